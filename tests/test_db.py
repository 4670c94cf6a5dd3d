from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from proxy import db
from proxy.ledger import Ledger
from tests.conftest import mint_keys, new_user, start_proxy, stop_proxy
from tests.forwarder import forwarding
from tests.upstream import Upstream


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


@pytest.mark.parametrize(("exc", "outage"), [
    (ConnectionRefusedError(111, "refused"), True),
    (ConnectionResetError(104, "reset"), True),
    (TimeoutError(), True),  # a connect or a statement past its timeout
    (asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"), True),
    (asyncpg.CannotConnectNowError("the database system is starting up"), True),
    (asyncpg.AdminShutdownError("terminating connection"), True),
    (asyncpg.TooManyConnectionsError("too many clients"), True),
    (asyncpg.InterfaceError("connection is closed"), True),
    # Answers, not outages: the statement was refused.
    (asyncpg.CheckViolationError("balance - held >= 0"), False),
    (asyncpg.UniqueViolationError("duplicate key"), False),
    (asyncpg.InterfaceError("another operation is in progress"), False),
    (ValueError("a bug"), False),
])
def test_what_counts_as_an_outage(exc: Exception, outage: bool) -> None:
    assert db.is_outage(exc) is outage


OUTAGE_CONFIG = """
[database]
connect_timeout = 1.0
command_timeout = 2.0

[providers.up]
kind = "openai"
base_url = "{url}"

[models.echo]
provider = "up"

[paywalls.down]
starter_grant = "1"
"""


async def test_a_database_outage_answers_503_at_once_without_calling_the_provider(
        upstream: Upstream, database_url: str, tmp_path: Path) -> None:
    """PostgreSQL out of reach: a completion answers 503 with Retry-After within a
    second or so (whether its key is cached or must be looked up), the provider is not
    called, and the log has one line for the request, no traceback."""
    config = tmp_path / "proxy.toml"
    config.write_text(OUTAGE_CONFIG.format(url=upstream.url))
    known = (await mint_keys(database_url, ["down"]))["down"]
    fresh = (await mint_keys(database_url, ["down"]))["down"]  # never looked up
    user = new_user("down")
    body = {"model": "echo", "user": user, "messages": [{"role": "user", "content": "Hi"}]}

    def forwarded() -> int:
        return sum(1 for s in list(upstream.seen) if s.body.get("user") == user)

    with forwarding(database_url) as fwd:
        proxy = await asyncio.to_thread(start_proxy, config, fwd.url(database_url), tmp_path)
        try:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
                ok = await http.post("/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {known}"})
                assert ok.status_code == 200, ok.text
                before = forwarded()
                fwd.cut()
                for key, rid in ((known, "req-outage-held"), (fresh, "req-outage-key")):
                    started = time.monotonic()
                    r = await http.post("/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {key}",
                                                 "X-Request-Id": rid})
                    assert time.monotonic() - started < 3  # about 1 s; the machine is busy
                    assert r.status_code == 503, r.text
                    assert r.headers["retry-after"] == "1"
                    assert r.json()["error"]["code"] == "database_unavailable"
                    assert r.json()["error"]["type"] == "server_error"
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"].startswith("unavailable")
                assert forwarded() == before
                await asyncio.sleep(0.3)
                log = proxy.output()
                for rid in ("req-outage-held", "req-outage-key"):
                    assert len([x for x in log.splitlines() if rid in x]) == 1, log
                assert "Traceback" not in log
                fwd.restore()

                async def served() -> bool:
                    r = await http.post("/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {known}"})
                    return r.status_code == 200

                deadline = time.monotonic() + 10
                while not await served():
                    assert time.monotonic() < deadline, "the database did not come back"
                    await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(stop_proxy, proxy)


@contextlib.asynccontextmanager
async def database_at(pg_server: str, name: str, version: int, tmp_path: Path
                      ) -> AsyncIterator[str]:
    """A new database ``name`` migrated up to ``version``, dropped on the way out."""
    from tests.conftest import admin, with_database

    for m in db.migrations():
        if m.version <= version:
            (tmp_path / m.name).write_text(m.sql)
    await admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin(pg_server, f"CREATE DATABASE {name}")
    url = with_database(pg_server, name)
    try:
        await db.migrate(url, tmp_path)
        yield url
    finally:
        await admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)")


