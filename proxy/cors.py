"""CORS for the ``/api/v1`` routes: a page may call them from the origins its paywall
lists in ``allowed_origins`` — preflight included — and from nowhere else.

The paywall is the one in the path (``/api/v1/paywall/{id}/…``), else ``paywall_id``
in the query, else the ``X-Paywall-Id`` header. A preflight cannot carry that header,
so a preflight naming no paywall is allowed for an origin some paywall lists; the
request itself is then checked against its own paywall. A refused origin gets no
CORS headers at all (the browser then blocks the response) and a 403 preflight.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from proxy.settings import Settings

PREFIX = "/api/v1/"
_PAYWALL_IN_PATH = re.compile(r"^/api/v1/paywall/([^/]+)/")
_ALLOW_HEADERS = "authorization, content-type, x-paywall-id, idempotency-key, accept, " \
                 "x-request-id, anthropic-version, openai-beta"
_EXPOSE = ("x-request-id, x-query-type, retry-after, x-ratelimit-limit-requests, "
           "x-ratelimit-remaining-requests, x-ratelimit-reset-requests")
_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def paywall_named(query_string: bytes, header: str | None) -> str | None:
    """The paywall a gateway request names: the last ``paywall_id`` in the query (as
    Starlette reads it), else the ``X-Paywall-Id`` header. A blank last value names
    none (""), never the header's: CORS and the route both read this one rule."""
    values = [v for k, v in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
              if k == "paywall_id"]
    if values:
        return values[-1]
    return header


class Cors:
    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.origins = {pid: frozenset(p.allowed_origins)
                        for pid, p in settings.paywalls.items()}
        self.any_paywall = frozenset().union(*self.origins.values()) if self.origins \
            else frozenset()

    @property
    def state(self) -> Any:
        return self.app.state

    def _paywall(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> str | None:
        if m := _PAYWALL_IN_PATH.match(scope["path"]):
            return m.group(1)
        given = headers.get(b"x-paywall-id")
        return paywall_named(scope.get("query_string", b""),
                             given.decode("latin-1") if given else None)

    def allowed(self, origin: str, paywall_id: str | None, preflight: bool) -> bool:
        if paywall_id is None:
            return preflight and origin in self.any_paywall
        return origin in self.origins.get(paywall_id, ())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin_raw = headers.get(b"origin")
        if origin_raw is None:
            await self.app(scope, receive, send)
            return
        origin = origin_raw.decode("latin-1")
        preflight = (scope["method"] == "OPTIONS"
                     and b"access-control-request-method" in headers)
        ok = self.allowed(origin, self._paywall(scope, headers), preflight)
        if preflight:
            out = [(b"vary", b"Origin")]
            if ok:
                out += [(b"access-control-allow-origin", origin_raw),
                        (b"access-control-allow-methods", _METHODS.encode()),
                        (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
                        (b"access-control-max-age", b"600")]
            await send({"type": "http.response.start", "status": 204 if ok else 403,
                        "headers": out})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"vary", b"Origin")]
                if ok:
                    extra += [(b"access-control-allow-origin", origin_raw),
                              (b"access-control-expose-headers", _EXPOSE.encode())]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_cors)
