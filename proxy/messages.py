"""Anthropic's Messages API (``POST /v1/messages``), as an adapter of the metered
lifecycle (:mod:`proxy.lifecycle`), for apps that speak it with the Anthropic SDKs.

    client ─▶ key (x-api-key or Bearer) ─▶ parse + user ─▶ bound the prompt
           ─▶ [lifecycle: limits, hold, decide]
           ├─ connect / spend_cap / top_up ─▶ an assistant message, nothing charged
           └─ forward ─▶ anthropic provider ─▶ relay ─▶ [lifecycle: post, release]

Only models served by an ``anthropic`` provider are answered here; the body goes
upstream as it came but for the model name and ``max_tokens`` (within the paywall's
limits; a thinking budget is lowered with it, :func:`thinking_within`). The end user
is ``metadata.user_id``, else the ``X-Paywall-User`` header, else the path
(``/v1/{user}/messages``; the SDK's base URL ``.../v1/{user}`` lands on
``/v1/{user}/v1/messages``).

The provider's usage is authoritative (cache reads and writes priced apart); when it
is missing or refused, the delivered output is counted here (:mod:`proxy.anthropic_wire`).
What a whole answer cost, and the balance after, are in the ``x-paywall-cost`` and
``x-paywall-balance`` headers: Anthropic's ``usage`` has no field for money, and the
body is left as the provider sent it (but for the public model name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import anthropic_wire as wire
from proxy import guard, lifecycle
from proxy.decide import Decision, UserState
from proxy.errors import InvalidRequest
from proxy.identity import USER_HEADER, resolve_user
from proxy.ledger import Posted
from proxy.lifecycle import Charge, Plan
from proxy.limits import Verdict
from proxy.metered import Streamed, model_of
from proxy.metering import public_names
from proxy.observe import record_of
from proxy.pricing import Usage, worst_case
from proxy.providers import Call
from proxy.relay import Framer, StreamRelay
from proxy.services import Services, authenticate, read_json
from proxy.settings import Settings
from proxy.upstream import Reply


@dataclass(slots=True)
class MessagesCall(Streamed):
    """One Messages request: its plan, and how its answer is read and priced."""

    error_tail = staticmethod(wire.error_event)

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        told = await self.told(decision, state)
        body, media = wire.paywall_message(request_id=self.call.request_id, model=self.model,
                                           text=told.text, paywall=told.paywall,
                                           stream=self.call.stream)
        return Response(body, media_type=media,
                        headers={"x-paywall-action": decision.action.value})

    def framer(self) -> Framer:
        self.meter = wire.StreamMeter(public_names(self.route.upstreams, self.model))
        return self.meter

    def usage_in(self, data: Any) -> Usage | None:
        return wire.message_usage(data)

    def output_in(self, data: Any, raw: bytes) -> str:
        return wire.message_output(data, raw)

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        return self.respond(reply, content, posted, verdict,
                            public_names(self.route.upstreams, self.model))


def _user_id(body: dict[str, Any]) -> Any:
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object.", param="metadata")
    return metadata.get("user_id")


def _checked(body: dict[str, Any]) -> tuple[str, bool, int]:
    """The request's model, stream flag and max_tokens, as given; 400 for what is wrong
    with them, or for a feature whose cost cannot be bounded."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required: the name of a model.", param="model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("'max_tokens' is required: a positive integer.",
                             param="max_tokens")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):  # "stream": 1 or "true" would stream unmetered
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    for field in ("mcp_servers", "container"):
        if body.get(field):
            raise InvalidRequest(
                f"'{field}' is not supported: remote tools and containers cost what cannot"
                " be bounded before the request is sent.", param=field)
    wire.check_priced(body)
    return name, stream, max_tokens


MIN_THINKING_BUDGET = 1024  # Anthropic's least thinking.budget_tokens
INTERLEAVED = "interleaved-thinking"  # the anthropic-beta feature; see thinking_within


def thinking_within(thinking: Any, max_tokens: int, limit: int, interleaved: bool) -> Any:
    """``thinking`` as it is sent with ``max_tokens`` lowered to ``limit`` by the paywall's
    clamp. Anthropic takes an enabled thinking's ``budget_tokens`` only below max_tokens:
    one at or past ``limit`` is lowered to ``limit - 1`` (anything else is as sent, as
    is a budget under interleaved thinking, which spans the requests of a turn and may
    exceed max_tokens). 400, naming ``thinking.budget_tokens``, when that is below
    Anthropic's least budget."""
    if (limit >= max_tokens or interleaved or not isinstance(thinking, dict)
            or thinking.get("type") != "enabled"):
        return thinking
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < limit:
        return thinking
    if limit - 1 < MIN_THINKING_BUDGET:
        raise InvalidRequest(
            f"'thinking.budget_tokens' must be below max_tokens, which this app limits to "
            f"{limit} tokens per request: less than the least budget, "
            f"{MIN_THINKING_BUDGET} tokens. Send the request without 'thinking'.",
            param="thinking.budget_tokens")
    return {**thinking, "budget_tokens": limit - 1}


