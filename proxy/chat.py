"""Chat completions, as an adapter of the metered lifecycle (:mod:`proxy.lifecycle`).

    client ─▶ key ─▶ parse + user ─▶ estimate ─▶ [lifecycle: limits, hold, decide]
           ├─ connect / spend_cap / top_up ─▶ an assistant message, nothing charged
           └─ forward ─▶ provider ─▶ relay ─▶ [lifecycle: post the cost, release the rest]

The provider's usage is authoritative when it makes sense (:mod:`proxy.metering`):
streams are asked for it (``stream_options.include_usage``) and the extra chunk is
removed again when the client did not ask. When a provider reports none, or usage
that is refused or stale, the delivered output is counted here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import anthropic_wire, guard, lifecycle, translate
from proxy.decide import Decision, UserState
from proxy.errors import InvalidRequest
from proxy.identity import USER_HEADER, resolve_user
from proxy.ledger import Posted
from proxy.lifecycle import Charge, Plan
from proxy.limits import Verdict
from proxy.metered import Streamed, model_of
from proxy.metering import Meter, completion_text, completion_usage, public_names
from proxy.observe import record_of
from proxy.pricing import Usage, worst_case
from proxy.providers import Call
from proxy.relay import Framer, StreamRelay, error_event
from proxy.replies import paywall_reply
from proxy.services import Services, authenticate, read_json
from proxy.settings import ModelSettings, PaywallSettings
from proxy.upstream import Reply

MAX_CHOICES = 128  # as OpenAI


@dataclass(slots=True)
class ChatCall(Streamed):
    """One chat completion: its plan, and how its answer is read and priced."""

    client_wants_usage: bool
    rename: Callable[[bytes], bytes] | None = None  # the public model name, in answers
    reply_format: str = "text"  # what a blocked request is answered with (_reply_format)
    translated: bool = False  # the provider speaks another wire format (anthropic)
    error_tail = staticmethod(error_event)

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        told = await self.told(decision, state)
        body, media = paywall_reply(request_id=self.call.request_id, model=self.model,
                                    text=told.text, paywall=told.paywall,
                                    stream=self.call.stream,
                                    include_usage=self.client_wants_usage,
                                    reply_format=self.reply_format)
        return Response(body, media_type=media,
                        headers={"x-paywall-action": decision.action.value})

    def framer(self) -> Framer:
        self.meter = Meter(self.client_wants_usage, self.cost_fields, self.rename,
                           usage_is_ours=self.translated)
        return self.meter

    def usage_in(self, data: Any) -> Usage | None:
        return completion_usage(data)

    def output_in(self, data: Any, raw: bytes) -> str:
        return completion_text(data, raw)

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        body = self.costed(content, charge, posted, lambda u: {
            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens})
        return self.respond(reply, body, posted, verdict, self.rename)


def _output_cap(body: dict[str, Any], model: ModelSettings, paywall: PaywallSettings,
                limits: guard.Limits) -> int:
    """The most output tokens the request can produce: the largest cap it sets, within
    the paywall's limit, else the paywall's default cap. It goes upstream in the one
    field this provider reads (``max_tokens_field``), like the model name is mapped."""
    caps = []
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.pop(field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{field}' must be a positive integer.", param=field)
        caps.append(guard.output_cap(value, paywall.max_output_tokens, limits, field))
    cap = max(caps) if caps else guard.output_cap(None, paywall.max_output_tokens, limits,
                                                  model.max_tokens_field)
    body[model.max_tokens_field] = cap
    return cap


async def chat_completions(request: Request) -> Response | StreamRelay:
    services: Services = request.app.state.services
    s = services.settings
    rec = record_of(request.state)
    principal = await authenticate(request, services)
    paywall_id = rec.paywall = principal.paywall_id
    body = await read_json(request, s.server.max_body_bytes)
    user = resolve_user(body, request.headers.get(USER_HEADER), request.path_params.get("user"))
    rec.user = user
    request_id: str = request.state.request_id

    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    paywall = s.paywalls[paywall_id]
    model = model_of(s, name)  # decide()'s first rule, answered before anything is estimated
    upstream_model = model.upstream or name
    rec.model, rec.provider = name, model.provider
    body["model"] = upstream_model
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):  # "stream": 1 or "true" would stream unmetered
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"'n' must be an integer from 1 to {MAX_CHOICES}.", param="n")
    guard.priced_options(body, {})
    limits = guard.effective(paywall.limits, await services.overrides.get(paywall_id, user))
    output_cap = _output_cap(body, model, paywall, limits)
    options = body.get("stream_options")
    client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if stream and not client_wants_usage:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}

    translated = s.providers[model.provider].kind == "anthropic"
    # What Messages cannot do is refused before any hold; what it can is bounded as the
    # provider will bill it (its tool system prompt, a forced tool for JSON output).
    messages_body = translate.to_messages(body) if translated else None
    if messages_body is not None:
        anthropic_wire.check_priced(messages_body)
    price = services.prices[name]
    scale = s.assets[price.asset].scale
    rec.asset, rec.scale = price.asset, scale
    markup_bps = int(paywall.markup_percent * 100)
    try:
        if messages_body is not None:
            prompt_tokens, estimate, predicted = await services.tokenizer.bound(
                anthropic_wire.prompt_of(messages_body, model.max_image_tokens),
                upstream_model, model.encoding, model.prompt_margin)
        else:
            prompt_tokens, estimate, predicted = await services.tokenizer.prompt_tokens(
                body, upstream_model, model.encoding, model.max_image_tokens,
                model.prompt_margin)
        # A translating provider is sent the request in its own format.
        upstream_body = orjson.dumps(body if messages_body is None else messages_body)
    except orjson.JSONEncodeError:  # orjson nests at most 254 levels deep
        raise InvalidRequest("The request body is nested too deeply.") from None
    # The worst case: all output tokens (a prediction's unused ones are billed as output
    # too), each at its dearest price.
    output = (output_cap + predicted) * n
    route = services.routes[name]
    hold = worst_case(estimate, output, route.hold_price(price), markup_bps)
    plan = Plan(paywall_id, paywall, user, limits, price.asset, hold, name,
                frozenset({paywall.asset, price.asset}), tokens=estimate + output)
    call = Call(body=upstream_body, stream=stream, request_id=request_id,
                headers=request.headers, payload=body)
    return await lifecycle.run(request, services, rec, ChatCall(
        plan, services, route, call, price, scale, markup_bps,
        prompt_tokens, name, upstream_model, model.encoding, client_wants_usage,
        rename=public_names(route.upstreams, name), reply_format=_reply_format(body),
        translated=translated))


def _reply_format(body: dict[str, Any]) -> str:
    """How a blocked request's message is best carried so the client's parser takes it:
    "refusal" for a ``json_schema`` response format (the SDKs' ``.parse()`` returns a
    refusal rather than failing on text that is not the schema), "json_object" for JSON
    mode (the message inside a JSON object), else "text". A request that forces a tool
    still gets text: a made-up tool call would be run as if the model had made it."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        return "refusal"
    return "json_object" if kind == "json_object" else "text"
