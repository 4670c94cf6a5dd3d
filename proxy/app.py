"""The ASGI application: routes, the request-id wrapper, error rendering, the lifespan.

Nothing is built at import time. :func:`create_app` takes settings and returns the
app; its lifespan opens the PostgreSQL pool and the upstream HTTP session, starts
the hold reaper, and hands them to the handlers through ``app.state.services``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import db, pages, reaper, user_api
from proxy import settings as config
from proxy.chat import chat_completions
from proxy.errors import ModelNotFound, ProxyError, error_body
from proxy.keys import KeyStore
from proxy.ledger import Ledger
from proxy.limits import Gate, OverrideCache, build_limiter
from proxy.links import LinkSigner
from proxy.pricing import price_from, units
from proxy.providers import build_providers
from proxy.requestid import request_id_from
from proxy.services import JSON, Services, authenticate, json_response, services_of
from proxy.settings import Settings
from proxy.tasks import TaskSet
from proxy.tokens import Tokenizer

log = logging.getLogger("proxy")


def _model_card(name: str, s: Settings) -> dict[str, Any]:
    m = s.models[name]
    p = m.price
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": m.owned_by or m.provider,
        "pricing": {
            "asset": p.asset,
            "per_request": format(p.per_request, "f"),
            "input_per_million": format(p.input_per_million, "f"),
            "output_per_million": format(p.output_per_million, "f"),
        },
    }


async def list_models(request: Request) -> Response:
    services = services_of(request)
    await authenticate(request, services)
    s = services.settings
    return json_response({"object": "list", "data": [_model_card(n, s) for n in s.models]})


async def get_model(request: Request) -> Response:
    services = services_of(request)
    await authenticate(request, services)
    name = request.path_params["model"]
    if name not in services.settings.models:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    return json_response(_model_card(name, services.settings))


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def _render_proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=exc.headers)


async def _render_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = error_body(str(exc.detail), "invalid_request_error",
                      code="not_found" if exc.status_code == 404 else None)
    return Response(body, status_code=exc.status_code, media_type=JSON, headers=exc.headers)


async def _render_crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return Response(ProxyError("The proxy had an internal error.").body(), status_code=500,
                    media_type=JSON)


class RequestIdMiddleware:
    """Outermost layer: every response, errors included, carries ``X-Request-Id``."""

    def __init__(self, app: Starlette):
        self.app = app

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                given = v.decode("latin-1")
                break
        rid = request_id_from(given)
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(settings: Settings) -> RequestIdMiddleware:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not settings.database_url:
            raise RuntimeError("DATABASE_URL is not set (paywall-proxy serve sets it)")
        pool = await db.create_pool(
            settings.database_url, settings.database.pool_min, settings.database.pool_max
        )
        connector = aiohttp.TCPConnector(limit=settings.upstream.pool_size, limit_per_host=0,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                        skip_auto_headers=("User-Agent",))
        tokenizer = Tokenizer()
        # Load each model's encoding now, off the loop, rather than in a first request.
        for name, m in settings.models.items():
            await asyncio.to_thread(tokenizer.encoding, m.upstream or name, m.encoding)
        ledger = Ledger(pool, settings.billing.hold_ttl_seconds)
        gate = Gate(build_limiter(settings.redis_url))
        services = Services(
            settings=settings,
            keys=KeyStore(pool, settings.server.key_cache_seconds),
            providers=build_providers(settings.providers, settings.upstream, session),
            prices={name: price_from(m.price, settings.assets[m.price.asset].scale)
                    for name, m in settings.models.items()},
            grants={pid: units(p.starter_grant, settings.assets[p.asset].scale)
                    for pid, p in settings.paywalls.items()},
            ledger=ledger,
            gate=gate,
            overrides=OverrideCache(ledger.limits_of, settings.server.key_cache_seconds),
            live=reaper.LiveHolds(),
            tokenizer=tokenizer,
            signer=LinkSigner(settings.server.link_secret or secrets.token_hex(32),
                              settings.server.public_url),
            tasks=TaskSet(),
            pool=pool,
            session=session,
        )
        app.state.services = services
        try:
            leases = [p.limits.lease_seconds for p in settings.paywalls.values()]
            async with reaper.running(ledger, services.live, gate,
                                      settings.billing.reaper_interval_seconds,
                                      min([settings.billing.reaper_interval_seconds,
                                           *(ttl / 3 for ttl in leases)])):
                yield
                await services.tasks.drain()
        finally:
            await gate.limiter.close()
            await session.close()
            await pool.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/{user}/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            *user_api.routes,
            *pages.routes,
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={
            ProxyError: _render_proxy_error,
            HTTPException: _render_http_error,
            Exception: _render_crash,
        },
        lifespan=lifespan,
    )
    return RequestIdMiddleware(app)


def app_from_env() -> RequestIdMiddleware:
    """uvicorn factory for ``serve``: settings from ``$PAYWALL_CONFIG`` and the environment."""
    return create_app(config.load())

