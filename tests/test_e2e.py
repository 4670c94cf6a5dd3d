"""End to end: the official OpenAI SDK against the real proxy server and a local upstream."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import BYOK_KEY, PROVIDER_KEY, Running
from tests.upstream import CHUNK_DELAY, CHUNKS, WORDS, _chunk

HELLO = [{"role": "user", "content": "Hello"}]


_CLIENTS: list[OpenAI] = []


def client(r: Running, **kw: object) -> OpenAI:
    """An SDK client of the proxy, closed after the test (an unclosed one's sockets are
    reported whenever the garbage collector finds them: in some later test)."""
    kw.setdefault("base_url", r.proxy.base_url)
    made = OpenAI(api_key=r.key, max_retries=0, **kw)  # type: ignore[arg-type]
    _CLIENTS.append(made)
    return made


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def test_non_streaming_with_body_user(running: Running) -> None:
    raw = client(running).chat.completions.with_raw_response.create(
        model="gpt-test", user="user_1", messages=HELLO, temperature=0.2, seed=7,
        extra_body={"custom_field": {"kept": True}},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo 0"
    assert completion.usage is not None and completion.usage.total_tokens == 7
    seen = running.upstream.last()
    # The body arrives as sent, but for the model name and the output cap that bounds the
    # hold.
    assert seen.body == {"model": "echo", "user": "user_1", "messages": HELLO,
                         "temperature": 0.2, "seed": 7, "custom_field": {"kept": True},
                         "max_completion_tokens": 4096}
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert raw.headers["x-request-id"].startswith("req_")
    assert seen.headers["x-request-id"] == raw.headers["x-request-id"]
    assert raw.headers["x-upstream-request-id"] == "up-123"
    assert "set-cookie" not in raw.headers


async def test_async_non_streaming(running: Running) -> None:
    async with AsyncOpenAI(api_key=running.key, base_url=running.proxy.base_url,
                           max_retries=0) as c:
        results = await asyncio.gather(*[
            c.chat.completions.create(model="echo", user=f"user_{i}", messages=HELLO)
            for i in range(10)
        ])
    assert [r.choices[0].message.content for r in results] == ["echo 0"] * 10


def test_streaming_arrives_chunk_by_chunk(running: Running) -> None:
    stream = client(running).chat.completions.create(
        model="chunks", user="user_1", messages=HELLO, stream=True)
    arrivals, pieces = [], []
    for chunk in stream:
        arrivals.append(time.monotonic())
        pieces.append(chunk.choices[0].delta.content)
    assert pieces == WORDS
    # Each chunk arrives when the upstream sends it, not all at once at the end.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) == CHUNKS - 1
    assert arrivals[-1] - arrivals[0] > (CHUNKS - 1) * CHUNK_DELAY * 0.8
    assert statistics.median(gaps) > CHUNK_DELAY * 0.5  # median: a busy machine jitters
    # The proxy asked the provider for usage, and kept that chunk from the client.
    assert running.upstream.last().body["stream_options"] == {"include_usage": True}
    assert stream.response.is_closed


def test_stream_bytes_are_unchanged(running: Running) -> None:
    with httpx.stream(
        "POST", running.proxy.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {running.key}"},
        json={"model": "chunks", "user": "u", "messages": HELLO, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = b"".join(resp.iter_raw())
    expected = b"".join(_chunk("chunks", w) for w in WORDS)
    assert body.startswith(expected)
    assert b'"usage":{"prompt_tokens":5' in body
    assert body.endswith(b"data: [DONE]\n\n")


async def test_async_streaming(running: Running) -> None:
    async with AsyncOpenAI(api_key=running.key, base_url=running.proxy.base_url,
                           max_retries=0) as c:
        stream = await c.chat.completions.create(model="chunks", user="u", messages=HELLO,
                                                 stream=True)
        text = [chunk.choices[0].delta.content async for chunk in stream]
    assert text == WORDS


def test_tools(running: Running) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    completion = client(running).chat.completions.create(
        model="echo", user="u", messages=HELLO, tools=tools, tool_choice="auto")  # type: ignore[arg-type]
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert running.upstream.last().body["tools"] == tools
    assert running.upstream.last().body["tool_choice"] == "auto"


def test_json_mode_n_and_logprobs(running: Running) -> None:
    c = client(running)
    completion = c.chat.completions.create(model="echo", user="u", messages=HELLO,
                                           response_format={"type": "json_object"})
    assert orjson.loads(completion.choices[0].message.content or "") == {"answer": 42}
    assert running.upstream.last().body["response_format"] == {"type": "json_object"}
    completion = c.chat.completions.create(model="echo", user="u", messages=HELLO, n=2,
                                           logprobs=True, top_logprobs=2)
    assert [ch.index for ch in completion.choices] == [0, 1]
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.content[0].token == "echo"  # type: ignore[index]


def test_user_from_header_and_path(running: Running) -> None:
    via_header = client(running, default_headers={"X-Paywall-User": "header-user"})
    assert via_header.chat.completions.create(model="echo", messages=HELLO).choices
    via_path = client(running, base_url=f"{running.proxy.base_url}/path.user@x")
    assert via_path.chat.completions.create(model="echo", messages=HELLO).choices
    assert running.upstream.last().path == "/v1/chat/completions"


def test_missing_or_invalid_user(running: Running) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        client(running).chat.completions.create(model="echo", messages=HELLO)
    message = missing.value.message
    assert "'user'" in message and "X-Paywall-User" in message and "/v1/{user}/" in message
    with pytest.raises(openai.BadRequestError) as invalid:
        client(running).chat.completions.create(model="echo", user="has space", messages=HELLO)
    assert invalid.value.code == "invalid_user"
    with pytest.raises(openai.BadRequestError):
        client(running).chat.completions.create(model="echo", user="x" * 129, messages=HELLO)


def test_client_credentials_never_reach_the_upstream(running: Running) -> None:
    canaries = {"Cookie": "session=CANARY-cookie", "X-Api-Key": "CANARY-x-api-key",
                "Proxy-Authorization": "Basic CANARY-proxy", "OpenAI-Organization": "CANARY-org",
                "X-Forwarded-For": "10.9.9.9", "Connection": "keep-alive, X-Hop",
                "X-Hop": "CANARY-hop"}
    client(running, default_headers=canaries).chat.completions.create(
        model="echo", user="u", messages=HELLO)
    seen = running.upstream.last().headers
    values = " ".join(seen.values())
    assert running.key not in values
    assert "CANARY" not in values.replace(PROVIDER_KEY, "")
    assert "10.9.9.9" not in values
    assert not {"cookie", "x-api-key", "proxy-authorization", "x-hop"} & seen.keys()


def test_provider_key_never_reaches_the_client(running: Running) -> None:
    for model, secret in (("reject", PROVIDER_KEY), ("byok-reject", BYOK_KEY)):
        resp = httpx.post(running.proxy.base_url + "/chat/completions",
                          headers={"Authorization": f"Bearer {running.key}"},
                          json={"model": model, "user": "u", "messages": HELLO})
        assert resp.status_code == 401
        text = resp.text + str(resp.headers)
        assert secret not in text
        assert secret[-4:] + "." not in text  # nor its masked form
        assert "CANARY" not in text
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(running).chat.completions.create(model="reject", user="u", messages=HELLO)


def test_byok_and_azure_style_providers(running: Running) -> None:
    c = client(running)
    c.chat.completions.create(model="byok-echo", user="u", messages=HELLO)
    assert running.upstream.last().headers["authorization"] == f"Bearer {BYOK_KEY}"
    c.chat.completions.create(model="azure-echo", user="u", messages=HELLO)
    seen = running.upstream.last()
    assert seen.headers["api-key"] == PROVIDER_KEY
    assert "authorization" not in seen.headers
    assert seen.query == "api-version=2024-10-21"


def test_client_disconnect_closes_the_upstream_within_a_second(running: Running) -> None:
    before = len(running.upstream.closed_at)
    with httpx.Client(timeout=10) as http, http.stream(
        "POST", running.proxy.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {running.key}"},
        json={"model": "endless", "user": "u", "messages": HELLO, "stream": True},
    ) as resp:
        received = 0
        for chunk in resp.iter_raw():
            received += chunk.count(b"data: ")
            if received >= 3:
                break
        left = time.monotonic()
    deadline = left + 3
    while len(running.upstream.closed_at) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(running.upstream.closed_at) > before, "upstream never saw the disconnect"
    assert running.upstream.closed_at[-1] - left < 1.0


def test_stalled_stream_ends_with_an_error_event(running: Running) -> None:
    stream = client(running).chat.completions.create(model="stall", user="u", messages=HELLO,
                                                     stream=True)
    got = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["first"]
    assert "did not answer in time" in failed.value.message
    assert time.monotonic() - started < 5


def test_upstream_failures_are_openai_shaped(running: Running) -> None:
    c = client(running)
    with pytest.raises(openai.InternalServerError) as dead:
        c.chat.completions.create(model="dead", user="u", messages=HELLO)
    assert dead.value.status_code == 502
    assert dead.value.code == "upstream_unavailable"
    with pytest.raises(openai.InternalServerError) as slow:
        c.chat.completions.create(model="sleepy", user="u", messages=HELLO)
    assert slow.value.status_code == 504
    with pytest.raises(openai.InternalServerError) as crash:
        c.chat.completions.create(model="crash", user="u", messages=HELLO)
    assert crash.value.status_code == 500
    assert crash.value.body == {"message": "upstream broke", "type": "server_error",  # as sent
                               "param": None, "code": None}


def test_proxy_errors_are_openai_shaped(running: Running) -> None:
    c = client(running)
    with pytest.raises(openai.NotFoundError) as unknown:
        c.chat.completions.create(model="no-such-model", user="u", messages=HELLO)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="sk-pw-wrong", base_url=running.proxy.base_url, max_retries=0
               ).chat.completions.create(model="echo", user="u", messages=HELLO)
    url = running.proxy.base_url + "/chat/completions"
    auth = {"Authorization": f"Bearer {running.key}"}
    assert httpx.post(url).status_code == 401
    bad = httpx.post(url, headers=auth, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url, headers=auth, content=b"[1, 2]").status_code == 400
    too_big = httpx.post(url, headers=auth, content=b" " * (64 * 1024 + 1))
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "request_too_large"

    def chunked() -> object:
        for _ in range(100):
            yield b" " * 1024

    assert httpx.post(url, headers=auth, content=chunked()).status_code == 413  # type: ignore[arg-type]
    missing = httpx.get(running.proxy.url + "/v1/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    message = missing.json()["error"]["message"]
    assert message.startswith("Unknown route GET /v1/nowhere.")
    for endpoint in ("POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings",
                     "POST /v1/messages", "GET /v1/models"):
        assert endpoint in message
    with pytest.raises(openai.NotFoundError) as sdk:  # as the SDK shows it
        client(running).post("/audio/speech", cast_to=object, body={})
    assert "POST /v1/audio/speech" in sdk.value.message
    outside = httpx.get(running.proxy.url + "/nowhere")
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"


def test_request_ids(running: Running) -> None:
    url = running.proxy.base_url + "/chat/completions"
    auth = {"Authorization": f"Bearer {running.key}"}
    body = {"model": "echo", "user": "u", "messages": HELLO}
    kept = httpx.post(url, headers={**auth, "X-Request-Id": "client-id.42"}, json=body)
    assert kept.headers["x-request-id"] == "client-id.42"
    assert running.upstream.last().headers["x-request-id"] == "client-id.42"
    replaced = httpx.post(url, headers={**auth, "X-Request-Id": "bad id!"}, json=body)
    assert replaced.headers["x-request-id"].startswith("req_")
    errors = [httpx.post(url, json=body), httpx.get(running.proxy.url + "/nowhere")]
    assert all(e.headers["x-request-id"].startswith("req_") for e in errors)
    ids = [httpx.get(running.proxy.url + "/healthz").headers["x-request-id"] for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_models_list_and_retrieve(running: Running) -> None:
    c = client(running)
    models = {m.id: m for m in c.models.list()}
    assert {"echo", "gpt-test", "mock-1"} <= models.keys()
    pricing = models["gpt-test"].model_extra["pricing"]  # type: ignore[index]
    assert pricing == {"asset": "usd", "per_request": "0", "input_per_million": "0.15",
                       "output_per_million": "0.60"}
    assert c.models.retrieve("gpt-test").owned_by == "up"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    # A base URL that names the user (/v1/{user}) serves the models too.
    by_path = client(running, base_url=f"{running.proxy.base_url}/someone")
    assert {m.id for m in by_path.models.list()} == models.keys()
    assert by_path.models.retrieve("gpt-test").owned_by == "up"
    with pytest.raises(openai.NotFoundError):
        by_path.models.retrieve("nope")


def test_mock_provider(running: Running) -> None:
    c = client(running)
    completion = c.chat.completions.create(model="mock-1", user="u", messages=HELLO)
    assert completion.choices[0].message.content == "This is a mock answer"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    chunks = list(c.chat.completions.create(model="mock-1", user="u", messages=HELLO,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "This is a mock answer"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1


@pytest.mark.parametrize("stream", [1, "true", "yes", 0, [True], {"on": True}])
def test_stream_must_be_a_real_boolean(running: Running, stream: object) -> None:
    """A lenient upstream streams for "stream": 1; the proxy, reading a whole answer,
    once relayed that stream unmetered."""
    before = len(running.upstream.seen)
    resp = httpx.post(running.proxy.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {running.key}"},
                      json={"model": "chunks", "user": "u", "messages": HELLO,
                            "stream": stream})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "stream"
    assert len(running.upstream.seen) == before  # the provider was never called


def test_a_service_tier_billed_above_the_price_is_refused(running: Running) -> None:
    seen = len(running.upstream.seen)
    with pytest.raises(openai.BadRequestError) as refused:
        client(running).chat.completions.create(model="gpt-test", messages=HELLO, user="tier",
                                                service_tier="priority")
    assert refused.value.param == "service_tier"  # type: ignore[attr-defined]
    assert len(running.upstream.seen) == seen
    flex = client(running).chat.completions.create(model="gpt-test", messages=HELLO,
                                                   user="tier", service_tier="flex")
    assert flex.choices and running.upstream.last().body["service_tier"] == "flex"


def test_a_chat_body_nested_past_the_stack_is_a_400(running: Running) -> None:
    """1,015 levels: orjson reads them (its limit is 1,024), Python's stack would not."""
    deep = b"[" * 1015 + b'"x"' + b"]" * 1015
    url = running.proxy.base_url + "/chat/completions"
    head = b'{"model": "gpt-test", "user": "deep", '
    for body in (b'"messages": [{"role": "user", "content": [{"type": "text", "text": '
                 + deep + b"}]}]}",
                 b'"messages": [{"role": "user", "content": "hi"}], '
                 b'"prediction": {"type": "content", "content": ' + deep + b"}}"):
        r = httpx.post(url, headers={"Authorization": f"Bearer {running.key}",
                                     "content-type": "application/json"}, content=head + body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "The request body is nested too deeply."
