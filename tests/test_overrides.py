"""The users' limit overrides cache: read ahead in shared statements, never served older
than its time to live, and a change told meanwhile is not undone by a read in flight."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest

from proxy import limits
from proxy.ledger import Ledger
from proxy.limits import OverrideCache

TTL = 1.0  # seconds; the read ahead has half of it to come back (slack on a busy machine)


class Store:
    """The users table as the cache sees it: each user's overrides and when they were
    last changed, with the statements made."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.changed: dict[str, float] = {}
        self.alone: list[str] = []
        self.shared: list[list[str]] = []
        self.whole = 0  # reads of the paywall whole
        self.delays: list[float] = []  # the paywall reads' delays, in turn (else delay)
        self.fail = False  # the shared read fails
        self.fail_alone = False  # the read alone fails
        self.delay = 0.0
        self.reading = asyncio.Event()  # a shared read has begun

    def set(self, user: str, value: dict[str, Any]) -> None:
        self.values[user] = value
        self.changed[user] = time.monotonic()

    async def load(self, paywall_id: str, user: str) -> dict[str, Any]:
        self.alone.append(user)
        read = dict(self.values.get(user, {}))
        if self.delay:
            self.reading.set()
            await asyncio.sleep(self.delay)
        if self.fail_alone:
            raise ConnectionError("the database went away")
        return read

    async def load_many(self, paywall_id: str, users: list[str]) -> dict[str, dict[str, Any]]:
        self.shared.append(sorted(users))
        self.reading.set()
        read = {u: dict(self.values[u]) for u in users if u in self.values}
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("the database went away")
        return read

    async def load_paywall(self, paywall_id: str, most: int
                           ) -> dict[str, dict[str, Any]] | None:
        self.whole += 1
        read = {u: dict(v) for u, v in self.values.items() if v}
        delay = self.delays.pop(0) if self.delays else self.delay
        if delay:
            self.reading.set()
            await asyncio.sleep(delay)
        if self.fail:
            raise ConnectionError("the database went away")
        return None if len(read) > most else read


def whole(store: Store, most: int = 100, ttl: float = TTL) -> OverrideCache:
    """A cache that reads the store's paywall whole, user by user past ``most``."""
    return OverrideCache(store.load, ttl, load_many=store.load_many,
                         load_paywall=store.load_paywall, paywall_size=most)


async def test_users_seen_steadily_are_read_ahead_together_and_never_served_stale() -> None:
    store = Store()
    users = [f"u{i}" for i in range(20)]
    for u in users:
        store.set(u, {"rpm": 1})
    cache = OverrideCache(store.load, TTL, load_many=store.load_many)
    try:
        deadline = time.monotonic() + 3 * TTL
        n = 0
        while time.monotonic() < deadline:
            for u in users:
                if n == 100:  # a change no one tells the cache of: seen within TTL
                    store.set("u3", {"rpm": 2})
                got = await cache.get("pw", u)
                if u == "u3" and got == {"rpm": 1}:
                    assert time.monotonic() - store.changed["u3"] < TTL or n < 100
                n += 1
            await asyncio.sleep(0.005)
        assert await cache.get("pw", "u3") == {"rpm": 2}
    finally:
        await cache.aclose()
    assert sorted(store.alone) == sorted(users)  # each read alone once: the first time
    assert store.shared and all(len(batch) > 1 for batch in store.shared)
    assert cache.reads_ahead == len(store.shared)


async def test_a_change_told_while_a_read_ahead_is_in_flight_is_not_undone() -> None:
    store = Store()
    store.set("u", {"rpm": 1})
    cache = OverrideCache(store.load, TTL, load_many=store.load_many)
    try:
        assert await cache.get("pw", "u") == {"rpm": 1}
        await asyncio.sleep(TTL * 0.6)  # into the second half of its life
        store.delay = 0.2
        assert await cache.get("pw", "u") == {"rpm": 1}  # starts a read ahead
        await store.reading.wait()
        store.set("u", {"rpm": 5})  # the user API changes it, and tells the cache
        cache.forget("pw", "u")
        assert await cache.get("pw", "u") == {"rpm": 5}
        await asyncio.sleep(0.3)  # the read ahead, begun before the change, is back
        assert await cache.get("pw", "u") == {"rpm": 5}
    finally:
        await cache.aclose()


