"""The operator's console: what ``/admin`` shows and does and the CLI scripts, in one
place. Reads are plain queries over the ledger; every action goes through the
ledger's own operations (the same as the user API's), once per idempotency key, and
is written with the operator and the reason in its entry's metadata — so it appears in
the events like any other entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson

from proxy.ledger import (
    Balance,
    Entry,
    Ledger,
    Moved,
    Once,
    Opening,
    Refused,
    Stored,
)

Kind = Literal["deposit", "refund", "adjustment"]
KINDS: tuple[Kind, ...] = ("deposit", "refund", "adjustment")


@dataclass(frozen=True, slots=True)
class Overview:
    """A paywall over the last ``days``: what it charged and took in by day and asset,
    its users and requests, its top models and users by spend, its pending holds."""

    days: int
    charged: list[tuple[datetime, str, int]]  # (day, asset, amount charged)
    deposited: list[tuple[datetime, str, int]]  # (day, asset, deposits and top-ups)
    active_users: int  # users charged in the window
    requests: int  # charges in the window
    blocked: dict[str, int]  # request.blocked events by reason (connect, top_up, spend_cap)
    top_models: list[tuple[str, str, int, int]]  # (model, asset, spent, requests)
    top_users: list[tuple[str, str, int, int]]  # (user, asset, spent, requests)
    pending_holds: int


@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: str
    connected: bool
    created_at: datetime
    balances: dict[str, int]  # asset → balance


@dataclass(frozen=True, slots=True)
class UserDetail:
    user_id: str
    connected: bool
    created_at: datetime
    limits: dict[str, Any]
    balances: list[Balance]
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """An action's outcome: done (the asset's balance after it) or refused, with why."""

    ok: bool
    balance: int | None
    message: str


async def overview(pool: Any, paywall_id: str, days: int = 30) -> Overview:
    since = timedelta(days=int(days))
    daily = await pool.fetch(
        "SELECT date_trunc('day', e.created_at) AS day, a.asset,"
        "  sum(-e.amount) FILTER (WHERE e.kind = 'charge') AS charged,"
        "  sum(e.amount) FILTER (WHERE e.kind IN ('deposit', 'topup')) AS deposited"
        " FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND e.created_at >= now() - $2::interval"
        "   AND e.kind IN ('charge', 'deposit', 'topup')"
        " GROUP BY 1, 2 ORDER BY 1, 2", paywall_id, since)
    totals = await pool.fetchrow(
        "SELECT count(*) AS requests, count(DISTINCT a.user_id) AS users"
        " FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND e.kind = 'charge'"
        "   AND e.created_at >= now() - $2::interval", paywall_id, since)
    blocked = await pool.fetch(
        "SELECT data->>'reason' AS reason, sum(coalesce((data->>'count')::bigint, 1)) AS n"
        " FROM events WHERE paywall_id = $1 AND type = 'request.blocked'"
        "   AND created_at >= now() - $2::interval GROUP BY 1", paywall_id, since)
    top = {}
    for by in ("e.model", "a.user_id"):
        top[by] = await pool.fetch(
            f"SELECT coalesce({by}, '') AS name, a.asset, sum(-e.amount) AS spent,"
            "  count(*) AS requests FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND e.kind = 'charge'"
            "   AND e.created_at >= now() - $2::interval"
            " GROUP BY 1, 2 ORDER BY 3 DESC, 1 LIMIT 10", paywall_id, since)
    pending = await pool.fetchval(
        "SELECT count(*) FROM holds h JOIN accounts a ON a.id = h.account_id"
        " WHERE a.paywall_id = $1 AND h.status = 'pending'", paywall_id)
    return Overview(
        days,
        [(r["day"], r["asset"], int(r["charged"])) for r in daily if r["charged"]],
        [(r["day"], r["asset"], int(r["deposited"])) for r in daily if r["deposited"]],
        int(totals["users"]), int(totals["requests"]),
        {r["reason"] or "": int(r["n"]) for r in blocked},
        [(r["name"], r["asset"], int(r["spent"]), int(r["requests"])) for r in top["e.model"]],
        [(r["name"], r["asset"], int(r["spent"]), int(r["requests"]))
         for r in top["a.user_id"]],
        int(pending))


async def users(pool: Any, paywall_id: str, search: str = "", *, after: str = "",
                limit: int = 50) -> list[UserRow]:
    """Users whose id contains ``search`` (any, when empty), by id, after ``after``."""
    rows = await pool.fetch(
        "SELECT u.user_id, u.connected_at IS NOT NULL AS connected, u.created_at,"
        "  coalesce((SELECT jsonb_object_agg(a.asset, a.balance) FROM accounts a"
        "    WHERE a.paywall_id = u.paywall_id AND a.user_id = u.user_id), '{}') AS balances"
        " FROM users u WHERE u.paywall_id = $1 AND u.user_id > $2"
        "   AND ($3 = '' OR strpos(lower(u.user_id), lower($3)) > 0)"
        " ORDER BY u.user_id LIMIT $4", paywall_id, after, search, limit)
    return [UserRow(r["user_id"], r["connected"], r["created_at"],
                    {k: int(v) for k, v in orjson.loads(r["balances"]).items()}) for r in rows]


async def user(ledger: Ledger, paywall_id: str, user_id: str) -> UserDetail | None:
    row = await ledger.user(paywall_id, user_id)
    if row is None:
        return None
    return UserDetail(user_id, row["connected_at"] is not None, row["created_at"],
                      orjson.loads(row["limits"]) if row["limits"] else {},
                      await ledger.balances(paywall_id, user_id), bool(row["blocked"]))


async def block(ledger: Ledger, paywall_id: str, user_id: str, blocked: bool) -> None:
    """Block a user (every request refused with 403 ``user_blocked``) or lift it; other
    replicas see it within ``server.key_cache_seconds`` (callers in this process also
    forget the user's cached overrides)."""
    await ledger.block(paywall_id, user_id, blocked)


async def entries(ledger: Ledger, paywall_id: str, user_id: str, *, before: int | None = None,
                  limit: int = 50) -> list[Entry]:
    """A user's ledger, newest first, ``limit`` entries before the entry id ``before``."""
    return await ledger.entries(paywall_id, user_id, before=before, limit=limit)


async def revenue(pool: Any, paywall_id: str, by: Literal["day", "model", "user"],
                  since: datetime | None = None) -> list[tuple[str, str, int, int]]:
    """What was charged, as (day, model or user; asset; amount; charges), largest first
    (by day: in order)."""
    key = {"day": "to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
           "model": "coalesce(e.model, '')", "user": "a.user_id"}[by]
    order = "1, 2" if by == "day" else "3 DESC, 1, 2"
    rows = await pool.fetch(
        f"SELECT {key} AS name, a.asset, sum(-e.amount) AS amount, count(*) AS n"
        " FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND e.kind = 'charge'"
        "   AND ($2::timestamptz IS NULL OR e.created_at >= $2)"
        f" GROUP BY 1, 2 ORDER BY {order}", paywall_id, since)
    return [(r["name"], r["asset"], int(r["amount"]), int(r["n"])) for r in rows]


EXPORT_FIELDS = ("id", "created_at", "user", "asset", "kind", "amount", "balance_after",
                 "request_id", "model", "prompt_tokens", "completion_tokens", "outcome",
                 "metadata")


async def export(pool: Any, paywall_id: str, *, user_id: str | None = None,
                 since: datetime | None = None, batch: int = 5000
                 ) -> AsyncIterator[dict[str, Any]]:
    """Every entry of the paywall (or of one user), oldest first, read in pages by id:
    a ledger of any size streams in bounded memory."""
    after = 0
    while True:
        rows = await pool.fetch(
            "SELECT e.*, a.user_id, a.asset FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND e.id > $2 AND ($3::text IS NULL OR a.user_id = $3)"
            "   AND ($4::timestamptz IS NULL OR e.created_at >= $4)"
            " ORDER BY e.id LIMIT $5", paywall_id, after, user_id, since, batch)
        for r in rows:
            yield {"id": r["id"], "created_at": r["created_at"], "user": r["user_id"],
                   "asset": r["asset"], "kind": r["kind"], "amount": r["amount"],
                   "balance_after": r["balance_after"], "request_id": r["request_id"],
                   "model": r["model"], "prompt_tokens": r["prompt_tokens"],
                   "completion_tokens": r["completion_tokens"], "outcome": r["outcome"],
                   "metadata": orjson.loads(r["metadata"])}
        if len(rows) < batch:
            return
        after = rows[-1]["id"]


async def move(ledger: Ledger, paywall_id: str, user_id: str, asset: str, amount: int,
               kind: Kind, *, reason: str, operator: str, key: str,
               grants: Mapping[str, int], request_id: str) -> Result:
    """An operator's deposit (> 0), refund (> 0, given back) or adjustment (either
    sign) of ``amount`` in ``asset``'s smallest unit, with the ``reason`` and the
    ``operator`` in its entry; once per ``key`` (a retry answers what the first did).
    A negative adjustment beyond what is available is refused, and moves nothing."""
    if not reason.strip():
        raise ValueError("a reason is required")
    metadata = {"reason": reason, "operator": operator, "via": "console"}

    def answer(result: Moved | Refused) -> Stored:
        if isinstance(result, Refused):
            return Stored(402, orjson.dumps({"available": result.available}))
        return Stored(200, orjson.dumps({"balance": result.balance}))

    request = {"op": kind, "user": user_id, "asset": asset, "amount": amount,
               "reason": reason}
    stored = await ledger.move_for(
        paywall_id, user_id, asset, amount, kind,
        opening=Opening(frozenset({asset}), grants), request_id=request_id,
        metadata=metadata, once=Once(key, request), answer=answer)
    data = orjson.loads(stored.body)
    if stored.status != 200:
        return Result(False, None, f"refused: only {data['available']} available")
    return Result(True, int(data["balance"]), "done")


async def charges(ledger: Ledger, paywall_id: str, user_id: str, limit: int = 20
                  ) -> list[Entry]:
    """A user's most recent charges (their requests), newest first."""
    rows = await ledger.pool.fetch(
        "SELECT e.*, a.asset FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 AND e.kind = 'charge'"
        " ORDER BY e.id DESC LIMIT $3", paywall_id, user_id, limit)
    return [Entry(r["id"], r["asset"], r["kind"], r["amount"], r["balance_after"],
                  r["request_id"], r["model"], r["prompt_tokens"], r["completion_tokens"],
                  r["outcome"], orjson.loads(r["metadata"]), r["created_at"]) for r in rows]
