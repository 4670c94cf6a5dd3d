"""The limiter: the window as a table, and the in-process and Redis limiters run through
the same scenarios (the Redis one against a real redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import LimiterUnavailable, RateLimited
from proxy.limits import (
    Count,
    Gate,
    LocalLimiter,
    Rule,
    Verdict,
    Window,
    duration,
    window_check,
)
from proxy.redis_limits import RedisLimiter, resp
from tests.conftest import RedisServer, start_redis
from tests.upstream import free_port

WINDOW_CASES = [
    ("empty window", {}, 100, 10, 1, (True, 0, 0.0)),
    ("fits exactly", {95: 9}, 100, 10, 1, (True, 9, 55.0)),
    ("one over", {95: 10}, 100, 10, 1, (False, 10, 55.0)),
    ("old buckets drop out", {40: 10, 41: 5}, 100, 10, 1, (True, 5, 1.0)),
    ("the 60th second back is gone", {40: 10}, 100, 10, 10, (True, 0, 0.0)),
    ("waits for enough to free", {50: 3, 70: 3, 90: 4}, 100, 10, 5, (False, 10, 30.0)),
    ("never fits", {}, 100, 10, 11, (False, 0, 60.0)),
]


@pytest.mark.parametrize(("buckets", "now", "limit", "cost", "expected"),
                         [c[1:] for c in WINDOW_CASES], ids=[c[0] for c in WINDOW_CASES])
def test_window(buckets: dict[int, int], now: int, limit: int, cost: int,
                expected: tuple[bool, int, float]) -> None:
    assert window_check(buckets, now, limit, cost) == expected


# A step: a check at a second (the clock mostly moving on, now and then set back) with a
# limit and a cost, counted when it fits; or a correction at a second already counted.
_STEPS = st.lists(st.one_of(
    st.tuples(st.just("check"), st.sampled_from([0, 1, 2, 20, 30, 59, 60, 61, -1, -30]),
              st.integers(0, 30), st.integers(0, 12)),
    st.tuples(st.just("correct"), st.integers(0, 8), st.integers(-10, 10), st.just(0)),
), max_size=60)


@given(_STEPS)
def test_the_kept_window_answers_as_window_check(steps: list[tuple[str, int, int, int]]
                                                 ) -> None:
    """The in-process limiter's running window and the pure function (the Redis
    script's) agree on every check, whatever the order of seconds and corrections."""
    window, buckets, now, seen = Window(), {}, 1_000, [1_000]
    for what, a, b, c in steps:
        if what == "check":
            now += a
            expected = window_check(buckets, now, b, c)
            assert window.check(now, b, c) == expected
            for s in [s for s in buckets if s <= now - 60]:  # as the limiter drops them
                del buckets[s]
            if expected[0]:
                buckets[now] = buckets.get(now, 0) + c
                window.add(now, c)
                seen.append(now)
        else:
            second = seen[-1 - a % len(seen)]
            buckets[second] = buckets.get(second, 0) + b
            window.add(second, b)


@pytest.mark.parametrize("commands", [
    [["EVALSHA", "ab" * 20, 2, "pl:{t}:k1", "pl:{t}:kö", "lease", 30_000, "requests", 60, 1]],
    [["ZREM", "k", "l"], ["HINCRBY", "k", "1700000000", -700], ["SET", b"\x00\r\n", 1.5]],
    [["PING"]],
    [["SET", "k", "x" * 7000], ["SET", "big", 10**30], ["SET", "neg", -1e-7]],
])
def test_commands_are_packed_as_redis_py_packs_them(commands: list[list[Any]]) -> None:
    from redis.asyncio.connection import Connection
    assert resp(commands) == b"".join(Connection().pack_commands(commands))


