"""Relaying a provider's stream to the client: bytes out as they arrive, metered on the side.

The relay never re-encodes: each event read from the provider is written to the
client as it is (see :mod:`proxy.metering` for the two billing exceptions). A
client that goes away cancels the upstream read at once; an upstream that fails
or stalls after the headers went out ends the stream with an OpenAI-style
``error`` event, which the SDKs raise as ``APIError``. However the stream ends,
``on_done`` runs once with the outcome, and is awaited.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

from proxy.errors import ProxyError, UpstreamTimeout
from proxy.server import Departure, departure_of
from proxy.upstream import Reply

log = logging.getLogger("proxy.relay")
T = TypeVar("T")


class Outcome(enum.Enum):
    COMPLETED = "completed"
    ABORTED = "aborted"  # the client went away
    PARTIAL = "partial"  # the provider failed or stalled mid-stream


CLIENT_GONE = 499  # the status logged for a client that left before the provider answered
# What writing to a client that is gone raises: OSError, or uvloop's RuntimeError for a
# closed transport (a client that pipelined a second request and left).
_GONE = (OSError, RuntimeError)


def error_event(error: ProxyError) -> bytes:
    return b"data: " + error.body() + b"\n\n"


class Framer(Protocol):
    """What the relay passes each chunk through (the chat :class:`~proxy.metering.Meter`,
    or :class:`Verbatim`)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Verbatim:
    """Chunks out exactly as they came in."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""


async def unless_client_leaves(request: Request, sending: Coroutine[Any, Any, T]) -> T | None:
    """What ``sending`` returns (the provider's reply, or its body), or None — the call
    cancelled — if the client goes away first. The request body has been read, so the
    next ASGI message is the disconnect."""
    departure = departure_of(request.scope)
    if departure is None:  # another ASGI server: watch receive() for the disconnect
        return await _unless_received_disconnect(request, sending)
    if departure.gone:
        sending.close()
        return None
    try:
        return await _until_departure(sending, departure)
    except _Departed:
        return None


class _Departed(Exception):
    """The client left, and what was awaited for it was cancelled."""


async def _until_departure(awaited: Coroutine[Any, Any, T], departure: Departure) -> T:
    """What ``awaited`` returns, awaited in this task (no task of its own), or
    :class:`_Departed` once the client has gone: this task is cancelled for it and the
    cancellation taken back, as ``asyncio.timeout`` does for its deadline. A
    cancellation from elsewhere is raised as it came."""
    task = asyncio.current_task()
    assert task is not None
    departed = False

    def leave() -> None:
        nonlocal departed
        departed = True
        task.cancel()

    departure.watch(leave)
    try:
        result = await awaited
    except asyncio.CancelledError:
        if departed and task.uncancel() == 0:
            raise _Departed from None
        raise
    finally:
        departure.unwatch(leave)
    if departed:  # it kept the cancellation to itself and returned: so be it
        task.uncancel()
    return result


async def _unless_received_disconnect(request: Request, sending: Coroutine[Any, Any, T]
                                      ) -> T | None:
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        async with asyncio.TaskGroup() as tg:
            reply = tg.create_task(sending)
            watch = tg.create_task(gone())
            reply.add_done_callback(lambda _: watch.cancel())
            watch.add_done_callback(lambda t: t.cancelled() or reply.cancel())
    except BaseExceptionGroup as group:  # the provider call failed: its own error
        raise group.exceptions[0]  # noqa: B904 (its cause is kept)
    return None if reply.cancelled() else reply.result()


class StreamRelay:
    """An ASGI response that relays ``reply`` and races it against the client leaving."""

    def __init__(self, reply: Reply, headers: list[tuple[bytes, bytes]], max_seconds: float,
                 meter: Framer, on_done: Callable[[Outcome], Awaitable[None]] | None = None,
                 error_tail: Callable[[ProxyError], bytes] | None = error_event):
        self.reply = reply
        self.headers = headers
        self.max_seconds = max_seconds
        self.meter = meter
        self.on_done = on_done
        # What ends a stream the provider broke off; None: cut the connection instead.
        self.error_tail = error_tail
        self.outcome = Outcome.COMPLETED
        self.first_at = 0.0  # perf_counter() at the provider's first chunk
        self.ended_at = 0.0  # … and when its stream ended (or failed)
        self.sent = 0  # body bytes handed to the client so far
        self._pumped = False  # set once the last byte went out (or could not)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.reply.status,
                        "headers": self.headers})
            departure = departure_of(scope)
            if departure is None:  # another ASGI server: watch receive() for it
                async with asyncio.TaskGroup() as tg:
                    pump = tg.create_task(self._pump(send))
                    gone = tg.create_task(self._client_gone(receive))
                    pump.add_done_callback(lambda _: gone.cancel())
                    gone.add_done_callback(lambda t: t.cancelled() or pump.cancel())
            elif departure.gone:
                self.outcome = Outcome.ABORTED
                self.ended_at = time.perf_counter()
            else:
                try:
                    await _until_departure(self._pump(send), departure)
                except _Departed:
                    if not self._pumped:
                        self.outcome = Outcome.ABORTED
        except _GONE:
            self.outcome = Outcome.ABORTED
        except asyncio.CancelledError:  # the server gave up on this response
            self.outcome = Outcome.ABORTED
            raise
        finally:
            try:
                await self.reply.aclose()
            finally:
                if self.on_done is not None:
                    await self.on_done(self.outcome)

    async def _client_gone(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # ASGI servers also report a disconnect once the response is complete.
        if not self._pumped:
            self.outcome = Outcome.ABORTED

    def _tail(self, error: ProxyError) -> bytes:
        return self.error_tail(error) if self.error_tail is not None else b""

    async def _pump(self, send: Any) -> None:
        tail = b""
        try:
            async with asyncio.timeout(self.max_seconds):
                async for chunk in self.reply.chunks:
                    if not self.first_at:
                        self.first_at = time.perf_counter()
                    out = self.meter.feed(chunk)
                    if out:
                        try:
                            await send({"type": "http.response.body", "body": out,
                                        "more_body": True})
                        except RuntimeError as e:  # uvloop: the transport is closed
                            raise ConnectionResetError(str(e)) from e
                        self.sent += len(out)
            tail = self.meter.flush()
        except TimeoutError:
            self.outcome = Outcome.PARTIAL
            tail = self._tail(
                UpstreamTimeout("The stream exceeded its longest allowed duration."))
        except ProxyError as e:
            self.outcome = Outcome.PARTIAL
            tail = self._tail(e)
        except OSError:  # the ASGI server reports a vanished client this way
            self.outcome = Outcome.ABORTED
            return
        except Exception:  # a bug, not the provider: still end the stream the same way
            log.exception("relaying a stream failed")
            self.outcome = Outcome.PARTIAL
            tail = self._tail(ProxyError("The proxy failed while relaying the stream."))
        finally:
            self.ended_at = time.perf_counter()
            self.reply.close()
        if self.outcome is Outcome.PARTIAL and self.error_tail is None:
            # No way to say so in the body: leave the response unterminated, so the
            # server drops the connection and the client sees a truncated body.
            self._pumped = True
            return
        try:
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except _GONE:
            self.outcome = Outcome.ABORTED
        self._pumped = True
