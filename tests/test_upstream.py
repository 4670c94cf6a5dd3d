"""The upstream transport: scrubbing, header policy, and every received byte delivered.

A raw-socket provider stands in where a well-behaved HTTP server cannot: it writes a
whole answer — status, headers, body — in one go and closes, so the proxy finds the
data and the broken connection together in its buffer. By the first path segment it
answers ``cut`` with three chat chunks and no end of the chunked body, ``weird-id``
with a completion whose ``x-request-id`` is not ASCII, ``echo-key`` with a completion
repeating the credential it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import aiohttp
import asyncpg
import openai
import orjson
import pytest

from proxy.errors import UpstreamUnavailable
from proxy.settings import UpstreamSettings
from proxy.upstream import (
    OPENAI_HEADERS,
    Outbound,
    StreamScrubber,
    Transport,
    encoded,
    scrub,
    secret_values,
)
from tests.conftest import PROVIDER_KEY, mint_key, new_user, serving_proxy
from tests.upstream import Upstream

KEY = "sk-proj-abcdefghijklmnop1234"
CUT_WORDS = ["one", " two", " three"]


@pytest.mark.parametrize(("body", "masked", "expected"), [
    (f'{{"message": "bad key {KEY}"}}'.encode(), False, b'{"message": "bad key [redacted]"}'),
    (b'{"message": "Incorrect API key provided: sk-proj-************1234."}', True,
     b'{"message": "Incorrect API key provided: [redacted]."}'),
    # A 2xx body is searched for the secrets only: "****" is just text there.
    (b'{"content": "a ****** b"}', False, b'{"content": "a ****** b"}'),
    (b'{"message": "fine"}', True, b'{"message": "fine"}'),
    (b"short secret", True, b"short secret"),  # secrets under 8 characters are not hunted
])
def test_scrub(body: bytes, masked: bool, expected: bytes) -> None:
    assert scrub(body, [KEY, "short"], masked=masked) == expected


@pytest.mark.parametrize(("headers", "query", "expected"), [
    ({"Authorization": f"Bearer {KEY}"}, {}, [f"Bearer {KEY}", KEY]),
    ({"X-Goog-Api-Key": KEY, "Content-Type": "application/json"}, {}, [KEY]),
    ({"User-Agent": "provider-agent/1", "OpenAI-Beta": "assistants=v2"}, {}, []),
    ({}, {"api-version": "2024-10-21", "key": KEY}, [KEY]),
])
def test_secret_values_are_the_credentials_only(headers: dict[str, str],
                                                query: dict[str, str],
                                                expected: list[str]) -> None:
    assert secret_values(headers, query) == expected


@pytest.mark.parametrize(("chunks", "out"), [
    ([b"a " + KEY.encode() + b" b"], [b"a [redacted] b"]),
    # A key split across two reads is held back at the first, found at the second.
    ([b"a " + KEY[:10].encode(), KEY[10:].encode() + b" b"], [b"a ", b"[redacted] b"]),
    ([b"a " + KEY[:1].encode(), KEY[1:].encode()], [b"a ", b"[redacted]"]),
    # What only looks like a key's start is handed on at the next read (or the end).
    ([b"data: sk", b"y\n\n"], [b"data: ", b"sky\n\n"]),
    ([b"end sk-proj"], [b"end ", b"sk-proj"]),
    # An SSE event ends in a blank line: never held back.
    ([b'data: {"x": "sk-proj-abc"}\n\n'], [b'data: {"x": "sk-proj-abc"}\n\n']),
])
def test_stream_scrubber(chunks: list[bytes], out: list[bytes]) -> None:
    scrubber = StreamScrubber(encoded([KEY, "short"]))
    got = [scrubber.feed(c) for c in chunks] + [scrubber.flush()]
    assert [g for g in got if g] == out


def _chunk(text: str) -> bytes:
    event = b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk",
                                      "created": 0, "model": "m", "choices": [
                                          {"index": 0, "delta": {"content": text}}]}) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _answer(path: str, request_head: bytes) -> bytes:
    if path.startswith("/cut/"):
        return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                + b"".join(_chunk(w) for w in CUT_WORDS))  # … and no final 0-chunk
    if path.startswith("/weird-id/"):
        body = orjson.dumps({"id": "c", "object": "chat.completion", "created": 0,
                             "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hi"}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                       "total_tokens": 2}})
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"x-request-id: caf\xe9-\xff\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body))
    auth = next((line.split(b":", 1)[1].strip() for line in request_head.split(b"\r\n")
                 if line.lower().startswith(b"authorization:")), b"")
    body = orjson.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": "you sent " + auth.decode()}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 3,
                                   "total_tokens": 4}})
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d"
            b"\r\n\r\n%s" % (len(body), body))


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        path = head.split(b" ", 2)[1].decode()
        writer.write(_answer(path, head))  # all of it at once, then the connection ends
        await writer.drain()
    finally:
        writer.close()


@contextlib.contextmanager
def raw_provider() -> Iterator[int]:
    """The raw-socket provider on a port of its own, in a thread, for the block."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(_serve, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