async def test_a_failed_read_ahead_leaves_entries_to_end_and_be_read_alone() -> None:
    store = Store()
    store.set("u", {"rpm": 1})
    store.fail = True
    cache = OverrideCache(store.load, TTL, load_many=store.load_many)
    try:
        await cache.get("pw", "u")
        await asyncio.sleep(TTL * 0.6)
        await cache.get("pw", "u")  # a read ahead, which fails
        store.set("u", {"rpm": 7})
        await asyncio.sleep(TTL * 0.5)  # past the entry's end
        assert await cache.get("pw", "u") == {"rpm": 7}
    finally:
        await cache.aclose()
    assert store.alone == ["u", "u"]


async def test_the_shared_read_answers_each_user_as_the_lone_read_does(database_url: str
                                                                       ) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        ledger = Ledger(pool, hold_ttl=3600)
        paywall = f"pw-{uuid.uuid4().hex[:12]}"
        limited, blocked, plain, absent = (f"user-{uuid.uuid4().hex}" for _ in range(4))
        await ledger.set_limits(paywall, limited, {"concurrency": 3}, [])
        await ledger.set_limits(paywall, blocked, {"requests_per_minute": 9}, [])
        await ledger.block(paywall, blocked, True)
        await ledger.open_user(paywall, plain, assets={"usd"}, grants={"usd": 0})
        users = [limited, blocked, plain, absent]
        many = await ledger.limits_of_many(paywall, users)
        alone = {u: await ledger.limits_of(paywall, u) for u in users}
        assert {u: many.get(u, {}) for u in users} == alone
        assert alone[limited] == {"concurrency": 3}
        assert alone[blocked] == {"requests_per_minute": 9, "blocked": True}
        assert alone[plain] == {} and absent not in many
        assert await ledger.limits_of_many(f"pw-{uuid.uuid4().hex[:12]}", users) == {}
    finally:
        await pool.close()


def slow(value: dict[str, Any], delay: float) -> tuple[Store, OverrideCache]:
    """A cache over a store holding ``value`` for "u", whose reads take ``delay``."""
    store = Store()
    store.set("u", value)
    store.delay = delay
    return store, OverrideCache(store.load, TTL)


async def test_a_burst_of_misses_for_one_user_is_one_read() -> None:
    store, cache = slow({"rpm": 3}, 0.05)
    try:
        got = await asyncio.gather(*(cache.get("pw", "u") for _ in range(200)),
                                   cache.get("pw", "other"))
    finally:
        await cache.aclose()
    assert got == [{"rpm": 3}] * 200 + [{}]
    assert sorted(store.alone) == ["other", "u"]


async def change_told_during_a_read(store: Store, cache: OverrideCache) -> None:
    """u is {"rpm": 1} and is read slowly: a change told meanwhile is what the requests
    after it get, and the read begun before it is not kept."""
    before = asyncio.get_running_loop().create_task(cache.get("pw", "u"))
    await store.reading.wait()
    store.set("u", {"rpm": 5})  # the user API changes it, and tells the cache
    cache.forget("pw", "u")
    assert await cache.get("pw", "u") == {"rpm": 5}
    assert await before == {"rpm": 1}  # asked before the change: the read it joined
    assert await cache.get("pw", "u") == {"rpm": 5}  # the older read was not kept


async def test_a_change_told_while_a_shared_read_is_in_flight_is_read_again() -> None:
    store, cache = slow({"rpm": 1}, 0.1)
    try:
        await change_told_during_a_read(store, cache)
    finally:
        await cache.aclose()
    assert store.alone == ["u", "u"]