async def test_upgrading_the_ledger_to_cheaper_checks_keeps_it(
        pg_server: str, tmp_path: Path) -> None:
    """0016-0018 turn holds.status and entries.kind into enum types and a window's period
    into a domain: a ledger written before them reads the same after them and goes on
    working, on a connection opened before the upgrade (a proxy still serving: its
    functions were compiled, its statements prepared, on the old types) as on a new one."""
    from proxy.ledger import SpendCap
    from tests.conftest import unbalanced_accounts

    caps = [SpendCap("u", "day", 10_000), SpendCap("", "month", 10_000)]

    async def use(ledger: Ledger, tag: str) -> None:
        """A hold posted, one voided, one expired, one left pending; and a new user."""
        held = [(await ledger.hold("pw", "u", "usd", 100, request_id=f"{tag}{i}",
                                   model="m", require_connect=False, caps=caps)).hold_id
                for i in range(4)]
        ids = [h for h in held if h is not None]
        assert len(ids) == 4
        assert await ledger.post(ids[0], 70, None, "ok") is not None
        assert await ledger.void(ids[1]) is True
        assert await ledger.void(ids[2], "expired") is True
        await ledger.open_user("pw", f"new-{tag}", assets={"usd"}, grants={"usd": 5})

    read = ("SELECT (SELECT array_agg(status::text || ':' || amount ORDER BY id)"
            "        FROM holds),"
            " (SELECT array_agg(kind::text || ':' || amount ORDER BY id) FROM entries),"
            " (SELECT array_agg(period::text || ':' || spent || ':' || held"
            "         ORDER BY period) FROM spend_windows)")
    async with database_at(pg_server, "migrate_checks", 15, tmp_path) as url:
        before_pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        after_pool = None
        try:
            old = Ledger(before_pool, hold_ttl=3600)
            await old.open_user("pw", "u", assets={"usd"}, grants={"usd": 1_000})
            await use(old, "a")
            before = tuple(await before_pool.fetchrow(read))
            assert before == (["posted:100", "voided:100", "expired:100", "pending:100"],
                              ["grant:1000", "charge:-70", "grant:5"],
                              ["day:70:100", "month:70:100"])

            applied = await db.migrate(url)  # the pool's one connection stays open
            assert applied[:3] == ["0016_hold_statuses_as_an_enum.sql",
                                   "0017_entry_kinds_as_an_enum.sql",
                                   "0018_spend_periods_checked_where_written.sql"]
            after_pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
            assert tuple(await after_pool.fetchrow(read)) == before
            assert tuple(await after_pool.fetchrow(
                "SELECT (SELECT pg_typeof(status)::text FROM holds LIMIT 1),"
                " (SELECT pg_typeof(kind)::text FROM entries LIMIT 1),"
                " (SELECT pg_typeof(period)::text FROM spend_windows LIMIT 1)")) == (
                    "hold_status", "entry_kind", "spend_period")

            await use(old, "b")  # on the connection opened before the upgrade
            await use(Ledger(after_pool, hold_ttl=3600), "c")
            holds, kinds, windows = await after_pool.fetchrow(read)
            assert holds == before[0] * 3
            assert kinds == (["grant:1000", "charge:-70", "grant:5"]
                             + ["charge:-70", "grant:5"] * 2)
            assert windows == ["day:210:300", "month:210:300"]
            assert await unbalanced_accounts(url) == []
        finally:
            await before_pool.close()
            if after_pool is not None:
                await after_pool.close()


async def test_a_migration_after_0015_writes_at_most_one_table(
        pg_server: str, tmp_path: Path) -> None:
    """Requests lock the ledger's tables in more than one order (a hold: accounts, then
    holds; a post: holds, then accounts), so a migration that locked two of them beyond
    reading, while a proxy of the release before kept serving, could deadlock with a
    request and fail. From 0016 on, each locks one table so."""
    later = [m for m in db.migrations() if m.version > 15]
    async with database_at(pg_server, "migrate_locks", 15, tmp_path) as url:
        conn = await asyncpg.connect(url)
        try:
            locked = {}
            for m in later:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    locked[m.name] = {r["relname"] for r in await conn.fetch(
                        "SELECT c.relname FROM pg_locks l JOIN pg_class c"
                        " ON c.oid = l.relation WHERE l.pid = pg_backend_pid()"
                        " AND c.relkind IN ('r', 'p') AND l.mode <> 'AccessShareLock'"
                        " AND c.relnamespace = 'public'::regnamespace")}  # not catalogs
                    await conn.execute("INSERT INTO schema_migrations (version, name)"
                                       " VALUES ($1, $2)", m.version, m.name)
        finally:
            await conn.close()
        assert locked and all(len(tables) <= 1 for tables in locked.values()), locked
        assert await db.migrate(url) == []  # as migrate() would have applied them


def test_the_migrations_leave_a_new_databases_ledger_tables_unanalyzed(
        pg_server: str) -> None:
    """A migration that gathers statistics again after retyping a column must not do so
    on an empty table: told "empty", the planner of a cached plan scanned spend_windows
    whole at every capped request as it filled (five times the PostgreSQL CPU a request
    at c=64 in bench/run.py), where a table never analyzed is read by its index."""
    from tests.conftest import fresh_database

    async def analyzed(url: str) -> list[str]:
        conn = await asyncpg.connect(url)
        try:
            return [r["relname"] for r in await conn.fetch(
                "SELECT relname FROM pg_class WHERE relname = ANY($1::text[])"
                " AND reltuples >= 0", ["holds", "entries", "spend_windows"])]
        finally:
            await conn.close()

    with fresh_database(pg_server) as url:
        assert asyncio.run(analyzed(url)) == []
