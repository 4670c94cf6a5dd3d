"""Group commit against a real PostgreSQL: calls made at the same moment go as one
batch, one commit; each call still gets exactly its own answer or its own error."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from proxy import db
from proxy.batcher import GroupCommit
from proxy.errors import DatabaseUnavailable


@pytest.fixture
async def table(database_url: str) -> AsyncIterator[tuple[db.Database, str]]:
    """A pool (as the proxy has it) and a table of its own: ``n`` unique; the statement
    under test inserts ``n`` and answers 100 / n, so n = 0 is a refused call."""
    pool = await db.create_pool(database_url, 1, 4)
    name = f"batch_{uuid.uuid4().hex[:12]}"
    await pool.execute(f"CREATE TABLE {name} (n int PRIMARY KEY)")
    try:
        yield pool, name
    finally:
        await pool.execute(f"DROP TABLE {name}")
        await pool.close()


def inserting(pool: Any, name: str, max_batch: int = 64) -> GroupCommit:
    return GroupCommit(pool, f"WITH i AS (INSERT INTO {name} VALUES ($1) RETURNING n)"
                             " SELECT 100 / n AS q FROM i", max_batch)


async def rows(pool: Any, name: str) -> list[int]:
    return [r["n"] for r in await pool.fetch(f"SELECT n FROM {name} ORDER BY n")]


async def test_calls_at_one_moment_are_one_batch_in_order(
        table: tuple[db.Database, str]) -> None:
    pool, name = table
    batch = inserting(pool, name)
    answers = await asyncio.gather(*(batch.fetchrow(n) for n in (1, 2, 4, 5)))
    assert [a["q"] for a in answers] == [100, 50, 25, 20]
    assert (batch.batches, batch.calls) == (1, 4)
    assert await rows(pool, name) == [1, 2, 4, 5]


async def test_a_call_alone_waits_for_no_other(table: tuple[db.Database, str]) -> None:
    pool, name = table
    batch = inserting(pool, name)
    for n in (1, 2, 3):
        assert (await batch.fetchrow(n))["q"] == 100 // n
    assert (batch.batches, batch.calls) == (3, 3)


async def test_a_refused_call_fails_alone_and_the_rest_commit_once(
        table: tuple[db.Database, str]) -> None:
    """n = 0 fails the batch (division by zero), and 2 twice is a unique violation:
    nothing of the batch is committed, then each call runs alone."""
    pool, name = table
    batch = inserting(pool, name)
    answers = await asyncio.gather(*(batch.fetchrow(n) for n in (1, 0, 2, 2, 5)),
                                   return_exceptions=True)
    assert [a["q"] if isinstance(a, asyncpg.Record) else type(a) for a in answers] == [
        100, asyncpg.DivisionByZeroError, 50, asyncpg.UniqueViolationError, 20]
    assert await rows(pool, name) == [1, 2, 5]  # each once: the failed batch left nothing


async def test_batches_are_bounded_and_follow_each_other(
        table: tuple[db.Database, str]) -> None:
    pool, name = table
    batch = inserting(pool, name, max_batch=10)
    answers = await asyncio.gather(*(batch.fetchrow(n) for n in range(1, 26)))
    assert [a["q"] for a in answers] == [100 // n for n in range(1, 26)]
    assert (batch.batches, batch.calls) == (3, 25)
    assert await rows(pool, name) == list(range(1, 26))


async def test_a_caller_that_stops_waiting_does_not_cancel_its_call(
        table: tuple[db.Database, str]) -> None:
    pool, name = table
    batch = inserting(pool, name)
    gone = asyncio.ensure_future(batch.fetchrow(7))  # noqa: TID251 -- awaited below
    await asyncio.sleep(0)  # the call is queued
    gone.cancel()
    assert (await batch.fetchrow(8))["q"] == 12
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await rows(pool, name) == [7, 8]


async def test_an_outage_fails_every_call_of_the_batch_as_unavailable(
        table: tuple[db.Database, str], database_url: str) -> None:
    _, name = table
    lost = await db.create_pool(database_url, 1, 1)
    await lost.close()
    batch = inserting(lost, name)
    answers = await asyncio.gather(*(batch.fetchrow(n) for n in (1, 2, 3)),
                                   return_exceptions=True)
    assert [type(a) for a in answers] == [DatabaseUnavailable] * 3
    assert len({id(a) for a in answers}) == 3  # each its own error
    assert all(a.__cause__ is not None for a in answers)
    await batch.aclose()


async def test_a_deferrable_call_rides_the_batch_the_next_call_starts(
        table: tuple[db.Database, str]) -> None:
    """A call no one waits on (a post after its answer) starts no batch: the next call
    that does takes it along, ahead of itself, in one commit."""
    pool, name = table
    batch = inserting(pool, name)
    batch.defer_seconds = 30  # only the next call can send it
    later = asyncio.ensure_future(batch.fetchrow(4, deferrable=True))  # noqa: TID251
    await asyncio.sleep(0.05)
    assert not later.done() and batch.batches == 0
    assert (await batch.fetchrow(5))["q"] == 20
    assert (await later)["q"] == 25
    assert (batch.batches, batch.calls) == (1, 2)
    assert await rows(pool, name) == [4, 5]


async def test_a_deferrable_call_alone_leaves_after_its_delay(
        table: tuple[db.Database, str]) -> None:
    pool, name = table
    batch = inserting(pool, name)
    batch.defer_seconds = 0.05
    started = asyncio.get_running_loop().time()
    assert (await batch.fetchrow(2, deferrable=True))["q"] == 50
    assert asyncio.get_running_loop().time() - started >= 0.05
    assert (batch.batches, batch.calls) == (1, 1)


async def test_closing_sends_what_is_deferred_at_once(
        table: tuple[db.Database, str]) -> None:
    pool, name = table
    batch = inserting(pool, name)
    batch.defer_seconds = 30
    later = asyncio.ensure_future(batch.fetchrow(10, deferrable=True))  # noqa: TID251
    await asyncio.sleep(0)
    await asyncio.wait_for(batch.aclose(), 5)
    assert (await asyncio.wait_for(later, 1))["q"] == 10  # not after its 30 s
    assert await rows(pool, name) == [10]
