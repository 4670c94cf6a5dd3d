"""The ASGI application: routes, the request-id wrapper, error rendering, the lifespan.

Nothing is built at import time. :func:`create_app` takes settings and returns the
app; its lifespan opens the PostgreSQL pool and the upstream HTTP session, replays the
settlement spool, starts the hold reaper, and hands them to the handlers through
``app.state.services``; on the way out it writes (or spools) what billing still owes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import importlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import (
    admin,
    balances,
    cors,
    db,
    events,
    gateway,
    gauges,
    messages,
    observe,
    pages,
    payments,
    reaper,
    user_api,
    webhooks_api,
)
from proxy import settings as config
from proxy.chat import chat_completions
from proxy.embeddings import embeddings
from proxy.endusers import TokenVerifier
from proxy.errors import (
    AuthenticationFailed,
    DatabaseUnavailable,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ProxyError,
    error_body,
)
from proxy.events import Events
from proxy.hotpath import HotPath
from proxy.keys import KeyStore
from proxy.ledger import Ledger
from proxy.limits import Gate, OverrideCache, build_limiter
from proxy.links import LinkSigner
from proxy.payments import Payments
from proxy.pricing import price_from, units
from proxy.providers import build_providers
from proxy.responses import create_response
from proxy.routing import build_breakers, build_routes
from proxy.services import JSON, Services, authenticate, json_response, services_of
from proxy.settings import PaywallSettings, Settings
from proxy.settler import Settlements
from proxy.tasks import TaskSet
from proxy.tokens import Tokenizer
from proxy.upstream import Transport

log = logging.getLogger("proxy")

SAMPLE_SECONDS = 2.0  # how often gauges (pool, holds) are refreshed between scrapes
# The young generation is collected every 20,000 allocations rather than 700: a request
# allocates a few hundred objects, and nearly all of them die by reference count.
GC_THRESHOLDS = (20_000, 20, 50)


def starter_grants(p: PaywallSettings, s: Settings) -> dict[str, int]:
    """What each new end user of paywall ``p`` is granted once: the starter grant and
    the trial credits, in each asset's smallest unit."""
    out = {t: units(Decimal(n), s.assets[t].scale) for t, n in p.credits.trial.items() if n}
    if p.starter_grant:
        out[p.asset] = out.get(p.asset, 0) + units(p.starter_grant, s.assets[p.asset].scale)
    return out


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


# Sent by every Anthropic SDK request: such a client reads Anthropic's model list.
ANTHROPIC_VERSION = "anthropic-version"


async def list_models(request: Request) -> Response:
    services = services_of(request)
    await authenticate(request, services)
    s = services.settings
    if ANTHROPIC_VERSION in request.headers:
        return json_response(messages.model_list(s))
    return json_response({"object": "list", "data": [_model_card(n, s) for n in s.models]})