async def test_a_waiter_cancelled_leaves_the_shared_read_to_the_others() -> None:
    store, cache = slow({"rpm": 2}, 0.1)
    try:
        first = asyncio.get_running_loop().create_task(cache.get("pw", "u"))
        await store.reading.wait()
        second = asyncio.get_running_loop().create_task(cache.get("pw", "u"))
        await asyncio.sleep(0)
        first.cancel()
        assert await second == {"rpm": 2}
        assert await cache.get("pw", "u") == {"rpm": 2}  # kept: no read of its own
    finally:
        await cache.aclose()
    assert first.cancelled()
    assert store.alone == ["u"]


async def test_a_failed_shared_read_fails_its_waiters_and_the_next_miss_reads_again() -> None:
    store, cache = slow({"rpm": 4}, 0.05)
    store.fail_alone = True
    try:
        got = await asyncio.gather(*(cache.get("pw", "u") for _ in range(3)),
                                   return_exceptions=True)
        assert [type(g) for g in got] == [ConnectionError] * 3
        store.fail_alone = False
        assert await cache.get("pw", "u") == {"rpm": 4}
    finally:
        await cache.aclose()
    assert store.alone == ["u", "u"]


async def test_users_each_seen_once_cost_no_read_of_their_own_when_the_paywall_is_read_whole(
        ) -> None:
    store = Store()
    store.set("u7", {"rpm": 7})
    store.set("u9", {"blocked": True})
    cache = whole(store)
    try:
        got = await asyncio.gather(*(cache.get("pw", f"u{i}") for i in range(1_000)))
    finally:
        await cache.aclose()
    assert got[7] == {"rpm": 7} and got[9] == {"blocked": True}
    assert got.count({}) == 998
    assert store.alone == [] and store.whole == 1


async def test_a_paywall_read_whole_is_read_ahead_and_never_served_stale() -> None:
    store = Store()
    store.set("u3", {"rpm": 1})
    cache = whole(store)
    try:
        deadline = time.monotonic() + 3 * TTL
        n = 0
        while time.monotonic() < deadline:
            if n == 100:  # a change no one tells the cache of: seen within TTL
                store.set("u3", {"rpm": 2})
            got = await cache.get("pw", f"u{n % 50}" if n % 7 else "u3")
            if n % 7 == 0 and got == {"rpm": 1}:
                assert n < 100 or time.monotonic() - store.changed["u3"] < TTL
            n += 1
            await asyncio.sleep(0.005)
        assert await cache.get("pw", "u3") == {"rpm": 2}
    finally:
        await cache.aclose()
    assert store.alone == []
    assert store.whole >= 3 and cache.reads_ahead >= 2  # ahead of need, not after


async def test_a_change_told_while_the_paywall_is_read_is_read_again() -> None:
    store = Store()
    store.set("u", {"rpm": 1})
    store.delays = [0.3, 0.05]  # the read begun before the change ends last
    cache = whole(store)
    try:
        await change_told_during_a_read(store, cache)
    finally:
        await cache.aclose()
    assert store.whole == 2


async def test_a_change_told_while_the_paywall_is_read_ahead_is_not_undone() -> None:
    store = Store()
    store.set("u", {"rpm": 1})
    cache = whole(store)
    try:
        assert await cache.get("pw", "u") == {"rpm": 1}
        await asyncio.sleep(TTL * 0.6)  # into the second half of its life
        store.delays = [0.3, 0.05]  # the read ahead, begun before the change, ends last
        assert await cache.get("pw", "u") == {"rpm": 1}  # starts a read ahead
        await store.reading.wait()
        store.set("u", {"rpm": 5})
        cache.forget("pw", "u")
        assert await cache.get("pw", "u") == {"rpm": 5}
        await asyncio.sleep(0.4)  # the read ahead is back
        assert store.whole == 3
        assert await cache.get("pw", "u") == {"rpm": 5}
    finally:
        await cache.aclose()


