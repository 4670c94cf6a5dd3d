"""A local OpenAI-compatible deployment that fails on cue, over real HTTP/1.1.

Each instance is a server of its own (an ``asyncio`` TCP server in a thread), so a
failure can be a real one: a connection reset before any byte, an answer that never
begins, a stream that breaks after its first chunk. It answers the requests it gets
with the behaviours queued by :meth:`Flaky.will`, in order, then ``default``:

- ``ok``: a chat completion (a stream when asked) whose content names the instance and
  whose usage is 5 prompt tokens and ``completion_tokens`` completion tokens;
- ``<status>`` (``500``, ``503``, ``400``...), or ``429:<seconds>`` with that
  Retry-After: an OpenAI-shaped error;
- ``too-long`` and ``policy``: a 400 refusing the request as too long for the model's
  context window, or under its content policy, as OpenAI and Azure word them;
- ``reset``: the connection reset (RST) once the request is read;
- ``stall``: nothing, until the client goes away;
- ``break-early``: a stream's 200 and headers, then a reset before its first chunk;
- ``break``: a stream's first chunk, then a reset.

Every request is recorded in ``seen``: its model, key, whether it streamed and the
behaviour it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

REFUSALS = {
    "too-long": {"message": "This model's maximum context length is 8192 tokens. However, "
                            "your messages resulted in 9000 tokens.",
                 "type": "invalid_request_error", "param": "messages",
                 "code": "context_length_exceeded"},
    "policy": {"message": "The response was filtered due to the prompt triggering Azure "
                          "OpenAI's content management policy.",
               "type": None, "param": "prompt", "code": "content_filter"},
}


@dataclass
class Seen:
    model: str
    key: str
    stream: bool
    behaviour: str


@dataclass
class Flaky:
    name: str
    completion_tokens: int
    default: str = "ok"
    plan: list[str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def will(self, *behaviours: str) -> None:
        self.plan.extend(behaviours)

    def reset(self, default: str = "ok") -> None:
        self.plan.clear()
        self.seen.clear()
        self.default = default

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            body = orjson.loads(raw) if raw else {}
            behaviour = self.plan.pop(0) if self.plan else self.default
            self.seen.append(Seen(str(body.get("model")),
                                  headers.get("authorization", "").removeprefix("Bearer "),
                                  bool(body.get("stream")), behaviour))
            await self._act(behaviour, body, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _act(self, behaviour: str, body: dict[str, Any], reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        if behaviour == "reset":
            return _reset(writer)
        if behaviour in REFUSALS:
            return await _send(writer, 400, orjson.dumps({"error": REFUSALS[behaviour]}))
        if behaviour == "stall":
            await reader.read()  # until the client goes away
            return
        if behaviour == "ok" and not body.get("stream"):
            return await _send(writer, 200, orjson.dumps(self._completion(body)))
        if behaviour in ("ok", "break", "break-early"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            await writer.drain()
            if behaviour == "break-early":
                await asyncio.sleep(0.05)
                return _reset(writer)
            for event in self._events(body):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                if behaviour == "break":
                    await asyncio.sleep(0.2)  # the first chunk reaches the client first
                    return _reset(writer)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        status, _, wait = behaviour.partition(":")
        extra = f"retry-after: {wait}\r\n".encode() if wait else b""
        await _send(writer, int(status), orjson.dumps({"error": {
            "message": f"{self.name} failed with {status}", "type": "server_error",
            "param": None, "code": None}}), extra)

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": 5, "completion_tokens": self.completion_tokens,
                "total_tokens": 5 + self.completion_tokens}

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self.name}", "object": "chat.completion", "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": f"from {self.name}"}}],
                "usage": self._usage()}

    def _events(self, body: dict[str, Any]) -> Iterator[bytes]:
        def event(choices: list[Any], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({
                "id": f"chatcmpl-{self.name}", "object": "chat.completion.chunk",
                "created": 1, "model": body.get("model"), "choices": choices,
                **extra}) + b"\n\n"

        yield event([{"index": 0, "delta": {"role": "assistant", "content": "from"},
                      "finish_reason": None}])
        yield event([{"index": 0, "delta": {"content": f" {self.name}"},
                      "finish_reason": "stop"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event([], usage=self._usage())
        yield b"data: [DONE]\n\n"


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes,
                extra: bytes = b"") -> None:
    writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                 b"connection: close\r\n%s\r\n%s" % (status, len(body), extra, body))
    await writer.drain()


@contextlib.contextmanager
def serving(*flakies: Flaky) -> Iterator[None]:
    """Serve each of ``flakies`` on a port of its own until the block ends."""
    loop = asyncio.new_event_loop()
    servers: list[asyncio.Server] = []

    async def start() -> None:
        for f in flakies:
            server = await asyncio.start_server(f._handle, "127.0.0.1", 0)
            f.port = server.sockets[0].getsockname()[1]
            servers.append(server)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield
    finally:
        async def stop() -> None:
            for s in servers:
                s.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