async def get_model(request: Request) -> Response:
    services = services_of(request)
    await authenticate(request, services)
    name = request.path_params["model"]
    if ANTHROPIC_VERSION in request.headers:
        found = [m for m in messages.model_list(services.settings)["data"] if m["id"] == name]
        if not found:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return json_response(found[0])
    if name not in services.settings.models:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    return json_response(_model_card(name, services.settings))


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when PostgreSQL (and Redis, when configured) answer within a second."""
    services = services_of(request)
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(1.0):
            await services.pool.fetchval("SELECT 1")
        checks["database"] = "ok"
    except Exception as e:
        services.metrics.errors.labels("database").inc()
        cause = e.__cause__ if isinstance(e, DatabaseUnavailable) and e.__cause__ else e
        checks["database"] = f"unavailable: {type(cause).__name__}"
    if services.settings.redis_url:
        try:
            async with asyncio.timeout(1.0):
                await services.gate.limiter.ping()
            checks["redis"] = "ok"
        except Exception as e:
            checks["redis"] = f"unavailable: {type(e).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return json_response({"status": "ready" if ready else "unavailable", "checks": checks},
                         status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    services = services_of(request)
    token = services.settings.server.metrics_token
    if token and not hmac.compare_digest(
            (request.headers.get("authorization") or "").encode(), f"Bearer {token}".encode()):
        raise AuthenticationFailed("/metrics needs 'Authorization: Bearer <metrics_token>'.")
    await gauges.sample(services)
    return Response(services.metrics.exposition(), media_type=observe.METRICS_CONTENT_TYPE)


async def _render_proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    observe.record_of(request.state).error = exc.code or exc.type
    if isinstance(exc, DatabaseUnavailable):  # the request's access line says so, once
        request.app.state.services.metrics.errors.labels("database").inc()
    # /api/v1 speaks the hosted gateway's error shape, Messages Anthropic's; the rest OpenAI's.
    path = request.url.path
    body = (exc.api_body() if path.startswith(cors.PREFIX)
            else exc.anthropic_body() if messages.speaks_anthropic(path) else exc.body())
    return Response(body, status_code=exc.status, media_type=JSON, headers=exc.headers)


# What a client that calls an unknown /v1 route is told this proxy serves; one that
# calls an unknown Messages route (count_tokens, batches), what it serves of that API.
ENDPOINTS = ("POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings",
             "POST /v1/messages", "GET /v1/models", "GET /v1/models/{model}")
ANTHROPIC_ENDPOINTS = ("POST /v1/messages", "GET /v1/models", "GET /v1/models/{model}")


async def _render_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    path = request.url.path
    if path.startswith(cors.PREFIX):
        body = orjson.dumps({"error": str(exc.detail), "code": code})
    elif messages.speaks_anthropic(path):
        error = (NotFound(
            f"Unknown route {request.method} {path}. Of Anthropic's API this proxy serves "
            + ", ".join(ANTHROPIC_ENDPOINTS) + " (each also under /v1/{user}/ to name the"
            " end user).") if exc.status_code == 404
                 else MethodNotAllowed(str(exc.detail)) if exc.status_code == 405
                 else InvalidRequest(str(exc.detail)))
        body = error.anthropic_body()
    elif exc.status_code == 404 and (path == "/v1" or path.startswith("/v1/")):
        body = error_body(
            f"Unknown route {request.method} {path}. This proxy serves "
            + ", ".join(ENDPOINTS) + " (each also under /v1/{user}/ to name the end user).",
            "invalid_request_error", code="unknown_url")
    else:
        body = error_body(str(exc.detail), "invalid_request_error", code=code)
    return Response(body, status_code=exc.status_code, media_type=JSON, headers=exc.headers)


async def _render_crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    record = observe.record_of(request.state)
    record.error = type(exc).__name__
    if isinstance(exc, (asyncpg.PostgresError, OSError)) and (services := getattr(
            request.app.state, "services", None)):
        services.metrics.errors.labels("database").inc()
    error = ProxyError("The proxy had an internal error.")
    body = (error.anthropic_body() if messages.speaks_anthropic(request.url.path)
            else error.body())
    return Response(body, status_code=500, media_type=JSON)


def spool_dir(settings: Settings) -> Path:
    return Path(settings.billing.spool_dir or Path(settings.data_dir) / "spool")


def create_app(settings: Settings) -> observe.Observe:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not settings.database_url:
            raise RuntimeError("DATABASE_URL is not set (paywall-proxy serve sets it)")
        pool = await db.create_pool(
            settings.database_url, settings.database.pool_min, settings.database.pool_max,
            settings.billing.synchronous_commit,
            connect_timeout=settings.database.connect_timeout,
            command_timeout=settings.database.command_timeout,
        )
        connector = aiohttp.TCPConnector(limit=settings.upstream.pool_size, limit_per_host=0,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        # No User-Agent of aiohttp's own: Transport.send skips it where none is sent.
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        if any(p.auth.jwks_url or p.auth.hs256_secret for p in settings.paywalls.values()):
            await asyncio.to_thread(importlib.import_module, "jwt")  # off the loop, once
        if any(p.payments.stripe_secret_key for p in settings.paywalls.values()):
            await asyncio.to_thread(payments.load_stripe)  # not in the first payment's time
        transport = Transport(session, settings.upstream)
        tokenizer = Tokenizer()
        # Load each model's encoding now, off the loop, rather than in a first request.
        for name, m in settings.models.items():
            await asyncio.to_thread(tokenizer.encoding, m.upstream or name, m.encoding)
        ledger = Ledger(pool, settings.billing.hold_ttl_seconds)
        if not settles_alone(settings, os.environ):
            ledger.batch.defer_seconds = 0.0  # see proxy/batcher.py
        settlements = Settlements(ledger, spool_dir(settings), await ledger.identity())
        gate = Gate(build_limiter(settings.redis_url))
        grants = {pid: starter_grants(p, settings) for pid, p in settings.paywalls.items()}
        metrics = observe.Metrics()
        tasks = TaskSet()
        outbox = Events(settings, pool, metrics, tasks)
        providers = build_providers(settings.providers, transport)
        breakers = build_breakers(settings)
        services = Services(
            settings=settings,
            keys=KeyStore(pool, settings.server.key_cache_seconds),
            providers=providers,
            routes=build_routes(settings, providers, breakers, metrics),
            breakers=breakers,
            transport=transport,
            prices={name: price_from(m.price, settings.assets[m.price.asset].scale)
                    for name, m in settings.models.items()},
            grants=grants,
            ledger=ledger,
            gate=gate,
            overrides=OverrideCache(ledger.limits_of, settings.server.key_cache_seconds,
                                    load_many=ledger.limits_of_many,
                                    load_paywall=ledger.limits_of_paywall),
            live=reaper.LiveHolds(),
            settlements=settlements,
            tokenizer=tokenizer,
            signer=LinkSigner(settings.server.link_secret or secrets.token_hex(32),
                              settings.server.public_url),
            tasks=tasks,
            pool=pool,
            metrics=metrics,
            verifiers={pid: TokenVerifier(p.auth, session)
                       for pid, p in settings.paywalls.items()},
            payments=Payments(settings, ledger, metrics, grants, outbox),
            events=outbox,
        )
        app.state.services = services
        # Everything built so far lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise stall every open stream.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            # What earlier processes spooled is posted before this reaper could expire it.
            await settlements.replay()
            await services.events.sync()
            leases = [p.limits.lease_seconds for p in settings.paywalls.values()]
            async with reaper.running(ledger, services.live, settlements, gate,
                                      settings.billing.reaper_interval_seconds,
                                      min([settings.billing.reaper_interval_seconds,
                                           *(ttl / 3 for ttl in leases)]),
                                      services.metrics), \
                    gauges.sampling(services, SAMPLE_SECONDS), \
                    payments.recharging(services.payments,
                                        settings.billing.reaper_interval_seconds), \
                    events.delivering(services.events):
                yield
                ledger.batch.hurry()  # posts made after their answers wait no more
                await services.tasks.drain()
        finally:
            try:
                await settlements.shutdown(settings.billing.shutdown_settle_seconds)
            finally:
                services.metrics.close()
                await services.overrides.aclose()
                await services.payments.close()
                await services.events.close()
                await gate.limiter.close()
                await breakers.close()
                await session.close()
                await ledger.batch.aclose()
                await pool.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/{user}/chat/completions", chat_completions, methods=["POST"]),
        *messages.routes,
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/{user}/responses", create_response, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/{user}/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        # A client whose base URL names the user (/v1/{user}) lists models there too.
        Route("/v1/{user}/models", list_models, methods=["GET"]),
        Route("/v1/{user}/models/{model:path}", get_model, methods=["GET"]),
        # … and an Anthropic SDK's, which adds /v1 to its base URL.
        Route("/v1/{user}/v1/models", list_models, methods=["GET"]),
        Route("/v1/{user}/v1/models/{model:path}", get_model, methods=["GET"]),
        *webhooks_api.routes,
        *user_api.routes,
        *balances.routes,
        *gateway.routes,
        *pages.routes,
        *payments.routes,
        *(admin.Console(settings).routes if settings.admin.token else []),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ProxyError: _render_proxy_error,
            HTTPException: _render_http_error,
            Exception: _render_crash,
        },
        lifespan=lifespan,
    )
    labels: dict[Any, str] = {}
    for route in routes:
        labels.setdefault(getattr(route, "endpoint", None), getattr(route, "path", "other"))
    hot = HotPath(app, {chat_completions, create_response, embeddings, messages.messages})
    return observe.Observe(cors.Cors(hot, settings), labels)


def settles_alone(settings: config.Settings, environ: Mapping[str, str]) -> bool:
    """Whether this process serves every request of its paywalls: one worker and no
    Redis (without it, the proxy is one replica). Only then may a post made after its
    answer wait for the next request's batch (:mod:`proxy.batcher`)."""
    workers = int(environ.get(config.WORKERS_ENV) or settings.server.workers)
    return workers <= 1 and not settings.redis_url


def app_from_env() -> observe.Observe:
    """uvicorn factory for ``serve``: settings from ``$PAYWALL_CONFIG`` and the environment.
    Each worker process configures its own logging here."""
    settings = config.load()
    observe.configure_logging(settings.server.log_format, config.secrets_of(settings),
                              settings.server.access_log)
    return create_app(settings)

