"""The chat-completions pipeline: authenticate, identify, estimate, limit, hold, decide,
forward, settle.

    client ─▶ key ─▶ parse + user ─▶ estimate ─▶ limits (Redis or in process)
           ─▶ hold within balance and spend caps (one round trip) ─▶ decide
           ├─ connect / spend_cap / top_up ─▶ an assistant message, nothing charged
           └─ forward ─▶ provider ─▶ relay ─▶ post the actual cost, release the rest

The provider's usage is authoritative: streams are asked for it
(``stream_options.include_usage``) and the extra chunk is removed again when the
client did not ask. Only when a provider reports nothing are tokens counted here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import guard
from proxy.decide import Action, decide
from proxy.errors import InvalidRequest, ModelNotFound, ProxyError
from proxy.identity import USER_HEADER, resolve_user
from proxy.ledger import UserState
from proxy.limits import Verdict
from proxy.metering import Meter
from proxy.observe import Record, record_of
from proxy.pricing import Price, Usage, cost, format_amount
from proxy.providers import Call, Reply
from proxy.relay import CLIENT_GONE, Outcome, StreamRelay, unless_client_leaves
from proxy.replies import paywall_reply
from proxy.requestid import new_request_id
from proxy.services import Services, authenticate, read_json, resolve_hold
from proxy.settings import ModelSettings, PaywallSettings

MAX_CHOICES = 128  # as OpenAI
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class Metered:
    """One forwarded request, as billing sees it."""

    services: Services
    hold_id: int
    hold: int
    price: Price
    scale: int
    markup_bps: int
    prompt_tokens: int  # counted here, for when the provider reports nothing
    model: str  # the public name
    upstream_model: str
    encoding: str
    verdict: Verdict | None  # the limiter's admission, finished at settlement
    request_id: str
    lease: str  # the limiter's id for this request (never the client's X-Request-Id)
    admitted_tokens: int
    record: Record
    settled: bool = False

    def cost(self, usage: Usage) -> int:
        return min(cost(usage, self.price, self.markup_bps), self.hold)

    def cost_fields(self, usage: Usage) -> dict[str, Any]:
        return {"cost": format_amount(self.cost(usage), self.scale),
                "cost_asset": self.price.asset}

    async def counted(self, text: str) -> Usage:
        tokenizer = self.services.tokenizer
        completion = await tokenizer.count_async(text, self.upstream_model, self.encoding)
        return Usage(self.prompt_tokens, completion)

    async def settle(self, usage: Usage | None, outcome: str) -> Any:
        """Post ``usage`` at its price (capped by the hold), or void when there is none
        (:func:`~proxy.services.resolve_hold`); then free the request's limiter leases
        and correct its token count."""
        if self.settled:
            return None
        self.settled = True
        services = self.services
        charge = meta = None
        if usage is not None:
            self.record.prompt_tokens = usage.prompt_tokens
            self.record.completion_tokens = usage.completion_tokens
            exact = cost(usage, self.price, self.markup_bps)
            charge = min(exact, self.hold)
            meta = {"uncharged": exact - self.hold} if exact > self.hold else None
        posted = await resolve_hold(services, self.record, self.hold_id, charge, usage,
                                    outcome, meta)
        used = usage.prompt_tokens + usage.completion_tokens if usage else 0
        await services.gate.finish(self.verdict, self.lease, used - self.admitted_tokens)
        return posted


class StreamCheckpoint:
    """What a live stream has delivered so far, counted incrementally for the reaper."""

    def __init__(self, meter: Meter, metered: Metered):
        self.meter = meter
        self.metered = metered
        self.seen = 0
        self.tokens = 0

    def __call__(self) -> dict[str, Any] | None:
        m = self.metered
        if self.meter.usage is not None:
            usage = self.meter.usage
        else:
            new = "".join(self.meter.text[self.seen:])
            self.seen = len(self.meter.text)
            self.tokens += m.services.tokenizer.count(new, m.upstream_model, m.encoding)
            if not self.tokens:
                return None
            usage = Usage(m.prompt_tokens, self.tokens)
        return {"prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens, "cost": m.cost(usage)}


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
    rec.paywall = principal.paywall_id
    body = await read_json(request, s.server.max_body_bytes)
    user = resolve_user(body, request.headers.get(USER_HEADER), request.path_params.get("user"))
    rec.user = user
    request_id: str = request.state.request_id

    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    paywall = s.paywalls[principal.paywall_id]
    model = s.models.get(name)
    if model is None:  # decide()'s first rule, answered before anything is estimated
        raise ModelNotFound(
            f"The model '{name}' does not exist or you do not have access to it.", param="model"
        )
    upstream_model = model.upstream or name
    rec.model, rec.provider = name, model.provider
    body["model"] = upstream_model
    stream = body.get("stream") is True
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"'n' must be an integer from 1 to {MAX_CHOICES}.", param="n")
    limits = guard.effective(paywall.limits,
                             await services.overrides.get(principal.paywall_id, user))
    output_cap = _output_cap(body, model, paywall, limits)
    options = body.get("stream_options")
    client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if stream and not client_wants_usage:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}

    price = services.prices[name]
    scale = s.assets[price.asset].scale
    rec.asset, rec.scale = price.asset, scale
    markup_bps = int(paywall.markup_percent * 100)
    prompt_tokens, estimate = await services.tokenizer.prompt_tokens(
        body, upstream_model, model.encoding)
    # The worst case: all output tokens at the dearer of the output and reasoning prices.
    hold = cost(Usage(estimate, output_cap * n, reasoning_tokens=(
        output_cap * n if price.reasoning > price.output else 0)), price, markup_bps)
    admitted_tokens = estimate + output_cap * n
    lease = new_request_id()
    verdict = await services.gate.admit(
        guard.rules(limits, principal.paywall_id, user, admitted_tokens), lease,
        limits.lease_seconds, limits.fail_open)
    try:
        ledger = services.ledger
        caps = guard.spend_caps(limits, user, price.asset, s.assets)

        async def place() -> UserState:
            return await ledger.hold(principal.paywall_id, user, price.asset, hold,
                                     request_id=request_id, model=name,
                                     require_connect=paywall.require_connect, caps=caps,
                                     timezone=limits.timezone)

        state = await place()
        if not state.exists or (state.hold_id is None and not state.has_account):
            await ledger.open_user(principal.paywall_id, user,
                                   assets={paywall.asset, price.asset},
                                   grants=services.grants[principal.paywall_id])
            state = await place()
        decision = decide(paywall, True, state, hold)
        rec.outcome = decision.action.value
        if decision.action is not Action.FORWARD:
            if state.hold_id is not None:  # cannot happen: the hold and decide agree
                await ledger.void(state.hold_id)
            await services.gate.finish(verdict, lease, -admitted_tokens)
            # A connect link is issued against the user's connection version.
            version = (await ledger.connect_version(principal.paywall_id, user)
                       if decision.action is Action.CONNECT else 0)
            return _paywall_reply(services, principal.paywall_id, paywall, user, name,
                                  request_id, decision.action, state, scale, price.asset,
                                  stream, client_wants_usage, version)
    except BaseException:
        await services.tasks.run_to_end(services.gate.finish(verdict, lease, -admitted_tokens))
        raise

    assert state.hold_id is not None
    metered = Metered(services, state.hold_id, hold, price, scale, markup_bps,
                      prompt_tokens, name, upstream_model, model.encoding,
                      verdict, request_id, lease, admitted_tokens, rec)
    rec.hold_id = state.hold_id
    provider_id = model.provider
    call = Call(
        body=orjson.dumps(body), stream=stream, request_id=request_id, headers=request.headers,
        api_key=paywall.provider_keys.get(provider_id) or s.providers[provider_id].api_key,
        payload=body,
    )
    meter = Meter(client_wants_usage, metered.cost_fields)
    services.live.add(state.hold_id, StreamCheckpoint(meter, metered) if stream else None)
    rec.upstream_started = time.perf_counter()
    try:
        reply = await unless_client_leaves(request, services.providers[provider_id].send(call))
    except BaseException as e:
        if isinstance(e, ProxyError):
            services.metrics.errors.labels("upstream").inc()
        await services.tasks.run_to_end(metered.settle(None, "failed"))
        raise
    if reply is None:  # the client left before the provider answered: the prompt is owed
        await services.tasks.run_to_end(
            metered.settle(Usage(metered.prompt_tokens, 0), Outcome.ABORTED.value))
        return Response(status_code=CLIENT_GONE)
    try:
        return await _answer(services, metered, meter, reply, verdict)
    except BaseException:
        # Whatever went wrong before the relay took over, the hold is resolved here.
        await reply.aclose()
        await services.tasks.run_to_end(metered.settle(None, "failed"))
        raise


async def _answer(services: Services, metered: Metered, meter: Meter, reply: Reply,
                  verdict: Verdict | None) -> Response | StreamRelay:
    rec = metered.record
    if not reply.ok:
        try:
            content = await reply.read()
        finally:
            await reply.aclose()
        rec.upstream_first = rec.upstream_ended = time.perf_counter()
        rec.error = f"upstream_{reply.status}"
        services.metrics.errors.labels("upstream").inc()
        await services.tasks.run_to_end(metered.settle(None, "failed"))
        return Response(content, status_code=reply.status, headers=dict(reply.headers))

    if reply.stream:
        async def on_done(outcome: Outcome) -> None:
            rec.upstream_first, rec.upstream_ended = relay.first_at, relay.ended_at
            if outcome is Outcome.PARTIAL:
                services.metrics.errors.labels("upstream").inc()
            await services.tasks.run_to_end(_settle_stream(metered, meter, outcome))

        limit_headers = verdict.headers() if verdict else {}
        headers = [(k.encode(), v.encode())
                   for k, v in [*reply.headers, *limit_headers.items()]] + _STREAM_HEADERS
        relay = StreamRelay(reply, headers, services.settings.upstream.stream_max_seconds,
                            meter, on_done)
        return relay

    try:
        content = await reply.read()
    finally:
        await reply.aclose()
    rec.upstream_first = rec.upstream_ended = time.perf_counter()
    return await services.tasks.run_to_end(_settle_completion(metered, reply.headers, content))


async def _settle_completion(metered: Metered, headers: list[tuple[str, str]],
                             content: bytes) -> Response:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    usage = Usage.from_openai(data.get("usage")) if isinstance(data, dict) else None
    if usage is None:
        usage = await metered.counted(_completion_text(data))
    posted = await metered.settle(usage, "completed")
    out = dict(headers)
    if metered.verdict is not None:
        out.update(metered.verdict.headers())
    if posted is not None:
        out["x-paywall-cost"] = format_amount(posted.charged, metered.scale)
        out["x-paywall-balance"] = format_amount(posted.balance_after, metered.scale)
        if isinstance(data, dict):
            if not isinstance(data.get("usage"), dict):
                data["usage"] = {"prompt_tokens": usage.prompt_tokens,
                                 "completion_tokens": usage.completion_tokens,
                                 "total_tokens": usage.prompt_tokens + usage.completion_tokens}
            data["usage"]["cost"] = out["x-paywall-cost"]
            data["usage"]["cost_asset"] = metered.price.asset
            content = orjson.dumps(data)
    out.pop("content-length", None)
    return Response(content, status_code=200, headers=out)


async def _settle_stream(metered: Metered, meter: Meter, outcome: Outcome) -> None:
    if meter.usage is not None:
        await metered.settle(meter.usage, "completed" if meter.done else outcome.value)
    elif meter.delivered:
        usage = await metered.counted("".join(meter.text))
        await metered.settle(usage, outcome.value)
    else:
        await metered.settle(None, outcome.value)


def _completion_text(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    parts = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            if isinstance(message.get("content"), str):
                parts.append(message["content"])
            if message.get("tool_calls"):
                parts.append(orjson.dumps(message["tool_calls"]).decode())
    return "".join(parts)


def _paywall_reply(services: Services, paywall_id: str, paywall: PaywallSettings, user: str,
                   model: str, request_id: str, action: Action, state: UserState, scale: int,
                   asset: str, stream: bool, include_usage: bool, version: int) -> Response:
    ttl = paywall.link_ttl_seconds
    name = paywall.name or paywall_id
    if action is Action.CONNECT:
        url = services.signer.link(paywall_id, user, "connect", ttl, version=version)
        text = paywall.connect_message.format(name=name, url=url)
        info: dict[str, Any] = {"connected": False, "connect_link": url}
    elif action is Action.SPEND_CAP:
        cap = state.cap
        assert cap is not None
        label = cap.name.replace("_", " ")
        resets = cap.resets.isoformat().replace("+00:00", "Z")
        text = paywall.spend_cap_message.format(name=name, cap=label, resets=resets)
        info = {"connected": True, "spend_cap": cap.name, "cap": format_amount(cap.cap, scale),
                "spent": format_amount(cap.used, scale), "asset": asset, "resets_at": resets}
    else:
        url = services.signer.link(paywall_id, user, "topup", ttl)
        text = paywall.topup_message.format(name=name, url=url)
        info = {"connected": True, "balance": format_amount(state.available, scale),
                "asset": asset, "topup_link": url}
    body, media = paywall_reply(request_id=request_id, model=model, text=text, paywall=info,
                                stream=stream, include_usage=include_usage)
    return Response(body, media_type=media, headers={"x-paywall-action": action.value})