def test_an_argument_redis_cannot_take_is_refused_as_redis_py_refuses_it() -> None:
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError
    for bad in (True, None):
        with pytest.raises(DataError):
            Connection().pack_commands([["SET", "k", bad]])
        with pytest.raises(DataError):  # a RedisError: the limiter is unavailable
            resp([["SET", "k", bad]])


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (1, "1s"), (1.2, "2s"),
                                                (59, "59s"), (60, "1m0s"), (361, "6m1s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "local":
        yield LocalLimiter()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    r = RedisLimiter(server.url)
    try:
        yield r
    finally:
        await r.close()


def key(name: str) -> str:
    return f"pl:{{t}}:{uuid.uuid4().hex}:{name}"


async def test_a_burst_passes_exactly_the_limit(limiter: Any) -> None:
    rule = Rule(key("rpm"), "requests", 60, 1)
    verdicts = await asyncio.gather(*[limiter.admit([rule], f"r{i}", 30) for i in range(200)])
    assert sum(v.allowed for v in verdicts) == 60
    refused = next(v for v in verdicts if not v.allowed)
    assert refused.refused is not None and refused.refused.used == 60
    headers = refused.headers()
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < refused.refused.reset <= 60


async def test_all_rules_or_none(limiter: Any) -> None:
    ok = Rule(key("rpm"), "requests", 10, 1)
    tight = Rule(key("tpm"), "tokens", 100, 150)
    verdict = await limiter.admit([ok, tight], "r1", 30)
    assert not verdict.allowed and verdict.refused.rule == tight
    assert [c.rule for c in verdict.counts] == [ok]
    # Nothing was counted against the rule that passed.
    again = await limiter.admit([ok], "r2", 30)
    assert again.allowed and again.counts[0].used == 0


async def test_concurrency_leases(limiter: Any) -> None:
    rule = Rule(key("conc"), "concurrency", 2, 1)
    first = await limiter.admit([rule], "a", 30)
    second = await limiter.admit([rule], "b", 30)
    third = await limiter.admit([rule], "c", 30)
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    await limiter.finish(first, "a", 0)
    assert (await limiter.admit([rule], "c", 30)).allowed


async def test_leases_expire_unless_renewed(limiter: Any) -> None:
    rule = Rule(key("conc"), "concurrency", 1, 1)
    kept = Rule(key("conc"), "concurrency", 1, 1)
    assert (await limiter.admit([rule], "dead", 0.3)).allowed
    assert (await limiter.admit([kept], "alive", 0.3)).allowed
    for _ in range(4):
        await asyncio.sleep(0.1)
        await limiter.renew([(kept.key, "alive")], 0.3)
    assert (await limiter.admit([rule], "next", 0.3)).allowed  # the dead lease freed itself
    assert not (await limiter.admit([kept], "next", 0.3)).allowed  # the renewed one did not


async def test_tokens_are_corrected_at_settlement(limiter: Any) -> None:
    rule = Rule(key("tpm"), "tokens", 1000, 800)
    first = await limiter.admit([rule], "a", 30)
    assert first.allowed
    assert not (await limiter.admit([rule], "b", 30)).allowed
    await limiter.finish(first, "a", 100 - 800)  # it really used 100
    second = await limiter.admit([rule], "c", 30)
    assert second.allowed and second.counts[0].used == 100


async def test_the_window_slides() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    rule = Rule("k", "requests", 2, 1)
    assert (await limiter.admit([rule], "a", 30)).allowed
    clock.now += 30
    assert (await limiter.admit([rule], "b", 30)).allowed
    assert not (await limiter.admit([rule], "c", 30)).allowed
    clock.now += 30  # the first request is now 60 s old
    assert (await limiter.admit([rule], "d", 30)).allowed
    assert not (await limiter.admit([rule], "e", 30)).allowed


async def test_a_lease_not_renewed_frees_its_slot_and_a_renewed_one_does_not() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    rule = Rule("c", "concurrency", 2, 1)
    assert (await limiter.admit([rule], "kept", 30)).allowed
    clock.now += 10
    assert (await limiter.admit([rule], "lost", 30)).allowed  # its process dies
    assert not (await limiter.admit([rule], "x", 30)).allowed
    clock.now += 25
    await limiter.renew([("c", "kept")], 30)  # kept: now until 65 s from the start
    assert not (await limiter.admit([rule], "x", 30)).allowed  # 35 s: none expired
    clock.now += 6  # 41 s: "lost" (until 40 s) has expired
    assert (await limiter.admit([rule], "y", 30)).allowed
    assert not (await limiter.admit([rule], "z", 30)).allowed
    clock.now -= 40  # set back: a renewal now ends sooner than anything seen before
    await limiter.renew([("c", "kept")], 5)  # until 6 s
    clock.now += 6
    assert (await limiter.admit([rule], "z", 30)).allowed  # "kept" has expired


async def test_gate_refuses_with_openai_headers_and_fails_open_or_closed(
        redis_server: RedisServer) -> None:
    gate = Gate(LocalLimiter())
    rule = Rule(key("rpm"), "requests", 1, 1)
    assert isinstance(await gate.admit([rule], "a", 30, True), Verdict)
    with pytest.raises(RateLimited) as refused:
        await gate.admit([rule], "b", 30, True)
    assert refused.value.status == 429 and refused.value.kind == "requests"
    assert int(refused.value.headers["retry-after"]) >= 1
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert await gate.admit([], "c", 30, True) is None  # no rules, nothing to ask

    dead = Gate(RedisLimiter("redis://127.0.0.1:1/0"))
    started = time.monotonic()
    assert await dead.admit([rule], "d", 30, fail_open=True) is None
    assert time.monotonic() - started < 0.5  # refused: no timeout to wait for
    with pytest.raises(LimiterUnavailable) as closed:
        await dead.admit([rule], "e", 30, fail_open=False)
    assert closed.value.status == 503 and closed.value.headers["retry-after"] == "1"
    assert dead.errors == 2
    await dead.finish(Verdict(True, (), None, 0), "d")  # never raises
    await dead.limiter.close()


BUSY = """local t0 = redis.call('TIME')
repeat local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
return 1"""


def keep_redis_busy(port: int, seconds: float) -> socket.socket:
    """Redis runs one script at a time: this one spins for ``seconds``, so what is sent
    meanwhile is answered after it."""
    sock = socket.create_connection(("127.0.0.1", port))
    parts = [b"EVAL", BUSY.encode(), b"0", str(int(seconds * 1e6)).encode()]
    sock.sendall(b"*%d\r\n" % len(parts)
                 + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    return sock


async def test_a_stalled_event_loop_is_not_a_dead_redis(redis_server: RedisServer) -> None:
    """The reply to an admission arrives while the event loop is stuck for longer than
    a Redis round trip could ever take: it is read late, not taken for an outage."""
    gate = Gate(RedisLimiter(redis_server.url))
    rule = Rule(key("rpm"), "requests", 10, 1)
    try:
        await gate.limiter.ping()  # a pooled connection, as in a running proxy

        async def stall() -> None:
            await asyncio.sleep(0.05)  # the admission has sent its script by now
            time.sleep(1.5)  # noqa: ASYNC251  # the point: the whole loop is stuck

        with keep_redis_busy(redis_server.port, 0.3):  # its reply comes during the stall
            verdict, _ = await asyncio.gather(
                gate.admit([rule], "a", 30, fail_open=True), stall())
        assert isinstance(verdict, Verdict) and verdict.allowed
        assert gate.errors == 0
    finally:
        await gate.limiter.close()


async def test_a_redis_that_stops_answering_is_unavailable_after_the_read_timeout() -> None:
    port = free_port()
    server = start_redis(port)
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", read_timeout=0.5)
    gate = Gate(limiter)
    rule = Rule(key("rpm"), "requests", 10, 1)
    try:
        assert isinstance(await gate.admit([rule], "a", 30, fail_open=True), Verdict)
        server.send_signal(signal.SIGSTOP)  # connected, but never answers
        started = time.monotonic()
        assert await gate.admit([rule], "b", 30, fail_open=True) is None
        # The reply waited for, then once more on a fresh connection.
        assert 0.9 < time.monotonic() - started < 3
        assert gate.errors == 1
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()
        await limiter.close()


async def test_requests_in_flight_together_share_pipelines_each_with_its_own_outcome(
        redis_server: RedisServer) -> None:
    """Admissions and settlements made at the same moment go to Redis in a few
    pipelines, and each gets what it would alone: the first five of a burst on a
    concurrency limit of five, the settlements free exactly their own leases, and a
    command that fails (a key of the wrong type) fails its own call only."""
    limiter = RedisLimiter(redis_server.url)
    try:
        rule = Rule(key("conc"), "concurrency", 5, 1)
        wrong = Rule(key("wrong"), "tokens", 100, 1)
        await limiter.redis.set(wrong.key, "not a hash")
        before = limiter.pipelined.pipelines
        verdicts = await asyncio.gather(
            *[limiter.admit([rule], f"r{i}", 30) for i in range(40)],
            limiter.admit([wrong], "w", 30), return_exceptions=True)
        assert limiter.pipelined.pipelines - before < 5  # 41 calls, few round trips
        *burst, failed = verdicts
        assert [v.allowed for v in burst] == [True] * 5 + [False] * 35  # in order
        assert isinstance(failed, LimiterUnavailable)
        await asyncio.gather(*[limiter.finish(v, f"r{i}", 0)
                               for i, v in enumerate(burst[:3])])
        assert await limiter.redis.zcard(rule.key) == 2
        with pytest.raises(LimiterUnavailable):  # through the gate's translation
            await Gate(limiter).admit([wrong], "w2", 30, fail_open=False)
    finally:
        await limiter.close()


async def test_a_redis_that_lost_its_scripts_gets_them_again(redis_server: RedisServer
                                                             ) -> None:
    limiter = RedisLimiter(redis_server.url)
    try:
        rule = Rule(key("rpm"), "requests", 3, 1)
        assert (await limiter.admit([rule], "a", 30)).allowed
        await limiter.redis.script_flush()  # as a restarted Redis
        verdicts = await asyncio.gather(*[limiter.admit([rule], f"b{i}", 30)
                                          for i in range(4)])
        assert [v.allowed for v in verdicts] == [True, True, False, False]
    finally:
        await limiter.close()


async def test_a_settlement_sent_with_an_admission_that_lost_its_script_counts_once(
        redis_server: RedisServer) -> None:
    """Only the calls whose script Redis no longer had run again: a token correction
    that shared their pipeline is applied once (it was applied twice)."""
    limiter = RedisLimiter(redis_server.url)
    try:
        tokens = Rule(key("tpm"), "tokens", 10**9, 100)
        verdict = await limiter.admit([tokens], "a", 30)
        await limiter.redis.script_flush()  # as a Redis restarted with its data
        other = Rule(key("rpm"), "requests", 10**9, 1)
        _, admitted = await asyncio.gather(limiter.finish(verdict, "a", 500),
                                           limiter.admit([other], "b", 30))
        assert admitted.allowed
        counted = await limiter.redis.hgetall(tokens.key)
        assert sum(int(v) for v in counted.values()) == 100 + 500
        assert sum(int(v) for v in (await limiter.redis.hgetall(other.key)).values()) == 1
    finally:
        await limiter.close()


async def test_a_call_made_while_a_stuck_pipeline_is_out_waits_for_its_own_only() -> None:
    """A Redis that stops answering fails each call after its own timeouts, not after
    those of a pipeline sent before it too (calls waited for that one first)."""
    port = free_port()
    server = start_redis(port)
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", read_timeout=1.0)
    rule = Rule(key("rpm"), "requests", 1000, 1)
    try:
        await limiter.admit([rule], "warm", 30)
        server.send_signal(signal.SIGSTOP)

        async def waited(delay: float, lease: str) -> float:
            await asyncio.sleep(delay)
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await limiter.admit([rule], lease, 30)
            return time.monotonic() - started

        first, second = await asyncio.gather(waited(0, "a"), waited(0.5, "b"))
        # Each: its read, then once more on a fresh connection (whose handshake waits
        # too): a few read timeouts, not those of the pipeline before it as well.
        assert first < 6 and second < 6
        assert second < 1.6 * first
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()
        await limiter.close()


class _StallingRelay:
    """A TCP relay to Redis that, once armed, passes on the first reply line of the
    next pipeline carrying two token corrections and then holds every later byte of
    that connection back (a link that stalls mid-reply)."""

    def __init__(self, redis_port: int):
        self.redis_port = redis_port
        self.armed = False

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                     ) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        stall = [False]

        async def up() -> None:
            with contextlib.suppress(Exception):
                while data := await client_r.read(65536):
                    if self.armed and data.count(b"HINCRBY") >= 2:
                        self.armed, stall[0] = False, True
                    redis_w.write(data)
                    await redis_w.drain()
            redis_w.close()

        async def down() -> None:
            with contextlib.suppress(Exception):
                while data := await redis_r.read(65536):
                    if stall[0]:
                        line, sep, _ = data.partition(b"\r\n")
                        client_w.write(line + sep)
                        await client_w.drain()
                        await asyncio.sleep(3600)
                    client_w.write(data)
                    await client_w.drain()
            client_w.close()

        await asyncio.gather(up(), down(), return_exceptions=True)


async def test_a_reply_read_before_the_link_stalled_is_not_sent_again(
        redis_server: RedisServer) -> None:
    """Two settlements share a pipeline; the first's reply arrives, then the link
    stalls past the read timeout. Only the unanswered one is sent again: the first
    correction counts once (the whole pipeline was sent again, counting it twice)."""
    relay = _StallingRelay(redis_server.port)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", read_timeout=1.0)
    try:
        a, b = Rule(key("tpm-a"), "tokens", 10**9, 100), Rule(key("tpm-b"), "tokens", 10**9, 100)
        va = await limiter.admit([a], "la", 30)
        vb = await limiter.admit([b], "lb", 30)
        relay.armed = True
        await asyncio.gather(limiter.finish(va, "la", 500), limiter.finish(vb, "lb", 700),
                             return_exceptions=True)
        assert sum(int(v) for v in (await limiter.redis.hgetall(a.key)).values()) == 600
    finally:
        await limiter.close()
        server.close()


def _headers_as_first_written(v: Verdict) -> dict[str, str]:
    """The x-ratelimit-* headers as Verdict.headers first made them, the reference."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        counts = [c for c in v.counts if c.rule.kind == kind]
        if v.refused is not None and v.refused.rule.kind == kind:
            counts.append(v.refused)
        if not counts:
            continue
        c = min(counts, key=lambda c: c.rule.limit - c.used)
        spent = c.used + (c.rule.cost if v.allowed else 0)
        out[f"x-ratelimit-limit-{kind}"] = str(c.rule.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(max(c.rule.limit - spent, 0))
        out[f"x-ratelimit-reset-{kind}"] = duration(c.reset)
    return out


_COUNTS = st.builds(
    Count, st.builds(Rule, st.sampled_from(["a", "b", "c"]),
                     st.sampled_from(["requests", "tokens", "concurrency"]),
                     st.integers(1, 50), st.integers(0, 20)),
    st.integers(0, 60), st.floats(0, 120))


@given(st.booleans(), st.lists(_COUNTS, max_size=6), st.none() | _COUNTS)
def test_the_rate_limit_headers_name_the_first_tightest_rule_of_each_kind(
        allowed: bool, counts: list[Count], refused: Count | None) -> None:
    v = Verdict(allowed, tuple(counts), refused)
    assert v.headers() == _headers_as_first_written(v)
    assert v.raw_headers() == [(k.encode(), s.encode()) for k, s in v.headers().items()]
