"""A local upstream speaking Anthropic's Messages API for the tests, over real HTTP.

It records every request it receives (path, headers, body) in ``seen`` and answers
``POST .../messages`` in Anthropic's shapes (``msg_`` ids, ``content`` blocks,
``stop_reason``, ``usage``), a stream as Anthropic's events (``message_start``,
``content_block_start``/``delta``/``stop``, ``ping``, ``message_delta`` with the
cumulative ``usage.output_tokens``, ``message_stop``), one text delta per word.

What it reports as usage is derivable from the request alone:

- ``input_tokens``: the words (whitespace-split) of every string in ``system`` and
  ``messages`` — text blocks, tool results and plain strings alike; at least 1.
- when ``system`` is a list of blocks one of which has ``cache_control``:
  ``cache_read_input_tokens`` = ``CACHE_READ`` and ``cache_creation_input_tokens`` =
  ``CACHE_WRITE`` on top (else both 0).
- ``output_tokens``: one per text delta (word) and per tool-input delta it sends.

It behaves according to the model asked for:

- ``claude-echo`` (and anything unknown): the text ``echo: <the last user text>``;
  stops early, ``stop_reason: stop_sequence``, at the first of ``stop_sequences`` the
  text contains.
- ``claude-thinking``: a ``thinking`` block (``THINKING``, its words counted as
  output), then the echo.
- ``claude-tools``: with ``tools`` and no ``tool_result`` in the last user message, the
  text ``TOOL_PREAMBLE`` then a ``tool_use`` block (``toolu_<n>``, input
  ``TOOL_INPUT``, streamed as the pieces ``TOOL_INPUT_PIECES``) for each of the first two
  tools (only the first with ``tool_choice.disable_parallel_tool_use``), stop_reason
  ``tool_use``; with ``tool_choice`` ``any`` or ``tool`` (a forced call) no text, and
  ``tool`` calls only the tool it names; when the last user message has tool results,
  the text ``tool said: <each result's text, joined by " | ">``.
- ``claude-max``: ``min(max_tokens, 20)`` words, ``stop_reason: max_tokens``.
- ``claude-stream-endless``: a stream of a word every 0.1 s for a minute; when the
  client side goes away the time is recorded in ``closed_at``.
- ``claude-break-after-K``: a stream of the first K of ``STORY_WORDS``, then,
  ``BREAK_PAUSE`` later, an error inside the app, so the server drops the connection.
- ``claude-error-after-K``: a stream of K words, then an ``error`` event
  (``overloaded_error``), as Anthropic ends a stream that fails once begun.
- ``claude-crash``: 500 ``{"type": "error", "error": {"type": "api_error", ...}}``.
- ``claude-overloaded``: 529 ``overloaded_error``.
- ``claude-reject``: 401 ``authentication_error`` whose message repeats the
  ``x-api-key`` it was sent, as some providers do.
- ``claude-odd-usage``: like ``claude-echo``, but ``output_tokens`` is a string (usage a
  reader must refuse).
- ``claude-zero-input``: like ``claude-echo``, but a stream's ``message_delta`` usage
  also says ``input_tokens`` and both cache counts are 0 (below message_start's).

Every answer carries ``request-id``, an ``anthropic-ratelimit-requests-remaining``
and a ``set-cookie`` header (which must not reach a client).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.upstream import (
    BREAK_PAUSE,
    STORY_WORDS,
    UpstreamBroke,
    free_port,
    read_body,
    send_json,
    serve_asgi,
)

CACHE_READ = 40
CACHE_WRITE = 24
THINKING = "Let me think about that."
TOOL_PREAMBLE = "Checking."
TOOL_INPUT = {"city": "Paris"}
TOOL_INPUT_PIECES = ['{"city"', ': "Par', 'is"}']
HEADERS = [(b"request-id", b"req_up_anthropic"),
           (b"anthropic-ratelimit-requests-remaining", b"99"),
           (b"set-cookie", b"upstream=secret")]


@dataclass
class Seen:
    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items()
                   if k in ("text", "content", "thinking"))
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    return 0


def input_usage(body: dict[str, Any]) -> dict[str, int]:
    """The prompt part of the usage this upstream reports for ``body``."""
    system = body.get("system")
    cached = isinstance(system, list) and any(
        isinstance(b, dict) and b.get("cache_control") for b in system)
    return {"input_tokens": max(1, _words(system) + _words(body.get("messages"))),
            "cache_read_input_tokens": CACHE_READ if cached else 0,
            "cache_creation_input_tokens": CACHE_WRITE if cached else 0}


def _last_user(body: dict[str, Any]) -> Any:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return message.get("content")
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(b.get("text") if b.get("type") == "text" else b.get("content"))
                        for b in content if isinstance(b, dict) and b.get("type") in
                        ("text", "tool_result"))
    return ""


def _pieces(text: str) -> list[str]:
    words = text.split()
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


@dataclass
class Plan:
    """What one answer is: blocks of (type, pieces, extra), the stop reason."""

    blocks: list[tuple[str, list[str], dict[str, Any]]]
    stop_reason: str
    stop_sequence: str | None = None


def plan(body: dict[str, Any]) -> Plan:
    """The answer to ``body`` (see the module's docstring)."""
    model = str(body.get("model", ""))
    last = _last_user(body)
    if model == "claude-tools":
        results = [b for b in last if isinstance(b, dict) and b.get("type") == "tool_result"
                   ] if isinstance(last, list) else []
        if results:
            said = " | ".join(_text_of(r.get("content")) for r in results)
            return Plan([("text", _pieces("tool said: " + said), {})], "end_turn")
        if body.get("tools"):
            choice = body.get("tool_choice") or {}
            tools = body["tools"][:1 if choice.get("disable_parallel_tool_use") else 2]
            blocks: list[tuple[str, list[str], dict[str, Any]]] = []
            if choice.get("type") == "tool":
                tools = [t for t in body["tools"] if t["name"] == choice["name"]]
            if choice.get("type") not in ("tool", "any"):
                blocks.append(("text", _pieces(TOOL_PREAMBLE), {}))
            for i, tool in enumerate(tools):
                blocks.append(("tool_use", list(TOOL_INPUT_PIECES),
                               {"id": f"toolu_{i}", "name": tool["name"]}))
            return Plan(blocks, "tool_use")
    if model == "claude-max":
        n = min(int(body.get("max_tokens") or 1), 20)
        return Plan([("text", _pieces(" ".join(f"w{i}" for i in range(n))), {})], "max_tokens")
    text = "echo: " + _text_of(last)
    for stop in body.get("stop_sequences") or []:
        if stop in text:
            return Plan([("text", _pieces(text[:text.index(stop)]), {})], "stop_sequence", stop)
    blocks = [("text", _pieces(text), {})]
    if model == "claude-thinking":
        blocks.insert(0, ("thinking", _pieces(THINKING), {"signature": "sig-1"}))
    return Plan(blocks, "end_turn")


def output_tokens(answer: Plan) -> int:
    return sum(len(pieces) for _, pieces, _ in answer.blocks)


def _block(kind: str, pieces: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    if kind == "tool_use":
        return {"type": "tool_use", "id": extra["id"], "name": extra["name"],
                "input": orjson.loads("".join(pieces))}
    if kind == "thinking":
        return {"type": "thinking", "thinking": "".join(pieces),
                "signature": extra["signature"]}
    return {"type": "text", "text": "".join(pieces)}


def message(body: dict[str, Any], answer: Plan, msg_id: str = "msg_up1") -> dict[str, Any]:
    """A whole Messages answer."""
    usage: dict[str, Any] = {**input_usage(body), "output_tokens": output_tokens(answer)}
    if body.get("model") == "claude-odd-usage":
        usage["output_tokens"] = str(usage["output_tokens"])
    return {"id": msg_id, "type": "message", "role": "assistant",
            "model": body.get("model"),
            "content": [_block(*b) for b in answer.blocks],
            "stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence,
            "usage": usage}


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _delta(kind: str, piece: str) -> dict[str, Any]:
    if kind == "tool_use":
        return {"type": "input_json_delta", "partial_json": piece}
    if kind == "thinking":
        return {"type": "thinking_delta", "thinking": piece}
    return {"type": "text_delta", "text": piece}


def _start(kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    if kind == "tool_use":
        return {"type": "tool_use", "id": extra["id"], "name": extra["name"], "input": {}}
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def stream_events(body: dict[str, Any], answer: Plan, msg_id: str = "msg_up1") -> list[bytes]:
    """A whole stream's events, one per item."""
    start = {"id": msg_id, "type": "message", "role": "assistant", "model": body.get("model"),
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**input_usage(body), "output_tokens": 1}}
    out = [event("message_start", {"type": "message_start", "message": start}),
           event("ping", {"type": "ping"})]
    for index, (kind, pieces, extra) in enumerate(answer.blocks):
        out.append(event("content_block_start", {"type": "content_block_start",
                                                 "index": index,
                                                 "content_block": _start(kind, extra)}))
        for piece in pieces:
            out.append(event("content_block_delta", {"type": "content_block_delta",
                                                     "index": index,
                                                     "delta": _delta(kind, piece)}))
        if kind == "thinking":
            out.append(event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": extra["signature"]}}))
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence},
        "usage": {"output_tokens": output_tokens(answer),
                  **({"input_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}
                     if body.get("model") == "claude-zero-input" else {})}}))
    out.append(event("message_stop", {"type": "message_stop"}))
    return out


