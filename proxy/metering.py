"""Metering a chat-completion stream on its way through. Pure: bytes in, bytes out.

The :class:`Meter` sees the provider's SSE bytes, passes each complete event on
unchanged, and keeps what billing needs: the provider's usage, the text delivered
so far, whether ``[DONE]`` arrived. Two events are touched, both for billing: the
usage chunk the proxy asked for on the client's behalf is removed again, and the
usage chunk the client asked for gains ``cost``.

Bytes are passed on per complete event (an event split across network reads is
held until its blank line arrives): a partial event is of no use to a client.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from proxy.pricing import Usage
from proxy.sse import SSEParser

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class Meter:
    __slots__ = ("_buf", "_parser", "client_wants_usage", "done", "price", "text", "usage")

    def __init__(self, client_wants_usage: bool,
                 price: Callable[[Usage], dict[str, Any]] | None = None):
        self._buf = b""
        self._parser = SSEParser()
        self.client_wants_usage = client_wants_usage
        self.price = price
        self.done = False
        self.usage: Usage | None = None
        self.text: list[str] = []

    @property
    def delivered(self) -> bool:
        """Whether any output reached the client."""
        return bool(self.text)

    def feed(self, chunk: bytes) -> bytes:
        """Take provider bytes; return the bytes to send to the client now."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            block = buf[start:m.end()]
            start = m.end()
            out.append(self._event(block))
        self._buf = buf[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left when the provider closes: an unterminated last event, metered
        like any other and passed on as it came (unless it is the proxy's usage chunk)."""
        rest, self._buf = self._buf, b""
        if not rest.strip():
            return rest
        out = self._event(rest + b"\n\n")
        return rest if out == rest + b"\n\n" else out

    def _delivered(self, delta: dict[str, Any]) -> None:
        """Keep what a delta delivers: text, a refusal, tool-call names and arguments."""
        for key in ("content", "refusal"):
            if isinstance(delta.get(key), str):
                self.text.append(delta[key])
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str):
                        self.text.append(fn[key])

    def _event(self, block: bytes) -> bytes:
        for event in self._parser.feed(block):
            if event.data == "[DONE]":
                self.done = True
                return block
            try:
                data = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                return block
            if not isinstance(data, dict):
                return block
            choices = data.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    self._delivered(delta)
            usage = Usage.from_openai(data.get("usage"))
            if usage is not None:
                self.usage = usage
                if not data.get("choices"):
                    if not self.client_wants_usage:
                        return b""  # the extra chunk the proxy asked for
                    if self.price is not None:
                        data["usage"].update(self.price(usage))
                        return b"data: " + orjson.dumps(data) + b"\n\n"
        return block
