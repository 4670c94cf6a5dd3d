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

from collections.abc import Awaitable
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
from proxy.ledger import (
    Balance,
    BalanceOverflow,
    IdempotencyConflict,
    Moved,
    Once,
    Opening,
    Refused,
    Stored,
    storable,
)
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


def _once(request: Request, op: str, body: dict[str, Any]) -> Once | None:
    """The request's ``Idempotency-Key``, if it sent one: at most one move per key (a
    retry replays the first answer; another body under the key is a 409)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise InvalidRequest("An Idempotency-Key has 1-255 characters.",
                             param="Idempotency-Key")
    if not storable(body):
        raise InvalidRequest("The body cannot be kept for its Idempotency-Key: no NUL "
                             "characters, and nested less than 250 deep.",
                             code="invalid_value")
    return Once(key, {"op": op, "body": body})


async def _run(operation: Awaitable[Stored], param: str | None = "amount") -> Response:
    try:
        stored = await operation
    except IdempotencyConflict:
        raise Conflict("This Idempotency-Key was already used with a different request "
                       "body.", param="Idempotency-Key") from None
    except BalanceOverflow:
        raise InvalidRequest("The user's balance cannot hold that many more credits.",
                             param=param, code="balance_overflow") from None
    return Response(stored.body, status_code=stored.status, media_type=JSON)


def _counts(types: list[str], balances: list[Balance]) -> list[dict[str, Any]]:
    have = {b.asset: b.available for b in balances}
    return [{"type": t, "count": have.get(t, 0)} for t in types]


async def post_balances(request: Request) -> Response:
    services, paywall_id, body = await _owner_write(request, "balances")
    paywall = services.settings.paywalls[paywall_id]
    types = paywall.credits.types
    user = _user_id(body.get("user_id"))
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in types:
        raise InvalidRequest(f"Unknown credit type {kind!r} (this paywall has "
                             f"{', '.join(types) or 'none'}).",
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

    def answer(result: Moved | Refused) -> Stored:
        balances = _counts(types, result.balances)
        if isinstance(result, Refused):
            error = PaymentRequired(
                f"The user has {result.available} '{kind}' credits; {amount} cannot be "
                "debited.",
                code="insufficient", details={"balances": balances, "queryType": kind,
                                              "currentBalance": current(balances, kind)})
            return Stored(error.status, error.api_body())
        return Stored(200, orjson.dumps({
            "user_id": user, "type": kind, "op": op, "amount": amount,
            "count": result.balance, "balances": balances, "request_id": request_id}))

    operation = services.ledger.charge if op == "debit" else services.ledger.deposit
    return await _run(operation(
        paywall_id, user, kind, amount, opening=_opening(services, paywall_id),
        request_id=request_id, metadata={"via": "balances"},
        once=_once(request, "balances", body), answer=answer))


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

    def answer(result: Moved | Refused) -> Stored:
        return Stored(200, orjson.dumps({
            "user_id": user, "plan": plan_id, "credits": dict(plan.credits),
            "balances": _counts(types, result.balances), "request_id": request_id}))

    return await _run(services.ledger.grant(
        paywall_id, user, plan.credits, opening=_opening(services, paywall_id),
        request_id=request_id, metadata={"plan": plan_id},
        once=_once(request, "grants", body), answer=answer), param="plan")


def _opening(services: Services, paywall_id: str) -> Opening:
    return Opening(frozenset(services.settings.paywalls[paywall_id].credits.types),
                   services.grants[paywall_id])


def current(balances: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((b for b in balances if b["type"] == kind), None)


routes = [
    Route("/api/v1/paywall/{paywall_id}/user", get_user, methods=["GET"]),
    Route("/api/v1/paywall/{paywall_id}/balances", get_balances, methods=["GET"]),
    Route("/api/v1/paywall/{paywall_id}/balances", post_balances, methods=["POST"]),
    Route("/api/v1/paywall/{paywall_id}/grants", post_grants, methods=["POST"]),
]
