"""Events: what happened to users' money, told to the app as signed webhooks.

The outbox is the ``events`` table. Money operations and user changes write their event
in their own transaction, from triggers (migration 0010): ``charge.created``,
``balance.deposit.created``, ``credits.granted``, ``charge.refunded``,
``balance.adjusted``, ``balance.low``, ``topup.checkout.completed``, ``user.created``,
``user.connected``, ``user.disconnected``, ``hold.expired``. What is not a change of the
ledger is written here on its own: ``balance.depleted`` (once per running out),
``request.blocked`` and ``limit.reached`` (sampled: one event per user, reason and
window, counting the rest), ``topup.failed``, ``webhook.subscription.disabled``.

Delivery (:meth:`Events.run`, in every worker): new events are fanned out to the
matching subscriptions of their paywall, then due deliveries are claimed with ``FOR
UPDATE SKIP LOCKED`` and a lease, so replicas share the work and no delivery is sent by
two at once. Each is POSTed as JSON, signed per the Standard Webhooks specification
(``webhook-id`` = the event id, ``webhook-timestamp``, ``webhook-signature``), with a
short timeout and no redirects followed. A 2xx delivers it; anything else is retried
with exponential backoff and jitter until ``events.retry_hours`` have passed since the
event, then given up; a subscription that has had no success for that long is disabled.
A user's later event waits while an earlier one of theirs is pending for the same
subscription (order per user). Delivery is at least once: receivers dedupe on the event
id (``webhook-id``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from standardwebhooks.webhooks import Webhook

from proxy.errors import DatabaseUnavailable
from proxy.event_types import EVENT_TYPES as EVENT_TYPES
from proxy.observe import Metrics
from proxy.pricing import units
from proxy.settings import EventSettings, Settings
from proxy.tasks import TaskSet

log = logging.getLogger("proxy.events")

LEASE_SECONDS = 60.0  # a claimed delivery is the claimer's for this long


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def new_subscription_id() -> str:
    return "whsub_" + secrets.token_hex(12)


def backoff(attempts: int, first: float, most: float, rand: random.Random) -> float:
    """Seconds before attempt ``attempts + 1``: ``first`` doubled per attempt up to
    ``most``, with up to 25 % of jitter either way (so a receiver that comes back is not
    hit by every delivery at once)."""
    base = min(first * 2.0 ** max(attempts - 1, 0), most)
    return float(base * (0.75 + rand.random() * 0.5))


def signature(secrets_: Sequence[str], msg_id: str, at: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space separated
    (during a rotation both the new and the old secret sign)."""
    return " ".join(Webhook(s).sign(msg_id, at, body) for s in secrets_)


