"""The API gateway, for apps without a backend:

    *    /api/v1/api-gateway/{provider}[/{path}]?paywall_id=…   Bearer (end user)

A gateway call passes the same limits as a chat completion, holds one credit of the
provider's ``query_type`` (``free`` holds nothing), forwards the request with the
provider's server-side headers, and relays the answer unchanged, streams included.
The credit is posted once the upstream answered 2xx and the answer was delivered;
an upstream error or failure voids it. A client that leaves cancels the upstream call
at once; it is charged (outcome ``aborted``) only if part of a 2xx answer had already
reached it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

from proxy import guard
from proxy.balances import balances_of, current, end_user, paywall_of
from proxy.errors import (
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PaymentRequired,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.observe import record_of
from proxy.providers import Reply, scrub
from proxy.relay import CLIENT_GONE, Outcome, StreamRelay, Verbatim, unless_client_leaves
from proxy.requestid import new_request_id
from proxy.services import (
    Services,
    parse_json,
    read_body,
    resolve_hold,
    services_of,
)
from proxy.settings import ApiProviderSettings, PaywallSettings

FREE = "free"
PAYWALL_HEADER = "x-paywall-id"
# Client headers that may travel to an API provider (never Authorization or cookies).
_FORWARD = frozenset({"accept", "accept-language", "content-type", "openai-beta",
                      "anthropic-version", "anthropic-beta", "user-agent"})
# Upstream response headers the client never sees (hop-by-hop, framing, cookies).
_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                   "content-encoding", "set-cookie", "proxy-authenticate", "trailer",
                   "upgrade", "alt-svc", "strict-transport-security", "vary",
                   "access-control-allow-origin", "access-control-allow-credentials",
                   "access-control-allow-headers", "access-control-allow-methods",
                   "access-control-expose-headers", "access-control-max-age",
                   # The proxy sends its own of these two (one each, RFC 9110 §5.3).
                   "date", "x-request-id"})


# ---- the gateway ---------------------------------------------------------------------

async def api_gateway(request: Request) -> Response | StreamRelay:
    services = services_of(request)
    s = services.settings
    rec = record_of(request.state)
    provider_id: str = request.path_params["provider_id"]
    provider = s.api_providers.get(provider_id)
    if provider is None:
        raise NotFound(f"No API provider '{provider_id}'.", code="provider_not_found")
    paywall_id = request.query_params.get("paywall_id") or request.headers.get(PAYWALL_HEADER)
    paywall = paywall_of(services, paywall_id)
    assert paywall_id is not None
    rec.paywall, rec.model, rec.provider = paywall_id, provider_id, provider_id
    query_type = provider.query_type
    if query_type != FREE and query_type not in paywall.credits.types:
        raise Forbidden(f"The provider '{provider_id}' is not enabled for this paywall "
                        f"(its query type '{query_type}' is not one of the paywall's).",
                        code="provider_disabled")
    user = (await end_user(request, services, paywall_id)).id
    rec.user = user
    if request.method != provider.method:
        raise MethodNotAllowed(f"The provider '{provider_id}' takes {provider.method}.",
                               headers={"allow": provider.method})
    url = _upstream_url(provider, request.path_params.get("path", ""))  # before any hold
    body = await _body(request, provider, s.server.max_body_bytes)

    limits = guard.effective(paywall.limits, await services.overrides.get(paywall_id, user))
    lease = new_request_id()
    verdict = await services.gate.admit(guard.rules(limits, paywall_id, user, 0), lease,
                                        limits.lease_seconds, limits.fail_open)
    hold_id: int | None = None
    try:
        if query_type != FREE:
            hold_id = await _hold(services, request, paywall_id, paywall, user, query_type,
                                  provider_id, limits)
            rec.asset, rec.scale, rec.hold_id = query_type, 0, hold_id
            services.live.add(hold_id)
        rec.outcome = "forward"
        rec.upstream_started = time.perf_counter()
        reply = await unless_client_leaves(
            request, _send(services, provider_id, provider, url, request, body))
    except BaseException:
        await services.tasks.run_to_end(_settle(services, rec, hold_id, None))
        await services.tasks.run_to_end(services.gate.finish(verdict, lease))
        raise
    if reply is None:  # the client left before the provider answered: nothing is owed
        await services.tasks.run_to_end(_settle(services, rec, hold_id, None, "aborted"))
        await services.tasks.run_to_end(services.gate.finish(verdict, lease))
        return Response(status_code=CLIENT_GONE)
    try:
        return await _answer(services, rec, provider, query_type, reply, verdict, lease,
                             hold_id)
    except BaseException:
        # Whatever failed before the relay took over, the hold and the lease end here.
        await reply.aclose()
        await services.tasks.run_to_end(_settle(services, rec, hold_id, None))
        await services.tasks.run_to_end(services.gate.finish(verdict, lease))
        raise


async def _answer(services: Services, rec: Any, provider: ApiProviderSettings,
                  query_type: str, reply: Reply, verdict: Any, lease: str,
                  hold_id: int | None) -> Response | StreamRelay:
    # Header values keep the bytes the provider sent (aiohttp decodes them with
    # surrogateescape).
    headers = [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in reply.headers]
    headers.append((b"x-query-type", query_type.encode()))
    if verdict is not None:
        headers += [(k.encode(), v.encode()) for k, v in verdict.headers().items()]
    if not reply.ok:
        try:
            content = scrub(await reply.read(), _secrets(provider))
        finally:
            await reply.aclose()
        rec.upstream_first = rec.upstream_ended = time.perf_counter()
        rec.error = f"upstream_{reply.status}"
        response = Response(content, status_code=reply.status)
        response.raw_headers += headers
        await services.tasks.run_to_end(_settle(services, rec, hold_id, None))
        await services.tasks.run_to_end(services.gate.finish(verdict, lease))
        return response

    async def on_done(outcome: Outcome) -> None:
        rec.upstream_first, rec.upstream_ended = relay.first_at, relay.ended_at
        charged = outcome is Outcome.COMPLETED or (outcome is Outcome.ABORTED and relay.sent)
        await services.tasks.run_to_end(
            _settle(services, rec, hold_id, outcome.value if charged else None,
                    failed=outcome.value))
        await services.tasks.run_to_end(services.gate.finish(verdict, lease))

    relay = StreamRelay(reply, headers, services.settings.upstream.stream_max_seconds,
                        Verbatim(), on_done, error_tail=None)
    return relay


async def _body(request: Request, provider: ApiProviderSettings, limit: int) -> bytes:
    """The client's body as it came (form-data, binary, …), except a JSON object, which
    gets the provider's default fields merged under it."""
    raw = await read_body(request, limit)
    ctype = request.headers.get("content-type", "")
    if not provider.body or (ctype and "json" not in ctype):
        return raw
    return orjson.dumps({**provider.body, **(parse_json(raw) if raw.strip() else {})})


