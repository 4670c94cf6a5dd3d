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
from proxy.decide import Action, Decision, UserState
from proxy.errors import InvalidRequest, ModelNotFound
from proxy.identity import USER_HEADER, resolve_user
from proxy.ledger import Posted
from proxy.lifecycle import Charge, Plan, StreamCheckpoint, answer_headers, cost_headers
from proxy.limits import Verdict
from proxy.metering import Meter, completion_text, completion_usage, public_names
from proxy.observe import record_of
from proxy.pricing import Price, Usage, cost, format_amount, worst_case
from proxy.providers import Call, Provider
from proxy.relay import Framer, Outcome, StreamRelay, error_event
from proxy.replies import notice, paywall_reply
from proxy.services import Services, authenticate, read_json
from proxy.settings import ModelSettings, PaywallSettings
from proxy.upstream import Reply

MAX_CHOICES = 128  # as OpenAI


@dataclass(slots=True)
class ChatCall:
    """One chat completion: its plan, and how its answer is read and priced."""

    plan: Plan
    services: Services
    provider: Provider
    call: Call
    price: Price
    scale: int
    markup_bps: int
    prompt_tokens: int  # counted here, for when the provider reports nothing
    model: str  # the public name
    upstream_model: str
    encoding: str
    client_wants_usage: bool
    rename: Callable[[bytes], bytes] | None = None  # the public model name, in answers
    reply_format: str = "text"  # what a blocked request is answered with (_reply_format)
    translated: bool = False  # the provider speaks another wire format (anthropic)
    meter: Meter | None = None
    answered: tuple[Any, bool] = (None, False)  # a whole answer, parsed; usage reported?
    error_tail = staticmethod(error_event)
    headers = staticmethod(answer_headers)

    def cost(self, usage: Usage) -> int:
        return cost(usage, self.price, self.markup_bps)  # the ledger bounds the charge

    def cost_fields(self, usage: Usage) -> dict[str, Any]:
        return {"cost": format_amount(self.cost(usage), self.scale),
                "cost_asset": self.price.asset}

    async def counted(self, text: str) -> Usage:
        tokenizer = self.services.tokenizer
        completion = await tokenizer.count_async(text, self.upstream_model, self.encoding)
        return Usage(self.prompt_tokens, completion)

    def priced(self, usage: Usage, outcome: str) -> Charge:
        return Charge(cost(usage, self.price, self.markup_bps), outcome, usage)

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        p = self.plan
        # A connect link is issued against the user's connection version.
        version = (await self.services.ledger.connect_version(p.paywall_id, p.user)
                   if decision.action is Action.CONNECT else 0)
        return _paywall_reply(self.services, p, self.model, self.call.request_id,
                              decision.action, state, self.scale, self.price.asset,
                              self.call.stream, self.client_wants_usage, version,
                              self.reply_format)

    async def send(self) -> Reply:
        return await self.provider.send(self.call)

    def relays(self, reply: Reply) -> bool:
        return self.call.stream and reply.stream

    def framer(self) -> Framer:
        self.meter = Meter(self.client_wants_usage, self.cost_fields, self.rename,
                           usage_is_ours=self.translated)
        return self.meter

    def checkpoint(self) -> StreamCheckpoint | None:
        return StreamCheckpoint(self) if self.call.stream else None

    def gone(self) -> Charge:
        return self.priced(Usage(self.prompt_tokens, 0), Outcome.ABORTED.value)

    async def settle_relayed(self, framer: Framer, outcome: Outcome, sent: int) -> Charge:
        meter = self.meter
        assert meter is not None and framer is meter
        if meter.failed:  # the provider ended the stream with an error event
            outcome = Outcome.PARTIAL
        if outcome is Outcome.PARTIAL and not meter.delivered:
            return Charge(None, outcome.value)  # the provider failed before any output
        if meter.usage is not None:
            done = meter.done and not meter.failed
            return self.priced(meter.usage, "completed" if done else outcome.value)
        if meter.delivered:
            counted = await self.counted("".join(meter.text))
            return self.priced(meter.with_counted(counted), outcome.value)
        # The provider answered and has the prompt; the client left before any output
        # (or there was none): the prompt is owed, as for a client gone before the answer.
        return self.priced(Usage(self.prompt_tokens, 0), outcome.value)

    async def settle_whole(self, content: bytes) -> Charge:
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            data = None
        usage = completion_usage(data)
        self.answered = data, usage is not None
        if usage is None:  # none, or refused: the output is counted
            usage = await self.counted(completion_text(data, content))
        return self.priced(usage, "completed")

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        data, reported = self.answered
        body = _with_cost(content, data, reported, charge, posted, self)
        response = Response(self.rename(body) if self.rename is not None else body,
                            status_code=200)
        response.raw_headers += self.headers(reply, verdict, relayed=False)
        response.raw_headers += cost_headers(posted, self.scale)
        return response


def _with_cost(content: bytes, data: Any, reported: bool, charge: Charge,
               posted: Posted | None, call: ChatCall) -> bytes:
    """The provider's body (``content``, parsed: ``data``) with ``usage.cost`` added,
    and the usage charged when the provider ``reported`` none that could be used."""
    if posted is None or charge.usage is None or not isinstance(data, dict):
        return content
    usage = charge.usage
    if not reported:
        data["usage"] = {"prompt_tokens": usage.prompt_tokens,
                         "completion_tokens": usage.completion_tokens,
                         "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    data["usage"]["cost"] = format_amount(posted.charged, call.scale)
    data["usage"]["cost_asset"] = call.price.asset
    return orjson.dumps(data)


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
    model = s.models.get(name)
    if model is None:  # decide()'s first rule, answered before anything is estimated
        raise ModelNotFound(
            f"The model '{name}' does not exist or you do not have access to it.", param="model"
        )
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
        upstream_body = orjson.dumps(body)
    except orjson.JSONEncodeError:  # orjson nests at most 254 levels deep
        raise InvalidRequest("The request body is nested too deeply.") from None
    # The worst case: all output tokens (a prediction's unused ones are billed as output
    # too), each at its dearest price.
    output = (output_cap + predicted) * n
    hold = worst_case(estimate, output, price, markup_bps)
    plan = Plan(paywall_id, paywall, user, limits, price.asset, hold, name,
                frozenset({paywall.asset, price.asset}), tokens=estimate + output)
    provider_id = model.provider
    call = Call(
        body=upstream_body, stream=stream, request_id=request_id, headers=request.headers,
        api_key=paywall.provider_keys.get(provider_id) or s.providers[provider_id].api_key,
        payload=body,
    )
    return await lifecycle.run(request, services, rec, ChatCall(
        plan, services, services.providers[provider_id], call, price, scale, markup_bps,
        prompt_tokens, name, upstream_model, model.encoding, client_wants_usage,
        rename=public_names(upstream_model, name), reply_format=_reply_format(body),
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


def _paywall_reply(services: Services, plan: Plan, model: str, request_id: str,
                   action: Action, state: UserState, scale: int, asset: str, stream: bool,
                   include_usage: bool, version: int, reply_format: str) -> Response:
    told = notice(services.signer, plan.paywall_id, plan.paywall, plan.user, action, state,
                  scale, asset, version)
    body, media = paywall_reply(request_id=request_id, model=model, text=told.text,
                                paywall=told.paywall, stream=stream,
                                include_usage=include_usage, reply_format=reply_format)
    return Response(body, media_type=media, headers={"x-paywall-action": action.value})
