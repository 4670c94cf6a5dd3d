from __future__ import annotations

import asyncio
import re

import asyncpg

from proxy.keys import KEY_PREFIX, KeyStore, bearer_token, digest, new_key


def test_key_format() -> None:
    keys = {new_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert re.fullmatch(KEY_PREFIX + r"[A-Za-z0-9]{32}", key)  # 32 of 62 symbols: > 128 bits


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


async def test_store_keeps_only_digests_and_revocation_is_prompt(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        store = KeyStore(pool, cache_seconds=0.3)
        key, record = await store.create("app", "ci")
        stored = await pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", record.id)
        assert key not in str(dict(stored)) and stored["digest"] == digest(key)
        assert record.prefix == key[:12]

        principal = await store.authenticate(key)
        assert principal is not None and principal.paywall_id == "app"
        assert await store.authenticate(key + "x") is None
        assert [r.id for r in await store.list("app")] [-1] == record.id

        assert not await store.revoke("other", record.id)  # not that paywall's key
        assert await store.revoke("app", record.id)
        assert not await store.revoke("app", record.id)
        assert await store.authenticate(key) is not None  # cached for a moment...
        await asyncio.sleep(0.35)
        assert await store.authenticate(key) is None  # ...then refused
    finally:
        await pool.close()


class CountingPool:
    """A pool that counts its ``fetchrow`` statements."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        self.fetched = 0

    async def fetchrow(self, query: str, *args: object) -> object:
        self.fetched += 1
        return await self.pool.fetchrow(query, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.pool, name)


async def test_a_burst_of_requests_with_a_key_not_cached_is_one_lookup(
        database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        key, _ = await KeyStore(pool).create("app-burst")
        counting = CountingPool(pool)
        store = KeyStore(counting, cache_seconds=5)
        found = await asyncio.gather(*(store.authenticate(key) for _ in range(100)),
                                     store.authenticate(key + "x"))
        assert {p.paywall_id if p else None for p in found[:100]} == {"app-burst"}
        assert found[100] is None
        assert counting.fetched == 2  # one lookup a key, however many asked at once
        await store.authenticate(key)
        assert counting.fetched == 2  # and then cached
    finally:
        await pool.close()
