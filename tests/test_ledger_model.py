"""The ledger against a model: random sequences of deposits, withdrawals, holds,
posts, voids, renewals, expiries and reaps, checked after every step against the
database and a plain Python model of balances and holds."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter, defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from proxy import db
from proxy.decide import UserState
from proxy.ledger import IdempotencyConflict, InsufficientFunds, Ledger, Posted, Stored
from proxy.pricing import Usage

T = TypeVar("T")

USERS = ("alice", "bob", "carol")  # carol is not opened at first
ASSETS = ("usd", "credits")
GRANT_ASSET = "usd"
LIVE_TTL = 3600.0  # holds that stay live for the whole test
EXPIRED_TTL = -1.0  # holds placed or renewed already past their expiry

users = st.sampled_from(USERS[:2]) | st.sampled_from(USERS)
assets = st.sampled_from(ASSETS)
checkpoints = st.none() | st.fixed_dictionaries({
    "cost": st.integers(0, 200),
    "prompt_tokens": st.integers(0, 100),
    "completion_tokens": st.integers(0, 100),
})
usages = st.none() | st.builds(Usage, st.integers(0, 1000), st.integers(0, 1000))


@dataclass
class ModelHold:
    account: tuple[str, str]
    amount: int
    status: str = "pending"
    expired: bool = False
    checkpoint: dict[str, int] | None = None
    charged: int | None = None
    outcome: str | None = None
    resolved_at: datetime | None = None  # as first seen in the database


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, url: str):
        super().__init__()
        # One event loop of the machine's own drives the async ledger.
        self.loop = asyncio.new_event_loop()
        try:
            self.pool = self.run(self.connect(url))
        except BaseException:
            self.loop.close()
            raise
        self.ledger = Ledger(self.pool, LIVE_TTL)
        self.expiring = Ledger(self.pool, EXPIRED_TTL)
        self.paywall = f"model-{uuid.uuid4().hex}"
        self.users: set[str] = set()
        self.connected: set[str] = set()
        self.versions: dict[str, int] = {}  # connection versions
        self.granted: set[str] = set()  # users whose starter grant was written
        self.accounts: dict[tuple[str, str], list[int]] = {}  # -> [balance, held]
        self.holds: dict[int, ModelHold] = {}

    @staticmethod
    async def connect(url: str) -> Any:
        # Created in a coroutine, so the pool belongs to the loop that runs it.
        return await asyncpg.create_pool(url, min_size=1, max_size=2)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            # Leave no expired hold behind for the next example's reap to count.
            self.run(self.ledger.reap(10_000))
        finally:
            try:
                self.run(self.pool.close())
            finally:
                self.loop.close()

    def available(self, user: str, asset: str) -> int:
        acct = self.accounts.get((user, asset))
        return acct[0] - acct[1] if acct else 0

    def pending(self) -> list[int]:
        return sorted(h for h, m in self.holds.items() if m.status == "pending")

    def resolved(self) -> list[int]:
        return sorted(h for h, m in self.holds.items() if m.status != "pending")

    # --- users and money in/out ------------------------------------------------------

    @initialize(grants=st.lists(st.integers(100, 1000), min_size=2, max_size=2),
                credits=st.integers(100, 1000))
    def open_users(self, grants: list[int], credits: int) -> None:
        for user, grant in zip(USERS[:2], grants, strict=True):
            self.open_user(user, grant, set(ASSETS))
        self.deposit(USERS[0], "credits", credits, "topup", "transaction")

    @rule(user=users, grant=st.integers(0, 300),
          wanted=st.sets(assets, min_size=1))
    def open_user(self, user: str, grant: int, wanted: set[str]) -> None:
        self.run(self.ledger.open_user(self.paywall, user, assets=wanted,
                                       grants={GRANT_ASSET: grant}))
        # The starter grant is written the first time a user is opened, however the
        # user came to exist (a deposit, a connect, an earlier open with no grant).
        first = user not in self.granted
        self.granted.add(user)
        self.users.add(user)
        for asset in wanted | ({GRANT_ASSET} if grant > 0 else set()):
            self.accounts.setdefault((user, asset), [0, 0])
        if first and grant > 0:
            self.accounts[(user, GRANT_ASSET)][0] += grant

    @rule(user=users, connected=st.booleans(), stale=st.booleans())
    def set_connected(self, user: str, connected: bool, stale: bool) -> None:
        """Connect with a link of the user's connection version (or of an older one,
        which a disconnect retired), or disconnect."""
        current = self.versions.get(user, 0)
        if not connected:
            self.run(self.ledger.disconnect(self.paywall, user))
            self.versions[user] = current + 1
            self.users.add(user)
            self.connected.discard(user)
            return
        version = current - 1 if stale and current > 0 else current
        done = self.run(self.ledger.connect(self.paywall, user, version))
        assert done == (version == current)
        assert self.run(self.ledger.connect_version(self.paywall, user)) == current
        if done:
            self.users.add(user)
            self.connected.add(user)

    @rule(user=users, asset=assets, amount=st.integers(0, 500),
          kind=st.sampled_from(["deposit", "topup"]),
          how=st.sampled_from(["idempotent", "retried", "conflicting", "transaction"]))
    def deposit(self, user: str, asset: str, amount: int, kind: str, how: str) -> None:
        key = f"key-{uuid.uuid4()}"
        calls: list[int] = []

        async def write(conn: Any) -> Stored:
            calls.append(amount)
            balance = await Ledger.move(conn, self.paywall, user, asset, amount, kind,
                                        request_id=None, idempotency_key=key,
                                        metadata={"how": how})
            return Stored(201, orjson.dumps({"balance": balance}))

        async def directly() -> int:
            async with self.pool.acquire() as conn, conn.transaction():
                return await Ledger.move(conn, self.paywall, user, asset, amount, kind,
                                         request_id=None, idempotency_key=None, metadata={})

        expected = (self.accounts[(user, asset)][0] if (user, asset) in self.accounts
                    else 0) + amount
        body = {"user": user, "asset": asset, "amount": amount, "kind": kind}
        if how == "transaction":
            assert self.run(directly()) == expected
        else:
            stored = self.run(self.ledger.idempotent(self.paywall, key, body, write))
            assert stored == Stored(201, orjson.dumps({"balance": expected}))
            if how == "retried":
                assert self.run(self.ledger.idempotent(self.paywall, key, body, write)) == stored
            elif how == "conflicting":
                with pytest.raises(IdempotencyConflict):
                    self.run(self.ledger.idempotent(self.paywall, key,
                                                    {**body, "amount": amount + 1}, write))
            assert calls == [amount]
        self.users.add(user)
        self.accounts.setdefault((user, asset), [0, 0])[0] += amount

    @rule(user=users, asset=assets, amount=st.integers(1, 200))
    def withdraw(self, user: str, asset: str, amount: int) -> None:
        async def take() -> int:
            async with self.pool.acquire() as conn, conn.transaction():
                return await Ledger.move(conn, self.paywall, user, asset, -amount,
                                         "adjustment", request_id=None,
                                         idempotency_key=None, metadata={})

        available = self.available(user, asset)
        if available >= amount:
            acct = self.accounts[(user, asset)]
            assert self.run(take()) == acct[0] - amount
            acct[0] -= amount
        else:  # refused, and the transaction (with any account it created) rolled back
            with pytest.raises(InsufficientFunds) as raised:
                self.run(take())
            assert raised.value.available == available

    # --- holds -----------------------------------------------------------------------

    @rule(user=users, asset=assets, amount=st.integers(0, 120),
          require_connect=st.sampled_from([False, False, True]),
          expired=st.sampled_from([False, False, True]))
    def hold(self, user: str, asset: str, amount: int, require_connect: bool,
             expired: bool) -> None:
        ledger = self.expiring if expired else self.ledger
        self.held(self.run(self.hold_of(ledger, user, asset, amount, require_connect)),
                  user, asset, amount, require_connect, expired)

    def hold_of(self, ledger: Ledger, user: str, asset: str, amount: int,
                require_connect: bool) -> Coroutine[Any, Any, UserState]:
        return ledger.hold(self.paywall, user, asset, amount,
                           request_id=f"req-{uuid.uuid4()}", model="m",
                           require_connect=require_connect)

    def held(self, state: UserState, user: str, asset: str, amount: int,
             require_connect: bool, expired: bool) -> None:
        """Check a hold's answer against the model, and apply it there."""
        acct = self.accounts.get((user, asset))
        assert state.exists == (user in self.users)
        assert state.connected == (user in self.connected)
        assert state.has_account == (acct is not None)
        assert state.available == self.available(user, asset)
        fits = acct is not None and acct[0] - acct[1] >= amount
        if fits and (user in self.connected or not require_connect):
            assert acct is not None and state.hold_id is not None
            assert state.hold_id not in self.holds
            acct[1] += amount
            self.holds[state.hold_id] = ModelHold((user, asset), amount, expired=expired)
        else:
            assert state.hold_id is None

    def chargeable(self, hold_id: int, cost: int) -> int:
        """What posting ``cost`` on the hold charges: up to the hold, plus what the
        account has available beyond it."""
        h = self.holds[hold_id]
        balance, held = self.accounts[h.account]
        return min(cost, h.amount + balance - held)

    def settle(self, hold_id: int, charge: int, outcome: str) -> int:
        h = self.holds[hold_id]
        acct = self.accounts[h.account]
        acct[0] -= charge
        acct[1] -= h.amount
        h.status, h.charged, h.outcome = "posted", charge, outcome
        return acct[0]

    def release(self, hold_id: int, status: str) -> None:
        h = self.holds[hold_id]
        self.accounts[h.account][1] -= h.amount
        h.status = status

    @precondition(lambda self: self.pending())
    @rule(data=st.data(), usage=usages)
    def post(self, data: st.DataObject, usage: Usage | None) -> None:
        hold_id = data.draw(st.sampled_from(self.pending()), label="hold")
        amount = data.draw(self.costs(hold_id), label="amount")
        self.posted(self.run(self.ledger.post(hold_id, amount, usage, "completed",
                                              {"note": "model"})), hold_id, amount)

    def costs(self, hold_id: int) -> st.SearchStrategy[int]:
        held = self.holds[hold_id].amount
        return st.integers(0, held) | st.integers(held, 2 * held + 10)

    def posted(self, posted: Posted | None, hold_id: int, amount: int) -> None:
        """Check a post's answer against the model, and apply it there."""
        if self.holds[hold_id].status != "pending":
            assert posted is None
            return
        charge = self.chargeable(hold_id, amount)
        assert posted == Posted(charge, self.settle(hold_id, charge, "completed"),
                                amount - charge)

    @precondition(lambda self: self.pending())
    @rule(data=st.data(), status=st.sampled_from(["voided", "expired"]))
    def void(self, data: st.DataObject, status: str) -> None:
        hold_id = data.draw(st.sampled_from(self.pending()), label="hold")
        self.voided(self.run(self.ledger.void(hold_id, status)), hold_id, status)

    def voided(self, done: bool, hold_id: int, status: str) -> None:
        assert done is (self.holds[hold_id].status == "pending")
        if done:
            self.release(hold_id, status)

    @rule(data=st.data(), size=st.integers(2, 8))
    def together(self, data: st.DataObject, size: int) -> None:
        """Holds, posts and voids made at the same moment by requests in flight: they
        go to PostgreSQL as one batch, one commit, and each answers exactly what it
        would alone, in the order the calls were made (two calls may name one hold)."""
        pending = self.pending()
        calls: list[tuple[Any, ...]] = []
        for i in range(size):
            kind = data.draw(st.sampled_from(["hold", "post", "void"] if pending
                                             else ["hold"]), label=f"call {i}")
            if kind == "hold":
                calls.append(("hold", data.draw(users, label="user"),
                              data.draw(assets, label="asset"),
                              data.draw(st.integers(0, 120), label="amount"),
                              data.draw(st.sampled_from([False, False, True]),
                                        label="require_connect")))
            else:
                hold_id = data.draw(st.sampled_from(pending), label="hold")
                calls.append((kind, hold_id, data.draw(self.costs(hold_id), label="cost")
                              if kind == "post" else
                              data.draw(st.sampled_from(["voided", "expired"]),
                                        label="status")))

        def start(call: tuple[Any, ...]) -> Coroutine[Any, Any, Any]:
            if call[0] == "hold":
                return self.hold_of(self.ledger, *call[1:])
            if call[0] == "post":
                return self.ledger.post(call[1], call[2], None, "completed")
            return self.ledger.void(call[1], call[2])

        async def all_at_once() -> list[Any]:
            return await asyncio.gather(*map(start, calls))

        batches = self.ledger.batch.batches
        answers = self.run(all_at_once())
        assert self.ledger.batch.batches == batches + 1  # one batch, one commit
        for call, answer in zip(calls, answers, strict=True):
            if call[0] == "hold":
                self.held(answer, *call[1:], expired=False)
            elif call[0] == "post":
                self.posted(answer, call[1], call[2])
            else:
                self.voided(answer, call[1], call[2])

    @precondition(lambda self: self.resolved())
    @rule(data=st.data(), amount=st.integers(0, 500),
          how=st.sampled_from(["post", "voided", "expired"]))
    def resolve_again(self, data: st.DataObject, amount: int, how: str) -> None:
        hold_id = data.draw(st.sampled_from(self.resolved()), label="hold")
        if how == "post":
            assert self.run(self.ledger.post(hold_id, amount, None, "completed")) is None
        else:
            assert self.run(self.ledger.void(hold_id, how)) is False

    @precondition(lambda self: self.pending())
    @rule(data=st.data(), expired=st.booleans())
    def renew(self, data: st.DataObject, expired: bool) -> None:
        """Renew some pending holds (and maybe a resolved one, which must not change),
        with or without a usage checkpoint; with ``expired`` the renewal sets an expiry
        in the past, as a tiny hold_ttl does."""
        ids = data.draw(st.lists(st.sampled_from(self.pending()), min_size=1, max_size=3,
                                 unique=True), label="holds")
        if self.resolved() and data.draw(st.booleans(), label="with a resolved hold"):
            ids.append(data.draw(st.sampled_from(self.resolved()), label="resolved"))
        cps = {i: data.draw(checkpoints, label=f"checkpoint {i}") for i in ids}
        self.run((self.expiring if expired else self.ledger).renew(cps))
        for i, cp in cps.items():
            h = self.holds[i]
            if h.status == "pending":
                h.checkpoint = cp if cp is not None else h.checkpoint
                h.expired = expired

    @precondition(lambda self: self.pending())
    @rule(data=st.data())
    def checkpoint_then_crash(self, data: st.DataObject) -> None:
        """A live stream reports its usage so far, then its process dies: the last
        renewal stores the checkpoint, and no renewal follows before the expiry."""
        hold_id = data.draw(st.sampled_from(self.pending()), label="hold")
        h = self.holds[hold_id]
        cp = {"cost": data.draw(st.integers(0, 2 * h.amount + 1), label="cost"),
              "prompt_tokens": 7, "completion_tokens": 11}
        self.run(self.ledger.renew({hold_id: cp}))
        h.checkpoint, h.expired = cp, False
        self.run(self.pool.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
            hold_id))
        h.expired = True

    @precondition(lambda self: self.pending())
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        """The process holding these died: their expiry passes (set directly)."""
        ids = data.draw(st.lists(st.sampled_from(self.pending()), min_size=1, max_size=3,
                                 unique=True), label="holds")
        self.run(self.pool.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second'"
            " WHERE id = any($1::bigint[])", ids))
        for i in ids:
            self.holds[i].expired = True

    def due(self) -> list[int]:
        return [i for i in self.pending() if self.holds[i].expired]

    @precondition(lambda self: self.due())
    @rule()
    def reap(self) -> None:
        # In the reaper's order: a charge beyond its hold takes from what the next finds.
        due = [r["id"] for r in self.run(self.pool.fetch(
            "SELECT id FROM holds WHERE id = ANY($1::bigint[]) ORDER BY expires_at, id",
            self.due()))]
        assert self.run(self.ledger.reap()) == len(due)
        for i in due:
            h = self.holds[i]
            cost = h.checkpoint["cost"] if h.checkpoint else 0
            if cost > 0:
                self.settle(i, self.chargeable(i, cost), "reaped")
            else:
                self.release(i, "expired")

    # --- the database agrees with the model ------------------------------------------

    async def snapshot(self) -> dict[str, list[asyncpg.Record]]:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            return {
                "users": await conn.fetch(
                    "SELECT user_id, connected_at IS NOT NULL AS connected FROM users"
                    " WHERE paywall_id = $1", self.paywall),
                "accounts": await conn.fetch(
                    "SELECT id, user_id, asset, balance, held FROM accounts"
                    " WHERE paywall_id = $1", self.paywall),
                "holds": await conn.fetch(
                    "SELECT h.id, h.account_id, h.amount, h.status, h.checkpoint,"
                    "  h.resolved_at, h.expires_at < now() AS expired"
                    " FROM holds h JOIN accounts a ON a.id = h.account_id"
                    " WHERE a.paywall_id = $1", self.paywall),
                "entries": await conn.fetch(
                    "SELECT e.id, e.account_id, e.kind, e.amount, e.balance_after, e.hold_id,"
                    "  e.outcome FROM entries e JOIN accounts a ON a.id = e.account_id"
                    " WHERE a.paywall_id = $1 ORDER BY e.id", self.paywall),
            }

    @invariant()
    def database_matches_model(self) -> None:
        snap = self.run(self.snapshot())
        assert {r["user_id"] for r in snap["users"]} == self.users
        assert {r["user_id"] for r in snap["users"] if r["connected"]} == self.connected

        accounts = {r["id"]: r for r in snap["accounts"]}
        assert {(r["user_id"], r["asset"]): [r["balance"], r["held"]]
                for r in accounts.values()} == self.accounts
        key_of = {i: (r["user_id"], r["asset"]) for i, r in accounts.items()}

        # Holds: the model's, in the state the model says; a resolved one never changes.
        holds = {r["id"]: r for r in snap["holds"]}
        assert set(holds) == set(self.holds)
        pending_sum: dict[int, int] = defaultdict(int)
        for hold_id, r in holds.items():
            m = self.holds[hold_id]
            assert (key_of[r["account_id"]], r["amount"], r["status"]) == (
                m.account, m.amount, m.status), hold_id
            cp = orjson.loads(r["checkpoint"]) if r["checkpoint"] else None
            if m.status == "pending":
                pending_sum[r["account_id"]] += r["amount"]
                assert r["resolved_at"] is None
                assert r["expired"] == m.expired
                assert cp == m.checkpoint
            elif m.resolved_at is None:
                assert r["resolved_at"] is not None
                m.resolved_at = r["resolved_at"]
            else:
                assert r["resolved_at"] == m.resolved_at

        # Entries: at most one per hold, and exactly the posted holds' charges.
        per_hold = Counter(e["hold_id"] for e in snap["entries"] if e["hold_id"] is not None)
        assert max(per_hold.values(), default=0) <= 1
        charges = {e["hold_id"]: (e["kind"], -e["amount"], e["outcome"])
                   for e in snap["entries"] if e["hold_id"] is not None}
        assert charges == {i: ("charge", m.charged, m.outcome)
                           for i, m in self.holds.items() if m.status == "posted"}

        # Accounts: held is the sum of pending holds, balance the fold of the entries.
        running: dict[int, int] = defaultdict(int)
        for e in snap["entries"]:
            running[e["account_id"]] += e["amount"]
            assert e["balance_after"] == running[e["account_id"]], e
        for account_id, r in accounts.items():
            assert r["balance"] - r["held"] >= 0
            assert r["held"] == pending_sum[account_id]
            assert r["balance"] == running[account_id]


def with_search_path(url: str, schema: str) -> str:
    """The URL with ``search_path`` set (asyncpg sends unknown query parameters as
    server settings)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, f"search_path={schema}") if q)
    return urlunsplit(parts._replace(query=query))


def test_ledger_matches_its_model(database_url: str) -> None:
    # The ledger's tables in a schema of this test's own: reap() resolves every expired
    # hold it can see, so no other test's holds (nor another reaper) may share them.
    schema = f"ledger_model_{secrets.token_hex(4)}"
    url = with_search_path(database_url, schema)
    loop = asyncio.new_event_loop()

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        loop.run_until_complete(admin(f"CREATE SCHEMA {schema}"))
        try:
            loop.run_until_complete(db.migrate(url))
            run_state_machine_as_test(
                lambda: LedgerMachine(url),
                settings=settings(max_examples=30, stateful_step_count=25, deadline=None,
                                  database=None),
            )
        finally:
            loop.run_until_complete(admin(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        loop.close()