async def _hold(services: Services, request: Request, paywall_id: str,
                paywall: PaywallSettings, user: str, query_type: str, provider_id: str,
                limits: guard.Limits) -> int:
    ledger = services.ledger
    caps = guard.spend_caps(limits, user, query_type, services.settings.assets)
    request_id: str = request.state.request_id

    async def place() -> Any:
        return await ledger.hold(paywall_id, user, query_type, 1, request_id=request_id,
                                 model=f"api:{provider_id}", require_connect=False,
                                 caps=caps, timezone=limits.timezone)

    state = await place()
    if not state.exists or (state.hold_id is None and not state.has_account):
        await ledger.open_user(paywall_id, user, assets={*paywall.credits.types, query_type},
                               grants=services.grants[paywall_id])
        state = await place()
    if state.hold_id is not None:
        hold_id: int = state.hold_id
        return hold_id
    balances = await balances_of(services, paywall_id, user)
    details = {"balances": balances, "queryType": query_type,
               "currentBalance": current(balances, query_type)}
    record_of(request.state).outcome = "not_enough_queries"
    if state.cap is not None:
        details["spendCap"] = state.cap.name
        details["resetsAt"] = state.cap.resets.isoformat().replace("+00:00", "Z")
        raise PaymentRequired(f"The {state.cap.name.replace('_', ' ')} limit is reached.",
                              code="spend_cap", details=details)
    raise PaymentRequired(f"Not enough '{query_type}' credits for this call.",
                          code="not_enough_queries", details=details)


