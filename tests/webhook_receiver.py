"""A webhook receiver for the tests, over real HTTP: it verifies every delivery with the
``standardwebhooks`` library, as an app would, and keeps what it received.

``fail_first`` makes it answer 500 to that many deliveries before it accepts any;
``down`` makes it answer 503 to everything until set back.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.upstream import free_port, serve_asgi


@dataclass
class Received:
    event: dict[str, Any]
    headers: dict[str, str]
    at: float
    body: bytes


@dataclass
class Receiver:
    secret: str
    port: int = 0
    fail_first: int = 0
    down: bool = False
    accepted: list[Received] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (reason, body)
    attempts: int = 0
    in_flight: int = 0
    most_in_flight_per_id: dict[str, int] = field(default_factory=dict)
    _open: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            msg_id = headers.get("webhook-id", "")
            with self._lock:
                self.attempts += 1
                self._open[msg_id] = self._open.get(msg_id, 0) + 1
                self.most_in_flight_per_id[msg_id] = max(
                    self.most_in_flight_per_id.get(msg_id, 0), self._open[msg_id])
            try:
                if self.down:
                    return Response(status_code=503)
                with self._lock:
                    if self.fail_first > 0:
                        self.fail_first -= 1
                        return Response(status_code=500)
                try:
                    Webhook(self.secret).verify(body, headers)
                except WebhookVerificationError as e:
                    with self._lock:
                        self.refused.append((str(e), body.decode(errors="replace")))
                    return Response(status_code=400)
                with self._lock:
                    self.accepted.append(Received(orjson.loads(body), headers, time.time(), body))
                return Response(b"ok")
            finally:
                with self._lock:
                    self._open[msg_id] -= 1

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def events(self, event_type: str | None = None, user: str | None = None
               ) -> list[dict[str, Any]]:
        """The events accepted (each once, by id: deliveries are at least once), in the
        order they first arrived."""
        seen: set[str] = set()
        out = []
        with self._lock:
            for r in self.accepted:
                e = r.event
                if e["id"] in seen:
                    continue
                seen.add(e["id"])
                if (event_type is None or e["type"] == event_type) and \
                        (user is None or e["user"] == user):
                    out.append(e)
        return out


@contextlib.contextmanager
def serve_receiver(secret: str, port: int = 0) -> Iterator[Receiver]:
    receiver = Receiver(secret, port or free_port())
    with serve_asgi(receiver.app(), receiver.port):
        yield receiver
