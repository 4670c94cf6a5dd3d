"""Relaying a provider's stream to the client: bytes out as they arrive, watched on the side.

The relay never re-encodes: each chunk read from the provider is written to the
client as it is. A :class:`StreamWatch` sees the same bytes through the SSE parser
and keeps what metering needs (usage, delivered text). A client that goes away
cancels the upstream read at once; an upstream that fails or stalls after the
headers went out ends the stream with an OpenAI-style ``error`` event, which the
SDKs raise as ``APIError``.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import orjson

from proxy.errors import ProxyError, UpstreamTimeout
from proxy.providers import Reply
from proxy.sse import SSEParser

Scope = dict[str, Any]


class Outcome(enum.Enum):
    COMPLETED = "completed"
    ABORTED = "aborted"  # the client went away
    FAILED = "failed"  # the provider failed or stalled mid-stream


class StreamWatch:
    """What went by in a chat-completion SSE stream: usage, text, whether it finished."""

    __slots__ = ("_parser", "done", "events", "text", "usage")

    def __init__(self) -> None:
        self._parser = SSEParser()
        self.events = 0
        self.done = False
        self.usage: dict[str, Any] | None = None
        self.text: list[str] = []

    def feed(self, chunk: bytes) -> None:
        for event in self._parser.feed(chunk):
            if event.data == "[DONE]":
                self.done = True
                continue
            self.events += 1
            try:
                data = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            if usage := data.get("usage"):
                self.usage = usage
            for choice in data.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    self.text.append(delta["content"])


def error_event(error: ProxyError) -> bytes:
    return b"data: " + error.body() + b"\n\n"


class StreamRelay:
    """An ASGI response that relays ``reply`` and races it against the client leaving."""

    def __init__(self, reply: Reply, headers: list[tuple[bytes, bytes]], max_seconds: float,
                 watch: StreamWatch | None = None):
        self.reply = reply
        self.headers = headers
        self.max_seconds = max_seconds
        self.watch = watch if watch is not None else StreamWatch()
        self.outcome = Outcome.COMPLETED

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.reply.status,
                    "headers": self.headers})
        try:
            async with asyncio.TaskGroup() as tg:
                pump = tg.create_task(self._pump(send))
                gone = tg.create_task(self._client_gone(receive))
                pump.add_done_callback(lambda _: gone.cancel())
                gone.add_done_callback(lambda t: t.cancelled() or pump.cancel())
        finally:
            await self.reply.aclose()

    async def _client_gone(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.outcome = Outcome.ABORTED

    async def _pump(self, send: Any) -> None:
        tail = b""
        try:
            async with asyncio.timeout(self.max_seconds):
                async for chunk in self.reply.chunks:
                    self.watch.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            self.outcome = Outcome.FAILED
            tail = error_event(UpstreamTimeout("The stream exceeded its longest allowed duration."))
        except ProxyError as e:
            self.outcome = Outcome.FAILED
            tail = error_event(e)
        except OSError:  # the ASGI server reports a vanished client this way
            self.outcome = Outcome.ABORTED
            return
        finally:
            self.reply.close()
        try:
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            self.outcome = Outcome.ABORTED
