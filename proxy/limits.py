"""Rate, token and concurrency limits, checked before a request reaches a provider.

Requests and tokens are counted over a sliding window of the last 60 one-second
buckets: a burst of 200 requests against 60 per minute lets exactly 60 through, and
the 61st fits again 60 s after the first. Tokens are counted from the estimate at
admission and corrected with the actual usage at settlement. Concurrency is a set
of leases that expire unless their process renews them, so a process that dies
frees its slots within ``lease_seconds``.

With ``REDIS_URL`` every check for one request — user and paywall, requests, tokens
and concurrency — is one Lua script, one round trip, shared by all replicas; without
it the same algorithm runs in process, for a single replica (:mod:`proxy.redis_limits`
holds the Redis side). Spend caps are not here: they live with the money, in the
ledger's hold.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from proxy.errors import LimiterUnavailable, RateLimited
from proxy.tasks import Shared

log = logging.getLogger("proxy.limits")

WINDOW = 60  # seconds

Kind = Literal["requests", "tokens", "concurrency"]


@dataclass(frozen=True, slots=True)
class Rule:
    key: str
    kind: Kind
    limit: int
    cost: int


@dataclass(frozen=True, slots=True)
class Count:
    """One rule's state as of the check: what was used before this request, and in how
    many seconds the window frees up (enough for this request, when it was refused)."""

    rule: Rule
    used: int
    reset: float


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    counts: tuple[Count, ...] = ()
    refused: Count | None = None
    second: int = 0  # the window bucket this request was counted in

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """:meth:`headers` as an ASGI response carries them (made for every answer)."""
        out: list[tuple[bytes, bytes]] = []
        for kind, limit, remaining, reset in self._tightest():
            out += ((_HEADER_NAMES[kind, "limit"], str(limit).encode()),
                    (_HEADER_NAMES[kind, "remaining"], str(remaining).encode()),
                    (_HEADER_NAMES[kind, "reset"], reset.encode()))
        return out

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers as OpenAI sends them, for the tightest rule of each
        kind (requests, tokens)."""
        out: dict[str, str] = {}
        for kind, limit, remaining, reset in self._tightest():
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = reset
        return out

    def _tightest(self) -> Iterator[tuple[str, int, int, str]]:
        """Of each kind (requests, tokens) the rule with the least room (the first such),
        as (kind, limit, remaining after this request, reset)."""
        for kind in ("requests", "tokens"):
            tightest = None
            for c in (*self.counts, self.refused):
                if c is not None and c.rule.kind == kind and (
                        tightest is None
                        or c.rule.limit - c.used < tightest.rule.limit - tightest.used):
                    tightest = c
            if tightest is None:
                continue
            limit = tightest.rule.limit
            spent = tightest.used + (tightest.rule.cost if self.allowed else 0)
            yield kind, limit, max(limit - spent, 0), duration(tightest.reset)


_HEADER_NAMES = {(kind, what): f"x-ratelimit-{what}-{kind}".encode()
                 for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")}


def duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "250ms"."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def window_check(buckets: Mapping[int, int], now: int, limit: int,
                 cost: int) -> tuple[bool, int, float]:
    """Whether ``cost`` fits under ``limit`` in the window ending at second ``now``.

    Returns (fits, used before, seconds until the window frees: enough room for
    ``cost`` when it does not fit, any room when it does). Pure; the Lua script in
    :class:`proxy.redis_limits.RedisLimiter` is this same function.
    """
    live = sorted((s, c) for s, c in buckets.items() if s > now - WINDOW)
    return _answer(live, sum(c for _, c in live), now, limit, cost)


def _answer(live: Sequence[Sequence[int]], used: int, now: int, limit: int, cost: int
            ) -> tuple[bool, int, float]:
    """:func:`window_check`'s answer from the window's live (second, count) pairs, oldest
    first, and their sum."""
    if used + cost <= limit:
        return True, used, float(live[0][0] + WINDOW - now) if live else 0.0
    need, freed = used + cost - limit, 0
    for s, c in live:
        freed += c
        if freed >= need:
            return False, used, float(s + WINDOW - now)
    return False, used, float(WINDOW)


