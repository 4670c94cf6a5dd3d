"""Embeddings (``POST /v1/embeddings``), as an adapter of the metered lifecycle
(:mod:`proxy.lifecycle`).

    client ─▶ key ─▶ parse + user ─▶ count the input ─▶ [lifecycle: limits, hold, decide]
           ├─ connect / spend_cap / top_up ─▶ 402, the link in the message, nothing charged
           └─ forward ─▶ provider ─▶ the whole answer ─▶ [lifecycle: post the cost]

An embedding is priced by its input tokens alone (``input_per_million``, and
``per_request``); nothing is output. The input comes in OpenAI's four forms
(:func:`parse_input`): strings are counted with the model's tokenizer, token arrays by
their length. The hold is that count with a margin, since the provider's tokenizer may
not be this one.

The provider's ``usage.prompt_tokens`` is what is charged; a usage that is missing,
refused, or says a non-empty input cost nothing is replaced by the count made here. An
upstream error voids the hold. A client that leaves before the answer is in is charged
the input all the same, as chat charges the prompt: the provider has already been
asked to do the work, and embeddings have no output to stop early.

A blocked request is answered 402 (OpenAI's ``insufficient_quota`` type, codes
``connect_required``, ``insufficient_balance``, ``spend_cap``) with the connect or top-up
link in the message and chat's ``paywall`` object beside the error: an embedding has no
assistant message to carry it, and a vector store must not take a notice for a vector.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import guard, lifecycle
from proxy.decide import Action, Decision, UserState
from proxy.errors import InvalidRequest, PaymentRequired
from proxy.identity import USER_HEADER, resolve_user
from proxy.ledger import Posted
from proxy.lifecycle import Charge, Plan
from proxy.limits import Verdict
from proxy.metered import Metered, model_of
from proxy.metering import public_names
from proxy.observe import record_of
from proxy.pricing import Usage, worst_case
from proxy.providers import Call
from proxy.relay import Framer, Outcome, StreamRelay
from proxy.services import Services, authenticate, read_json
from proxy.tokens import LARGE_TEXT, Tokenizer, data_tokens
from proxy.upstream import Reply

MAX_INPUTS = 2048  # as OpenAI: inputs in one request
MAX_TOKEN_ID = 2**31 - 1  # token ids are 32-bit; the provider checks its own vocabulary
ENCODING_FORMATS = ("float", "base64")
# What the token limits are told before the provider counts: this tokenizer's count,
# with a margin.
_MARGIN_PERCENT = 5
_MARGIN_TOKENS = 8
# The special tokens a provider may add around each input (BOS/EOS, [CLS]/[SEP]).
SPECIAL_TOKENS = 8
_CODES = {Action.CONNECT: "connect_required", Action.TOP_UP: "insufficient_balance",
          Action.SPEND_CAP: "spend_cap"}


@dataclass(frozen=True, slots=True)
class Inputs:
    """An embeddings request's input, taken apart: the strings to count, and the tokens
    given as ids (counted by length)."""

    texts: tuple[str, ...]
    token_ids: int
    count: int  # how many inputs (embeddings the answer holds)

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="input")


def _tokens(value: list[Any], where: str) -> int:
    """The length of a token array; raises unless it is a non-empty list of token ids."""
    if not value:
        raise _bad(f"{where} is an empty token array.")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID:
            raise _bad(f"{where} must hold token ids: integers from 0 to {MAX_TOKEN_ID}.")
    return len(value)


def parse_input(value: Any) -> Inputs:
    """``input`` in one of OpenAI's four forms — a string, an array of strings, an array
    of token ids, an array of token arrays — or InvalidRequest (param ``input``): empty
    strings and arrays, mixed or other types, more than :data:`MAX_INPUTS` inputs, token
    ids that are not integers from 0 to :data:`MAX_TOKEN_ID`. Pure."""
    if isinstance(value, str):
        if not value:
            raise _bad("'input' cannot be an empty string.")
        return Inputs((value,), 0, 1)
    if not isinstance(value, list):
        raise _bad("'input' must be a string, an array of strings, an array of token ids"
                   " or an array of token arrays.")
    if not value:
        raise _bad("'input' cannot be an empty array.")
    first = value[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return Inputs((), _tokens(value, "'input'"), 1)
    if len(value) > MAX_INPUTS:
        raise _bad(f"'input' may hold at most {MAX_INPUTS} inputs, not {len(value)}.")
    if isinstance(first, str):
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise _bad(f"'input[{i}]' must be a string, like the first input.")
            if not text:
                raise _bad(f"'input[{i}]' cannot be an empty string.")
        return Inputs(tuple(value), 0, len(value))
    if isinstance(first, list):
        ids = 0
        for i, tokens in enumerate(value):
            if not isinstance(tokens, list):
                raise _bad(f"'input[{i}]' must be a token array, like the first input.")
            ids += _tokens(tokens, f"'input[{i}]'")
        return Inputs((), ids, len(value))
    raise _bad("'input' must be a string, an array of strings, an array of token ids"
               " or an array of token arrays.")


async def count_input(tokenizer: Tokenizer, inputs: Inputs, model: str, encoding: str
                      ) -> int:
    """The input's tokens as counted here: each string on its own (as a provider embeds
    each apart), token arrays by their length. Much text is counted off the loop."""
    def count() -> int:
        return sum(tokenizer.count(t, model, encoding) for t in inputs.texts)

    if inputs.chars >= LARGE_TEXT:
        return inputs.token_ids + await asyncio.to_thread(count)
    return inputs.token_ids + count()


def estimate(counted: int) -> int:
    """The prompt tokens the token limits count at admission: the count, with a margin."""
    return math.ceil(counted * (100 + _MARGIN_PERCENT) / 100) + _MARGIN_TOKENS


def most_tokens(inputs: Inputs) -> int:
    """The most prompt tokens any provider can bill for ``inputs``, what the hold is
    placed for: a token stands for at least one byte of text
    (:func:`~proxy.tokens.data_tokens`), token ids for themselves, and each input may
    gain :data:`SPECIAL_TOKENS`. A bound whatever the provider's tokenizer, where a
    count with a margin is only a guess; embeddings are cheap, so holding it costs
    little."""
    return (sum(data_tokens(t) for t in inputs.texts) + inputs.token_ids
            + SPECIAL_TOKENS * inputs.count)


def embedding_usage(data: Any) -> Usage | None:
    """The provider's usage of an embeddings answer (``data``, its parsed body) when it
    is charged as it is: ``{prompt_tokens, total_tokens}``, read with
    :meth:`Usage.from_openai <proxy.pricing.Usage.from_openai>`'s rules, completion 0.
    None when there is none, when it is refused, or when it says the input cost nothing
    (the input is never empty): then the input is counted."""
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        return None
    usage = Usage.from_openai({"prompt_tokens": data["usage"].get("prompt_tokens"),
                               "completion_tokens": 0})
    return usage if usage is not None and usage.prompt_tokens else None


def paywall_error(text: str, action: Action, info: dict[str, Any]) -> bytes:
    """The 402 body of a blocked request: OpenAI's error shape, with ``paywall`` beside."""
    return orjson.dumps({"error": {"message": text, "type": PaymentRequired.type,
                                   "param": None, "code": _CODES[action]},
                         "paywall": info})


