"""The ledger: the one path by which money moves.

Every write to users' balances, holds and entries is a statement in this module,
run as a single statement or in one explicit transaction, so a balance always
equals the fold of its entries. The database's constraints are the backstop:
``balance - held >= 0``, a hold leaves ``pending`` at most once, an entry per hold
at most, entries never change.

Two-phase charging (as in TigerBeetle's pending transfers):

- :meth:`Ledger.hold` reserves the worst case within the balance and the spend caps
  (``paywall_hold``: conditional UPDATEs in one transaction, one round trip);
- :meth:`Ledger.post` charges the actual cost and releases the hold,
  :meth:`Ledger.void` releases it all. The hold bounds the cost as well as the proxy
  can estimate it; should the provider still bill more, the charge exceeds the hold
  by at most what the balance has available beyond it (``balance - held`` never goes
  below 0), and what even that does not cover is recorded as ``uncharged``;
- live holds are renewed by their process (:meth:`Ledger.renew`); a hold whose
  process died expires, and :meth:`Ledger.reap` posts it at its last usage
  checkpoint or, with none, voids it.

Money that moves at once — :meth:`Ledger.deposit`, :meth:`Ledger.charge` and
:meth:`Ledger.grant` — is one operation each: one durable transaction that opens the
user (with its starter grants), moves the money, and keeps the answer under the
request's idempotency key, so a retry replays that answer byte for byte. The caller
says how to answer (``answer``, pure); the ledger decides when.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from proxy.batcher import GroupCommit
from proxy.decide import CapReached, UserState
from proxy.errors import DatabaseUnavailable
from proxy.pricing import MAX_UNITS, Usage
from proxy.tasks import Shared

log = logging.getLogger("proxy.ledger")


@dataclass(frozen=True, slots=True)
class SpendCap:
    """A cap on what a user (``scope`` = its id) or a paywall (``scope`` = "") may spend
    in one asset per calendar ``period`` ("day" or "month")."""

    scope: str
    period: str
    cap: int


@dataclass(frozen=True, slots=True)
class Posted:
    charged: int
    balance_after: int
    uncharged: int = 0  # of the cost: what the hold and the balance beyond it did not cover


@dataclass(frozen=True, slots=True)
class Balance:
    asset: str
    balance: int
    held: int

    owed: int = 0  # taken back by a refund or dispute beyond what was available

    @property
    def available(self) -> int:
        return max(self.balance - self.held - self.owed, 0)


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    asset: str
    kind: str
    amount: int
    balance_after: int
    request_id: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    outcome: str | None
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Stored:
    """A response kept for an idempotency key."""

    status: int
    body: bytes


class IdempotencyConflict(Exception):
    """The key was used before with another request body."""


class InsufficientFunds(Exception):
    def __init__(self, available: int):
        super().__init__(available)
        self.available = available


class BalanceOverflow(ValueError):
    """The move would take a balance past what the ledger holds (a PostgreSQL bigint)."""


@dataclass(frozen=True, slots=True)
class Once:
    """An idempotency key and the request it was sent with (what a retry must match)."""

    key: str
    request: Any


@dataclass(frozen=True, slots=True)
class Opening:
    """How a user is opened on first sight: accounts for ``assets`` and the starter
    ``grants`` (asset → amount), written once."""

    assets: frozenset[str]
    grants: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Moved:
    """A money operation done: the moved asset's balance after it, and all the user's
    balances as the same transaction sees them."""

    balance: int
    balances: list[Balance]


@dataclass(frozen=True, slots=True)
class Refused:
    """A charge that the available balance did not cover; nothing moved."""

    available: int
    balances: list[Balance]


Answer = Callable[[Moved | Refused], Stored]


@dataclass(frozen=True, slots=True)
class Payment:
    """A paid payment to deposit: ``id`` is its key (a Checkout Session's id, or an
    automatic recharge's PaymentIntent id), ``amount`` what it deposits in ``asset``'s
    smallest unit, ``paid`` what it cost in ``currency``'s minor unit. ``trigger``: the
    automatic recharge it ends, if it is one."""

    id: str
    user_id: str
    asset: str
    amount: int
    paid: int
    currency: str
    payment_intent: str | None
    customer: str | None
    item: str
    trigger: int | None = None


@dataclass(frozen=True, slots=True)
class Reversal:
    """A reversal written: ``moved`` is what the balance changed by (negative when taken
    back), ``owed`` what the owed amount changed by."""

    moved: int
    owed: int


_ACCOUNT = """
WITH u AS (
    INSERT INTO users (paywall_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING
)
INSERT INTO accounts (paywall_id, user_id, asset) VALUES ($1, $2, $3)
ON CONFLICT (paywall_id, user_id, asset) DO NOTHING
"""


# paywall_apply (migration 0011): the operation, a hold's ten arguments, a post's eight,
# a void's status; what an operation does not use is NULL.
_APPLY = ("SELECT * FROM paywall_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11,"
          " $12, $13, $14, $15, $16, $17, $18, $19::jsonb, $20)")
_OPEN_USER = "SELECT paywall_open_user($1, $2, $3, $4, $5)"
_NO_HOLD = (None,) * 10
_NO_COST = (None,) * 7
_NO_POST = (None,) * 9


def _cap_name(c: SpendCap) -> str:
    return ("user_" if c.scope else "paywall_") + ("daily" if c.period == "day" else "monthly")


# orjson writes NUL as the escape \u0000; an even run of backslashes before "u0000" is
# escaped backslashes and the text "u0000", not NUL.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def storable(value: Any) -> bool:
    """Whether ``value`` can be kept as jsonb and hashed as a request: orjson encodes it
    (nested at most 254 deep) and no string holds NUL, which jsonb refuses."""
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return _NUL.search(encoded) is None


def request_hash(body: Any) -> bytes:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


class Ledger:
    def __init__(self, pool: Any, hold_ttl: float):
        self.pool = pool
        self.hold_ttl = hold_ttl
        # Holds, posts and voids: group-committed with those of other requests.
        self.batch = GroupCommit(pool, _APPLY)
        self._opening: Shared[Any] = Shared()  # users being opened

    async def identity(self) -> str:
        """The ledger's identity (32 hex digits): what settlements kept on disk are
        named after (:mod:`proxy.spool`), made once by its migration."""
        found = await self.pool.fetchval("SELECT id FROM ledger_identity")
        if found is None:
            raise RuntimeError("the ledger has no identity (table ledger_identity is "
                               "empty): INSERT INTO ledger_identity DEFAULT VALUES")
        return str(found.hex)

    async def open_user(self, paywall_id: str, user_id: str, *, assets: set[str],
                        grants: Mapping[str, int], conn: Any = None) -> None:
        """Create the user if needed, with accounts for ``assets``, and write the
        starter ``grants`` (asset → amount) the first time the user is opened, however
        it was first seen. ``conn``: run in that connection's transaction; else the
        same opening asked for meanwhile (a burst of a new user's requests) is one
        statement, theirs all."""
        given = sorted(grants.items())
        args = (paywall_id, user_id, sorted(assets), [a for a, _ in given],
                [n for _, n in given])
        if conn is not None:
            await conn.execute(_OPEN_USER, *args)
            return
        key = (paywall_id, user_id, tuple(args[2]), tuple(given))
        await self._opening.run(key, lambda: self.pool.execute(_OPEN_USER, *args))

    async def hold(self, paywall_id: str, user_id: str, asset: str, amount: int, *,
                   request_id: str, model: str, require_connect: bool,
                   caps: Sequence[SpendCap] = (), timezone: str = "UTC") -> UserState:
        """Try to reserve ``amount`` within the balance and every spend cap; report the
        user's state either way (one round trip, one transaction)."""
        caps_json = orjson.dumps([{"scope": c.scope, "period": c.period, "cap": c.cap}
                                  for c in caps]).decode()
        row = await self.batch.fetchrow(
            "hold", paywall_id, user_id, asset, amount, request_id, model, require_connect,
            self.hold_ttl, caps_json, timezone, *_NO_POST)
        cap = None
        if row["cap"] is not None:
            limit = next(c.cap for c in caps if _cap_name(c) == row["cap"])
            cap = CapReached(row["cap"], limit, row["cap_used"], row["cap_resets"])
        return UserState(
            exists=row["connected"] is not None,
            connected=bool(row["connected"]),
            has_account=row["available"] is not None,
            available=row["available"] or 0,
            hold_id=row["hold_id"],
            cap=cap,
            balance=row["balance"],
        )

    async def post(self, hold_id: int, amount: int, usage: Usage | None, outcome: str,
                   metadata: dict[str, Any] | None = None, *, deferrable: bool = False
                   ) -> Posted | None:
        """Charge the exact cost ``amount`` and release the hold; None if already resolved.
        ``deferrable``: no one waits on it (its answer has gone); it may ride a later
        batch (:class:`~proxy.batcher.GroupCommit`).

        The charge is ``amount`` up to the hold plus what the account has available
        beyond it, so it may exceed the hold but never takes what other requests hold;
        the rest is returned as ``uncharged`` and written in the entry's metadata
        (``{"uncharged": n}``, merged into ``metadata``)."""
        if amount < 0:
            raise ValueError(f"a charge cannot be negative: {amount}")
        u = usage or Usage(0, 0)
        if u.cache_write_tokens:  # no column of its own: kept with the entry
            metadata = {**(metadata or {}), "cache_write_tokens": u.cache_write_tokens}
        row = await self.batch.fetchrow(
            "post", *_NO_HOLD, hold_id, amount, u.prompt_tokens, u.completion_tokens,
            u.cached_tokens, u.reasoning_tokens, outcome, orjson.dumps(metadata or {}).decode(),
            None, deferrable=deferrable)
        if not row["resolved"]:
            return None
        return Posted(row["charged"], row["balance_after"], row["uncharged"])

    async def void(self, hold_id: int, status: str = "voided", *, deferrable: bool = False
                   ) -> bool:
        """Release the whole hold; ``status`` is "voided", or "expired" for the reaper.
        ``deferrable`` as for :meth:`post`."""
        if status not in ("voided", "expired"):
            raise ValueError(f"a hold is voided or expired, not {status!r}")
        row = await self.batch.fetchrow("void", *_NO_HOLD, hold_id, *_NO_COST, status,
                                        deferrable=deferrable)
        return bool(row["resolved"])

    async def renew(self, checkpoints: dict[int, dict[str, Any] | None]) -> None:
        """Extend live holds and store their usage checkpoints, in one statement."""
        if not checkpoints:
            return
        ids = list(checkpoints)
        cps = [None if c is None else orjson.dumps(c).decode() for c in checkpoints.values()]
        await self.pool.execute(
            "UPDATE holds SET expires_at = now() + make_interval(secs => $3),"
            " checkpoint = coalesce(c.cp::jsonb, holds.checkpoint)"
            " FROM unnest($1::bigint[], $2::text[]) AS c(id, cp)"
            " WHERE holds.id = c.id AND holds.status = 'pending'",
            ids, cps, self.hold_ttl,
        )

    async def pending_holds(self) -> int:
        """Holds not yet resolved, in the whole ledger (a gauge operators alert on)."""
        n: int = await self.pool.fetchval("SELECT count(*) FROM holds WHERE status = 'pending'")
        return n

    async def reap(self, limit: int = 200, exclude: Sequence[int] = ()) -> int:
        """Resolve expired holds (but those in ``exclude``, still live here): post at
        their checkpoint's cost, or void them. One failing hold does not stop the rest."""
        rows = await self.pool.fetch(
            "SELECT id, checkpoint FROM holds WHERE status = 'pending' AND expires_at < now()"
            " AND NOT (id = ANY($2::bigint[])) ORDER BY expires_at, id LIMIT $1",
            limit, list(exclude),
        )
        for row in rows:
            cp = orjson.loads(row["checkpoint"]) if row["checkpoint"] else None
            try:
                if cp and cp.get("cost", 0) > 0:
                    usage = Usage(cp.get("prompt_tokens", 0), cp.get("completion_tokens", 0))
                    await self.post(row["id"], int(cp["cost"]), usage, "reaped",
                                    {"reason": "the serving process stopped mid-request"})
                else:
                    await self.void(row["id"], "expired")
            except DatabaseUnavailable:
                raise  # the rest would fail alike; the reaper's next round retries
            except Exception:
                log.exception("could not resolve expired hold %s", row["id"])
        return len(rows)

    async def balances(self, paywall_id: str, user_id: str, conn: Any = None) -> list[Balance]:
        rows = await (conn or self.pool).fetch(
            "SELECT asset, balance, held, owed FROM accounts"
            " WHERE paywall_id = $1 AND user_id = $2 ORDER BY asset", paywall_id, user_id,
        )
        return [Balance(r["asset"], r["balance"], r["held"], r["owed"]) for r in rows]

    async def paid(self, paywall_id: str, user_id: str) -> bool:
        """Whether the user was ever granted a plan."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND a.user_id = $2 AND e.kind = 'grant'"
            " AND e.metadata ? 'plan')", paywall_id, user_id))

    async def user(self, paywall_id: str, user_id: str) -> Any:
        return await self.pool.fetchrow(
            "SELECT * FROM users WHERE paywall_id = $1 AND user_id = $2", paywall_id, user_id)

    async def limits_of(self, paywall_id: str, user_id: str) -> dict[str, Any]:
        """The user's limit overrides, and ``"blocked": true`` when the operator blocked
        the user (what guard.effective reads)."""
        row = await self.pool.fetchrow(
            "SELECT limits, blocked FROM users WHERE paywall_id = $1 AND user_id = $2",
            paywall_id, user_id)
        return {} if row is None else _overrides(row)

    async def limits_of_many(self, paywall_id: str, user_ids: Sequence[str]
                             ) -> dict[str, dict[str, Any]]:
        """:meth:`limits_of` for several users in one statement; a user without a row
        is left out (no overrides)."""
        rows = await self.pool.fetch(
            "SELECT user_id, limits, blocked FROM users"
            " WHERE paywall_id = $1 AND user_id = ANY($2::text[])",
            paywall_id, list(user_ids))
        return {row["user_id"]: _overrides(row) for row in rows}

    async def limits_of_paywall(self, paywall_id: str, most: int
                                ) -> dict[str, dict[str, Any]] | None:
        """:meth:`limits_of` for every user of the paywall that has overrides or is
        blocked (a user left out has none), or None when more than ``most`` have."""
        rows = await self.pool.fetch(
            "SELECT user_id, limits, blocked FROM users WHERE paywall_id = $1"
            " AND (blocked OR limits <> '{}'::jsonb) LIMIT $2", paywall_id, most + 1)
        if len(rows) > most:
            return None
        return {row["user_id"]: _overrides(row) for row in rows}

    async def block(self, paywall_id: str, user_id: str, blocked: bool) -> None:
        """Block the user (every request refused, 403) or lift the block."""
        await self.pool.execute(
            "INSERT INTO users (paywall_id, user_id, blocked) VALUES ($1, $2, $3)"
            " ON CONFLICT (paywall_id, user_id) DO UPDATE SET blocked = $3",
            paywall_id, user_id, blocked)

    async def set_limits(self, paywall_id: str, user_id: str, changed: dict[str, Any],
                         removed: Sequence[str]) -> None:
        """Merge ``changed`` into the user's overrides and drop ``removed``, in one
        statement, so concurrent changes to different limits are all kept."""
        await self.pool.execute(
            "INSERT INTO users (paywall_id, user_id, limits)"
            " VALUES ($1, $2, $3::jsonb - $4::text[])"
            " ON CONFLICT (paywall_id, user_id) DO UPDATE"
            " SET limits = (users.limits || $3::jsonb) - $4::text[]",
            paywall_id, user_id, orjson.dumps(changed).decode(), list(removed))

    async def connect_version(self, paywall_id: str, user_id: str) -> int:
        """The user's connection version, which connect links are issued against."""
        version = await self.pool.fetchval(
            "SELECT connect_version FROM users WHERE paywall_id = $1 AND user_id = $2",
            paywall_id, user_id)
        return int(version or 0)

    async def connect(self, paywall_id: str, user_id: str, version: int) -> bool:
        """Mark the user connected, if ``version`` (the link's) is still the user's
        connection version; False when a disconnect has retired it since."""
        return bool(await self.pool.fetchval(
            "INSERT INTO users (paywall_id, user_id, connected_at, connect_version)"
            " VALUES ($1, $2, now(), $3)"
            " ON CONFLICT (paywall_id, user_id) DO UPDATE"
            " SET connected_at = coalesce(users.connected_at, now())"
            " WHERE users.connect_version = $3 RETURNING true",
            paywall_id, user_id, version))

    async def disconnect(self, paywall_id: str, user_id: str) -> None:
        """Withdraw the user's authorization and retire every connect link issued so far."""
        await self.pool.execute(
            "INSERT INTO users (paywall_id, user_id, connect_version) VALUES ($1, $2, 1)"
            " ON CONFLICT (paywall_id, user_id) DO UPDATE"
            " SET connected_at = NULL, connect_version = users.connect_version + 1",
            paywall_id, user_id)

    async def idempotent(
        self, paywall_id: str, key: str, body: Any,
        write: Callable[[Any], Awaitable[Stored]],
    ) -> Stored:
        """Run ``write(conn)`` once per (paywall, key) and keep its response.

        The key, the money movement and the stored response commit in one
        transaction: a retry after any failure either replays the stored response
        or finds nothing and runs the write afresh. A concurrent retry waits on
        the key's row lock. Same key with another body raises IdempotencyConflict.
        """
        digest = request_hash(body)
        async with self.pool.acquire() as conn, conn.transaction():
            await self.durable(conn)
            inserted = await conn.fetchval(
                "INSERT INTO idempotency (paywall_id, key, request_hash, status, response)"
                " VALUES ($1, $2, $3, 0, '') ON CONFLICT DO NOTHING RETURNING true",
                paywall_id, key, digest,
            )
            if not inserted:
                row = await conn.fetchrow(
                    "SELECT request_hash, status, response FROM idempotency"
                    " WHERE paywall_id = $1 AND key = $2", paywall_id, key,
                )
                if bytes(row["request_hash"]) != digest:
                    raise IdempotencyConflict(key)
                return Stored(row["status"], bytes(row["response"]))
            stored = await write(conn)
            await conn.execute(
                "UPDATE idempotency SET status = $3, response = $4"
                " WHERE paywall_id = $1 AND key = $2",
                paywall_id, key, stored.status, stored.body,
            )
            return stored

    @staticmethod
    async def durable(conn: Any) -> None:
        """Make the transaction on ``conn`` wait for the disk at commit, whatever the
        pool's ``synchronous_commit``: an answered deposit must never be lost."""
        await conn.execute("SET LOCAL synchronous_commit = on")

    @staticmethod
    async def move(conn: Any, paywall_id: str, user_id: str, asset: str, amount: int,
                   kind: str, *, request_id: str | None, idempotency_key: str | None,
                   metadata: dict[str, Any]) -> int:
        """Add ``amount`` (negative to take) to a balance with its entry; return the new
        balance. Taking more than is available raises InsufficientFunds."""
        if abs(amount) > MAX_UNITS:
            raise BalanceOverflow(amount)
        await conn.execute(_ACCOUNT, paywall_id, user_id, asset)
        # What is owed is not spendable: a charge leaves it; a reversal takes from it.
        spendable = "balance - held - owed" if kind == "charge" else "balance - held"
        try:
            row = await conn.fetchrow(
                "WITH a AS (UPDATE accounts SET balance = balance + $4"
                "  WHERE paywall_id = $1 AND user_id = $2 AND asset = $3"
                f"    AND {spendable} + $4 >= 0 RETURNING id, balance)"
                " INSERT INTO entries (account_id, kind, amount, balance_after, request_id,"
                "   idempotency_key, metadata)"
                " SELECT id, $5, $4, balance, $6, $7, $8 FROM a RETURNING balance_after",
                paywall_id, user_id, asset, amount, kind, request_id, idempotency_key,
                orjson.dumps(metadata).decode(),
            )
        except asyncpg.NumericValueOutOfRangeError:
            raise BalanceOverflow(amount) from None
        if row is None:
            available = await conn.fetchval(
                f"SELECT greatest({spendable}, 0) FROM accounts"
                " WHERE paywall_id = $1 AND user_id = $2 AND asset = $3",
                paywall_id, user_id, asset,
            )
            raise InsufficientFunds(available or 0)
        if kind == "deposit":  # what a refund or dispute left owed is settled first
            settled = await conn.fetchval(
                "WITH p AS (SELECT id, least(owed, balance - held) AS n FROM accounts"
                "  WHERE paywall_id = $1 AND user_id = $2 AND asset = $3 AND owed > 0),"
                " a AS (UPDATE accounts SET balance = balance - p.n, owed = owed - p.n"
                "  FROM p WHERE accounts.id = p.id AND p.n > 0"
                "  RETURNING accounts.id, accounts.balance, p.n)"
                " INSERT INTO entries (account_id, kind, amount, balance_after, request_id,"
                "   metadata)"
                " SELECT id, 'adjustment', -n, balance, $4,"
                "   jsonb_build_object('reason', 'owed', 'settled', n) FROM a"
                " RETURNING balance_after", paywall_id, user_id, asset, request_id)
            if settled is not None:
                return int(settled)
        return int(row["balance_after"])

    # ---- money operations: one transaction each, answered once per key ----------------

    async def deposit(self, paywall_id: str, user_id: str, asset: str, amount: int, *,
                      opening: Opening, request_id: str, metadata: dict[str, Any],
                      once: Once | None, answer: Answer) -> Stored:
        """Credit ``amount`` (> 0) to the user's ``asset``; ``answer`` gets :class:`Moved`.
        BalanceOverflow when the balance cannot hold it (nothing moves, nothing is kept)."""
        if amount <= 0:
            raise ValueError(f"a deposit is positive: {amount}")
        return await self._operate(paywall_id, user_id, opening, once, answer, request_id,
                                   [(asset, amount, "deposit", metadata)])

    async def charge(self, paywall_id: str, user_id: str, asset: str, amount: int, *,
                     opening: Opening, request_id: str, metadata: dict[str, Any],
                     once: Once | None, answer: Answer) -> Stored:
        """Take ``amount`` (> 0) from what the user has available (balance - held);
        ``answer`` gets :class:`Moved`, or :class:`Refused` when it does not cover it."""
        if amount <= 0:
            raise ValueError(f"a charge is positive: {amount}")
        return await self._operate(paywall_id, user_id, opening, once, answer, request_id,
                                   [(asset, -amount, "charge", metadata)])

    async def grant(self, paywall_id: str, user_id: str, amounts: Mapping[str, int], *,
                    opening: Opening, request_id: str, metadata: dict[str, Any],
                    once: Once | None, answer: Answer) -> Stored:
        """Grant ``amounts`` (asset → amount ≥ 0; 0 writes nothing) together; ``answer``
        gets :class:`Moved` (``balance``: the last asset granted, in name order)."""
        if any(n < 0 for n in amounts.values()):
            raise ValueError(f"a grant is not negative: {dict(amounts)}")
        return await self._operate(paywall_id, user_id, opening, once, answer, request_id,
                                   [(a, n, "grant", metadata)
                                    for a, n in sorted(amounts.items()) if n])

    async def move_for(self, paywall_id: str, user_id: str, asset: str, amount: int,
                       kind: str, *, opening: Opening, request_id: str,
                       metadata: dict[str, Any], once: Once | None, answer: Answer) -> Stored:
        """An operator's move of ``amount`` as an entry of ``kind``: a deposit or a refund
        (> 0), or an adjustment (either sign: ``answer`` gets :class:`Refused` when a
        negative one exceeds what is available)."""
        if kind not in ("deposit", "refund", "adjustment") or amount == 0 or (
                kind != "adjustment" and amount < 0):
            raise ValueError(f"not an operator's move: {kind} of {amount}")
        return await self._operate(paywall_id, user_id, opening, once, answer, request_id,
                                   [(asset, amount, kind, metadata)])

    async def _operate(self, paywall_id: str, user_id: str, opening: Opening,
                       once: Once | None, answer: Answer, request_id: str,
                       moves: Sequence[tuple[str, int, str, dict[str, Any]]]) -> Stored:
        async def write(conn: Any) -> Stored:
            await self.open_user(paywall_id, user_id, assets=set(opening.assets),
                                 grants=opening.grants, conn=conn)
            after = 0
            try:
                for asset, amount, kind, metadata in moves:
                    after = await self.move(
                        conn, paywall_id, user_id, asset, amount, kind, request_id=request_id,
                        idempotency_key=once.key if once else None, metadata=metadata)
            except InsufficientFunds as e:
                return answer(Refused(e.available,
                                      await self.balances(paywall_id, user_id, conn)))
            return answer(Moved(after, await self.balances(paywall_id, user_id, conn)))

        if once is not None:
            return await self.idempotent(paywall_id, once.key, once.request, write)
        async with self.pool.acquire() as conn, conn.transaction():
            await self.durable(conn)
            return await write(conn)

    async def entries(self, paywall_id: str, user_id: str, *, before: int | None,
                      limit: int) -> list[Entry]:
        rows = await self.pool.fetch(
            "SELECT e.*, a.asset FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND a.user_id = $2 AND ($3::bigint IS NULL OR e.id < $3)"
            " ORDER BY e.id DESC LIMIT $4", paywall_id, user_id, before, limit,
        )
        return [Entry(r["id"], r["asset"], r["kind"], r["amount"], r["balance_after"],
                      r["request_id"], r["model"], r["prompt_tokens"], r["completion_tokens"],
                      r["outcome"], orjson.loads(r["metadata"]), r["created_at"]) for r in rows]

    async def usage(self, paywall_id: str, *, user_id: str | None, since: datetime,
                    until: datetime) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT a.user_id, e.model, a.asset, (e.created_at AT TIME ZONE 'UTC')::date AS day,"
            "  count(*) AS requests, sum(-e.amount) AS cost,"
            "  sum(e.prompt_tokens) AS prompt_tokens,"
            "  sum(e.completion_tokens) AS completion_tokens"
            " FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND e.kind = 'charge'"
            "   AND ($2::text IS NULL OR a.user_id = $2)"
            "   AND e.created_at >= $3 AND e.created_at < $4"
            " GROUP BY 1, 2, 3, 4 ORDER BY 4, 1, 2",
            paywall_id, user_id, since, until,
        )
        return [dict(r) for r in rows]

    # ---- payments: deposited once per payment, reversed by Stripe's totals ------------

    async def pay(self, paywall_id: str, payment: Payment, *, opening: Opening,
                  request_id: str) -> bool:
        """Deposit ``payment`` unless it was deposited before: True when this call did.

        The payment's row, its deposit and (for an automatic recharge) the end of the
        pending recharge commit in one durable transaction; a concurrent delivery of the
        same payment waits on the row's key and then finds it taken."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.durable(conn)
            await self.open_user(paywall_id, payment.user_id, assets=set(opening.assets),
                                 grants=opening.grants, conn=conn)
            fresh = await conn.fetchval(
                "INSERT INTO payments (paywall_id, id, user_id, asset, amount, paid, currency,"
                "  payment_intent, customer, item) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
                "  $9, $10) ON CONFLICT DO NOTHING RETURNING true",
                paywall_id, payment.id, payment.user_id, payment.asset, payment.amount,
                payment.paid, payment.currency, payment.payment_intent, payment.customer,
                payment.item)
            if not fresh:
                return False
            await self.move(conn, paywall_id, payment.user_id, payment.asset, payment.amount,
                            "deposit", request_id=request_id,
                            idempotency_key=f"payment:{payment.id}",
                            metadata={"payment": payment.id, "item": payment.item,
                                      "paid": payment.paid, "currency": payment.currency})
            # The account's row is locked since the deposit: its last deposit is this one.
            await conn.execute(
                "UPDATE payments SET entry_id = (SELECT e.id FROM entries e"
                "  JOIN accounts a ON a.id = e.account_id WHERE a.paywall_id = $1"
                "  AND a.user_id = $3 AND a.asset = $4 AND e.kind = 'deposit'"
                "  ORDER BY e.id DESC LIMIT 1)"
                " WHERE paywall_id = $1 AND id = $2",
                paywall_id, payment.id, payment.user_id, payment.asset)
            if payment.trigger is not None:
                await conn.execute(
                    "UPDATE recharges SET pending_since = NULL, failures = 0, last_error = NULL,"
                    " updated_at = now() WHERE paywall_id = $1 AND user_id = $2"
                    " AND triggers = $3", paywall_id, payment.user_id, payment.trigger)
            return True

    async def reverse(self, paywall_id: str, payment_intent: str, *, request_id: str,
                      refunded: int | None = None, dispute: tuple[str, int] | None = None,
                      source: str = "") -> Reversal | None:
        """Bring what a payment's deposit gave back in line with Stripe's totals for it:
        ``refunded`` (minor units refunded in all; it only grows) and a dispute's amount
        (``(id, amount)``; 0 once the dispute is won). None for a payment not deposited
        here.

        What the payment takes back is its deposit * (refunded + disputed) / paid, never
        more than it deposited; the change since the last reversal is one adjustment
        entry linked to the deposit. A take-back beyond the available balance leaves the
        rest owed (the balance never goes below 0); a give-back (a won dispute) settles
        what is owed first. Replays, duplicates and events out of order change nothing
        twice: each reversal writes the difference to the totals."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.durable(conn)
            row = await conn.fetchrow(
                "SELECT * FROM payments WHERE paywall_id = $1 AND payment_intent = $2"
                " FOR UPDATE", paywall_id, payment_intent)
            if row is None:
                return None
            total_refunded = row["refunded"] if refunded is None else max(
                row["refunded"], min(refunded, row["paid"]))
            disputes: dict[str, int] = orjson.loads(row["disputes"])
            if dispute is not None:
                disputes[dispute[0]] = max(0, dispute[1])
            taken = min(row["paid"], total_refunded + sum(disputes.values()))
            target = row["amount"] * taken // row["paid"]
            delta = target - row["reversed"]
            await conn.execute(
                "UPDATE payments SET refunded = $3, disputes = $4::jsonb, reversed = $5"
                " WHERE paywall_id = $1 AND id = $2", paywall_id, row["id"], total_refunded,
                orjson.dumps(disputes).decode(), target)
            if delta == 0:
                return Reversal(0, 0)
            account = await conn.fetchrow(
                "SELECT balance - held AS available, owed FROM accounts"
                " WHERE paywall_id = $1 AND user_id = $2 AND asset = $3 FOR UPDATE",
                paywall_id, row["user_id"], row["asset"])
            if delta > 0:
                moved = -min(delta, account["available"])
                owed = delta + moved
            else:
                owed = -min(-delta, account["owed"])
                moved = -delta + owed
            await conn.execute(
                "UPDATE accounts SET owed = owed + $4"
                " WHERE paywall_id = $1 AND user_id = $2 AND asset = $3",
                paywall_id, row["user_id"], row["asset"], owed)
            await self.move(conn, paywall_id, row["user_id"], row["asset"], moved, "adjustment",
                            request_id=request_id, idempotency_key=None,
                            metadata={"reverses": row["entry_id"], "payment": row["id"],
                                      "source": source, "reversed": delta, "owed": owed})
            return Reversal(moved, owed)

    async def payments_of(self, paywall_id: str, since: datetime | None = None) -> list[Any]:
        return list(await self.pool.fetch(
            "SELECT * FROM payments WHERE paywall_id = $1"
            " AND ($2::timestamptz IS NULL OR created_at >= $2) ORDER BY created_at",
            paywall_id, since))


def _overrides(row: Any) -> dict[str, Any]:
    """A users row's limit overrides, with ``"blocked": true`` when the column says so
    (only the column does)."""
    limits: dict[str, Any] = orjson.loads(row["limits"]) if row["limits"] else {}
    limits.pop("blocked", None)
    return {**limits, "blocked": True} if row["blocked"] else limits
