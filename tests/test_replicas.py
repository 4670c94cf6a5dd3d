"""Two replicas, one PostgreSQL, one Redis: a burst split between them spends a funded
balance exactly once.

Each request costs a flat ``per_request`` price, so its hold and its charge are the same
known amount and a balance of K of them lets exactly K requests through, however the
two processes interleave. The books are read from the database, the forwarded requests
counted at the local upstream, and both replicas' /metrics must add up to the same.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from tests.conftest import (
    Proxy,
    RedisServer,
    Samples,
    by,
    mint_key,
    parse_metrics,
    start_proxy,
    stop_proxy,
)
from tests.upstream import WORDS, Upstream

SCALE = 10**9  # usd's smallest unit
PRICE = "0.001"  # per request, in usd
PRICE_UNITS = 1_000_000
FUNDED = 40  # requests the deposit pays for
BURST = 300
CHAT = "/v1/chat/completions"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello from a replica"}]


def replicas_config(upstream: Upstream) -> str:
    return f"""
[database]
pool_min = 2
pool_max = 6

[upstream]
read_timeout = 20.0
stream_idle_timeout = 20.0

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[models.r-echo]
provider = "up"
upstream = "echo"
price = {{ per_request = "{PRICE}" }}

[models.r-chunks]
provider = "up"
upstream = "chunks"
price = {{ per_request = "{PRICE}" }}

[paywalls.rep]
name = "Replicated app"
starter_grant = "0"