async def messages(request: Request) -> Response | StreamRelay:
    services: Services = request.app.state.services
    s = services.settings
    rec = record_of(request.state)
    principal = await authenticate(request, services)
    paywall_id = rec.paywall = principal.paywall_id
    body = await read_json(request, s.server.max_body_bytes)
    user = resolve_user({"metadata.user_id": _user_id(body)}, request.headers.get(USER_HEADER),
                        request.path_params.get("user"), fields=("metadata.user_id",),
                        route="messages")
    rec.user = user
    request_id: str = request.state.request_id

    name, stream, max_tokens = _checked(body)
    paywall = s.paywalls[paywall_id]
    model = model_of(s, name)
    provider_id = model.provider
    if s.providers[provider_id].kind != "anthropic":
        raise InvalidRequest(f"The model '{name}' is not served by an Anthropic provider; "
                             "call it at /v1/chat/completions instead.", param="model",
                             code="model_not_supported")
    upstream_model = model.upstream or name
    rec.model, rec.provider = name, provider_id
    prompt = wire.prompt_of(body, model.max_image_tokens)  # 400s before any I/O
    limits = guard.effective(paywall.limits, await services.overrides.get(paywall_id, user))
    output_cap = guard.output_cap(max_tokens, paywall.max_output_tokens, limits, "max_tokens")
    if "thinking" in body:
        body["thinking"] = thinking_within(
            body["thinking"], max_tokens, output_cap,
            INTERLEAVED in request.headers.get("anthropic-beta", ""))
    body["model"] = upstream_model
    body["max_tokens"] = output_cap

    price = services.prices[name]
    scale = s.assets[price.asset].scale
    rec.asset, rec.scale = price.asset, scale
    markup_bps = int(paywall.markup_percent * 100)
    try:
        upstream_body = orjson.dumps(body)
    except orjson.JSONEncodeError:  # orjson nests at most 254 levels deep
        raise InvalidRequest("The request body is nested too deeply.") from None
    prompt_tokens, estimate, _ = await services.tokenizer.bound(
        prompt, upstream_model, model.encoding, model.prompt_margin)
    # The worst case: the whole prompt at its dearest price (the provider may write all
    # of it to its cache), all of max_tokens (extended thinking's budget is within it).
    route = services.routes[name]
    hold = worst_case(estimate, output_cap, route.hold_price(price), markup_bps)
    plan = Plan(paywall_id, paywall, user, limits, price.asset, hold, name,
                frozenset({paywall.asset, price.asset}), tokens=estimate + output_cap)
    call = Call(body=upstream_body, stream=stream, request_id=request_id,
                headers=request.headers, payload=body, path="/messages")
    return await lifecycle.run(request, services, rec, MessagesCall(
        plan, services, route, call, price, scale, markup_bps,
        prompt_tokens, name, upstream_model, model.encoding))


def model_list(settings: Settings) -> dict[str, Any]:
    """The models served here (those of ``anthropic`` providers) as Anthropic's
    ``GET /v1/models`` lists them, for an Anthropic SDK's ``models.list()``: one page."""
    data = [{"type": "model", "id": name, "display_name": name,
             "created_at": "1970-01-01T00:00:00Z", "lifecycle": "active"}
            for name, m in settings.models.items()
            if settings.providers[m.provider].kind == "anthropic"]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


# What follows /v1/{user}/ on the OpenAI routes: /v1/messages/<one of these> is such a
# route for an end user named "messages".
_OPENAI_ROUTES = frozenset({"chat", "responses", "embeddings", "models"})


def speaks_anthropic(path: str) -> bool:
    """Whether ``path`` is a Messages route or under one (``/v1/messages/...``, also after
    ``/v1/{user}/`` and ``/v1/{user}/v1/``), whose errors are rendered as Anthropic's."""
    parts = path.split("/")[1:]
    if len(parts) < 2 or parts[0] != "v1":
        return False
    if parts[1] == "messages":
        return len(parts) == 2 or parts[2] not in _OPENAI_ROUTES
    return parts[2:3] == ["messages"] or parts[2:4] == ["v1", "messages"]


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/{user}/messages", messages, methods=["POST"]),
    # The Anthropic SDK appends /v1/messages to its base URL, here .../v1/{user}.
    Route("/v1/{user}/v1/messages", messages, methods=["POST"]),
]
