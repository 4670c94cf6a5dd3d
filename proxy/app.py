"""The ASGI application: routes, the request-id wrapper, error rendering, the lifespan.

Nothing is built at import time. :func:`create_app` takes settings and returns the
app; its lifespan opens the PostgreSQL pool and the upstream HTTP session and hands
them to the handlers through ``app.state.services``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import db
from proxy import settings as config
from proxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ProxyError,
    error_body,
)
from proxy.identity import USER_HEADER, resolve_user
from proxy.keys import KeyStore, Principal, bearer_token
from proxy.providers import Call, Provider, build_providers
from proxy.relay import StreamRelay
from proxy.requestid import request_id_from
from proxy.settings import Settings

log = logging.getLogger("proxy")

_JSON = "application/json"
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class Services:
    settings: Settings
    keys: KeyStore
    providers: dict[str, Provider]
    pool: Any
    session: aiohttp.ClientSession


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _authenticate(request: Request, services: Services) -> Principal:
    key = bearer_token(request.headers.get("authorization"))
    if key is None:
        raise AuthenticationFailed(
            "Missing API key: send your paywall key as 'Authorization: Bearer <key>'."
        )
    principal = await services.keys.authenticate(key)
    if principal is None or principal.paywall_id not in services.settings.paywalls:
        raise AuthenticationFailed("Incorrect API key provided.")
    return principal


async def _read_json(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    too_large = PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    raw = b"".join(parts)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return raw, body


async def chat_completions(request: Request) -> Response | StreamRelay:
    services = _services(request)
    s = services.settings
    principal = await _authenticate(request, services)
    raw, body = await _read_json(request, s.server.max_body_bytes)
    resolve_user(body, request.headers.get(USER_HEADER), request.path_params.get("user"))

    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    model = s.models.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model '{name}' does not exist or you do not have access to it.", param="model"
        )
    upstream_name = model.upstream or name
    if upstream_name != name:
        body["model"] = upstream_name
        raw = orjson.dumps(body)
    paywall = s.paywalls[principal.paywall_id]
    stream = body.get("stream") is True
    call = Call(
        body=raw,
        stream=stream,
        request_id=request.state.request_id,
        headers=request.headers,
        api_key=paywall.provider_keys.get(model.provider) or s.providers[model.provider].api_key,
        payload=body,
    )
    reply = await services.providers[model.provider].send(call)
    if reply.stream and reply.ok:
        headers = [(k.encode(), v.encode()) for k, v in reply.headers] + _STREAM_HEADERS
        return StreamRelay(reply, headers, s.upstream.stream_max_seconds)
    try:
        content = await reply.read()
    finally:
        await reply.aclose()
    return Response(content, status_code=reply.status, headers=dict(reply.headers))


def _model_card(name: str, s: Settings) -> dict[str, Any]:
    m = s.models[name]
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": m.owned_by or m.provider,
        "pricing": {
            "asset": m.price.asset,
            "per_request": str(m.price.per_request),
            "input_per_million": str(m.price.input_per_million),
            "output_per_million": str(m.price.output_per_million),
        },
    }


async def list_models(request: Request) -> Response:
    services = _services(request)
    await _authenticate(request, services)
    s = services.settings
    return json_response({"object": "list", "data": [_model_card(n, s) for n in s.models]})


async def get_model(request: Request) -> Response:
    services = _services(request)
    await _authenticate(request, services)
    name = request.path_params["model"]
    if name not in services.settings.models:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    return json_response(_model_card(name, services.settings))


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def _render_proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return Response(exc.body(), status_code=exc.status, media_type=_JSON)


async def _render_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = error_body(str(exc.detail), "invalid_request_error",
                      code="not_found" if exc.status_code == 404 else None)
    return Response(body, status_code=exc.status_code, media_type=_JSON, headers=exc.headers)


async def _render_crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return Response(ProxyError("The proxy had an internal error.").body(), status_code=500,
                    media_type=_JSON)


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
        try:
            app.state.services = Services(
                settings=settings,
                keys=KeyStore(pool, settings.server.key_cache_seconds),
                providers=build_providers(settings.providers, settings.upstream, session),
                pool=pool,
                session=session,
            )
            yield
        finally:
            await session.close()
            await pool.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/{user}/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
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
