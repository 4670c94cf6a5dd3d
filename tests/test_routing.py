"""Routing end to end: a model's deployments are local servers that fail on cue
(:mod:`tests.flaky_upstream`), the client is the OpenAI SDK, the books are read back
from PostgreSQL. Whatever the routing did, the client sees one ordinary answer and the
user pays once, at the usage of the deployment that answered.

Prices are 1,000 usd per million tokens (1,000,000 units of usd a token): every
deployment reports 5 prompt tokens and completion tokens of its own (a: 3, b: 7,
c: 11), so a charge says which deployment it was priced from.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from proxy.pricing import Price
from proxy.providers import Call
from proxy.routing import (
    Breakers,
    Deployment,
    LocalStore,
    NoDeployment,
    Route,
    RoutingFailed,
    State,
    retried,
    retry_after,
)
from proxy.settings import RoutingSettings
from proxy.upstream import Reply, one
from tests.conftest import (
    RedisServer,
    mint_key,
    parse_metrics,
    serving_proxy,
    start_proxy,
    stop_proxy,
)
from tests.flaky_upstream import Flaky, serving

TOKEN = 1_000_000  # usd units per token at the test price
COOLDOWN = 3.0  # long enough for a few requests on a busy machine
FAILURES = 3  # consecutive failures that open a circuit


def cost(flaky: Flaky) -> int:
    return (5 + flaky.completion_tokens) * TOKEN


def routed(name: str, *deployments: str) -> str:
    """A model over ``deployments``, each "provider[:priority[:timeout]]"."""
    out = [f'[models."{name}"]\n'
           'price = { input_per_million = "1000", output_per_million = "1000" }\n']
    for d in deployments:
        provider, _, rest = d.partition(":")
        priority, _, timeout = rest.partition(":")
        out.append(f'[[models."{name}".deployments]]\nprovider = "{provider}"\n'
                   f'upstream = "{name}-{provider}"\npriority = {priority or 0}\n'
                   f'timeout_seconds = {timeout or 0}\n'
                   f'answer_timeout_seconds = {timeout or 0}\n')
    return "\n".join(out)


FAILURES_BEFORE_ANY_BYTE = ["500", "503", "408", "429:0", "reset", "stall"]
STREAM_FAILURES = ["500", "reset", "stall", "break-early"]


def config(a: Flaky, b: Flaky, c: Flaky) -> str:
    providers = "\n".join(
        f'[providers.{f.name}]\nkind = "openai"\nbase_url = "{f.url}"\napi_key = "key-{f.name}"\n'
        for f in (a, b, c))
    models = [routed(f"fb-{x}", "a::1", "b:1") for x in FAILURES_BEFORE_ANY_BYTE]
    models += [routed(f"fbs-{x}", "a::1", "b:1") for x in STREAM_FAILURES]
    models += [routed(m, "a", "b:1") for m in ("partial", "four-hundred", "brk", "shared")]
    models.append(routed("trio", "a", "b:1", "c:2"))
    models.append(routed("priced", "a", "b:1").replace(
        'upstream = "priced-a"\n',
        'upstream = "priced-a"\nprice = { input_per_million = "3000", '
        'output_per_million = "3000" }\n', 1))
    models.append(routed("long", "c").replace('"1000"', '"2000"'))  # dearer: not charged
    models.append(routed("short", "a", "b:1").replace(
        'output_per_million = "1000" }\n',
        'output_per_million = "1000" }\ncontext_window_fallback = "long"\n'
        'content_policy_fallback = "long"\n', 1))
    return f"""
[upstream]
read_timeout = 10.0
stream_idle_timeout = 10.0

[routing]
backoff_ms = 10
max_retry_after_seconds = 1.0
breaker_failures = {FAILURES}
breaker_cooldown_seconds = {COOLDOWN}

{providers}
[models.single]
provider = "a"
upstream = "single"
price = {{ input_per_million = "1000", output_per_million = "1000" }}

[models.pool]
price = {{ input_per_million = "1000", output_per_million = "1000" }}
[[models.pool.deployments]]
provider = "a"
upstream = "pool"
api_keys = ["k1", "k2"]