def private_address(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not ip.is_global or ip.is_multicast


class PrivateTarget(Exception):
    """A subscription URL resolving to a loopback, private or otherwise non-public
    address, which it is not allowed to reach."""


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse (PrivateTarget) a URL that is not http(s), or whose host resolves to a
    non-public address unless ``allow_private``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PrivateTarget(f"not an http(s) URL: {url!r}")
    if allow_private:
        return
    host = parts.hostname
    if private_address(host):
        raise PrivateTarget(f"{host} is not a public address")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as e:
        raise PrivateTarget(f"{host} does not resolve: {e}") from None
    for info in infos:
        if private_address(str(info[4][0])):
            raise PrivateTarget(f"{host} resolves to {info[4][0]}, not a public address")


class _PublicResolver(aiohttp.abc.AbstractResolver):
    """Resolves like the default resolver and drops non-public addresses, so a name that
    resolved to a public address when checked cannot be rebound to a private one at
    connect time."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not private_address(str(r["host"]))]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class _Window:
    started: float
    count: int


class Sampler:
    """At most one event per key per ``seconds``; the rest are counted into the next."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._seen: dict[tuple[str, ...], _Window] = {}

    def admit(self, key: tuple[str, ...], now: float) -> int | None:
        """The number of occurrences the event to write now stands for, or None to
        write none (counted for later)."""
        w = self._seen.get(key)
        if w is None or now - w.started >= self.seconds:
            if len(self._seen) > 100_000:  # old windows go; a flood of keys stays bounded
                self._seen = {k: v for k, v in self._seen.items()
                              if now - v.started < self.seconds}
            stood_for = 1 + (w.count if w else 0)
            self._seen[key] = _Window(now, 0)
            return stood_for
        w.count += 1
        return None


class Events:
    def __init__(self, settings: Settings, pool: Any, metrics: Metrics, tasks: TaskSet):
        self.settings = settings
        self.tasks = tasks
        self.conf: EventSettings = settings.events
        self.pool = pool
        self.metrics = metrics
        self.sampler = Sampler(self.conf.sample_seconds)
        self._rand = random.Random()
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """There is something to deliver: the loop need not wait for its poll."""
        self._wake.set()

    # ---- writing what is not a ledger change ---------------------------------------------

    async def emit(self, paywall_id: str, user_id: str | None, event_type: str,
                   data: Mapping[str, Any], request_id: str | None = None) -> str:
        event_id: str = await self.pool.fetchval(
            "SELECT paywall_emit($1, $2, $3, $4, $5::jsonb)", paywall_id, user_id,
            request_id, event_type, orjson.dumps(dict(data)).decode())
        self._wake.set()
        return event_id

    async def once(self, paywall_id: str, key: str, user_id: str | None, event_type: str,
                   data: Mapping[str, Any], request_id: str | None = None) -> bool:
        """``event_type`` once per (paywall, ``key``), however often it is told; whether
        this call wrote it."""
        written = await self.pool.fetchval(
            "WITH k AS (INSERT INTO event_keys (paywall_id, key) VALUES ($1, $2)"
            "  ON CONFLICT DO NOTHING RETURNING paywall_id)"
            " SELECT paywall_emit(k.paywall_id, $3, $4, $5, $6::jsonb) FROM k",
            paywall_id, key, user_id, request_id, event_type,
            orjson.dumps(dict(data)).decode())
        if written:
            self._wake.set()
        return written is not None

    def sampled(self, paywall_id: str, user_id: str | None, event_type: str, reason: str,
                data: Mapping[str, Any], request_id: str | None) -> None:
        """``event_type`` (``request.blocked``, ``limit.reached``) for ``reason``, at most
        once per user, reason and ``events.sample_seconds``; ``data.count`` says how many
        occurrences it stands for. Decided here, in memory: only an event to write costs a
        task and a statement, off the request's path. Never fails the request it reports."""
        count = self.sampler.admit((paywall_id, user_id or "", event_type, reason),
                                   time.monotonic())
        if count is not None:
            self.tasks.spawn(self._sampled(paywall_id, user_id, event_type, reason, count,
                                           data, request_id))

    async def _sampled(self, paywall_id: str, user_id: str | None, event_type: str,
                       reason: str, count: int, data: Mapping[str, Any],
                       request_id: str | None) -> None:
        try:
            await self.emit(paywall_id, user_id, event_type,
                            {"reason": reason, "count": count, **data}, request_id)
        except Exception as e:
            log.warning("could not write %s for %s/%s: %s", event_type, paywall_id, user_id, e)

    async def depleted(self, paywall_id: str, user_id: str, data: Mapping[str, Any],
                       request_id: str | None) -> None:
        """``balance.depleted``, the first time the user is refused for want of balance
        since their last deposit (one statement: the mark and its event)."""
        try:
            await self.pool.execute(
                "WITH u AS (UPDATE users SET depleted_at = now() WHERE paywall_id = $1"
                "  AND user_id = $2 AND depleted_at IS NULL RETURNING paywall_id, user_id)"
                " SELECT paywall_emit(u.paywall_id, u.user_id, $3, 'balance.depleted',"
                "  $4::jsonb) FROM u", paywall_id, user_id, request_id,
                orjson.dumps(dict(data)).decode())
        except Exception as e:
            log.warning("could not write balance.depleted for %s/%s: %s", paywall_id,
                        user_id, e)

    # ---- settings into the database ------------------------------------------------------

    async def sync(self) -> None:
        """Make the database's low-balance thresholds and settings-defined subscriptions
        those of the settings (API-created subscriptions are left alone)."""
        s = self.settings
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM balance_alerts WHERE user_id = ''"
                               " AND NOT (paywall_id = ANY($1::text[]))", list(s.paywalls))
            for pid, w in s.paywalls.items():
                rows = [(a, units(v, s.assets[a].scale)) for a, v in w.low_balance.items()]
                await conn.execute(
                    "DELETE FROM balance_alerts WHERE paywall_id = $1 AND user_id = ''"
                    " AND NOT (asset = ANY($2::text[]))", pid, [a for a, _ in rows])
                for asset, threshold in rows:
                    await conn.execute(
                        "INSERT INTO balance_alerts (paywall_id, asset, threshold)"
                        " VALUES ($1, $2, $3) ON CONFLICT (paywall_id, user_id, asset)"
                        " DO UPDATE SET threshold = $3", pid, asset, threshold)
                for name, hook in w.webhooks.items():
                    await conn.execute(
                        "INSERT INTO webhook_subscriptions (id, paywall_id, name, source, url,"
                        "  types, secret, headers, allow_private, enabled)"
                        " VALUES ($1, $2, $3, 'settings', $4, $5, $6, $7::jsonb, $8, $9)"
                        " ON CONFLICT (paywall_id, name) DO UPDATE SET url = $4, types = $5,"
                        "  secret = $6, headers = $7::jsonb, allow_private = $8,"
                        "  enabled = CASE WHEN webhook_subscriptions.disabled_reason IS NULL"
                        "    OR webhook_subscriptions.url <> $4 OR NOT $9 THEN $9"
                        "    ELSE webhook_subscriptions.enabled END,"
                        "  disabled_reason = CASE WHEN webhook_subscriptions.url <> $4"
                        "    THEN NULL ELSE webhook_subscriptions.disabled_reason END",
                        new_subscription_id(), pid, name, hook.url, hook.events, hook.secret,
                        orjson.dumps(hook.headers).decode(), hook.allow_private, hook.enabled)
                await conn.execute(
                    "DELETE FROM webhook_subscriptions WHERE paywall_id = $1"
                    " AND source = 'settings' AND NOT (name = ANY($2::text[]))",
                    pid, list(w.webhooks))

    # ---- delivery ------------------------------------------------------------------------

    def _session(self, allow_private: bool) -> aiohttp.ClientSession:
        if allow_private not in self._sessions:
            connector = aiohttp.TCPConnector(
                limit=100, resolver=None if allow_private else _PublicResolver())
            self._sessions[allow_private] = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=self.conf.timeout_seconds))
        return self._sessions[allow_private]

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()

    async def fan_out(self, limit: int = 500) -> int:
        """Turn new events into deliveries for their paywall's enabled subscriptions that
        want them; how many events were fanned."""
        n: int = await self.pool.fetchval(
            "WITH e AS (SELECT id, seq, type, paywall_id, user_id FROM events"
            "   WHERE NOT fanned ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED),"
            " d AS (INSERT INTO webhook_deliveries (subscription_id, event_id, seq, user_key)"
            "   SELECT s.id, e.id, e.seq, coalesce(e.user_id, '') FROM e"
            "   JOIN webhook_subscriptions s ON s.paywall_id = e.paywall_id AND s.enabled"
            "   WHERE paywall_wants(s.types, e.type)"
            "   ON CONFLICT DO NOTHING),"
            " u AS (UPDATE events SET fanned = true FROM e WHERE events.id = e.id"
            "   RETURNING 1)"
            " SELECT count(*) FROM u", limit)
        if n:
            self.metrics.events_written.inc(n)
        return n

    async def claim(self, limit: int) -> list[Any]:
        """Due deliveries whose user has no earlier one pending for the subscription,
        leased to this worker for :data:`LEASE_SECONDS`, with their events."""
        return list(await self.pool.fetch(
            "WITH c AS (SELECT d.subscription_id, d.event_id FROM webhook_deliveries d"
            "   WHERE d.status = 'pending' AND d.next_attempt_at <= now()"
            "     AND (d.lease_until IS NULL OR d.lease_until < now())"
            "     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p"
            "       WHERE p.subscription_id = d.subscription_id AND p.user_key = d.user_key"
            "         AND p.status = 'pending' AND p.seq < d.seq)"
            "   ORDER BY d.next_attempt_at, d.seq LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " UPDATE webhook_deliveries d SET lease_until = now() + make_interval(secs => $2),"
            "   attempts = d.attempts + 1 FROM c, events e, webhook_subscriptions s"
            " WHERE d.subscription_id = c.subscription_id AND d.event_id = c.event_id"
            "   AND e.id = d.event_id AND s.id = d.subscription_id"
            " RETURNING d.subscription_id, d.event_id, d.attempts, e.type, e.version,"
            "   e.paywall_id, e.user_id, e.request_id, e.data, e.created_at, s.url, s.secret,"
            "   s.old_secret, s.old_secret_until, s.headers, s.allow_private, s.enabled",
            limit, LEASE_SECONDS))

    @staticmethod
    def body_of(row: Mapping[str, Any]) -> bytes:
        """The JSON an event is delivered as."""
        return orjson.dumps({
            "id": row["event_id"], "type": row["type"], "version": row["version"],
            "created_at": row["created_at"].astimezone(UTC).isoformat(),
            "paywall": row["paywall_id"], "user": row["user_id"],
            "request_id": row["request_id"], "data": orjson.loads(row["data"]),
        })

    async def send(self, row: Mapping[str, Any]) -> tuple[int | None, str | None]:
        """POST one delivery; the receiver's status (None when it was not reached) and
        what went wrong, if anything."""
        body = self.body_of(row)
        now = datetime.now(UTC)
        keys = [row["secret"]]
        if row["old_secret"] and row["old_secret_until"] and row["old_secret_until"] > now:
            keys.append(row["old_secret"])
        headers = {**orjson.loads(row["headers"]),
                   "content-type": "application/json", "user-agent": "paywall-proxy",
                   "webhook-id": row["event_id"], "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signature(keys, row["event_id"], now, body.decode())}
        try:
            await check_target(row["url"], row["allow_private"])
            async with self._session(row["allow_private"]).post(
                    row["url"], data=body, headers=headers, allow_redirects=False) as r:
                await r.content.read(4096)
                return r.status, None if 200 <= r.status < 300 else f"HTTP {r.status}"
        except PrivateTarget as e:
            return None, str(e)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return None, f"{type(e).__name__}: {e}"[:300]

    async def deliver(self, row: Mapping[str, Any]) -> bool:
        status, error = await self.send(row)
        sub, event = row["subscription_id"], row["event_id"]
        if error is None:
            await self._recorded(
                "WITH d AS (UPDATE webhook_deliveries SET status = 'delivered',"
                "  delivered_at = now(), lease_until = NULL, last_status = $3, last_error = NULL"
                "  WHERE subscription_id = $1 AND event_id = $2 RETURNING 1)"
                " UPDATE webhook_subscriptions SET last_success_at = now() WHERE id = $1",
                sub, event, status)
            self.metrics.events_delivered.inc()
            return True
        self.metrics.events_failed.labels("attempt").inc()
        age = (datetime.now(UTC) - row["created_at"]).total_seconds()
        window = self.conf.retry_hours * 3600
        delay = backoff(row["attempts"], self.conf.first_retry_seconds,
                        self.conf.max_retry_seconds, self._rand)
        if age + delay <= window:
            await self._recorded(
                "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval("
                "  secs => $3), lease_until = NULL, last_status = $4, last_error = $5"
                " WHERE subscription_id = $1 AND event_id = $2", sub, event, delay, status,
                error)
            return False
        self.metrics.events_failed.labels("given_up").inc()
        disabled = await self._recorded(
            "WITH d AS (UPDATE webhook_deliveries SET status = 'failed', lease_until = NULL,"
            "  last_status = $3, last_error = $4 WHERE subscription_id = $1 AND event_id = $2)"
            " UPDATE webhook_subscriptions SET enabled = false, disabled_reason = $5"
            " WHERE id = $1 AND enabled AND coalesce(last_success_at, created_at)"
            "   < now() - make_interval(secs => $6) RETURNING paywall_id",
            sub, event, status, error, f"no delivery succeeded for {self.conf.retry_hours} h"
            f" (last: {error})", window)
        if disabled:
            log.warning("webhook subscription %s disabled: nothing delivered for %s h", sub,
                        self.conf.retry_hours)
            await self.emit(disabled, None, "webhook.subscription.disabled",
                            {"subscription": sub, "url": row["url"], "last_error": error})
        return False

    async def _recorded(self, query: str, *args: Any) -> Any:
        """Write what became of a delivery that was sent, retried while the database is
        unavailable for up to half its lease: unwritten, the delivery would be sent again
        once its lease ends, and hold up its user's later events until then."""
        deadline = time.monotonic() + LEASE_SECONDS / 2
        wait = 0.1
        while True:
            try:
                return await self.pool.fetchval(query, *args)
            except DatabaseUnavailable:
                if time.monotonic() + wait > deadline:
                    raise
                await asyncio.sleep(wait)
                wait = min(wait * 2, 2.0)

    async def round(self) -> int:
        """Fan out, claim and deliver once; how many deliveries were attempted. One
        delivery that fails to be written does not stop the others' being written."""
        await self.fan_out()
        rows = await self.claim(self.conf.batch)
        done = await asyncio.gather(*(self.deliver(r) for r in rows), return_exceptions=True)
        for e in done:
            if isinstance(e, DatabaseUnavailable):
                log.warning("a delivery's outcome could not be written: the database is "
                            "unavailable; it is sent again after its lease")
            elif isinstance(e, BaseException):
                log.error("a delivery failed", exc_info=e)
        return len(rows)

    async def run(self) -> None:
        """The delivery loop of a worker, until cancelled."""
        last_prune = 0.0
        while True:
            try:
                busy = await self.round()
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    await self.prune()
            except DatabaseUnavailable:
                busy = 0
                log.warning("webhook delivery: the database is unavailable; retrying")
            except Exception:
                busy = 0
                log.exception("webhook delivery round failed")
            if not busy:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.conf.poll_seconds)

    async def prune(self) -> int:
        """Forget events older than ``events.retention_days`` with nothing pending."""
        n: int = await self.pool.fetchval(
            "WITH d AS (DELETE FROM events e WHERE e.created_at < now() - make_interval("
            "  days => $1) AND e.fanned AND NOT EXISTS (SELECT 1 FROM webhook_deliveries w"
            "  WHERE w.event_id = e.id AND w.status = 'pending') RETURNING 1)"
            " SELECT count(*) FROM d", self.conf.retention_days)
        return n

    async def oldest_pending_seconds(self) -> float:
        """Age of the oldest event not yet delivered to a subscription that wants it."""
        age = await self.pool.fetchval(
            "SELECT extract(epoch FROM now() - least("
            " (SELECT min(created_at) FROM events WHERE NOT fanned),"
            " (SELECT min(e.created_at) FROM webhook_deliveries d"
            "   JOIN events e ON e.id = d.event_id WHERE d.status = 'pending')))")
        return float(age or 0.0)


@contextlib.asynccontextmanager
async def delivering(events: Events) -> AsyncIterator[None]:
    """Run the delivery loop (when ``events.deliver``) until exit."""
    if not events.conf.deliver:
        yield
        return
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(events.run())
        try:
            yield
        finally:
            task.cancel()