@pytest.fixture(scope="module")
def raw_port() -> Iterator[int]:
    with raw_provider() as port:
        yield port


async def test_bytes_received_before_a_broken_connection_are_all_delivered(
        raw_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        transport = Transport(session, UpstreamSettings())
        reply = await transport.send(Outbound(
            "raw", "POST", f"http://127.0.0.1:{raw_port}/cut/v1/chat/completions", {},
            b"{}", True, OPENAI_HEADERS))
        await asyncio.sleep(0.2)  # busy elsewhere: the data and the end arrive meanwhile
        got = b""
        with pytest.raises(UpstreamUnavailable):
            async for chunk in reply.chunks:
                got += chunk
    assert [w.encode() in got for w in CUT_WORDS] == [True] * 3


def config(port: int) -> str:
    providers = "\n".join(f'[providers.{name}]\nkind = "openai"\n'
                          f'base_url = "http://127.0.0.1:{port}/{name}/v1"\n'
                          f'api_key = "{PROVIDER_KEY}"\n'
                          f'[models.{name}]\nprovider = "{name}"\n'
                          'price = { input_per_million = "1000", output_per_million = "1000" }\n'
                          for name in ("cut", "weird-id", "echo-key"))
    return providers + '\n[paywalls.app]\nstarter_grant = "100"\n'


@pytest.fixture(scope="module")
def proxy_url(raw_port: int, own_database_url: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, str]]:
    with serving_proxy(config(raw_port), own_database_url,
                       tmp_path_factory.mktemp("upstream")) as proxy:
        yield proxy.url, mint_key(own_database_url)


def client(proxy_url: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url[0] + "/v1", api_key=proxy_url[1], max_retries=0)


async def test_a_stream_cut_after_its_last_chunks_delivers_them_and_charges_them(
        proxy_url: tuple[str, str], own_database_url: str) -> None:
    user = new_user("cut")
    got = []
    with pytest.raises(openai.APIError):
        for chunk in client(proxy_url).chat.completions.create(
                model="cut", user=user, stream=True, messages=[{"role": "user", "content": "x"}]):
            got.append(chunk.choices[0].delta.content)
    assert "".join(got) == "".join(CUT_WORDS)
    conn = await asyncpg.connect(own_database_url)
    try:
        for _ in range(100):
            row = await conn.fetchrow(
                "SELECT e.outcome, e.completion_tokens, e.amount FROM entries e JOIN accounts a"
                " ON a.id = e.account_id WHERE a.user_id = $1 AND e.kind = 'charge'", user)
            if row:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert row is not None and row["outcome"] == "partial"
    assert row["completion_tokens"] >= 3 and row["amount"] < 0


def test_a_non_ascii_upstream_request_id_is_dropped_and_the_answer_kept(
        proxy_url: tuple[str, str]) -> None:
    raw = client(proxy_url).chat.completions.with_raw_response.create(
        model="weird-id", user=new_user("weird"), messages=[{"role": "user", "content": "x"}])
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content == "hi"
    assert "x-upstream-request-id" not in raw.headers


def test_the_provider_key_is_scrubbed_from_a_2xx_answer(proxy_url: tuple[str, str]) -> None:
    done = client(proxy_url).chat.completions.create(
        model="echo-key", user=new_user("echo"), messages=[{"role": "user", "content": "x"}])
    assert done.choices[0].message.content == "you sent Bearer [redacted]"


@pytest.mark.parametrize(("given", "sent"), [
    ({}, None),  # none of aiohttp's own
    ({"user-agent": "OpenAI/Python 1.99"}, "OpenAI/Python 1.99"),
    ({"User-Agent": "provider-agent/1"}, "provider-agent/1"),
])
async def test_a_user_agent_is_sent_only_when_the_request_has_one(
        upstream: Upstream, given: dict[str, str], sent: str | None) -> None:
    user = new_user("agent")
    async with aiohttp.ClientSession() as session:
        transport = Transport(session, UpstreamSettings())
        reply = await transport.send(Outbound(
            "up", "POST", f"{upstream.url}/chat/completions", given,
            orjson.dumps({"model": "echo", "user": user,
                          "messages": [{"role": "user", "content": "hi"}]}),
            False, OPENAI_HEADERS))
        await reply.read()
    [seen] = [s for s in upstream.seen if s.body.get("user") == user]
    assert seen.headers.get("user-agent") == sent
    assert seen.headers["accept-encoding"]  # aiohttp's other defaults are still sent
