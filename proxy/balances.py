"""The end-user and owner balance API under ``/api/v1/paywall/{id}``.

Two credentials, two jobs. An end user's ``Authorization: Bearer <token>`` (the app's
sign-in JWT, :mod:`proxy.endusers`) says who the user is; it can read balances, never
move one. The paywall key, sent as ``X-Api-Key``, is the owner's: it debits, credits
and grants plans.

    GET  /api/v1/paywall/{id}/user        Bearer        → user, paid, balances
    GET  /api/v1/paywall/{id}/balances    Bearer | key  → balances, tokenization
    POST /api/v1/paywall/{id}/balances    key           → debit or credit (idempotent)
    POST /api/v1/paywall/{id}/grants      key           → grant a plan (idempotent)
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.endusers import EndUser, bearer
from proxy.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PaymentRequired,
)
from proxy.identity import VALID_USER
from proxy.keys import Principal
from proxy.ledger import IdempotencyConflict, InsufficientFunds, Ledger, Stored
from proxy.observe import record_of
from proxy.services import JSON, Services, json_response, read_json, services_of
from proxy.settings import PaywallSettings

# ---- who is calling ------------------------------------------------------------------

def paywall_of(services: Services, paywall_id: str | None) -> PaywallSettings:
    if not paywall_id:
        raise InvalidRequest("Name the paywall: ?paywall_id=… or an X-Paywall-Id header.",
                             param="paywall_id", code="paywall_required")
    paywall = services.settings.paywalls.get(paywall_id)
    if paywall is None:
        raise NotFound(f"No paywall '{paywall_id}'.", param="paywall_id",
                       code="paywall_not_found")
    return paywall


async def end_user(request: Request, services: Services, paywall_id: str) -> EndUser:
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

async def balances_of(services: Services, paywall_id: str, user: str,
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
    paywall_of(services, paywall_id)
    who = await end_user(request, services, paywall_id)
    record_of(request.state).paywall, record_of(request.state).user = paywall_id, who.id
    balances = await balances_of(services, paywall_id, who.id)
    return json_response({"user": {"id": who.id, "email": who.email},
                          "paid": await services.ledger.paid(paywall_id, who.id),
                          "balances": balances})


async def get_balances(request: Request) -> Response:
    services = services_of(request)
    paywall_id = request.path_params["paywall_id"]
    paywall = paywall_of(services, paywall_id)
    if await _owner(request, services, paywall_id):
        user = _user_id(request.query_params.get("user_id"))
    else:
        user = (await end_user(request, services, paywall_id)).id
    record_of(request.state).paywall, record_of(request.state).user = paywall_id, user
    return json_response({"balances": await balances_of(services, paywall_id, user),
                          "tokenization": _tokenization(paywall)})


async def _owner_write(request: Request, op: str) -> tuple[Services, str, dict[str, Any]]:
    services = services_of(request)
    paywall_id = request.path_params["paywall_id"]
    paywall_of(services, paywall_id)
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
            balances = await balances_of(services, paywall_id, user, conn)
            error = PaymentRequired(
                f"The user has {e.available} '{kind}' credits; {amount} cannot be debited.",
                code="insufficient", details={"balances": balances, "queryType": kind,
                                              "currentBalance": current(balances, kind)})
            return Stored(error.status, error.api_body())
        return Stored(200, orjson.dumps({
            "user_id": user, "type": kind, "op": op, "amount": amount, "count": after,
            "balances": await balances_of(services, paywall_id, user, conn),
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
            "balances": await balances_of(services, paywall_id, user, conn),
            "request_id": request_id}))

    return await _once(request, services, paywall_id, "grants", body, write)


def current(balances: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((b for b in balances if b["type"] == kind), None)


routes = [
    Route("/api/v1/paywall/{paywall_id}/user", get_user, methods=["GET"]),
    Route("/api/v1/paywall/{paywall_id}/balances", get_balances, methods=["GET"]),
    Route("/api/v1/paywall/{paywall_id}/balances", post_balances, methods=["POST"]),
    Route("/api/v1/paywall/{paywall_id}/grants", post_grants, methods=["POST"]),
]
