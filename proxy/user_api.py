"""The user API, for an app's backend holding the paywall key: balances, links, deposits,
manual charges, the ledger and usage.

The end user is named by ``user`` in the query (GET) or the body (POST). Deposits and
charges require an ``Idempotency-Key`` header: the same key with the same body
replays the first response, with another body it is a 409; keys are kept 24 h or more.
The money itself moves in :mod:`proxy.ledger` (:meth:`~proxy.ledger.Ledger.deposit`,
:meth:`~proxy.ledger.Ledger.charge`); a handler validates and says how to answer.

Inputs are read strictly, and anything else is a 400: amounts are JSON numbers or
plain ASCII decimal strings (``"1.50"``; no sign, exponent, space, ``_`` or other
scripts' digits) within what a balance holds; ``limit`` and ``cursor`` are ASCII
digits; ``from``/``to`` are ISO 8601 dates that stay within years 1-9999 in UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import guard
from proxy.errors import Conflict, InvalidRequest, PaymentRequired
from proxy.identity import resolve_user
from proxy.keys import Principal
from proxy.ledger import (
    BalanceOverflow,
    IdempotencyConflict,
    Moved,
    Once,
    Opening,
    Refused,
    Stored,
    storable,
)
from proxy.pricing import format_amount, parse_decimal, units
from proxy.services import JSON, Services, authenticate, json_response, read_json, services_of

_INTEGER = re.compile(r"[0-9]{1,20}")


def _amount(value: Any, scale: int, field: str = "amount") -> int:
    """A positive amount, given as a plain decimal string or a JSON number, in the
    smallest unit."""
    amount = parse_decimal(value)
    if amount is None:
        raise InvalidRequest(f"'{field}' must be a plain decimal amount such as \"1.50\".",
                             param=field)
    if amount <= 0:
        raise InvalidRequest(f"'{field}' must be a positive amount.", param=field)
    try:
        return units(amount, scale)
    except ValueError as e:
        raise InvalidRequest(f"'{field}': {e}.", param=field) from None


async def _caller(request: Request) -> tuple[Services, Principal]:
    services = services_of(request)
    return services, await authenticate(request, services)


def _query_user(request: Request) -> str:
    return resolve_user({"user": request.query_params.get("user")}, None, None, ("user",))


def _asset(services: Services, principal: Principal, body: dict[str, Any]) -> tuple[str, int]:
    asset = body.get("asset") or services.settings.paywalls[principal.paywall_id].asset
    if not isinstance(asset, str) or asset not in services.settings.assets:
        raise InvalidRequest(f"Unknown asset {asset!r}.", param="asset")
    return asset, services.settings.assets[asset].scale


def _money(services: Services, asset: str, units: int) -> str:
    return format_amount(units, services.settings.assets[asset].scale)


async def balance(request: Request) -> Response:
    services, principal = await _caller(request)
    user = _query_user(request)
    row = await services.ledger.user(principal.paywall_id, user)
    balances = await services.ledger.balances(principal.paywall_id, user)
    return json_response({
        "user": user,
        "connected": bool(row and row["connected_at"]),
        "balances": [{"asset": b.asset, "balance": _money(services, b.asset, b.balance),
                      "held": _money(services, b.asset, b.held),
                      "available": _money(services, b.asset, b.available),
                      "owed": _money(services, b.asset, b.owed),
                      "units": b.balance} for b in balances],
    })


async def connect_status(request: Request) -> Response:
    services, principal = await _caller(request)
    user = _query_user(request)
    row = await services.ledger.user(principal.paywall_id, user)
    connected = bool(row and row["connected_at"])
    ttl = services.settings.paywalls[principal.paywall_id].link_ttl_seconds
    link = None if connected else services.signer.link(
        principal.paywall_id, user, "connect", ttl,
        version=row["connect_version"] if row else 0)
    return json_response({"user": user, "connected": connected, "connect_link": link})


async def disconnect(request: Request) -> Response:
    services, principal = await _caller(request)
    body = await read_json(request, services.settings.server.max_body_bytes)
    user = resolve_user(body, None, None, ("user",))
    await services.ledger.disconnect(principal.paywall_id, user)
    return json_response({"user": user, "connected": False})


async def topup_link(request: Request) -> Response:
    services, principal = await _caller(request)
    user = _query_user(request)
    ttl = services.settings.paywalls[principal.paywall_id].link_ttl_seconds
    link = services.signer.link(principal.paywall_id, user, "topup", ttl)
    return json_response({"user": user, "topup_link": link})


async def _money_move(request: Request, kind: str) -> Response:
    services, principal = await _caller(request)
    key = request.headers.get("idempotency-key")
    if not key or len(key) > 255:
        raise InvalidRequest("An Idempotency-Key header (1-255 characters) is required.",
                             param="Idempotency-Key", code="idempotency_key_required")
    body = await read_json(request, services.settings.server.max_body_bytes)
    user = resolve_user(body, None, None, ("user",))
    asset, scale = _asset(services, principal, body)
    amount = _amount(body.get("amount"), scale)
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object.", param="metadata")
    for name, value in (("metadata", metadata), ("description", body.get("description"))):
        if not storable(value):
            raise InvalidRequest(f"'{name}' cannot be stored: no NUL characters, and "
                                 "nested less than 250 deep.", param=name,
                                 code="invalid_value")
    if not storable(body):
        raise InvalidRequest("The body cannot be stored: no NUL characters, and nested "
                             "less than 250 deep.", code="invalid_value")
    if isinstance(body.get("description"), str):
        metadata = {**metadata, "description": body["description"]}
    request_id: str = request.state.request_id

    def answer(result: Moved | Refused) -> Stored:
        if isinstance(result, Refused):
            error = PaymentRequired(
                f"The user's available balance ({_money(services, asset, result.available)} "
                f"{asset}) does not cover {_money(services, asset, amount)}.")
            return Stored(error.status, error.body())
        return Stored(200, orjson.dumps({
            "user": user, "asset": asset, "kind": kind,
            "amount": _money(services, asset, amount),
            "balance": _money(services, asset, result.balance), "request_id": request_id,
        }))

    operation = services.ledger.deposit if kind == "deposit" else services.ledger.charge
    try:
        stored = await operation(
            principal.paywall_id, user, asset, amount,
            opening=Opening(frozenset({asset}), services.grants[principal.paywall_id]),
            request_id=request_id, metadata=metadata, once=Once(key, {"op": kind, "body": body}),
            answer=answer)
    except IdempotencyConflict:
        raise Conflict("This Idempotency-Key was already used with a different request body.",
                       param="Idempotency-Key") from None
    except BalanceOverflow:
        raise InvalidRequest(f"The user's {asset} balance cannot hold "
                             f"{_money(services, asset, amount)} more.", param="amount",
                             code="balance_overflow") from None
    return Response(stored.body, status_code=stored.status, media_type=JSON)


async def deposit(request: Request) -> Response:
    return await _money_move(request, "deposit")


async def charge(request: Request) -> Response:
    return await _money_move(request, "charge")


async def ledger(request: Request) -> Response:
    services, principal = await _caller(request)
    user = _query_user(request)
    limit = _int_param(request, "limit", 50, 1, 500)
    cursor = request.query_params.get("cursor")
    before = _int_param(request, "cursor", 0, 1, 2**62) if cursor else None
    entries = await services.ledger.entries(principal.paywall_id, user, before=before,
                                            limit=limit + 1)
    page = entries[:limit]
    return json_response({
        "object": "list",
        "data": [{"id": e.id, "created_at": e.created_at.isoformat(), "kind": e.kind,
                  "asset": e.asset, "amount": _money(services, e.asset, e.amount),
                  "balance_after": _money(services, e.asset, e.balance_after),
                  "request_id": e.request_id, "model": e.model,
                  "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
                  "outcome": e.outcome, "metadata": e.metadata} for e in page],
        "next_cursor": str(page[-1].id) if len(entries) > limit else None,
    })


async def usage(request: Request) -> Response:
    services, principal = await _caller(request)
    user = request.query_params.get("user")
    if user is not None:
        user = _query_user(request)
    now = datetime.now(UTC)
    since = _date_param(request, "from", now - timedelta(days=30))
    until = _date_param(request, "to", now + timedelta(days=1))
    rows = await services.ledger.usage(principal.paywall_id, user_id=user, since=since,
                                       until=until)
    return json_response({"object": "list", "data": [
        {"user": r["user_id"], "model": r["model"], "day": r["day"].isoformat(),
         "asset": r["asset"], "requests": r["requests"],
         "cost": _money(services, r["asset"], r["cost"] or 0),
         "prompt_tokens": r["prompt_tokens"] or 0,
         "completion_tokens": r["completion_tokens"] or 0} for r in rows]})


async def get_limits(request: Request) -> Response:
    services, principal = await _caller(request)
    user = _query_user(request)
    return await _limits_response(services, principal, user)


async def patch_limits(request: Request) -> Response:
    services, principal = await _caller(request)
    body = await read_json(request, services.settings.server.max_body_bytes)
    user = resolve_user(body, None, None, ("user",))
    changed = guard.parse_overrides(body, services.settings.assets, {})
    removed = [k for k, v in body.items() if v is None and k != "user"]
    await services.ledger.set_limits(principal.paywall_id, user, changed, removed)
    services.overrides.forget(principal.paywall_id, user)
    return await _limits_response(services, principal, user)


async def _limits_response(services: Services, principal: Principal, user: str) -> Response:
    overrides = await services.ledger.limits_of(principal.paywall_id, user)
    conf = services.settings.paywalls[principal.paywall_id].limits
    return json_response({
        "user": user,
        "overrides": overrides,
        "effective": guard.effective(conf, overrides).as_overridable(),
    })


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit() and int() also take "²", "١٢" or "1_0".
    if not _INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return int(raw)


def _date_param(request: Request, name: str, default: datetime) -> datetime:
    """An ISO 8601 date or time (UTC unless it names an offset), as a UTC time."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = datetime.fromisoformat(raw)
        # An offset can carry a time past the years datetime holds (9999-12-31T23:59-05:00).
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date from 0001-01-01 to "
                             "9999-12-31.", param=name) from None


routes = [
    Route("/v1/user/balance", balance, methods=["GET"]),
    Route("/v1/user/connect", connect_status, methods=["GET"]),
    Route("/v1/user/disconnect", disconnect, methods=["POST"]),
    Route("/v1/user/balance/topup", topup_link, methods=["GET"]),
    Route("/v1/user/balance/deposit", deposit, methods=["POST"]),
    Route("/v1/user/charge", charge, methods=["POST"]),
    Route("/v1/user/ledger", ledger, methods=["GET"]),
    Route("/v1/user/limits", get_limits, methods=["GET"]),
    Route("/v1/user/limits", patch_limits, methods=["PATCH"]),
    Route("/v1/usage", usage, methods=["GET"]),
]
