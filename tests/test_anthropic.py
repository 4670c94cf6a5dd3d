"""The anthropic provider kind: native Messages calls against a local Anthropic-shaped
upstream, and chat completions translated, end to end with the official OpenAI SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from proxy.anthropic import AnthropicProvider
from proxy.providers import Call, build_providers
from proxy.settings import ProviderSettings, UpstreamSettings
from proxy.upstream import Transport
from tests.anthropic_upstream import AnthropicUpstream, input_usage, message, plan

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
    p = provider(anthropic_upstream, transport, headers={"x-extra": "1"})
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