class Window:
    """One rule's counts by second, oldest first, and their sum: :func:`window_check`'s
    answers as the requests come, without a pass over the whole window each time."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, count], seconds increasing
        self.total = 0

    def check(self, now: int, limit: int, cost: int) -> tuple[bool, int, float]:
        """:func:`window_check` of these counts; the seconds gone from the window are
        dropped."""
        b = self.buckets
        while b and b[0][0] <= now - WINDOW:
            self.total -= b.popleft()[1]
        return _answer(b, self.total, now, limit, cost)

    def add(self, second: int, n: int) -> None:
        """Count ``n`` more at ``second``: the newest, or an earlier one (a correction at
        settlement, or a clock set back), kept in order."""
        b = self.buckets
        self.total += n
        if b and b[-1][0] == second:
            b[-1][1] += n
        elif not b or b[-1][0] < second:
            b.append([second, n])
        else:
            for i in range(len(b) - 1, -1, -1):
                if b[i][0] == second:
                    b[i][1] += n
                    return
                if b[i][0] < second:
                    b.insert(i + 1, [second, n])
                    return
            b.appendleft([second, n])


class Limiter(Protocol):
    async def admit(self, rules: Sequence[Rule], lease: str, lease_ttl: float) -> Verdict: ...

    async def finish(self, verdict: Verdict, lease: str, token_delta: int) -> None: ...

    async def renew(self, leases: Sequence[tuple[str, str]], lease_ttl: float) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class LocalLimiter:
    """The in-process limiter, for one replica without Redis."""

    clock: Any = time.time
    windows: dict[str, Window] = field(default_factory=dict)
    leases: dict[str, dict[str, float]] = field(default_factory=dict)
    # per concurrency key: no lease of it expires before this (a scan is due after)
    _soonest: dict[str, float] = field(default_factory=dict)

    async def admit(self, rules: Sequence[Rule], lease: str, lease_ttl: float) -> Verdict:
        now = self.clock()
        second = int(now)
        counts: list[Count] = []
        for rule in rules:
            if rule.kind == "concurrency":
                held = self.leases.setdefault(rule.key, {})
                if now >= self._soonest.get(rule.key, 0.0):
                    for k in [k for k, expiry in held.items() if expiry <= now]:
                        del held[k]
                    self._soonest[rule.key] = min(held.values(), default=math.inf)
                used = len(held)
                if used + rule.cost > rule.limit:
                    reset = min(held.values()) - now if held else 1.0
                    return Verdict(False, tuple(counts), Count(rule, used, reset), second)
                counts.append(Count(rule, used, 0.0))
            else:
                window = self.windows.get(rule.key)
                if window is None:
                    window = self.windows[rule.key] = Window()
                fits, used, reset = window.check(second, rule.limit, rule.cost)
                if not fits:
                    return Verdict(False, tuple(counts), Count(rule, used, reset), second)
                counts.append(Count(rule, used, reset))
        for rule in rules:
            if rule.kind == "concurrency":
                self.leases[rule.key][lease] = expiry = now + lease_ttl
                if expiry < self._soonest[rule.key]:
                    self._soonest[rule.key] = expiry
            else:
                self.windows[rule.key].add(second, rule.cost)
        return Verdict(True, tuple(counts), None, second)

    async def finish(self, verdict: Verdict, lease: str, token_delta: int) -> None:
        for c in verdict.counts:
            if c.rule.kind == "concurrency":
                self.leases.get(c.rule.key, {}).pop(lease, None)
            elif c.rule.kind == "tokens" and token_delta:
                window = self.windows.get(c.rule.key)
                if window is None:
                    window = self.windows[c.rule.key] = Window()
                window.add(verdict.second, token_delta)

    async def renew(self, leases: Sequence[tuple[str, str]], lease_ttl: float) -> None:
        expiry = self.clock() + lease_ttl
        for key, lease in leases:
            held = self.leases.get(key)
            if held is not None and lease in held:
                held[lease] = expiry
                if expiry < self._soonest.get(key, math.inf):  # a clock set back
                    self._soonest[key] = expiry

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_limiter(redis_url: str | None) -> Limiter:
    """The shared limiter with ``redis_url``, else the one in process."""
    if not redis_url:
        return LocalLimiter()
    from proxy.redis_limits import RedisLimiter  # the Redis client only where it is used

    return RedisLimiter(redis_url)


class Gate:
    """Admits requests through the limiter and keeps their leases alive.

    When the limiter is unreachable a paywall either lets requests through
    (``fail_open``) or refuses them; either way ``errors`` counts it and a log line says.
    """

    def __init__(self, limiter: Limiter):
        self.limiter = limiter
        self.errors = 0
        self._leases: dict[str, tuple[float, list[str]]] = {}

    async def admit(self, rules: Sequence[Rule], lease: str, lease_ttl: float,
                    fail_open: bool) -> Verdict | None:
        """The verdict of an admitted request; raises RateLimited when it is not."""
        if not rules:
            return None
        try:
            verdict = await self.limiter.admit(rules, lease, lease_ttl)
        except LimiterUnavailable as e:
            self.errors += 1
            log.warning("rate limiter unavailable (%s); failing %s", e.__cause__,
                        "open" if fail_open else "closed")
            if fail_open:
                return None
            e.headers = {"retry-after": "1"}
            raise
        if not verdict.allowed:
            raise _refusal(verdict)
        keys = [c.rule.key for c in verdict.counts if c.rule.kind == "concurrency"]
        if keys:
            self._leases[lease] = (lease_ttl, keys)
        return verdict

    async def finish(self, verdict: Verdict | None, lease: str, token_delta: int = 0) -> None:
        """Free the request's leases and correct its token count; never raises."""
        self._leases.pop(lease, None)
        if verdict is None:
            return
        try:
            await self.limiter.finish(verdict, lease, token_delta)
        except LimiterUnavailable as e:
            self.errors += 1
            log.warning("rate limiter unavailable at settlement (%s)", e.__cause__)

    async def renew(self) -> None:
        by_ttl: dict[float, list[tuple[str, str]]] = {}
        for lease, (ttl, keys) in list(self._leases.items()):
            by_ttl.setdefault(ttl, []).extend((k, lease) for k in keys)
        for ttl, leases in by_ttl.items():
            try:
                await self.limiter.renew(leases, ttl)
            except LimiterUnavailable as e:
                self.errors += 1
                log.warning("rate limiter unavailable for lease renewal (%s)", e.__cause__)


