"""Apps without a backend, and apps with one: the ``/api/v1`` routes.

Two credentials, two jobs. An end user's ``Authorization: Bearer <token>`` (the app's
sign-in JWT, :mod:`proxy.endusers`) says who the user is; it can read balances and
spend credits through the gateway, never move a balance. The paywall key, sent as
``X-Api-Key``, is the owner's: it debits, credits and grants plans.

    GET  /api/v1/paywall/{id}/user        Bearer        → user, paid, balances
    GET  /api/v1/paywall/{id}/balances    Bearer | key  → balances, tokenization
    POST /api/v1/paywall/{id}/balances    key           → debit or credit (idempotent)
    POST /api/v1/paywall/{id}/grants      key           → grant a plan (idempotent)
    *    /api/v1/api-gateway/{provider}[/{path}]?paywall_id=…   Bearer

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
from proxy.endusers import EndUser, bearer
from proxy.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PaymentRequired,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.identity import VALID_USER
from proxy.keys import Principal
from proxy.ledger import IdempotencyConflict, InsufficientFunds, Ledger, Stored
from proxy.observe import record_of
from proxy.providers import Reply, scrub
from proxy.relay import CLIENT_GONE, Outcome, StreamRelay, Verbatim, unless_client_leaves
from proxy.requestid import new_request_id
from proxy.services import (
    JSON,
    Services,
    json_response,
    parse_json,
    read_body,
    read_json,
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


# ---- who is calling ------------------------------------------------------------------

def _paywall(services: Services, paywall_id: str | None) -> PaywallSettings:
    if not paywall_id:
        raise InvalidRequest("Name the paywall: ?paywall_id=… or an X-Paywall-Id header.",
                             param="paywall_id", code="paywall_required")
    paywall = services.settings.paywalls.get(paywall_id)
    if paywall is None:
        raise NotFound(f"No paywall '{paywall_id}'.", param="paywall_id",
                       code="paywall_not_found")
    return paywall


async def _end_user(request: Request, services: Services, paywall_id: str) -> EndUser:
    return await services.verifiers[paywall_id].verify(
        bearer(request.headers.get("authorization")))


async def _owner(request: Request, services: Services, paywall_id: str) -> Principal | None:
    """The paywall key from ``X-Api-Key``, if one was sent; it must be this paywall's."""
    key = request.headers.get("x-api-key")
    if not key:
        return None
    principal = await services.keys.authenticate(key)
    if principal is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    if principal.paywall_id != paywall_id:
        raise Forbidden("This API key belongs to another paywall.")
    return principal


def _user_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not VALID_USER.fullmatch(value):
        raise InvalidRequest("'user_id' must be the end user's id (1-128 letters, digits "
                             "or '._:@|-').",
                             param="user_id", code="invalid_user")
    return value


# ---- balances ------------------------------------------------------------------------

async def _balances(services: Services, paywall_id: str, user: str,
                    conn: Any = None) -> list[dict[str, Any]]:
    """The user's credits of each of the paywall's types (count = what can be spent),
    opening the user (and writing any trial credits) on first sight."""
    paywall = services.settings.paywalls[paywall_id]
    types = paywall.credits.types
    if not types:
        return []
    ledger = services.ledger
    have = {b.asset: b for b in await ledger.balances(paywall_id, user, conn)}
    if any(t not in have for t in types):
        await ledger.open_user(paywall_id, user, assets=set(types),
                               grants=services.grants[paywall_id], conn=conn)
        have = {b.asset: b for b in await ledger.balances(paywall_id, user, conn)}
    return [{"type": t, "count": have[t].available} for t in types]


def _tokenization(paywall: PaywallSettings) -> dict[str, Any]:
    c = paywall.credits
    return {"enabled": bool(c.types), "types": list(c.types), "trial": dict(c.trial),
            "plans": [{"id": pid, "name": p.name or pid, "credits": dict(p.credits)}
                      for pid, p in c.plans.items()]}


async def get_user(request: Request) -> Response:
    services = services_of(request)
    paywall_id = request.path_params["paywall_id"]
    _paywall(services, paywall_id)
    who = await _end_user(request, services, paywall_id)
    record_of(request.state).paywall, record_of(request.state).user = paywall_id, who.id
    balances = await _balances(services, paywall_id, who.id)
    return json_response({"user": {"id": who.id, "email": who.email},
                          "paid": await services.ledger.paid(paywall_id, who.id),
                          "balances": balances})


async def get_balances(request: Request) -> Response:
    services = services_of(request)
    paywall_id = request.path_params["paywall_id"]
    paywall = _paywall(services, paywall_id)
    if await _owner(request, services, paywall_id):
        user = _user_id(request.query_params.get("user_id"))
    else:
        user = (await _end_user(request, services, paywall_id)).id
    record_of(request.state).paywall, record_of(request.state).user = paywall_id, user
    return json_response({"balances": await _balances(services, paywall_id, user),
                          "tokenization": _tokenization(paywall)})


async def _owner_write(request: Request, op: str) -> tuple[Services, str, dict[str, Any]]:
    services = services_of(request)
    paywall_id = request.path_params["paywall_id"]
    _paywall(services, paywall_id)
    if await _owner(request, services, paywall_id) is None:
        if request.headers.get("authorization"):
            raise Forbidden("Balances change only with the paywall's API key (X-Api-Key); "
                            "an end user's token cannot move a balance.",
                            code="apikey_required")
        raise AuthenticationFailed("Send the paywall's API key as 'X-Api-Key'.",
                                   code="apikey_required")
    body = await read_json(request, services.settings.server.max_body_bytes)
    record_of(request.state).paywall = paywall_id
    return services, paywall_id, body