def _upstream_url(provider: ApiProviderSettings, path: str) -> URL:
    """The provider's URL with the client's path under it — and only under it: dot
    segments, and characters that would end the path, are refused."""
    url = provider.url.rstrip("/")
    if not path:
        return URL(url)
    segments = path.split("/")
    if (any(seg in (".", "..") for seg in segments) or not path.isprintable()
            or any(c in path for c in "?#\\")):
        raise InvalidRequest("The path after the provider id may not hold '.' or '..' "
                             "segments, '?', '#' or '\\'.", param="path", code="invalid_path")
    return URL(url + "/" + "/".join(quote(seg, safe="!$&'()*+,;=:@-._~") for seg in segments),
               encoded=True)


async def _send(services: Services, provider_id: str, provider: ApiProviderSettings,
                url: URL, request: Request, body: bytes) -> Reply:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "paywall_id"]
    headers = {k: v for k, v in request.headers.items() if k in _FORWARD}
    headers.update(provider.headers)
    headers["x-request-id"] = request.state.request_id
    limits = services.settings.upstream
    # Up to read_timeout for the answer to start; then stream_idle_timeout between chunks.
    timeout = aiohttp.ClientTimeout(total=None, connect=limits.read_timeout,
                                    sock_connect=limits.connect_timeout)
    try:
        async with asyncio.timeout(limits.read_timeout):
            resp = await services.session.request(
                provider.method, url, params=params or None, data=body or None,
                headers=headers, timeout=timeout, auto_decompress=True,
                allow_redirects=False)
    except TimeoutError as e:
        services.metrics.errors.labels("upstream").inc()
        raise UpstreamTimeout(f"The API provider '{provider_id}' did not answer in time.") from e
    except aiohttp.ClientError as e:
        services.metrics.errors.labels("upstream").inc()
        raise UpstreamUnavailable(f"The API provider '{provider_id}' could not be reached "
                                  f"({type(e).__name__}).") from e
    out = [(k.lower(), v) for k, v in resp.headers.items() if k.lower() not in _DROP]
    ctype = resp.headers.get("content-type", "")
    return Reply(resp.status, out, _chunks(resp, provider_id, limits.stream_idle_timeout),
                 stream="text/event-stream" in ctype, _closer=resp.close)


async def _chunks(resp: aiohttp.ClientResponse, provider_id: str, idle: float) -> Any:
    try:
        chunks = resp.content.iter_any()
        while True:
            async with asyncio.timeout(idle):
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
            yield chunk
    except TimeoutError as e:
        raise UpstreamTimeout(f"The API provider '{provider_id}' stalled.") from e
    except aiohttp.ClientError as e:
        raise UpstreamUnavailable(f"The API provider '{provider_id}' broke off.") from e
    finally:
        resp.release()


def _secrets(provider: ApiProviderSettings) -> list[str]:
    """The provider's header values, also without an auth scheme ("Bearer <key>" →
    "<key>"): what a provider echoes in an error is the key alone."""
    values = list(provider.headers.values())
    return values + [v.split(" ", 1)[1] for v in values if " " in v]


async def _settle(services: Services, rec: Any, hold_id: int | None, outcome: str | None,
                  failed: str = "failed") -> None:
    """Post the held credit with ``outcome``, or void it when ``outcome`` is None."""
    if hold_id is not None:  # else nothing was held (a free call, or none could be placed)
        await resolve_hold(services, rec, hold_id, None if outcome is None else 1, None,
                           outcome or failed)


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

routes = [
    Route("/api/v1/api-gateway/{provider_id}", api_gateway, methods=_METHODS),
    Route("/api/v1/api-gateway/{provider_id}/{path:path}", api_gateway, methods=_METHODS),
]