def _refusal(verdict: Verdict) -> RateLimited:
    assert verdict.refused is not None
    c = verdict.refused
    scope = "this app" if ":app:" in c.rule.key else "this user"
    wait = duration(c.reset)
    if c.rule.kind == "concurrency":
        message = (f"Too many concurrent requests for {scope}: limit {c.rule.limit}. "
                   f"Please try again in {wait}.")
    else:
        unit = "requests" if c.rule.kind == "requests" else "tokens"
        message = (f"Rate limit reached for {scope} on {unit} per minute: limit "
                   f"{c.rule.limit}, used {c.used}, requested {c.rule.cost}. "
                   f"Please try again in {wait}.")
    headers = verdict.headers()
    headers["retry-after"] = str(max(math.ceil(c.reset), 1))
    kind = "tokens" if c.rule.kind == "tokens" else "requests"
    limit = ("app_" if ":app:" in c.rule.key else "user_") + c.rule.kind
    return RateLimited(message, kind, headers, limit)


# How many ``ttl`` a paywall found to have too many overrides to read whole is read
# user by user before it is asked again.
TOO_MANY_TTLS = 12


class OverrideCache:
    """Users' limit overrides, read from the database and kept ``ttl`` seconds, so a
    change made through the user API takes effect everywhere within that time.

    With ``load_paywall``, a paywall whose users hold few overrides (at most
    ``paywall_size``; most users hold none) is read whole: one statement reads every
    user's that differs from the default, a user not in it has none, and the read is
    made again ahead of its end, in the second half of its life. A request then costs no
    statement of its own whoever sends it, however many users there are and however
    seldom each is seen. A paywall past ``paywall_size`` is read user by user, as
    without it, and counted again after ``TOO_MANY_TTLS`` times ``ttl``.

    User by user, with ``load_many``, an entry read in the second half of its life is
    read again ahead of its end, together with every other such entry gathered over a
    tenth of ``ttl``, in one statement a paywall: a user seen steadily costs one row of
    a shared read every half ``ttl`` rather than a statement of its own.

    What is served is never older than ``ttl``: what the read-ahead has not renewed in
    time is read again before it is served. Requests that miss the same entry together
    share one read (a burst of a new user's requests is one statement, not one each); a
    change told while a read is in flight is not kept from it, and the requests after
    the change read again."""

    def __init__(self, load: Any, ttl: float = 5.0, size: int = 50_000,
                 load_many: Any = None, load_paywall: Any = None,
                 paywall_size: int = 2_000):
        self._load = load
        self._load_many = load_many
        self._load_paywall = load_paywall
        self._paywall_size = paywall_size
        self._ttl = ttl
        self._size = size
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._ageing: set[tuple[str, str]] = set()  # to read ahead
        self._forgotten: set[tuple[str, str]] = set()  # during the read ahead in flight
        self._reading: asyncio.Task[None] | None = None
        self._missed: Shared[dict[str, Any]] = Shared()  # the reads alone in flight
        # A paywall read whole: until when, and its users' overrides (None: too many to
        # hold, read user by user); the reads of paywalls in flight, shared.
        self._paywalls: dict[str, tuple[float, dict[str, dict[str, Any]] | None]] = {}
        self._paywall_reads: Shared[dict[str, dict[str, Any]] | None] = Shared()
        self._ahead_after = 0.0  # no paywall read ahead before (after one failed)
        self.reads_ahead = 0  # statements the read-ahead made (the tests read them)

    async def get(self, paywall_id: str, user_id: str) -> dict[str, Any]:
        now = time.monotonic()
        if self._load_paywall is not None:
            whole = self._paywalls.get(paywall_id)
            if whole is None or whole[0] <= now:
                users = await self._paywall_reads.run(
                    paywall_id, lambda: self._read_paywall(paywall_id, now))
            else:
                if whole[0] - now < self._ttl / 2 and now >= self._ahead_after:
                    self._read_paywall_ahead(paywall_id)
                users = whole[1]
            if users is not None:
                return users.get(user_id, {})
            now = time.monotonic()  # the read above took time: judge entries from now
        key = (paywall_id, user_id)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            if self._load_many is not None and hit[0] - now < self._ttl / 2:
                self._read_ahead(key)
            return hit[1]
        return await self._missed.run(key, lambda: self._read_alone(key, now))

    async def _read_paywall(self, paywall_id: str, started: float
                            ) -> dict[str, dict[str, Any]] | None:
        users: dict[str, dict[str, Any]] | None = await self._load_paywall(
            paywall_id, self._paywall_size)
        if self._paywall_reads.current(paywall_id):  # no change told meanwhile
            # Too many to hold: the users are read one by one, and whether they still
            # are too many is asked again only after a while.
            life = self._ttl if users is not None else self._ttl * TOO_MANY_TTLS
            self._paywalls[paywall_id] = (started + life, users)
        return users

    def _read_paywall_ahead(self, paywall_id: str) -> None:
        if not self._paywall_reads.running(paywall_id):
            self.reads_ahead += 1
            self._paywall_reads.start(
                paywall_id, lambda: self._read_paywall(paywall_id, time.monotonic())
            ).add_done_callback(self._ahead_done)

    def _ahead_done(self, task: asyncio.Task[Any]) -> None:
        """A read ahead that failed is logged, and none is tried for a tenth of ``ttl``
        (a database that fails at once is not asked on every request); what it would
        have renewed ends and is read again when next needed."""
        if not task.cancelled() and (e := task.exception()) is not None:
            log.warning("reading limit overrides ahead failed (%s)", type(e).__name__)
            self._ahead_after = time.monotonic() + self._ttl / 10

    async def _read_alone(self, key: tuple[str, str], started: float) -> dict[str, Any]:
        value: dict[str, Any] = await self._load(*key)
        if self._missed.current(key):  # no change told meanwhile
            self._keep(key, started + self._ttl, value)
        return value

    def _keep(self, key: tuple[str, str], until: float, value: dict[str, Any]) -> None:
        if len(self._cache) >= self._size and key not in self._cache:
            self._cache.clear()
        self._cache[key] = (until, value)

    def _read_ahead(self, key: tuple[str, str]) -> None:
        self._ageing.add(key)
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._read_ageing())

    async def _read_ageing(self) -> None:
        try:
            await asyncio.sleep(self._ttl / 10)  # gather the others ageing meanwhile
            keys, self._ageing = self._ageing, set()
            self._forgotten.clear()
            by_paywall: dict[str, list[str]] = {}
            for paywall_id, user_id in keys:
                by_paywall.setdefault(paywall_id, []).append(user_id)
            for paywall_id, users in by_paywall.items():
                started = time.monotonic()
                self.reads_ahead += 1
                read = await self._load_many(paywall_id, users)
                for user_id in users:
                    key = (paywall_id, user_id)
                    if key not in self._forgotten:  # a change told meanwhile wins
                        self._keep(key, started + self._ttl, read.get(user_id, {}))
        except Exception as e:  # the entries then end and are read alone
            log.warning("reading limit overrides ahead failed (%s)", type(e).__name__)
        finally:
            self._reading = None

    def forget(self, paywall_id: str, user_id: str) -> None:
        """A change to the user's overrides made here: the next request reads them
        again (and its paywall's, when read whole)."""
        # A paywall read whole is read again; one read user by user keeps its count of
        # "too many", and forgets the user's own entry below.
        if (whole := self._paywalls.get(paywall_id)) is not None and whole[1] is not None:
            del self._paywalls[paywall_id]
        self._paywall_reads.forget(paywall_id)
        key = (paywall_id, user_id)
        self._cache.pop(key, None)
        self._missed.forget(key)
        self._ageing.discard(key)
        if self._reading is not None:
            self._forgotten.add(key)

    async def aclose(self) -> None:
        await self._paywall_reads.aclose()
        await self._missed.aclose()
        if (task := self._reading) is not None:
            task.cancel()
            await asyncio.wait([task])  # a close cancelled itself says so
