"""Spend caps in a batch (group commit): the holds, posts and voids of one moment, sent
together, must give every call the answer it gets when the calls run one by one, and
leave the same rows: windows, accounts, holds and entries.

Two paywalls get the same users, the same caps and the same random calls: one sends
each moment's calls together (one batch, as requests in flight at once), the other the
same calls one after another, each alone. Tight caps make holds refused by the
paywall's windows, by a user's and by the balance; posts beyond their hold, posts and
voids of resolved holds, and a call that fails its batch are in the mix."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from proxy.ledger import Ledger, SpendCap

ASSET = "usd"
USERS = ("u1", "u2", "u3", "u4")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


def caps_of(user: str, tight: int) -> list[SpendCap]:
    return [SpendCap("", "day", 900 + tight), SpendCap("", "month", 1_200 + tight),
            SpendCap(user, "day", 400), SpendCap(user, "month", 10_000)]


def moments(seed: int) -> list[list[tuple[Any, ...]]]:
    """Moments of 1 to 8 calls: ("hold", user, amount, tight), ("post", k, cost) and
    ("void", k) naming the k-th hold of earlier moments (resolved or not), and
    ("bad", k): a post the database refuses (a negative cost), failing its batch."""
    rng = random.Random(seed)
    out: list[list[tuple[Any, ...]]] = []
    holds = 0
    for _ in range(40):
        calls: list[tuple[Any, ...]] = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.choice(["hold"] * 5 + ["post"] * 3 + ["void", "bad"] if holds
                              else ["hold"])
            if kind == "hold":
                calls.append(("hold", rng.choice(USERS), rng.choice([0, 10, 50, 120, 300]),
                              rng.choice([0, 0, 500])))
            elif kind == "post":
                calls.append(("post", rng.randrange(holds), rng.choice([0, 5, 60, 150, 400])))
            else:
                calls.append((kind, rng.randrange(holds)))
        holds += sum(c[0] == "hold" for c in calls)
        out.append(calls)
    return out


async def replay(ledger: Ledger, paywall: str, seed: int, together: bool
                 ) -> tuple[list[Any], int]:
    """The answers to :func:`moments`, and how many of its batches a bad call fails."""
    failing = 0
    for user in USERS:
        await ledger.open_user(paywall, user, assets={ASSET}, grants={ASSET: 700})
    held: list[int | None] = []
    answers: list[Any] = []
    made = iter(range(10**6))  # the holds' request ids, in the order they are made

    def start(call: tuple[Any, ...]) -> Any:
        if call[0] == "hold":
            _, user, amount, tight = call
            return ledger.hold(paywall, user, ASSET, amount, request_id=f"r{next(made):04}",
                               model="m", require_connect=False, caps=caps_of(user, tight))
        hold_id = held[call[1]]
        if hold_id is None:
            return asyncio.sleep(0, "no hold")
        if call[0] == "post":
            return ledger.post(hold_id, call[2], None, "completed")
        if call[0] == "void":
            return ledger.void(hold_id)
        # What Ledger.post refuses before the database: sent as the statement would be.
        return ledger.batch.fetchrow("post", *(None,) * 10, hold_id, -1, 0, 0, 0, 0,
                                     "completed", "{}", None)

    for calls in moments(seed):
        sent = [c for c in calls if c[0] == "hold" or held[c[1]] is not None]
        failing += len(sent) > 1 and any(c[0] == "bad" for c in sent)
        if together:
            got = await asyncio.gather(*map(start, calls), return_exceptions=True)
        else:
            got = []
            for call in calls:
                try:
                    got.append(await start(call))
                except Exception as e:
                    got.append(e)
        for call, answer in zip(calls, got, strict=True):
            if isinstance(answer, BaseException):
                answers.append(type(answer).__name__)
                continue
            if call[0] == "hold":
                held.append(answer.hold_id)
                answer = (answer.hold_id is not None, answer.available, answer.balance,
                          answer.cap)
            answers.append(answer)
    return answers, failing


async def books(pool: asyncpg.Pool, paywall: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the paywall has, without ids and times."""
    return {
        "windows": [tuple(r) for r in await pool.fetch(
            "SELECT scope, period, spent, held FROM spend_windows WHERE paywall_id = $1"
            " ORDER BY scope, period", paywall)],
        "accounts": [tuple(r) for r in await pool.fetch(
            "SELECT user_id, balance, held, owed FROM accounts WHERE paywall_id = $1"
            " ORDER BY user_id", paywall)],
        "holds": [tuple(r) for r in await pool.fetch(
            "SELECT a.user_id, h.request_id, h.amount, h.status FROM holds h"
            " JOIN accounts a ON a.id = h.account_id WHERE a.paywall_id = $1"
            " ORDER BY h.request_id", paywall)],
        "entries": [tuple(r) for r in await pool.fetch(
            "SELECT a.user_id, e.kind, e.amount, e.balance_after, e.request_id, e.metadata"
            " FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 ORDER BY e.id", paywall)],
    }


@pytest.mark.parametrize("seed", range(6))
async def test_a_batch_answers_and_writes_as_its_calls_one_by_one(
        pool: asyncpg.Pool, seed: int) -> None:
    batched, alone = Ledger(pool, 3600), Ledger(pool, 3600)
    run = uuid.uuid4().hex[:8]
    today = "SELECT (now() AT TIME ZONE 'UTC')::date"
    began = await pool.fetchval(today)
    together, failing = await replay(batched, f"pw-together-{run}", seed, together=True)
    one_by_one, _ = await replay(alone, f"pw-alone-{run}", seed, together=False)
    if await pool.fetchval(today) != began:  # the windows of the two runs differ
        pytest.skip("a day ended between the two runs")
    assert together == one_by_one
    assert batched.batch.batches < alone.batch.batches  # the moments were batched
    assert batched.batch.refused == failing  # and only a bad call made one run alone
    assert await books(pool, f"pw-together-{run}") == await books(pool, f"pw-alone-{run}")
    caps = [a for a in together if isinstance(a, tuple) and a[3] is not None]
    assert {c[3].name for c in caps} >= {"paywall_daily", "user_daily"}, caps
    assert "RaiseError" in together and failing > 0
