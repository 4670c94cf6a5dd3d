"""Rate, token and concurrency limits, checked before a request reaches a provider.

Requests and tokens are counted over a sliding window of the last 60 one-second
buckets: a burst of 200 requests against 60 per minute lets exactly 60 through, and
the 61st fits again 60 s after the first. Tokens are counted from the estimate at
admission and corrected with the actual usage at settlement. Concurrency is a set
of leases that expire unless their process renews them, so a process that dies
frees its slots within ``lease_seconds``.

With ``REDIS_URL`` every check for one request — user and paywall, requests, tokens
and concurrency — is one Lua script, one round trip, shared by all replicas; without
it the same algorithm runs in process, for a single replica. Spend caps are not
here: they live with the money, in the ledger's hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import LimiterUnavailable, RateLimited

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
        return [(k.encode(), v.encode()) for k, v in self.headers().items()]

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers as OpenAI sends them, for the tightest rule of each
        kind (requests, tokens)."""
        out: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            counts = [c for c in self.counts if c.rule.kind == kind]
            if self.refused is not None and self.refused.rule.kind == kind:
                counts.append(self.refused)
            if not counts:
                continue
            c = min(counts, key=lambda c: c.rule.limit - c.used)
            spent = c.used + (c.rule.cost if self.allowed else 0)
            out[f"x-ratelimit-limit-{kind}"] = str(c.rule.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(c.rule.limit - spent, 0))
            out[f"x-ratelimit-reset-{kind}"] = duration(c.reset)
        return out


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
    :class:`RedisLimiter` is this same function.
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