def error(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}}


@dataclass
class AnthropicUpstream:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)

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
        model = str(body.get("model", ""))
        if not scope["path"].endswith("/messages"):
            await send_json(send, 404, error("not_found_error", "Not found"), HEADERS)
        elif model == "claude-crash":
            await send_json(send, 500, error("api_error", "Internal server error"), HEADERS)
        elif model == "claude-overloaded":
            await send_json(send, 529, error("overloaded_error", "Overloaded"), HEADERS)
        elif model == "claude-reject":
            key = headers.get("x-api-key", "")
            await send_json(send, 401, error("authentication_error",
                                             f"invalid x-api-key: {key}"), HEADERS)
        elif body.get("stream"):
            await self._stream(model, body, receive, send)
        else:
            await send_json(send, 200, message(body, plan(body)), HEADERS)

    async def _stream(self, model: str, body: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                *HEADERS]})
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.closed_at.append(time.monotonic())
            gone.set()

        async def out(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            if model == "claude-stream-endless":
                words = [f"t{i}" for i in range(600)]
                head = stream_events(body, Plan([("text", [], {})], "end_turn"))[:3]
                for frame in head:
                    await out(frame)
                for i, word in enumerate(words):
                    if gone.is_set():
                        return
                    await out(event("content_block_delta", {
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), 0.1)
                return
            broken = model.startswith(("claude-break-after-", "claude-error-after-"))
            if broken:
                k = int(model.rsplit("-", 1)[1])
                answer = Plan([("text", STORY_WORDS[:k], {})], "end_turn")
                frames = stream_events(body, answer)[:3 + k]  # start, ping, block start, K
            else:
                frames = stream_events(body, plan(body))
            for frame in frames:
                await out(frame)
            if model.startswith("claude-break-after-"):
                await asyncio.sleep(BREAK_PAUSE)  # the words reach the client first
                raise UpstreamBroke(model)
            if model.startswith("claude-error-after-"):
                await out(event("error", error("overloaded_error", "Overloaded")))
            await out(b"", more=False)
        except OSError:
            pass
        finally:
            watcher.cancel()


@contextlib.contextmanager
def serve_anthropic_upstream() -> Iterator[AnthropicUpstream]:
    """Run an :class:`AnthropicUpstream` on a free loopback port in a thread of its own."""
    app = AnthropicUpstream(port=free_port())
    with serve_asgi(app, app.port, lifespan="on"):
        yield app
