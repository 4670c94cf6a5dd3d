"""What one HTTP connection may cost the worker: uvicorn's httptools protocol, bounded.

uvicorn's httptools protocol hands every byte to the parser, which has no limit on
the size of a request head: it gathers a long header by concatenating the pieces it
reads, so one client sending a 96 MB header keeps the worker's event loop busy for
seconds, and every other request on it waits. Nor does uvicorn bound how long a client
may take to send a request: its only timer is the idle keep-alive one.

:class:`BoundedHttpToolsProtocol` adds three limits to it:

- **Head size.** Bytes are counted from the first byte of a request head to the end of
  its headers; past ``max_head_bytes`` the parser is fed nothing more, the client gets
  a 431 (RFC 6585 §5) and the connection is closed. At most ``max_head_bytes`` reach the
  parser, so an oversized head costs no more than reading it. (A head that arrives in the
  same read as the end of the previous request's body starts its count at the next
  read: it may pass the limit by less than one read.)
- **Head time.** A head must be complete within ``head_timeout`` of the connection's
  opening (first request) or of its first byte (later requests on a kept-alive
  connection; the idle time in between is uvicorn's keep-alive timeout). Otherwise the
  client gets a 408 if it had sent part of a head, and the connection is closed.
- **Body time.** A body must be complete within ``body_timeout`` of its head. Otherwise
  the client gets a 408 if its response has not started, and the connection is closed
  either way; the application sees the client disconnect. Time during which the worker
  itself stopped reading (flow control: the application has not taken what was read)
  does not count against the client.

After a 431 or a 408 the worker still reads, and throws away, up to ``LINGER_BYTES`` for
up to ``LINGER_SECONDS``, so that a client still sending gets to read the answer rather
than a reset (a lingering close, as nginx does); past either, the connection is closed.

Requests within the limits run exactly as in uvicorn: a head and a body that each
arrive in one read arm no timer at all.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from proxy.errors import error_body
from proxy.requestid import new_request_id

log = logging.getLogger("proxy.server")

LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0

Phase = Literal["head", "body"]

# Where a request's scope carries its :class:`Departure` (under "extensions").
DEPARTURE = "paywall.departure"


class Departure:
    """Whether one request's client has gone, told to its watchers the moment the
    connection is lost: what the application would otherwise learn by waiting on
    ``receive()`` for ``http.disconnect`` in a task of its own, for the price of a
    callback. A departure after the request's response is complete is not one."""

    __slots__ = ("_answered", "_flow", "_watchers", "gone")

    def __init__(self, flow: Any):
        self.gone = False
        self._flow = flow
        self._watchers: list[Callable[[], Any]] = []
        self._answered = False

    def watch(self, callback: Callable[[], Any]) -> None:
        """Call ``callback`` once if the client goes away (reading resumes, so that a
        closed connection is seen even when flow control had paused it)."""
        self._flow.resume_reading()
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], Any]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def leave(self) -> None:
        if self.gone or self._answered:
            return
        self.gone = True
        watchers, self._watchers = self._watchers, []
        for callback in watchers:
            callback()

    def answered(self) -> None:
        self._answered = True
        self._watchers = []


def departure_of(scope: MutableMapping[str, Any]) -> Departure | None:
    """The request's :class:`Departure`, when its server is this module's."""
    extensions = scope.get("extensions")
    return extensions.get(DEPARTURE) if extensions else None


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int = 65536
    head_timeout: float = 10.0
    body_timeout: float = 60.0


def protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The protocol to pass to uvicorn as ``http``: a factory it calls like the class
    (it is pickled to the worker processes, so it is a partial, not a new class)."""
    return cast(type[asyncio.Protocol],
                functools.partial(BoundedHttpToolsProtocol, limits=limits))


def refusal(status: int, message: str, code: str,
            default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response refusing a request, OpenAI-shaped, closing the
    connection."""
    body = error_body(message, "invalid_request_error", code=code)
    lines = [STATUS_LINE[status]]
    for name, value in default_headers:
        lines += [name, b": ", value, b"\r\n"]
    lines += [b"content-type: application/json\r\n",
              b"content-length: %d\r\n" % len(body),
              b"x-request-id: ", new_request_id().encode(), b"\r\n",
              b"connection: close\r\n\r\n", body]
    return b"".join(lines)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on the head's size and deadlines for
    the head and the body (see the module's docstring)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._phase: Phase = "head"
        self._head_left = limits.max_head_bytes  # bytes the current head may still take
        self._head_begun = False  # the parser has seen a byte of the current head
        self._heads = 0  # heads completed on this connection
        self._deadline: asyncio.TimerHandle | None = None  # the head's or the body's
        self._lingering = False
        self._discarded = 0
        # The departures of the requests not yet answered on this connection, oldest
        # first (responses complete in the order their requests came).
        self._departures: collections.deque[Departure] = collections.deque()

    # -- connection events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.head_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        self._depart()

    def _depart(self) -> None:
        while self._departures:
            self._departures.popleft().leave()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        self._feed(data)
        if self.transport.is_closing() or self._lingering:
            return
        if self._deadline is None:
            if self._phase == "body":
                self._arm(self.limits.body_timeout, self._body_late)
            elif self._head_begun:
                self._arm(self.limits.head_timeout, self._head_late)

    def _feed(self, data: bytes | memoryview) -> None:
        if self._phase == "body" or len(data) <= self._head_left:
            if self._phase == "head":
                self._head_left -= len(data)  # a head completed in ``data`` resets it
            super().data_received(data)  # type: ignore[arg-type]  # httptools takes buffers
            return
        # The head may end within its budget: feed just that much and see.
        view = memoryview(data)
        budget, heads = self._head_left, self._heads
        self._head_left = 0
        if budget:
            super().data_received(view[:budget])  # type: ignore[arg-type]
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
        if self._heads == heads:
            self._refuse_head()
        else:
            self._feed(view[budget:])

    # -- parser events -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        departure = Departure(self.flow)
        self._departures.append(departure)
        scope = cast(dict[str, Any], self.scope)
        scope.setdefault("extensions", {})[DEPARTURE] = departure

    def on_headers_complete(self) -> None:
        self._disarm()
        self._phase = "body"
        self._head_begun = False
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._phase = "head"
        self._head_left = self.limits.max_head_bytes
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._departures:
            self._departures.popleft().answered()
        super().on_response_complete()

    # -- limits --------------------------------------------------------------------------

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse_head(self) -> None:
        limit = self.limits.max_head_bytes
        log.warning("request head from %s over %d bytes: refused with 431",
                    _peer(self.client), limit)
        self._answer_and_close(
            431, f"The request line and headers are larger than the limit of {limit} bytes.",
            "request_header_fields_too_large")

    def _head_late(self) -> None:
        self._deadline = None
        if self.flow.read_paused:  # the worker stopped reading, not the client
            self._arm(self.limits.head_timeout, self._head_late)
            return
        if not self._head_begun and self._head_left == self.limits.max_head_bytes:
            self.transport.close()  # opened and never used
            return
        log.warning("request head from %s not complete within %g s: dropped",
                    _peer(self.client), self.limits.head_timeout)
        self._answer_and_close(
            408, f"The request head was not received within {self.limits.head_timeout:g} s.",
            "request_timeout")

    def _body_late(self) -> None:
        self._deadline = None
        if self.flow.read_paused:
            self._arm(self.limits.body_timeout, self._body_late)
            return
        log.warning("request body from %s not complete within %g s: dropped",
                    _peer(self.client), self.limits.body_timeout)
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            cycle.disconnected = True
            cycle.message_event.set()
            self._depart()
            self.transport.close()
            return
        self._answer_and_close(
            408, f"The request body was not received within {self.limits.body_timeout:g} s.",
            "request_timeout")

    def _answer_and_close(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` unless a response is under way on this connection, then
        close it after a bounded lingering read."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # the answer would land inside that response
                cycle.disconnected = True
                cycle.message_event.set()
                self._depart()
                self.transport.close()
                return
            cycle.disconnected = True  # the application's answer would come too late
            cycle.message_event.set()
            self._depart()
        self.transport.write(refusal(status, message, code, self.server_state.default_headers))
        self._lingering = True
        self._disarm()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