{chr(10).join(models)}
[paywalls.app]
name = "Routed app"
starter_grant = "1000"
"""


@pytest.fixture(scope="module")
def flakies() -> Iterator[tuple[Flaky, Flaky, Flaky]]:
    a, b, c = Flaky("a", 3), Flaky("b", 7), Flaky("c", 11)
    with serving(a, b, c):
        yield a, b, c


@pytest.fixture(scope="module")
def proxy(flakies: tuple[Flaky, Flaky, Flaky], own_database_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with serving_proxy(config(*flakies), own_database_url,
                       tmp_path_factory.mktemp("routing")) as p:
        yield p.base_url, mint_key(own_database_url)


@pytest.fixture(autouse=True)
def fresh(flakies: tuple[Flaky, Flaky, Flaky]) -> None:
    for f in flakies:
        f.reset()


@pytest.fixture
async def client(proxy: tuple[str, str]) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=proxy[0], api_key=proxy[1], max_retries=0) as c:
        yield c


async def ask(client: AsyncOpenAI, model: str, user: str = "ana") -> tuple[str, Any]:
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], user=user)
    answer = raw.parse()
    return answer.choices[0].message.content or "", raw.headers


async def ask_streaming(client: AsyncOpenAI, model: str, user: str = "ana"
                        ) -> tuple[str, Any]:
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], user=user, stream=True)
    text = ""
    async for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, raw.headers


async def entries(url: str, request_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT e.kind, e.amount, e.completion_tokens, e.outcome, e.metadata, h.status"
            " FROM holds h LEFT JOIN entries e ON e.hold_id = h.id WHERE h.request_id = $1",
            request_id)
        return rows
    finally:
        await conn.close()


@pytest.mark.parametrize("failure", FAILURES_BEFORE_ANY_BYTE)
async def test_a_deployment_failing_before_its_answer_falls_back_and_the_user_pays_once(
        failure: str, flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, b, _ = flakies
    a.will(failure)
    text, headers = await ask(client, f"fb-{failure}")
    assert text == "from b"
    assert headers["x-upstream-deployment"] == "b"
    assert [s.behaviour for s in a.seen] == [failure] and len(b.seen) == 1
    # Each deployment was sent its own name for the model, with its own key.
    assert (a.seen[0].model, a.seen[0].key) == (f"fb-{failure}-a", "key-a")
    assert (b.seen[0].model, b.seen[0].key) == (f"fb-{failure}-b", "key-b")
    [entry] = await entries(own_database_url, headers["x-request-id"])
    assert entry["kind"] == "charge" and -entry["amount"] == cost(b)
    assert entry["completion_tokens"] == b.completion_tokens
    assert '"deployment": "b"' in entry["metadata"] and '"attempts": 2' in entry["metadata"]


@pytest.mark.parametrize("failure", STREAM_FAILURES)
async def test_a_stream_failing_before_its_first_byte_falls_back(
        failure: str, flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, b, _ = flakies
    a.will(failure)
    text, headers = await ask_streaming(client, f"fbs-{failure}")
    assert text == "from b" and headers["x-upstream-deployment"] == "b"
    assert len(a.seen) == 1 and len(b.seen) == 1 and b.seen[0].stream

    async def settled() -> list[asyncpg.Record]:  # a stream settles after its last byte
        rows = await entries(own_database_url, headers["x-request-id"])
        return rows if rows and rows[0]["status"] != "pending" else []

    [entry] = await _eventually(settled)
    assert -entry["amount"] == cost(b) and entry["outcome"] == "completed"


async def test_a_stream_that_breaks_after_its_first_byte_is_not_retried(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, b, _ = flakies
    a.will("break")
    raw = await client.chat.completions.with_raw_response.create(
        model="partial", messages=[{"role": "user", "content": "hi"}], user="ana",
        stream=True)
    assert raw.headers["x-upstream-deployment"] == "a"
    text = ""
    with pytest.raises(openai.APIError):
        async for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert text == "from"  # what a delivered, and nothing from b
    assert b.seen == []

    async def settled() -> list[asyncpg.Record]:
        rows = await entries(own_database_url, raw.headers["x-request-id"])
        return rows if rows and rows[0]["status"] != "pending" else []

    [entry] = await _eventually(settled)
    assert entry["outcome"] == "partial" and entry["amount"] < 0  # what was delivered


async def test_every_deployment_down_is_one_502_listing_the_attempts_and_costs_nothing(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, b, c = flakies
    a.will("500")
    b.will("reset")
    c.will("503")
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="trio", messages=[{"role": "user", "content": "hi"}], user="ana")
    error = caught.value
    assert error.status_code == 502
    assert error.code == "upstream_unavailable"
    assert "3 attempts failed (a: HTTP 500; b: unreachable; c: HTTP 503)" in error.message
    [hold] = await entries(own_database_url, error.response.headers["x-request-id"])
    assert hold["kind"] is None and hold["status"] == "voided"


async def test_every_deployment_answering_429_is_a_429_with_the_soonest_retry_after(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI) -> None:
    a, b, c = flakies
    a.will("429:0.2")
    b.will("429:0.2")
    c.will("429:0.2")
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(client, "trio")
    assert caught.value.code == "upstream_rate_limited"
    assert caught.value.response.headers["retry-after"] == "1"


async def test_other_client_errors_are_the_answer_and_not_retried(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI) -> None:
    a, b, _ = flakies
    a.will("400")
    with pytest.raises(openai.BadRequestError):
        await ask(client, "four-hundred")
    assert len(a.seen) == 1 and b.seen == []


async def test_the_single_provider_form_is_sent_as_before(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI) -> None:
    a, _, _ = flakies
    text, headers = await ask(client, "single")
    assert text == "from a" and "x-upstream-deployment" not in headers
    a.will("503")
    with pytest.raises(openai.InternalServerError) as caught:
        await ask(client, "single")
    assert caught.value.status_code == 503  # relayed as it came, not retried
    assert len(a.seen) == 2


async def test_a_key_pool_takes_turns_and_a_key_answered_429_rests(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, _, _ = flakies
    for _ in range(4):
        await ask(client, "pool")
    assert [s.key for s in a.seen] == ["k1", "k2", "k1", "k2"]
    a.reset()
    a.will("429:30")
    text, headers = await ask(client, "pool")  # k1 answers 429: k2 at once
    assert text == "from a" and [s.key for s in a.seen] == ["k1", "k2"]
    [entry] = await entries(own_database_url, headers["x-request-id"])
    assert '"attempts": 2' in entry["metadata"]
    for _ in range(3):
        await ask(client, "pool")
    assert [s.key for s in a.seen[2:]] == ["k2", "k2", "k2"]  # k1 rests for 30 s


async def test_a_circuit_opens_after_consecutive_failures_probes_after_its_cooldown_and_closes(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        proxy: tuple[str, str]) -> None:
    a, _, _ = flakies
    a.default = "500"
    for _ in range(FAILURES):
        assert (await ask(client, "brk"))[0] == "from b"
    assert len(a.seen) == FAILURES
    for _ in range(3):  # open: a is not tried
        text, headers = await ask(client, "brk")
        assert text == "from b"
    assert len(a.seen) == FAILURES
    await asyncio.sleep(COOLDOWN + 0.1)
    a.default = "ok"
    text, headers = await ask(client, "brk")  # half-open: this request probes a
    assert text == "from a" and headers["x-upstream-deployment"] == "a"
    assert (await ask(client, "brk"))[0] == "from a"  # closed
    async with httpx.AsyncClient() as http:
        samples = parse_metrics((await http.get(proxy[0].removesuffix("/v1") + "/metrics")).text)
    attempts = {dict(labels)["result"]: v for (name, labels), v in samples.items()
                if name == "paywall_upstream_attempts_total"
                and dict(labels).get("model") == "brk" and dict(labels)["deployment"] == "a"}
    assert attempts == {"http_500": FAILURES, "ok": 2}


async def test_priorities_are_tried_in_order(flakies: tuple[Flaky, Flaky, Flaky],
                                             client: AsyncOpenAI) -> None:
    a, b, c = flakies
    a.will("500")
    b.will("503")
    text, headers = await ask(client, "trio")
    assert text == "from c" and headers["x-upstream-deployment"] == "c"
    assert (len(a.seen), len(b.seen), len(c.seen)) == (1, 1, 1)


@pytest.mark.parametrize("refused", ["too-long", "policy"])
async def test_a_refusal_for_length_or_policy_goes_to_the_fallback_model_at_this_price(
        refused: str, flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, b, c = flakies
    a.will(refused)
    raw = await client.chat.completions.with_raw_response.create(
        model="short", messages=[{"role": "user", "content": "hi"}], user="ana")
    answer = raw.parse()
    assert answer.choices[0].message.content == "from c"
    assert answer.model == "short"  # the public name, whichever model answered
    assert raw.headers["x-upstream-deployment"] == "long/c"
    assert b.seen == []  # a refusal is not a failure: not tried at the next deployment
    assert [s.model for s in c.seen] == ["long-c"]
    [entry] = await entries(own_database_url, raw.headers["x-request-id"])
    assert -entry["amount"] == cost(c)  # at short's price, c's usage
    a.will("400")  # any other 400 is the answer
    with pytest.raises(openai.BadRequestError):
        await ask(client, "short")
    assert len(c.seen) == 1
    a.will(refused)
    c.will("503")  # the fallback fails too: the client gets the refusal, not a 502
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(client, "short")
    assert caught.value.status_code == 400 and len(c.seen) == 2


async def test_a_deployment_priced_apart_charges_its_price_and_holds_cover_the_dearest(
        flakies: tuple[Flaky, Flaky, Flaky], client: AsyncOpenAI,
        own_database_url: str) -> None:
    a, b, _ = flakies
    _, headers = await ask(client, "priced")
    assert headers["x-upstream-deployment"] == "a"
    [entry] = await entries(own_database_url, headers["x-request-id"])
    assert -entry["amount"] == 3 * cost(a)  # a's own price
    a.will("500")
    _, headers = await ask(client, "priced")
    assert headers["x-upstream-deployment"] == "b"
    [entry] = await entries(own_database_url, headers["x-request-id"])
    assert -entry["amount"] == cost(b)  # the model's price
    conn = await asyncpg.connect(own_database_url)
    try:
        held = await conn.fetchval("SELECT amount FROM holds WHERE request_id = $1",
                                   headers["x-request-id"])
    finally:
        await conn.close()
    assert held >= 3 * TOKEN * (1 + 4096)  # the prompt and all the output at a's price


async def _eventually(probe: Any, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while not (value := await probe()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


def test_two_replicas_share_a_circuit_through_redis(
        flakies: tuple[Flaky, Flaky, Flaky], own_database_url: str,
        redis_server: RedisServer, tmp_path: Path) -> None:
    a, _, _ = flakies
    (tmp_path / "r.toml").write_text(config(*flakies))
    env = {"REDIS_URL": redis_server.url}
    one = start_proxy(tmp_path / "r.toml", own_database_url, tmp_path, env)
    two = start_proxy(tmp_path / "r.toml", own_database_url, tmp_path, env)
    key = mint_key(own_database_url)
    try:
        def ask_via(p: Any) -> str:
            with openai.OpenAI(base_url=p.base_url, api_key=key, max_retries=0) as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="shared", messages=[{"role": "user", "content": "hi"}], user="ana")
                return str(raw.headers["x-upstream-deployment"])

        a.default = "500"
        for _ in range(FAILURES):  # through the first replica only
            assert ask_via(one) == "b"
        assert len(a.seen) == FAILURES
        assert ask_via(two) == "b" and len(a.seen) == FAILURES  # open for the second too
        time.sleep(COOLDOWN + 0.1)
        a.default = "ok"
        assert ask_via(two) == "a"  # the second replica probes, and closes it
        assert ask_via(one) == "a"  # closed for the first too
    finally:
        stop_proxy(one)
        stop_proxy(two)


# ---- the parts, without a server ------------------------------------------------------

def test_retry_after_is_read_as_seconds_milliseconds_or_a_date() -> None:
    assert retry_after([("retry-after", "2")]) == 2.0
    assert retry_after([("retry-after-ms", "250"), ("retry-after", "9")]) == 0.25
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (retry_after([("retry-after", soon)]) or 0) <= 31
    assert retry_after([("retry-after", "soon")]) is None
    assert retry_after([]) is None


def test_only_408_409_429_and_5xx_are_tried_again() -> None:
    assert [s for s in (400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504)
            if retried(s)] == [408, 409, 429, 500, 502, 503, 504]


async def test_a_half_open_circuit_lets_exactly_one_probe_through() -> None:
    conf = RoutingSettings(breaker_failures=2, breaker_cooldown_seconds=0.2)
    breakers = Breakers(LocalStore(), conf)
    [known] = await breakers.states(["m/a"])
    assert known == (State.CLOSED, 0)
    assert await breakers.record("m/a", False, known) is State.CLOSED
    [known] = await breakers.states(["m/a"])
    assert known == (State.CLOSED, 1)
    assert await breakers.record("m/a", False, known) is State.OPEN
    assert (await breakers.states(["m/a"]))[0][0] is State.OPEN
    await asyncio.sleep(0.25)
    [known] = await breakers.states(["m/a"])
    assert known[0] is State.HALF_OPEN
    claims = await asyncio.gather(*(breakers.probe("m/a") for _ in range(5)))
    assert claims.count(True) == 1
    assert await breakers.record("m/a", False, known) is State.OPEN  # the probe failed
    await asyncio.sleep(0.25)
    [known] = await breakers.states(["m/a"])
    assert await breakers.probe("m/a")
    assert await breakers.record("m/a", True, known) is State.CLOSED
    assert (await breakers.states(["m/a"]))[0] == (State.CLOSED, 0)


async def test_a_failure_ratio_opens_a_circuit_that_consecutive_failures_would_not() -> None:
    conf = RoutingSettings(breaker_failures=0, breaker_failure_ratio=0.5,
                           breaker_min_attempts=4, breaker_window_seconds=60)
    breakers = Breakers(LocalStore(), conf)
    for ok in (True, False, True, False):  # never two failures in a row
        [known] = await breakers.states(["m/r"])
        state = await breakers.record("m/r", ok, known)
    assert state is State.OPEN


class Answers:
    """A provider that answers each call with the next status of ``statuses`` (a status
    and a Retry-After, as "429:0.1")."""

    def __init__(self, *statuses: int | str):
        self.statuses = list(statuses)
        self.calls: list[Call] = []

    async def send(self, call: Call) -> Reply:
        self.calls.append(call)
        status, _, wait = str(self.statuses.pop(0) if self.statuses else 200).partition(":")
        headers = [("retry-after", wait)] if wait else []
        return Reply(int(status), headers, one(b'{"ok": true}'), stream=False)


def route(*deployments: tuple[str, Answers, int, int], **conf: Any) -> Route:
    return Route("m", [Deployment(name, f"p-{name}", answers, f"m-{name}", priority, weight,
                                  ("",), None)
                       for name, answers, priority, weight in deployments],
                 RoutingSettings(**{"backoff_ms": 1, **conf}),
                 Breakers(LocalStore(), RoutingSettings(**conf)))


async def test_weights_share_the_requests_of_one_priority() -> None:
    heavy, light, spare = Answers(), Answers(), Answers()
    r = route(("heavy", heavy, 0, 3), ("light", light, 0, 1), ("spare", spare, 1, 1))
    call = Call(b'{"model": "m-heavy"}', False, "req_1", {})
    for _ in range(400):
        await r.send(call, {})
    assert spare.calls == []
    assert 0.65 < len(heavy.calls) / 400 < 0.85
    # Each deployment is sent its own name for the model.
    assert orjson.loads(light.calls[0].body)["model"] == "m-light"


async def test_a_deployment_tried_again_waits_its_backoff_and_attempts_are_bounded() -> None:
    only = Answers(503, 503, 503, 503)
    r = route(("only", only, 0, 1), max_attempts=3, breaker_failures=0)
    with pytest.raises(RoutingFailed) as caught:
        await r.send(Call(b"{}", False, "req_1", {}), {})
    assert len(only.calls) == 3 and len(caught.value.attempts) == 3
    assert [d["status"] for d in caught.value.details] == [503, 503, 503]


async def test_no_deployment_available_is_a_503_with_retry_after() -> None:
    down = Answers(500, 500)
    r = route(("down", down, 0, 1), ("also", Answers(500, 500), 0, 1), breaker_failures=1,
              breaker_cooldown_seconds=30)
    with pytest.raises(RoutingFailed):
        await r.send(Call(b"{}", False, "req_1", {}), {})
    with pytest.raises(NoDeployment) as caught:
        await r.send(Call(b"{}", False, "req_2", {}), {})
    assert caught.value.status == 503 and caught.value.headers["retry-after"] == "30"
    assert "circuit open" in caught.value.message


def test_deployments_are_checked_at_start(tmp_path: Path) -> None:
    from proxy import settings
    from proxy.errors import ConfigError

    head = ('[providers.o]\nkind = "openai"\nbase_url = "http://o.test/v1"\n'
            '[providers.n]\nkind = "anthropic"\nbase_url = "http://n.test/v1"\n'
            '[models.m]\n')
    cases = {
        'provider = "o"\n[[models.m.deployments]]\nprovider = "o"\n': "not both",
        '[[models.m.deployments]]\nprovider = "x"\n': r"deployments\[0\]\.provider: unknown",
        '[[models.m.deployments]]\nprovider = "o"\nweight = 0\n': "at least 1",
        '[[models.m.deployments]]\nprovider = "o"\n[[models.m.deployments]]\nprovider = "n"\n':
            "one wire format",
        '[[models.m.deployments]]\nprovider = "o"\nname = "x"\n'
        '[[models.m.deployments]]\nprovider = "o"\nname = "x"\n': "two deployments are named",
    }
    for body, problem in cases.items():
        path = tmp_path / "s.toml"
        path.write_text(head + body)
        with pytest.raises(ConfigError, match=problem):
            settings.load(path, {})
    path = tmp_path / "s.toml"
    path.write_text(head + '[[models.m.deployments]]\nprovider = "o"\n'
                    '[[models.m.deployments]]\nprovider = "o"\nupstream = "m2"\n')
    m = settings.load(path, {}).models["m"]
    assert [(d.name, d.upstream) for d in m.deployments] == [("o", ""), ("o#2", "m2")]
    assert (m.provider, m.upstream) == ("o", "")
    path.write_text(head + 'provider = "o"\nupstream = "u"\n')
    [single] = settings.load(path, {}).models["m"].deployments
    assert (single.provider, single.upstream, single.name) == ("o", "u", "o")


async def test_circuits_read_closed_while_their_redis_is_down() -> None:
    from proxy.routing import RedisStore
    from tests.upstream import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    breakers = Breakers(store, RoutingSettings(breaker_failures=1))
    try:
        assert await breakers.states(["m/a"]) == [(State.CLOSED, 0)]
        assert await breakers.record("m/a", False, (State.CLOSED, 0)) is State.CLOSED
        assert await breakers.probe("m/a")
        assert breakers.errors == 3
    finally:
        await breakers.close()


async def test_a_circuit_probed_by_another_request_is_a_prompt_503_not_a_wait() -> None:
    slow = Answers()
    r = route(("only", slow, 0, 1), max_attempts=2, breaker_failures=1,
              breaker_cooldown_seconds=0.5)
    await r.breakers.record("m/only", False, (State.CLOSED, 0))
    await asyncio.sleep(0.6)  # half-open now
    assert await r.breakers.probe("m/only")  # another request holds the probe (0.5 s)
    started = time.monotonic()
    with pytest.raises(NoDeployment) as caught:
        await r.send(Call(b"{}", False, "req_1", {}), {})
    assert time.monotonic() - started < 1.0 and slow.calls == []
    assert "probed by another request" in caught.value.message


async def test_a_resting_key_is_waited_for_with_breakers_off_too() -> None:
    busy = Answers("429:0.1", 200)
    r = route(("busy", busy, 0, 1), max_attempts=2, breaker_failures=0)
    reply = await r.send(Call(b"{}", False, "req_1", {}), {})
    assert reply.status == 200 and reply.attempts == 2 and len(busy.calls) == 2


async def test_a_success_that_started_before_the_trip_does_not_close_the_circuit() -> None:
    breakers = Breakers(LocalStore(), RoutingSettings(breaker_failures=2))
    await breakers.record("m/a", False, (await breakers.states(["m/a"]))[0])
    before = (await breakers.states(["m/a"]))[0]  # closed, one failure so far
    assert before == (State.CLOSED, 1)
    await breakers.record("m/a", False, before)  # the second: open
    assert (await breakers.states(["m/a"]))[0][0] is State.OPEN
    await breakers.record("m/a", True, before)  # in flight since before the trip
    assert (await breakers.states(["m/a"]))[0][0] is State.OPEN


async def test_a_paywall_with_its_own_key_is_never_sent_on_the_operators_keys() -> None:
    own, operators = Answers(500, 500), Answers()
    r = route(("own", own, 0, 1), ("operators", operators, 1, 1), breaker_failures=0)
    with pytest.raises(RoutingFailed):
        await r.send(Call(b"{}", False, "req_1", {}), {"p-own": "sk-paywall-own"})
    assert operators.calls == [] and own.calls[0].api_key == "sk-paywall-own"
    assert (await r.send(Call(b"{}", False, "req_2", {}), {})).deployment == "own"


async def test_a_single_deployment_priced_apart_is_named_so_its_price_is_charged() -> None:
    one_place = Answers()
    price = Price("usd", 0, 3, 3, 3, 3, 3)
    r = Route("m", [Deployment("only", "p", one_place, "m", 0, 1, ("",), None, price)],
              RoutingSettings(), Breakers(LocalStore(), RoutingSettings()))
    assert not r.simple
    reply = await r.send(Call(b"{}", False, "req_1", {}), {})
    assert r.prices[reply.deployment] == price
