"""The OpenAI Responses API (``POST /v1/responses``), as an adapter of the metered lifecycle.

    client ─▶ key ─▶ parse + user ─▶ refuse what cannot be priced ─▶ estimate
           ─▶ [lifecycle: limits, hold, decide] ─┬─ blocked ─▶ a ``response`` saying so
                                                 └─ forward ─▶ provider ``/responses``
           ─▶ relay (:class:`~proxy.response_events.ResponseMeter`) ─▶ [lifecycle: settle]

A hold must bound what the provider bills before it is asked, so a request is refused
(400) when part of its cost is out of the proxy's sight: state the provider keeps
(``previous_response_id``, ``conversation``, a stored ``prompt``, ``item_reference``
items, files and images by ``file_id``, files by ``file_url``), hosted tools, which
bill per call on top of tokens (web search, file search, code interpreter, computer
use, image generation, MCP), and ``background`` responses, which are answered before
they are metered. ``store`` is passed on as sent: a stored response costs nothing more
here, but only a later request that refers to it could use it, and that is refused.

Without ``max_output_tokens`` the paywall's cap is sent upstream in it, so the hold
bounds the answer. The provider's usage is authoritative when it covers the output;
otherwise the delivered output is counted here, as for chat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import guard, lifecycle
from proxy.decide import Decision, UserState
from proxy.errors import InvalidRequest, ProxyError
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
from proxy.response_events import (
    ResponseMeter,
    blocked_reply,
    error_event,
    response_text,
    response_usage,
    usage_object,
)
from proxy.services import Services, authenticate, read_json
from proxy.tokens import IMAGE_TOKENS, Prompt, data_tokens, document_tokens, strings
from proxy.upstream import Reply

TOOLS = frozenset({"function", "custom"})  # priced by their tokens alone
# Input items whose every string is prompt. (item_reference is refused: what it names is
# stored at the provider.)
ITEMS = frozenset({
    "message", "function_call", "function_call_output", "custom_tool_call",
    "custom_tool_call_output", "reasoning", "compaction", "web_search_call",
    "file_search_call", "computer_call", "computer_call_output", "image_generation_call",
    "code_interpreter_call", "local_shell_call", "local_shell_call_output", "shell_call",
    "shell_call_output", "apply_patch_call", "apply_patch_call_output", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "mcp_call"})
# A message's content parts: text ones, and the media ones _media() bounds.
PARTS = frozenset({"input_text", "output_text", "refusal", "summary_text", "reasoning_text",
                   "input_image", "input_file", "input_audio"})
_STATE = ("the provider keeps what it refers to, which the proxy cannot price before the"
          " request is sent; send the whole conversation in 'input' instead.")


# --- what a request is billed for (pure) ---------------------------------------------


def check_request(body: dict[str, Any]) -> None:
    """Refuse (InvalidRequest, with the ``param`` at fault) a Responses request whose
    cost cannot be bounded before it is sent; see the module doc."""
    if body.get("background"):
        raise InvalidRequest("'background' responses are not supported: the proxy meters"
                             " the answer as it is delivered.", param="background")
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise InvalidRequest(f"'{key}' is not supported: " + _STATE, param=key)
    if body.get("prompt") is not None:
        raise InvalidRequest("A stored 'prompt' is not supported: its content is kept at the"
                             " provider and cannot be priced before the request is sent;"
                             " send it as 'instructions' and 'input'.", param="prompt")
    guard.priced_options(body, {"context_management": "compaction is a model pass of its"
                                                      " own, which the usage does not show"})
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list.", param="tools")
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in TOOLS:
            raise InvalidRequest(
                f"Tools of type {kind!r} are not supported: a hosted tool is billed per call"
                " on top of tokens, which cannot be bounded before the request is sent."
                " Use 'function' or 'custom' tools.", param=f"tools[{i}].type")


def prompt_parts(body: dict[str, Any], image_tokens: int = IMAGE_TOKENS) -> Prompt:
    """What a Responses request ``body`` is billed for as prompt: every string of its
    ``instructions`` and ``input`` items (media bounded as :mod:`proxy.tokens` does for
    chat), and its ``tools``, ``text`` (the output format's schema) and ``tool_choice``.
    Raises InvalidRequest, with the ``param`` at fault, for a part that cannot be bounded,
    and for a body nested deeper than it can be walked or written back (orjson nests at
    most 254 levels deep)."""
    try:
        return _prompt_parts(body, image_tokens)
    except (RecursionError, orjson.JSONEncodeError):
        raise InvalidRequest("The request body is nested too deeply.") from None


def _prompt_parts(body: dict[str, Any], image_tokens: int) -> Prompt:
    text: list[str] = []
    media = 0
    items = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        text.append(instructions)
        items += 1
    elif instructions is not None:
        raise InvalidRequest("'instructions' must be a string.", param="instructions")
    given = body.get("input")
    if isinstance(given, str):
        text.append(given)
        items += 1
    elif isinstance(given, list):
        for i, item in enumerate(given):
            media += _item(item, f"input[{i}]", image_tokens, text)
        items += len(given)
    elif given is not None:
        raise InvalidRequest("'input' must be a string or a list of items.", param="input")
    for key in ("tools", "text", "tool_choice"):
        value = body.get(key)
        if value:
            text.append(value if isinstance(value, str) else orjson.dumps(value).decode())
    return Prompt("\n".join(text), items, media)


def _item(item: Any, where: str, image_tokens: int, text: list[str]) -> int:
    """Add an input item's strings to ``text``; return the bound of its media."""
    if not isinstance(item, dict):
        raise InvalidRequest("An input item must be an object.", param=where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "item_reference":
        raise InvalidRequest("An 'item_reference' input item is not supported: " + _STATE,
                             param=f"{where}.type")
    if kind not in ITEMS:
        raise InvalidRequest(
            f"Input items of type {kind!r} are not supported: what they cost cannot be"
            " bounded before the request is sent.", param=f"{where}.type")
    media = 0
    for key, value in item.items():
        if key == "content" and kind == "message" and isinstance(value, list):
            for j, part in enumerate(value):
                media += _part(part, f"{where}.content[{j}]", image_tokens, text)
        else:
            media += _field(key, value, where, image_tokens, text)
    return media


def _part(part: Any, where: str, image_tokens: int, text: list[str]) -> int:
    if not isinstance(part, dict):
        raise InvalidRequest("A content part must be an object.", param=where)
    if part.get("type") not in PARTS:
        raise InvalidRequest(
            f"Content parts of type {part.get('type')!r} are not supported: what they cost"
            " cannot be bounded before the request is sent.", param=f"{where}.type")
    return _walk(part, where, image_tokens, text)


def _walk(value: Any, where: str, image_tokens: int, text: list[str]) -> int:
    """Every string of ``value`` into ``text``, but media (an image, a file, audio,
    encrypted reasoning), whose bound is returned."""
    if isinstance(value, str):
        text.append(value)
        return 0
    if isinstance(value, list):
        return sum(_walk(v, f"{where}[{i}]", image_tokens, text) for i, v in enumerate(value))
    if not isinstance(value, dict):
        return 0
    kind = value.get("type")
    if kind in ("input_image", "computer_screenshot", "input_file"):
        return _media(value, where, image_tokens, text)
    if kind == "input_audio":
        audio = value.get("input_audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        if not isinstance(data, str):
            raise InvalidRequest("An input_audio part carries its audio as base64 'data'.",
                                 param=f"{where}.input_audio.data")
        return data_tokens(data)
    if value.get("file_id") is not None:
        raise InvalidRequest(_BY_ID, param=f"{where}.file_id")
    return sum(_field(key, v, where, image_tokens, text) for key, v in value.items())


def _field(key: str, value: Any, where: str, image_tokens: int, text: list[str]) -> int:
    """One member of an object, as :func:`_walk` reads it."""
    if key == "annotations":  # citations: their file ids name nothing to read
        text.extend(strings(value))
        return 0
    if key == "encrypted_content" and isinstance(value, str):
        return data_tokens(value)  # what it decrypts to is no longer than it is
    return _walk(value, f"{where}.{key}", image_tokens, text)


_BY_ID = ("Content sent by 'file_id' is stored at the provider and cannot be priced before it"
          " is read, so it cannot be paid for in advance; send it inline instead.")


def _media(part: dict[str, Any], where: str, image_tokens: int, text: list[str]) -> int:
    """An image's or a file's bound: an image at most ``image_tokens`` (a ``data:`` URL at
    least its bytes), a file's inline data its bytes."""
    if part.get("file_id") is not None:
        raise InvalidRequest(_BY_ID, param=f"{where}.file_id")
    if part.get("type") == "input_file":
        if part.get("file_url") is not None:
            raise InvalidRequest("A file sent by 'file_url' cannot be priced before it is"
                                 " fetched; send its content as 'file_data' instead.",
                                 param=f"{where}.file_url")
        data = part.get("file_data")
        if not isinstance(data, str):
            raise InvalidRequest("An input_file part carries its content as 'file_data'.",
                                 param=f"{where}.file_data")
        text.extend(v for k, v in part.items()
                    if k not in ("file_data", "type") and isinstance(v, str))
        return document_tokens(data, image_tokens)
    url = part.get("image_url")
    text.extend(v for k, v in part.items() if k not in ("image_url", "type")
                and isinstance(v, str))
    if isinstance(url, str) and url[:5].lower() == "data:":
        return max(image_tokens, data_tokens(url))
    return image_tokens


# --- the adapter ----------------------------------------------------------------------


@dataclass(slots=True)
class ResponsesCall(Streamed):
    """One Responses request: its plan, and how its answer is read and priced."""

    reply_format: str  # how a blocked request is told (_reply_format)

    @property
    def error_tail(self) -> Callable[[ProxyError], bytes]:
        """The Responses API's ``error`` event, numbered after the provider's last."""
        def tail(error: ProxyError) -> bytes:
            meter = self.meter
            seq = meter.sequence + 1 if isinstance(meter, ResponseMeter) else 0
            return error_event(error.code or error.type, error.message, error.param, seq)
        return tail

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        told = await self.told(decision, state)
        body, media = blocked_reply(request_id=self.call.request_id, model=self.model,
                                    text=told.text, paywall=told.paywall,
                                    stream=self.call.stream, reply_format=self.reply_format)
        return Response(body, media_type=media,
                        headers={"x-paywall-action": decision.action.value})

    def framer(self) -> Framer:
        self.meter = ResponseMeter(public_names(self.route.upstreams, self.model),
                                   self.cost_fields)
        return self.meter

    def usage_in(self, data: Any) -> Usage | None:
        return response_usage(data)

    def output_in(self, data: Any, raw: bytes) -> str:
        return response_text(data, raw)

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        body = self.costed(content, charge, posted, usage_object)
        return self.respond(reply, body, posted, verdict,
                            public_names(self.route.upstreams, self.model))


# --- the route ------------------------------------------------------------------------


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):  # "stream": 1 would stream unmetered
        raise InvalidRequest(f"'{key}' must be true or false.", param=key)
    return value


async def create_response(request: Request) -> Response | StreamRelay:
    services: Services = request.app.state.services
    s = services.settings
    rec = record_of(request.state)
    principal = await authenticate(request, services)
    paywall_id = rec.paywall = principal.paywall_id
    body = await read_json(request, s.server.max_body_bytes)
    user = resolve_user(body, request.headers.get(USER_HEADER), request.path_params.get("user"),
                        route="responses")
    rec.user = user
    request_id: str = request.state.request_id

    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    paywall = s.paywalls[paywall_id]
    model = model_of(s, name)
    provider_id = model.provider
    if any(s.providers[d.provider].kind != "openai" for d in model.deployments):
        raise InvalidRequest(f"The model '{name}' is not served through the Responses API;"
                             " use /v1/chat/completions.", param="model",
                             code="model_not_supported")
    upstream_model = model.upstream or name
    rec.model, rec.provider = name, provider_id
    stream = _flag(body, "stream")
    check_request(body)
    limits = guard.effective(paywall.limits, await services.overrides.get(paywall_id, user))
    requested = body.get("max_output_tokens")
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)
                                  or requested < 1):
        raise InvalidRequest("'max_output_tokens' must be a positive integer.",
                             param="max_output_tokens")
    output_cap = guard.output_cap(requested, paywall.max_output_tokens, limits,
                                  "max_output_tokens")
    body["max_output_tokens"] = output_cap
    body["model"] = upstream_model
    price = services.prices[name]
    scale = s.assets[price.asset].scale
    rec.asset, rec.scale = price.asset, scale
    markup_bps = int(paywall.markup_percent * 100)
    try:
        prompt_tokens, estimate, _ = await services.tokenizer.bound(
            prompt_parts(body, model.max_image_tokens), upstream_model, model.encoding,
            model.prompt_margin)
        upstream_body = orjson.dumps(body)
    except orjson.JSONEncodeError:  # orjson nests at most 254 levels deep
        raise InvalidRequest("The request body is nested too deeply.") from None
    # The worst case: every token at its dearest price.
    route = services.routes[name]
    hold = worst_case(estimate, output_cap, route.hold_price(price), markup_bps)
    plan = Plan(paywall_id, paywall, user, limits, price.asset, hold, name,
                frozenset({paywall.asset, price.asset}), tokens=estimate + output_cap,
                cap_param="max_output_tokens")
    call = Call(body=upstream_body, stream=stream, request_id=request_id,
                headers=request.headers, payload=body, path="/responses")
    return await lifecycle.run(request, services, rec, ResponsesCall(
        plan, services, route, call, price, scale, markup_bps,
        prompt_tokens, name, upstream_model, model.encoding, _reply_format(body)))


def _reply_format(body: dict[str, Any]) -> str:
    """How a blocked request's message is carried so the client's parser takes it:
    "refusal" for a ``json_schema`` ``text.format`` (``responses.parse()`` then returns a
    refusal rather than failing on text that is not the schema), "json_object" for JSON
    mode (the message inside a JSON object, which ``json.loads`` takes), else "text"."""
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        return "refusal"
    return "json_object" if kind == "json_object" else "text"
