"""What the handlers share: the services the lifespan builds, and the request basics
every route uses (the paywall key, a size-limited JSON body)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from proxy.endusers import TokenVerifier
from proxy.errors import (
    AuthenticationFailed,
    DatabaseUnavailable,
    InvalidRequest,
    PayloadTooLarge,
)
from proxy.keys import KeyStore, Principal, bearer_token
from proxy.ledger import Ledger, Posted
from proxy.limits import Gate, OverrideCache
from proxy.links import LinkSigner
from proxy.observe import Metrics, Record
from proxy.pricing import Price, Usage
from proxy.providers import Provider
from proxy.reaper import LiveHolds
from proxy.routing import Breakers, Route
from proxy.settings import Settings
from proxy.settler import Owed, Settlements
from proxy.tasks import TaskSet
from proxy.tokens import Tokenizer
from proxy.upstream import Transport

if TYPE_CHECKING:
    from proxy.events import Events
    from proxy.payments import Payments

JSON = "application/json"
log = logging.getLogger("proxy.ledger")


@dataclass(slots=True)
class Services:
    settings: Settings
    keys: KeyStore
    providers: dict[str, Provider]
    routes: dict[str, Route]  # each public model's deployments
    breakers: Breakers
    transport: Transport
    prices: dict[str, Price]
    grants: dict[str, dict[str, int]]  # each paywall's starter grants: asset → smallest units
    ledger: Ledger
    gate: Gate
    overrides: OverrideCache
    live: LiveHolds
    settlements: Settlements  # what the ledger refused, until it takes it
    tokenizer: Tokenizer
    signer: LinkSigner
    tasks: TaskSet
    pool: Any
    metrics: Metrics
    verifiers: dict[str, TokenVerifier]  # each paywall's end-user token verifier
    payments: Payments  # Stripe top-ups, refunds, automatic recharge
    events: Events  # the outbox's standalone events and webhook delivery


async def resolve_hold(services: Services, rec: Record, hold_id: int, charge: int | None,
                       usage: Usage | None, outcome: str,
                       meta: dict[str, Any] | None = None, *, answered: bool = False
                       ) -> Posted | None:
    """Post ``charge`` on a held request (or void it, for None) and record the outcome;
    ``answered``: the client has its answer, so the write may ride a later batch.

    Should the database fail, the settlement is owed (:mod:`proxy.settler`): written
    again until the ledger takes it, its hold renewed meanwhile at ``charge``, spooled
    to disk if the process must stop first. Nothing is lost and nothing is charged
    twice (a hold resolves at most once).
    """
    rec.settlement = outcome
    live = services.live
    try:
        if charge is None:
            await services.ledger.void(hold_id, deferrable=answered)
            posted = None
        else:
            posted = await services.ledger.post(hold_id, charge, usage, outcome, meta,
                                                deferrable=answered)
            if posted is None:
                services.metrics.errors.labels("ledger").inc()
                log.error("hold %s of %s was resolved before its settlement", hold_id,
                          rec.request_id)
            else:
                rec.cost, rec.uncharged = posted.charged, posted.uncharged
                services.payments.nudge(rec.paywall, rec.user)
        live.discard(hold_id)
        return posted
    except Exception as e:
        services.metrics.errors.labels("ledger").inc()
        services.settlements.owe(Owed(hold_id, charge, usage, outcome, meta, rec.request_id))
        live.discard(hold_id)
        await services.settlements.durable()  # before the answer goes out
        if isinstance(e, DatabaseUnavailable):
            log.warning("settling hold %s of %s failed: the database is unavailable (%s);"
                        " it stays owed until written", hold_id, rec.request_id,
                        type(e.__cause__).__name__)
        else:
            log.exception("settling hold %s of %s failed; it stays owed until written",
                          hold_id, rec.request_id)
        return None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=JSON, headers=headers)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def authenticate(request: Request, services: Services) -> Principal:
    """The paywall whose key the request carries: as ``Authorization: Bearer <key>``
    (the OpenAI SDKs), else as ``x-api-key`` (the Anthropic SDKs)."""
    key = (bearer_token(request.headers.get("authorization"))
           or request.headers.get("x-api-key") or None)
    if key is None:
        raise AuthenticationFailed(
            "Missing API key: send your paywall key as 'Authorization: Bearer <key>' "
            "or 'x-api-key: <key>'."
        )
    principal = await services.keys.authenticate(key)
    if principal is None or principal.paywall_id not in services.settings.paywalls:
        raise AuthenticationFailed("Incorrect API key provided.")
    return principal


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 as soon as it passes ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            parts.append(part)
    except ClientDisconnect:  # a client gone mid-body (or dropped as too slow): no crash
        raise InvalidRequest("The client went away before its body was complete.",
                             code="client_disconnected") from None
    return b"".join(parts)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit``, before parsing."""
    return parse_json(await read_body(request, limit))


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body