async def _once(request: Request, services: Services, paywall_id: str, op: str,
                body: dict[str, Any], write: Any) -> Response:
    """Run ``write(conn)`` in one transaction; with an ``Idempotency-Key``, at most once
    per key (a retry replays the first answer; another body under the key is a 409)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidRequest("An Idempotency-Key has 1-255 characters.",
                             param="Idempotency-Key")
    ledger = services.ledger
    if key is None:
        async with ledger.pool.acquire() as conn, conn.transaction():
            await ledger.durable(conn)
            stored: Stored = await write(conn)
    else:
        try:
            stored = await ledger.idempotent(paywall_id, key, {"op": op, "body": body}, write)
        except IdempotencyConflict:
            raise Conflict("This Idempotency-Key was already used with a different request "
                           "body.", param="Idempotency-Key") from None
    return Response(stored.body, status_code=stored.status, media_type=JSON)


async def post_balances(request: Request) -> Response:
    services, paywall_id, body = await _owner_write(request, "balances")
    paywall = services.settings.paywalls[paywall_id]
    user = _user_id(body.get("user_id"))
    kind = body.get("type")
    if kind not in paywall.credits.types:
        raise InvalidRequest(f"Unknown credit type {kind!r} (this paywall has "
                             f"{', '.join(paywall.credits.types) or 'none'}).",
                             param="type", code="unknown_type")
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount < 2**53:
        raise InvalidRequest("'amount' must be a positive whole number of credits.",
                             param="amount", code="invalid_amount")
    op = body.get("op")
    if op not in ("debit", "credit"):
        raise InvalidRequest("'op' must be \"debit\" or \"credit\".", param="op",
                             code="invalid_op")
    record_of(request.state).user = user
    request_id: str = request.state.request_id

    async def write(conn: Any) -> Stored:
        await services.ledger.open_user(paywall_id, user, assets=set(paywall.credits.types),
                                        grants=services.grants[paywall_id], conn=conn)
        try:
            after = await Ledger.move(
                conn, paywall_id, user, kind, -amount if op == "debit" else amount,
                "charge" if op == "debit" else "deposit", request_id=request_id,
                idempotency_key=request.headers.get("idempotency-key"),
                metadata={"via": "balances"})
        except InsufficientFunds as e:
            balances = await _balances(services, paywall_id, user, conn)
            error = PaymentRequired(
                f"The user has {e.available} '{kind}' credits; {amount} cannot be debited.",
                code="insufficient", details={"balances": balances, "queryType": kind,
                                              "currentBalance": _current(balances, kind)})
            return Stored(error.status, error.api_body())
        return Stored(200, orjson.dumps({
            "user_id": user, "type": kind, "op": op, "amount": amount, "count": after,
            "balances": await _balances(services, paywall_id, user, conn),
            "request_id": request_id}))

    return await _once(request, services, paywall_id, "balances", body, write)


async def post_grants(request: Request) -> Response:
    services, paywall_id, body = await _owner_write(request, "grants")
    plans = services.settings.paywalls[paywall_id].credits.plans
    user = _user_id(body.get("user_id"))
    plan_id = body.get("plan")
    if not isinstance(plan_id, str) or plan_id not in plans:
        raise InvalidRequest(f"Unknown plan {plan_id!r} (this paywall has "
                             f"{', '.join(plans) or 'none'}).", param="plan",
                             code="unknown_plan")
    plan = plans[plan_id]
    record_of(request.state).user = user
    request_id: str = request.state.request_id
    types = services.settings.paywalls[paywall_id].credits.types

    async def write(conn: Any) -> Stored:
        await services.ledger.open_user(paywall_id, user, assets=set(types),
                                        grants=services.grants[paywall_id], conn=conn)
        for kind, count in sorted(plan.credits.items()):
            if count:
                await Ledger.move(conn, paywall_id, user, kind, count, "grant",
                                  request_id=request_id,
                                  idempotency_key=request.headers.get("idempotency-key"),
                                  metadata={"plan": plan_id})
        return Stored(200, orjson.dumps({
            "user_id": user, "plan": plan_id, "credits": dict(plan.credits),
            "balances": await _balances(services, paywall_id, user, conn),
            "request_id": request_id}))

    return await _once(request, services, paywall_id, "grants", body, write)


def _current(balances: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((b for b in balances if b["type"] == kind), None)


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
    paywall = _paywall(services, paywall_id)
    assert paywall_id is not None
    rec.paywall, rec.model, rec.provider = paywall_id, provider_id, provider_id
    query_type = provider.query_type
    if query_type != FREE and query_type not in paywall.credits.types:
        raise Forbidden(f"The provider '{provider_id}' is not enabled for this paywall "
                        f"(its query type '{query_type}' is not one of the paywall's).",
                        code="provider_disabled")
    user = (await _end_user(request, services, paywall_id)).id
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
    balances = await _balances(services, paywall_id, user)
    details = {"balances": balances, "queryType": query_type,
               "currentBalance": _current(balances, query_type)}
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
    Route("/api/v1/paywall/{paywall_id}/user", get_user, methods=["GET"]),
    Route("/api/v1/paywall/{paywall_id}/balances", get_balances, methods=["GET"]),
    Route("/api/v1/paywall/{paywall_id}/balances", post_balances, methods=["POST"]),
    Route("/api/v1/paywall/{paywall_id}/grants", post_grants, methods=["POST"]),
    Route("/api/v1/api-gateway/{provider_id}", api_gateway, methods=_METHODS),
    Route("/api/v1/api-gateway/{provider_id}/{path:path}", api_gateway, methods=_METHODS),
]

