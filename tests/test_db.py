from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from proxy import db
from proxy.ledger import Ledger


async def test_migrations_are_recorded_and_idempotent(database_url: str) -> None:
    assert await db.migrate(database_url) == []  # the fixture applied them all already
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in rows] == [
        (m.version, m.name) for m in db.migrations()
    ]


async def test_replicas_migrating_together_apply_each_migration_once(
        pg_server: str, tmp_path: Path) -> None:
    from tests.conftest import with_database

    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "0002_b.sql").write_text("SELECT pg_sleep(0.2); INSERT INTO a VALUES (1);")
    admin = await asyncpg.connect(pg_server)
    await admin.execute("CREATE DATABASE migrate_race")
    try:
        url = with_database(pg_server, "migrate_race")
        results = await asyncio.gather(*[db.migrate(url, tmp_path) for _ in range(4)])
        assert sorted(map(tuple, results)) == [(), (), (), ("0001_a.sql", "0002_b.sql")]
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM a") == 1
        finally:
            await conn.close()
    finally:
        await admin.execute("DROP DATABASE migrate_race WITH (FORCE)")
        await admin.close()


def test_migration_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "1_bad.sql").write_text("")
    with pytest.raises(RuntimeError, match="NNNN_lower_snake"):
        db.migrations(tmp_path)
    (tmp_path / "1_bad.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0001_b.sql").write_text("")
    with pytest.raises(RuntimeError, match="share a number"):
        db.migrations(tmp_path)


async def test_a_pool_without_synchronous_commit_keeps_deposits_durable(
        database_url: str) -> None:


    fast = await db.create_pool(database_url, 1, 2, synchronous_commit=False)
    safe = await db.create_pool(database_url, 1, 2)
    try:
        assert await fast.fetchval("SHOW synchronous_commit") == "off"
        assert await safe.fetchval("SHOW synchronous_commit") == "on"
        async with fast.acquire() as conn, conn.transaction():
            await Ledger.durable(conn)
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await fast.fetchval("SHOW synchronous_commit") == "off"  # SET LOCAL ended
    finally:
        await fast.close()
        await safe.close()