async def test_a_failed_read_ahead_of_the_paywall_ends_it_and_the_next_request_reads_again(
        ) -> None:
    store = Store()
    store.set("u", {"rpm": 1})
    ttl = 3 * TTL  # its back-off, ttl / 10, outlasts the loop below on a busy machine
    cache = whole(store, ttl=ttl)
    try:
        await cache.get("pw", "u")
        await asyncio.sleep(ttl * 0.6)
        store.fail = True
        await cache.get("pw", "u")  # a read ahead, which fails
        await asyncio.sleep(0.05)
        for _ in range(20):  # none tried again at once, on every request
            await cache.get("pw", "u")
            await asyncio.sleep(0.001)  # (time for one tried to fail)
        assert store.whole == 2
        store.fail = False
        store.set("u", {"rpm": 7})
        await asyncio.sleep(ttl * 0.5)  # past its end
        assert await cache.get("pw", "u") == {"rpm": 7}
    finally:
        await cache.aclose()
    assert store.whole == 3 and store.alone == []


async def test_a_paywall_with_too_many_overrides_is_read_user_by_user() -> None:
    store = Store()
    for i in range(5):
        store.set(f"u{i}", {"rpm": i + 1})
    cache = whole(store, most=4)
    try:
        got = [await cache.get("pw", f"u{i}") for i in range(6)]
        assert [await cache.get("pw", f"u{i}") for i in range(6)] == got  # kept
    finally:
        await cache.aclose()
    assert got == [{"rpm": i + 1} for i in range(5)] + [{}]
    assert store.whole == 1 and store.alone == [f"u{i}" for i in range(6)]


async def test_an_entry_that_ends_while_the_paywall_is_counted_is_not_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A paywall with too many overrides, asked again whether it still has: the user's
    entry that ended during that read is read again, not served."""
    monkeypatch.setattr(limits, "TOO_MANY_TTLS", 0.5)
    store = Store()
    for i in range(5):
        store.set(f"u{i}", {"rpm": 1})
    cache = whole(store, most=4)
    try:
        assert await cache.get("pw", "u0") == {"rpm": 1}  # kept until TTL from now
        store.set("u0", {"rpm": 2})  # a change no one tells the cache of
        await asyncio.sleep(TTL * 0.7)  # "too many" is to be asked again, u0 still kept
        store.delays = [TTL * 0.5]  # asked until past u0's end
        assert await cache.get("pw", "u0") == {"rpm": 2}
    finally:
        await cache.aclose()
    assert store.whole == 2 and store.alone == ["u0", "u0"]


async def test_the_paywall_read_whole_answers_each_user_as_the_lone_read_does(
        database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        ledger = Ledger(pool, hold_ttl=3600)
        paywall = f"pw-{uuid.uuid4().hex[:12]}"
        limited, blocked, cleared, plain, absent = (f"user-{uuid.uuid4().hex}"
                                                    for _ in range(5))
        await ledger.set_limits(paywall, limited, {"concurrency": 3}, [])
        await ledger.block(paywall, blocked, True)
        await ledger.set_limits(paywall, cleared, {"concurrency": 2}, [])
        await ledger.set_limits(paywall, cleared, {}, ["concurrency"])
        await ledger.open_user(paywall, plain, assets={"usd"}, grants={"usd": 0})
        users = [limited, blocked, cleared, plain, absent]
        read = await ledger.limits_of_paywall(paywall, 2)
        assert read is not None and set(read) == {limited, blocked}
        alone = {u: await ledger.limits_of(paywall, u) for u in users}
        assert {u: read.get(u, {}) for u in users} == alone
        assert await ledger.limits_of_paywall(paywall, 1) is None  # two have overrides
        assert await ledger.limits_of_paywall(f"pw-{uuid.uuid4().hex[:12]}", 1) == {}
    finally:
        await pool.close()