[paywalls.rep.limits]  # generous, but counted in the shared Redis on every request
user_requests_per_minute = 100000
user_concurrency = 1000
paywall_requests_per_minute = 100000
"""


@dataclass
class Replicas:
    proxies: tuple[Proxy, Proxy]
    key: str
    upstream: Upstream
    redis_url: str


@pytest.fixture(scope="module")
def replicas(upstream: Upstream, own_database_url: str, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("replicas")
    config = workdir / "proxy.toml"
    config.write_text(replicas_config(upstream))
    env = {"REDIS_URL": redis_server.url}
    with ThreadPoolExecutor(2) as pool:  # two processes start (and stop) side by side
        starting = [pool.submit(start_proxy, config, own_database_url, workdir, env)
                    for _ in range(2)]
        started = [f.result() for f in as_completed(starting) if not f.exception()]
        try:
            assert len(started) == 2, [f.exception() for f in starting]
            yield Replicas((started[0], started[1]), mint_key(own_database_url, "rep"),
                           upstream, redis_server.url)
        finally:
            list(pool.map(stop_proxy, started))


@pytest.fixture(scope="module")
async def pg(own_database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(own_database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@dataclass(frozen=True)
class Answer:
    replica: int
    request_id: str
    action: str | None  # X-Paywall-Action; None when forwarded
    stream: bool


async def ask(client: AsyncOpenAI, replica: int, user: str, stream: bool) -> Answer:
    raw = await client.chat.completions.with_raw_response.create(
        model="r-chunks" if stream else "r-echo", user=user, messages=HELLO, stream=stream)
    action = raw.headers.get("x-paywall-action")
    parsed = raw.parse()
    if not isinstance(parsed, ChatCompletion):
        assert stream
        text = "".join([ch.choices[0].delta.content or "" async for ch in parsed if ch.choices])
        if action is None:
            assert text == "".join(WORDS)
    else:
        text = parsed.choices[0].message.content or ""
        if action is None:
            assert text == "echo 0"
            assert Decimal(raw.headers["x-paywall-cost"]) == Decimal(PRICE)
    if action == "top_up":
        assert "/topup?token=" in text
    return Answer(replica, raw.headers["x-request-id"], action, stream)


def scrape(proxy: Proxy) -> Samples:
    r = httpx.get(proxy.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return parse_metrics(r.text)


def added(*dicts: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


async def test_a_burst_over_two_replicas_spends_the_balance_once(replicas: Replicas,
                                                                 pg: Any) -> None:
    user = f"rep-{secrets.token_hex(4)}"
    first, second = replicas.proxies
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as http:
        r = await http.post("/v1/user/balance/deposit",
                            headers={"Authorization": f"Bearer {replicas.key}",
                                     "Idempotency-Key": user},
                            json={"user": user, "amount": f"{Decimal(PRICE) * FUNDED:f}"})
        assert r.status_code == 200, r.text
    funds = FUNDED * PRICE_UNITS

    started = time.monotonic()
    async with AsyncOpenAI(api_key=replicas.key, base_url=first.base_url,
                           max_retries=0, timeout=30) as a, \
            AsyncOpenAI(api_key=replicas.key, base_url=second.base_url,
                        max_retries=0, timeout=30) as b:
        answers = await asyncio.gather(*(
            ask((a, b)[i % 2], i % 2, user, stream=(i // 2) % 2 == 0) for i in range(BURST)))
    burst_seconds = time.monotonic() - started

    # The clients' view: exactly FUNDED forwarded, the rest asked to top up.
    forwarded = [x for x in answers if x.action is None]
    assert Counter(x.action for x in answers) == {None: FUNDED, "top_up": BURST - FUNDED}
    assert len({x.request_id for x in answers}) == BURST
    assert sum(1 for s in list(replicas.upstream.seen) if s.body.get("user") == user) == FUNDED

    # The books: no pending hold anywhere, one posted hold and one charge per forwarded
    # request, and the balance moved by exactly the charges.
    deadline = time.monotonic() + 10
    while await pg.fetchval("SELECT count(*) FROM holds WHERE status = 'pending'"):
        assert time.monotonic() < deadline, "holds still pending"
        await asyncio.sleep(0.05)
    account = await pg.fetchrow(
        "SELECT id, balance, held FROM accounts"
        " WHERE paywall_id = 'rep' AND user_id = $1 AND asset = 'usd'", user)
    holds = await pg.fetch("SELECT * FROM holds WHERE account_id = $1", account["id"])
    entries = await pg.fetch("SELECT * FROM entries WHERE account_id = $1 ORDER BY id",
                             account["id"])
    ids = {x.request_id for x in forwarded}
    assert sorted(h["request_id"] for h in holds) == sorted(ids)
    assert {(h["status"], h["amount"]) for h in holds} == {("posted", PRICE_UNITS)}
    charges = [e for e in entries if e["kind"] == "charge"]
    assert [(e["kind"], e["amount"]) for e in entries if e["kind"] != "charge"] == [
        ("deposit", funds)]
    assert sorted(e["request_id"] for e in charges) == sorted(ids)
    assert Counter(e["hold_id"] for e in charges) == Counter({h["id"]: 1 for h in holds})
    assert {e["amount"] for e in charges} == {-PRICE_UNITS}
    charged = -sum(e["amount"] for e in charges)
    assert account["balance"] == funds - charged == 0
    assert account["held"] == 0
    assert entries[-1]["balance_after"] == account["balance"]

    # Both replicas' metrics add up to the same, and each counts what it answered.
    def chat_requests(s: Samples) -> float:
        return sum(by(s, "paywall_requests_total", ("outcome",), route=CHAT).values())

    deadline = time.monotonic() + 10
    while True:  # a stream is counted once its relay has finished
        scraped = [scrape(p) for p in replicas.proxies]
        if sum(chat_requests(s) for s in scraped) >= BURST:
            break
        assert time.monotonic() < deadline, "not every request was counted"
        await asyncio.sleep(0.1)
    for i, s in enumerate(scraped):
        mine = Counter(x.action or "forward" for x in answers if x.replica == i)
        assert by(s, "paywall_requests_total", ("status", "outcome"), route=CHAT) == {
            ("200", outcome): n for outcome, n in mine.items()}
    assert added(*(by(s, "paywall_requests_total", ("outcome",), route=CHAT)
                   for s in scraped)) == {("forward",): FUNDED, ("top_up",): BURST - FUNDED}
    assert added(*(by(s, "paywall_settlements_total", ("paywall", "outcome"))
                   for s in scraped)) == {("rep", "completed"): FUNDED}
    metered_charge = sum(by(s, "paywall_charged_total", (), asset="usd",
                            paywall="rep").get((), 0) for s in scraped)
    assert metered_charge == pytest.approx(float(Decimal(charged) / SCALE), rel=1e-9)
    tokens = added(*(by(s, "paywall_tokens_total", ("direction",), paywall="rep")
                     for s in scraped))
    assert tokens == {("prompt",): sum(e["prompt_tokens"] for e in charges),
                      ("completion",): sum(e["completion_tokens"] for e in charges)}
    # Redis may time out on a loaded machine (the limiter then fails open, and counts it);
    # the ledger, the database and the provider may not fail at all.
    errors = added(*(by(s, "paywall_errors_total", ("component",)) for s in scraped))
    assert errors.keys() <= {("redis",)}, errors

    # Both replicas counted into the same Redis window, and freed their leases there.
    shared = aioredis.from_url(replicas.redis_url)
    try:
        counted = sum(int(v) for v in await shared.hvals(f"pl:{{rep}}:u:{user}:rpm"))
        leases = await shared.zcard(f"pl:{{rep}}:u:{user}:conc")
    finally:
        await shared.aclose()
    redis_errors = int(errors.get(("redis",), 0))
    assert BURST - redis_errors <= counted <= BURST
    if not redis_errors:
        assert leases == 0
    assert burst_seconds < 20, burst_seconds