# KEYS: one per rule. ARGV: lease id, lease ttl (ms), then kind, limit, cost per rule.
# Returns {allowed, now_s, refused index (0 if none), then used, reset per rule checked}.
_ADMIT = """
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local kind, limit, cost = ARGV[3*i], tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2])
  local used, reset = 0, 0
  if kind == 'concurrency' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    used = redis.call('ZCARD', key)
    if used + cost > limit then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      reset = (tonumber(first[2]) - now_ms) / 1000
      table.insert(out, used); table.insert(out, tostring(reset))
      return {0, now_s, i, unpack(out)}
    end
  else
    local flat = redis.call('HGETALL', key)
    local live = {}
    for j = 1, #flat, 2 do
      local s = tonumber(flat[j])
      if s <= now_s - 60 then
        redis.call('HDEL', key, flat[j])
      else
        local c = tonumber(flat[j + 1])
        used = used + c
        table.insert(live, {s, c})
      end
    end
    table.sort(live, function(a, b) return a[1] < b[1] end)
    if used + cost > limit then
      local need, freed = used + cost - limit, 0
      reset = 60
      for _, b in ipairs(live) do
        freed = freed + b[2]
        if freed >= need then reset = b[1] + 60 - now_s; break end
      end
      table.insert(out, used); table.insert(out, tostring(reset))
      return {0, now_s, i, unpack(out)}
    end
    if #live > 0 then reset = live[1][1] + 60 - now_s end
  end
  table.insert(out, used); table.insert(out, tostring(reset))
end
for i, key in ipairs(KEYS) do
  local kind, cost = ARGV[3*i], tonumber(ARGV[3*i+2])
  if kind == 'concurrency' then
    redis.call('ZADD', key, now_ms + ttl, lease)
    redis.call('PEXPIRE', key, ttl)
  else
    redis.call('HINCRBY', key, now_s, cost)
    redis.call('EXPIRE', key, 61)
  end
end
return {1, now_s, 0, unpack(out)}
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()  # how EVALSHA names it


class RedisLimiter:
    """The shared limiter: one Lua script per request, whatever the number of rules.

    Its timeouts tell a busy proxy from a dead Redis. A Redis that is gone refuses the
    connection at once, whatever the timeouts, and the limiter is unavailable within
    milliseconds. A slow answer, though, is nearly always this process's own event loop
    running late under load: a healthy Redis answers in well under a millisecond, but the
    reply is only read when the loop gets to it. So an answer is waited for
    ``read_timeout`` seconds (several, far above any loop lag worth serving through),
    and a connection ``connect_timeout`` seconds, short, since a live host answers a
    connect at once. A command that fails for a closed connection or a timeout is tried
    once more on a fresh connection: a pooled connection may have died with an earlier
    Redis, and a timeout may still have been the loop. (A command retried after its reply
    timed out may have run twice: an admission then counts twice, which errs toward
    refusing; a token correction at settlement is applied twice.) Callers queue for a
    free pooled connection rather than fail.
    """

    def __init__(self, url: str, read_timeout: float = 5.0, connect_timeout: float = 1.0,
                 connections: int = 64):
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=read_timeout + connect_timeout,
            socket_timeout=read_timeout, socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1))
        self.redis = redis.Redis(connection_pool=pool)
        self.pipelined = Pipelined(self.redis, {_ADMIT_SHA: _ADMIT})

    async def admit(self, rules: Sequence[Rule], lease: str, lease_ttl: float) -> Verdict:
        command: list[Any] = ["EVALSHA", _ADMIT_SHA, len(rules), *[r.key for r in rules],
                              lease, int(lease_ttl * 1000)]
        for r in rules:
            command += [r.kind, r.limit, r.cost]
        with _unavailable_on_error():
            result = (await self.pipelined.run([command]))[0]
        allowed, second, refused_at = int(result[0]), int(result[1]), int(result[2])
        pairs = result[3:]
        counts = [Count(rules[i], int(pairs[2 * i]), float(pairs[2 * i + 1]))
                  for i in range(len(pairs) // 2)]
        if allowed:
            return Verdict(True, tuple(counts), None, second)
        refused = counts.pop(refused_at - 1)
        return Verdict(False, tuple(counts), refused, second)

    async def finish(self, verdict: Verdict, lease: str, token_delta: int) -> None:
        commands: list[list[Any]] = []
        for c in verdict.counts:
            if c.rule.kind == "concurrency":
                commands.append(["ZREM", c.rule.key, lease])
            elif c.rule.kind == "tokens" and token_delta:
                commands.append(["HINCRBY", c.rule.key, str(verdict.second), token_delta])
        if commands:
            with _unavailable_on_error():
                await self.pipelined.run(commands)

    async def renew(self, leases: Sequence[tuple[str, str]], lease_ttl: float) -> None:
        if not leases:
            return
        with _unavailable_on_error():
            seconds, micros = await self.redis.time()
            expiry = seconds * 1000 + micros // 1000 + int(lease_ttl * 1000)
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, lease in leases:
                    pipe.zadd(key, {lease: expiry}, xx=True)
                    pipe.pexpire(key, int(lease_ttl * 1000))
                await pipe.execute()

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.pipelined.aclose()
        await self.redis.aclose(close_connection_pool=True)


class Pipelined:
    """Redis commands of requests in flight at the same moment, sent as one pipeline:
    one connection taken from the pool, one write, one read of all the replies, where
    each command alone would cost a round trip and the client's per-command machinery.

    The calls made in one turn of the event loop go out together at its end, each
    pipeline on a pooled connection of its own, so a call waits for its own pipeline
    only (a Redis that stops answering fails it after the client's timeouts, as a lone
    command would). The commands run in Redis one after another, each as it would alone
    (a script runs whole): a call's outcome is its own replies, or its own error. A call
    whose script Redis no longer has (it restarted) is run again, alone of its pipeline,
    once the script is loaded. A connection that fails is replaced once, and only the
    commands whose replies were not read yet are sent again (:meth:`_exchange`); a call
    still unanswered then fails with the connection's error, as it would alone."""

    def __init__(self, client: Any, scripts: Mapping[str, str], max_calls: int = 256):
        self.client = client
        self.scripts = dict(scripts)  # sha → source, for a Redis that lost them
        self.max_calls = max_calls
        self._queue: list[_Call] = []
        self._due = False  # a flush is scheduled for the end of this turn
        self._sending: set[asyncio.Task[None]] = set()
        self.pipelines = 0  # sent (the tests read them)

    async def run(self, commands: list[list[Any]]) -> list[Any]:
        """The replies to ``commands``, run one after another in this turn's pipeline;
        raises the first command's error, if one fails."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((commands, future))
        if not self._due:
            self._due = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._due = False
        calls, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        for at in range(0, len(calls), self.max_calls):
            task = loop.create_task(self._pipeline(calls[at:at + self.max_calls]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _pipeline(self, calls: list[_Call]) -> None:
        try:
            replies = await self._replies(calls)
            lost = [i for i, mine in enumerate(replies)
                    if isinstance(mine, list) and any(isinstance(r, NoScriptError) for r in mine)]
            self._answer([(c, r) for i, (c, r) in enumerate(zip(calls, replies, strict=True))
                          if i not in lost])
            if lost:  # only those calls ran nothing: load the scripts, run them again
                for source in self.scripts.values():
                    await self.client.script_load(source)
                again = [calls[i] for i in lost]
                self._answer(list(zip(again, await self._replies(again), strict=True)))
        except BaseException as e:  # a bug, or stopped: each call not answered fails
            for _, future in calls:
                if not future.done():
                    future.set_exception(_copy(e))
            if not isinstance(e, Exception):
                raise

    @staticmethod
    def _answer(answered: list[tuple[_Call, list[Any] | BaseException]]) -> None:
        for (_, future), mine in answered:
            if future.done():
                continue
            if isinstance(mine, BaseException):
                future.set_exception(_copy(mine))
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(mine)

    async def _replies(self, calls: list[_Call]) -> list[list[Any] | BaseException]:
        """Each call's replies (an error in place of a command's reply that failed), or
        the connection's error for a call whose replies did not all come."""
        flat, error = await self._exchange([c for commands, _ in calls for c in commands])
        out: list[list[Any] | BaseException] = []
        at = 0
        for commands, _ in calls:
            mine = flat[at:at + len(commands)]
            at += len(commands)
            out.append(mine if len(mine) == len(commands) or error is None else error)
        return out

    async def _exchange(self, commands: list[list[Any]]
                        ) -> tuple[list[Any], BaseException | None]:
        """The replies read, in order (a ResponseError in place of an error reply), and
        the error that stopped the rest, if any. A connection that fails while replies
        are still owed is replaced once and the commands not yet answered are sent
        again: each command is tried at most twice, and only when its own reply was
        lost (it may then have run twice, as a lone command tried again would), never
        one already answered."""
        replies: list[Any] = []
        try:
            await self._send(commands, replies)
        except (RedisConnectionError, RedisTimeoutError):
            try:
                await self._send(commands[len(replies):], replies)
            except (RedisConnectionError, RedisTimeoutError) as e:
                return replies, e
        return replies, None

    async def _send(self, commands: list[list[Any]], replies: list[Any]) -> None:
        self.pipelines += 1
        pool = self.client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(resp(commands))
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as e:
                    replies.append(e)
        except BaseException:
            await connection.disconnect(nowait=True)  # replies may still be owed on it
            raise
        finally:
            await pool.release(connection)

    async def aclose(self) -> None:
        """Send what is queued and wait for the pipelines out (at shutdown)."""
        if self._queue:
            self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


