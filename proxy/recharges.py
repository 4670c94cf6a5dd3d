"""Automatic recharge's schedule: who saved a card, under what threshold they are
recharged and with how much, and the recharge each has pending.

No money moves here. A recharge's deposit is :meth:`proxy.ledger.Ledger.pay`, which
ends the pending recharge in the deposit's own transaction; a failure is recorded
here once per trigger. The claim (:meth:`Recharges.claim`) is one ``UPDATE`` of the
user's row, so however many settlements and workers race to start a recharge, one
trigger starts one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Recharges:
    def __init__(self, pool: Any):
        self.pool = pool

    async def set(self, paywall_id: str, user_id: str, *, asset: str, threshold: int,
                  amount: int, currency: str, customer: str, payment_method: str) -> None:
        """Turn automatic recharge on (or change it) for a user: failures forgotten, and a
        recharge still pending is left to its own outcome under its own trigger."""
        await self.pool.execute(
            "INSERT INTO recharges (paywall_id, user_id, asset, threshold, amount, currency,"
            "  customer, payment_method) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (paywall_id, user_id) DO UPDATE SET asset = $3, threshold = $4,"
            "  amount = $5, currency = $6, customer = $7, payment_method = $8, enabled = true,"
            "  failures = 0, last_error = NULL, updated_at = now(),"
            "  pending_since = NULL, payment_intent = NULL",
            paywall_id, user_id, asset, threshold, amount, currency, customer, payment_method)

    async def stop(self, paywall_id: str, user_id: str) -> None:
        await self.pool.execute(
            "UPDATE recharges SET enabled = false, updated_at = now()"
            " WHERE paywall_id = $1 AND user_id = $2", paywall_id, user_id)

    async def of(self, paywall_id: str, user_id: str) -> Any:
        return await self.pool.fetchrow(
            "SELECT * FROM recharges WHERE paywall_id = $1 AND user_id = $2",
            paywall_id, user_id)

    async def claim(self, paywall_id: str, users: Sequence[str] | None, *,
                    max_failures: int, retry_seconds: float,
                    stale_seconds: float) -> list[Any]:
        """Start a recharge for each user of the paywall (of ``users``, or all when None)
        whose spendable balance (balance - held - owed) is under their threshold and who
        has none pending: one trigger each, however many callers race (the row's update
        is the claim). Also returned, trigger unchanged: recharges pending longer than
        ``stale_seconds`` (their process died before the outcome was written, or the
        payment is still processing), to be looked up again. After a failure the next
        try waits ``retry_seconds`` * 2^(failures - 1); after ``max_failures`` none is
        tried."""
        started = await self.pool.fetch(
            "UPDATE recharges r SET triggers = r.triggers + 1, pending_since = now(),"
            "  payment_intent = NULL, updated_at = now()"
            " FROM accounts a WHERE a.paywall_id = r.paywall_id AND a.user_id = r.user_id"
            "  AND a.asset = r.asset AND r.enabled AND r.pending_since IS NULL"
            "  AND r.failures < $2 AND a.balance - a.held - a.owed < r.threshold"
            "  AND r.paywall_id = $4 AND ($1::text[] IS NULL OR r.user_id = ANY($1))"
            "  AND (r.failures = 0 OR r.updated_at < now() - make_interval("
            "       secs => $3 * 2 ^ (r.failures - 1)))"
            " RETURNING r.*",
            None if users is None else list(users), max_failures, retry_seconds, paywall_id)
        stale = await self.pool.fetch(
            "UPDATE recharges SET updated_at = now() WHERE paywall_id = $2"
            "  AND pending_since IS NOT NULL"
            "  AND updated_at < now() - make_interval(secs => $1) RETURNING *",
            stale_seconds, paywall_id)
        return [*started, *stale]

    async def sent(self, paywall_id: str, user_id: str, trigger: int, intent_id: str) -> None:
        """The PaymentIntent the recharge ``trigger`` created: looked up, never created
        again, should its outcome be late."""
        await self.pool.execute(
            "UPDATE recharges SET payment_intent = $4 WHERE paywall_id = $1 AND user_id = $2"
            " AND triggers = $3 AND pending_since IS NOT NULL",
            paywall_id, user_id, trigger, intent_id)

    async def failed(self, paywall_id: str, user_id: str, trigger: int, error: str) -> bool:
        """Record that the recharge ``trigger`` failed, with its ``topup.failed`` event in
        the same statement (once, however often it is told)."""
        return bool(await self.pool.fetchval(
            "WITH r AS (UPDATE recharges SET pending_since = NULL, failures = failures + 1,"
            "  last_error = $4, updated_at = now() WHERE paywall_id = $1 AND user_id = $2"
            "  AND triggers = $3 AND pending_since IS NOT NULL RETURNING *)"
            " SELECT paywall_emit(r.paywall_id, r.user_id, NULL, 'topup.failed',"
            "  jsonb_build_object('item', 'recharge', 'trigger', r.triggers,"
            "   'failures', r.failures, 'paid', r.amount, 'currency', r.currency,"
            "   'reason', r.last_error)) IS NOT NULL FROM r",
            paywall_id, user_id, trigger, error[:500]))