@dataclass(slots=True)
class EmbeddingsCall(Metered):
    """One embeddings request: its plan, and how its answer is read and priced."""

    rename: Callable[[bytes], bytes] | None  # the public model name into the answer
    error_tail = None  # never relayed

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        told = await self.told(decision, state)
        return Response(paywall_error(told.text, decision.action, told.paywall),
                        status_code=PaymentRequired.status, media_type="application/json",
                        headers={"x-paywall-action": decision.action.value})

    def relays(self, reply: Reply) -> bool:
        return False  # one JSON object, read whole: its usage is at the end

    def framer(self) -> Framer:
        raise AssertionError("an embeddings answer is never relayed")

    def checkpoint(self) -> None:
        return None

    async def settle_relayed(self, framer: Framer, outcome: Outcome, sent: int) -> Charge:
        raise AssertionError("an embeddings answer is never relayed")

    async def settle_whole(self, content: bytes) -> Charge:
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            data = None
        usage = embedding_usage(data)
        self.answered = data, usage is not None
        return self.priced(usage or Usage(self.prompt_tokens, 0), "completed")

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        body = self.costed(content, charge, posted, lambda u: {  # base64 passes as it is
            "prompt_tokens": u.prompt_tokens, "total_tokens": u.prompt_tokens})
        return self.respond(reply, body, posted, verdict, self.rename)


def _options(body: dict[str, Any]) -> None:
    """Refuse an ``encoding_format`` or ``dimensions`` the provider would misread."""
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODING_FORMATS:
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'.",
                             param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)
                             or dims < 1):
        raise InvalidRequest("'dimensions' must be a positive integer.", param="dimensions")


async def embeddings(request: Request) -> Response | StreamRelay:
    services: Services = request.app.state.services
    s = services.settings
    rec = record_of(request.state)
    principal = await authenticate(request, services)
    paywall_id = rec.paywall = principal.paywall_id
    body = await read_json(request, s.server.max_body_bytes)
    user = resolve_user(body, request.headers.get(USER_HEADER), request.path_params.get("user"),
                        route="embeddings")
    rec.user = user

    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    model = model_of(s, name)
    provider_id = model.provider
    if any(s.providers[d.provider].kind not in ("openai", "mock") for d in model.deployments):
        raise InvalidRequest(f"The model '{name}' does not serve embeddings.", param="model",
                             code="model_not_supported")
    upstream_model = model.upstream or name
    rec.model, rec.provider = name, provider_id
    inputs = parse_input(body.get("input"))
    _options(body)
    body["model"] = upstream_model
    paywall = s.paywalls[paywall_id]
    limits = guard.effective(paywall.limits, await services.overrides.get(paywall_id, user))
    price = services.prices[name]
    scale = s.assets[price.asset].scale
    rec.asset, rec.scale = price.asset, scale
    markup_bps = int(paywall.markup_percent * 100)
    counted = await count_input(services.tokenizer, inputs, upstream_model, model.encoding)
    bound = estimate(counted)
    route = services.routes[name]
    hold = worst_case(max(bound, most_tokens(inputs)), 0, route.hold_price(price), markup_bps)
    plan = Plan(paywall_id, paywall, user, limits, price.asset, hold, name,
                frozenset({paywall.asset, price.asset}), tokens=bound, cap_param="input")
    try:
        upstream_body = orjson.dumps(body)
    except orjson.JSONEncodeError:  # orjson nests at most 254 levels deep
        raise InvalidRequest("The request body is nested too deeply.") from None
    call = Call(body=upstream_body, stream=False, request_id=request.state.request_id,
                headers=request.headers, payload=body, path="/embeddings")
    return await lifecycle.run(request, services, rec, EmbeddingsCall(
        plan, services, route, call, price, scale, markup_bps, counted,
        public_names(route.upstreams, name)))