_Call = tuple[list[list[Any]], "asyncio.Future[list[Any]]"]


def resp(commands: Sequence[Sequence[str | bytes | int | float]]) -> bytes:
    """``commands`` in Redis's protocol (RESP arrays of bulk strings), as one buffer:
    what redis-py's ``pack_commands`` writes (str as UTF-8, int in decimal, float as its
    repr), without its per-argument machinery or its chunks, which go out one by one."""
    out = bytearray()
    for command in commands:
        out += b"*%d\r\n" % len(command)
        for arg in command:
            if isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, int) and not isinstance(arg, bool):
                data = b"%d" % arg
            elif isinstance(arg, float):
                data = repr(arg).encode()
            else:
                raise DataError(f"not a Redis argument: {type(arg).__name__}")  # as redis-py
            out += b"$%d\r\n%b\r\n" % (len(data), data)
    return bytes(out)


def _copy(error: BaseException) -> Exception:
    """An error of its own for each caller (tracebacks differ), caused by ``error``: a
    Redis or connection error stays one, and so does a pipeline stopped at shutdown (the
    limiter is then unavailable); anything else is a bug, and says so."""
    own: Exception
    if isinstance(error, RedisError | OSError):
        try:
            own = type(error)(*error.args)
        except Exception:
            own = RedisError(str(error))
    elif isinstance(error, asyncio.CancelledError):
        own = RedisError("the limiter's pipeline was stopped")
    else:
        own = RuntimeError(f"the limiter's pipeline failed: {error!r}")
    own.__cause__ = error
    return own


class _unavailable_on_error:
    """Redis errors become LimiterUnavailable, here and only here."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, RedisError | OSError):
            raise LimiterUnavailable("The rate limiter is unavailable.") from exc


def build_limiter(redis_url: str | None) -> Limiter:
    return RedisLimiter(redis_url) if redis_url else LocalLimiter()


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


class OverrideCache:
    """Users' limit overrides, read from the database and kept ``ttl`` seconds, so a
    change made through the user API takes effect everywhere within that time.

    With ``load_many``, an entry read in the second half of its life is read again
    ahead of its end, together with every other such entry gathered over a tenth of
    ``ttl``, in one statement a paywall: a user seen steadily costs one row of a shared
    read every half ``ttl`` rather than a statement of its own. What is served is never
    older than ``ttl``: an entry the read-ahead has not renewed in time is read alone,
    as without it."""

    def __init__(self, load: Any, ttl: float = 5.0, size: int = 50_000,
                 load_many: Any = None):
        self._load = load
        self._load_many = load_many
        self._ttl = ttl
        self._size = size
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._ageing: set[tuple[str, str]] = set()  # to read ahead
        self._forgotten: set[tuple[str, str]] = set()  # during the read ahead in flight
        self._reading: asyncio.Task[None] | None = None
        self.reads_ahead = 0  # statements the read-ahead made (the tests read them)

    async def get(self, paywall_id: str, user_id: str) -> dict[str, Any]:
        now = time.monotonic()
        key = (paywall_id, user_id)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            if self._load_many is not None and hit[0] - now < self._ttl / 2:
                self._read_ahead(key)
            return hit[1]
        value: dict[str, Any] = await self._load(paywall_id, user_id)
        self._keep(key, now + self._ttl, value)
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
        key = (paywall_id, user_id)
        self._cache.pop(key, None)
        self._ageing.discard(key)
        if self._reading is not None:
            self._forgotten.add(key)

    async def aclose(self) -> None:
        if (task := self._reading) is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
