"""The API gateway, for apps without a backend:

    *    /api/v1/api-gateway/{provider}[/{path}]?paywall_id=…   Bearer (end user)

A gateway call passes the same limits as a chat completion, holds one credit of the
provider's ``query_type`` (``free`` holds nothing), forwards the request with the
provider's server-side headers, and relays the answer unchanged, streams included.
It runs the one metered lifecycle (:mod:`proxy.lifecycle`), so the paywall's rules
apply as they do to chat: ``require_connect`` answers 402 naming the connect link.
The credit is posted once the upstream answered 2xx and the answer was delivered;
an upstream error or failure voids it. A client that leaves cancels the upstream call
at once; it is charged (outcome ``aborted``) only if part of a 2xx answer had already
reached it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

from proxy import guard, lifecycle
from proxy.balances import balances_of, current, end_user, paywall_of
from proxy.cors import paywall_named
from proxy.decide import Action, Decision, UserState
from proxy.errors import Forbidden, InvalidRequest, MethodNotAllowed, NotFound, PaymentRequired
from proxy.ledger import Posted
from proxy.lifecycle import Charge, Plan
from proxy.limits import Verdict
from proxy.observe import record_of
from proxy.relay import Framer, Outcome, StreamRelay, Verbatim
from proxy.services import Services, parse_json, read_body, services_of
from proxy.settings import ApiProviderSettings
from proxy.upstream import GATEWAY_HEADERS, Outbound, Reply, encoded, secret_values

FREE = "free"
PAYWALL_HEADER = "x-paywall-id"


def charge_for(outcome: Outcome, sent: int) -> Charge:
    """A relayed call costs its one credit when it was delivered, or when a client that
    left had already received part of it; otherwise nothing."""
    if outcome is Outcome.COMPLETED or (outcome is Outcome.ABORTED and sent):
        return Charge(1, outcome.value)
    return Charge(None, outcome.value)


@dataclass(slots=True)
class GatewayCall:
    plan: Plan
    services: Services
    request: Request
    provider_id: str
    provider: ApiProviderSettings
    out: Outbound
    error_tail = None  # a broken answer is cut off: its format is the provider's

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        p = self.plan
        balances = await balances_of(self.services, p.paywall_id, p.user)
        details: dict[str, Any] = {"balances": balances, "queryType": p.asset,
                                   "currentBalance": current(balances, p.asset)}
        if decision.action is Action.CONNECT:
            version = await self.services.ledger.connect_version(p.paywall_id, p.user)
            link = self.services.signer.link(p.paywall_id, p.user, "connect",
                                             p.paywall.link_ttl_seconds, version=version)
            raise PaymentRequired("Connect your account to use this service: " + link,
                                  code="connect_required",
                                  details={**details, "connectLink": link})
        if decision.action is Action.SPEND_CAP and state.cap is not None:
            details["spendCap"] = state.cap.name
            details["resetsAt"] = state.cap.resets_at
            raise PaymentRequired(f"The {state.cap.name.replace('_', ' ')} limit is reached.",
                                  code="spend_cap", details=details)
        record_of(self.request.state).outcome = "not_enough_queries"
        raise PaymentRequired(f"Not enough '{p.asset}' credits for this call.",
                              code="not_enough_queries", details=details)

    async def send(self) -> Reply:
        return await self.services.transport.send(self.out)

    def headers(self, reply: Reply, verdict: Verdict | None, relayed: bool
                ) -> list[tuple[bytes, bytes]]:
        out = [*reply.raw_headers(), (b"x-query-type", self.provider.query_type.encode())]
        return out + verdict.raw_headers() if verdict is not None else out

    def relays(self, reply: Reply) -> bool:
        return True  # any size, any format: passed on as it arrives

    def framer(self) -> Framer:
        return Verbatim()

    def checkpoint(self) -> None:
        return None

    def gone(self) -> Charge:
        return Charge(None, Outcome.ABORTED.value)

    async def settle_relayed(self, framer: Framer, outcome: Outcome, sent: int) -> Charge:
        return charge_for(outcome, sent)

    async def settle_whole(self, content: bytes) -> Charge:
        raise AssertionError("the gateway relays every 2xx answer")

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        raise AssertionError("the gateway relays every 2xx answer")


async def api_gateway(request: Request) -> Response | StreamRelay:
    services = services_of(request)
    s = services.settings
    rec = record_of(request.state)
    provider_id: str = request.path_params["provider_id"]
    provider = s.api_providers.get(provider_id)
    if provider is None:
        raise NotFound(f"No API provider '{provider_id}'.", code="provider_not_found")
    paywall_id = paywall_named(request.scope["query_string"],
                               request.headers.get(PAYWALL_HEADER))
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
    free = query_type == FREE
    if not free:
        rec.asset, rec.scale = query_type, 0
    plan = Plan(paywall_id, paywall, user, limits, query_type, None if free else 1,
                f"api:{provider_id}", frozenset({*paywall.credits.types, query_type}))
    headers = GATEWAY_HEADERS.request(request.headers)
    headers.update(provider.headers)
    headers["x-request-id"] = request.state.request_id
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "paywall_id"]
    out = Outbound(provider_id, provider.method, url, headers, body or None, stream=True,
                   slow_start=True,
                   policy=GATEWAY_HEADERS, secrets=encoded(secret_values(provider.headers)),
                   params=params or None)
    return await lifecycle.run(request, services, rec, GatewayCall(
        plan, services, request, provider_id, provider, out))


async def _body(request: Request, provider: ApiProviderSettings, limit: int) -> bytes:
    """The client's body as it came (form-data, binary, …), except a JSON object, which
    gets the provider's default fields merged under it."""
    raw = await read_body(request, limit)
    ctype = request.headers.get("content-type", "")
    if not provider.body or (ctype and "json" not in ctype):
        return raw
    return orjson.dumps({**provider.body, **(parse_json(raw) if raw.strip() else {})})


def _upstream_url(provider: ApiProviderSettings, path: str) -> URL:
    """The provider's URL with the client's path under it — and only under it: dot
    segments, and characters that would end the path, are refused."""
    url = provider.url.rstrip("/")
    if not path:
        return URL(url)
    segments = path.split("/")
    # "..;x" is ".." to servers that take ";" as a path parameter (Tomcat, Jetty).
    if (any(seg.split(";", 1)[0] in (".", "..") for seg in segments)
            or not path.isprintable()
            or any(c in path for c in "?#\\")):
        raise InvalidRequest("The path after the provider id may not hold '.' or '..' "
                             "segments, '?', '#' or '\\'.", param="path", code="invalid_path")
    return URL(url + "/" + "/".join(quote(seg, safe="!$&'()*+,;=:@-._~") for seg in segments),
               encoded=True)


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

routes = [
    Route("/api/v1/api-gateway/{provider_id}", api_gateway, methods=_METHODS),
    Route("/api/v1/api-gateway/{provider_id}/{path:path}", api_gateway, methods=_METHODS),
]

