"""The shared limiter, over Redis: every check for one request (user and paywall,
requests, tokens and concurrency) is one Lua script and one round trip, shared by all
replicas. The algorithm is :class:`proxy.limits.LocalLimiter`'s; this module is loaded
only when ``REDIS_URL`` is set (:func:`proxy.limits.build_limiter`), so that a process
without Redis does not hold the client library.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import LimiterUnavailable
from proxy.limits import Count, Rule, Verdict

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
