"""Anthropic's Messages API on the wire: what a request is billed for, what an answer
delivers, and what a blocked request is told. Pure: no I/O.

What a Messages request is billed for (:func:`prompt_of`):

- ``system`` (a string or text blocks) and every message's content (a string or
  blocks): text, a ``tool_use``'s name and JSON input, a ``tool_result``'s content
  (a string or blocks, read the same way), a ``thinking`` block's text, a
  ``search_result``'s source, title and text; and ``tools``, ``tool_choice`` as JSON;
- an image by at most ``image_tokens`` (``models.*.max_image_tokens``), an inline one
  for its size when that is more (as :mod:`proxy.tokens` bounds inline data: one
  token per byte at most); a base64 document (a PDF) and a ``redacted_thinking``
  block's data by their size; a plain-text document by its text;
- the system prompt the provider adds for tools: :data:`TOOL_PROMPT_TOKENS` when the
  request has any, and :data:`DEFINED_TOOL_TOKENS` more for each tool the provider
  defines and the client runs (bash, text editor, computer, memory).

Refused with 400 before any hold, because what they cost cannot be known before the
request is sent: content stored at the provider (an image or document by ``file``
source, a ``container_upload``), a document by URL (its page count is unknown),
server tools (web search, web fetch, code execution, ...: fees per use and fetched
content), ``mcp_servers``, and any block or tool type this module does not know.

The :class:`StreamMeter` watches an Anthropic SSE stream (``event: X`` / ``data:
{...}``) the way :class:`proxy.metering.Meter` watches a chat stream: events pass on
unchanged (but for the public model name), and it keeps the usage — ``message_start``'s
``message.usage``, each ``message_delta``'s ``usage`` laid over it (:func:`laid_over`:
its counts are cumulative, so none goes down) — and the output delivered: text, tool
inputs (``partial_json``), thinking, tool names, and the raw data of any event that is
not a JSON object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy.errors import InvalidRequest, ProxyError
from proxy.metering import Meter
from proxy.pricing import Usage
from proxy.sse import Event, encode
from proxy.tokens import Prompt, data_tokens, document_tokens

# The system prompt Anthropic adds when a request has tools (at most 346 tokens for
# current models, per its tool-use pricing), with room to spare.
TOOL_PROMPT_TOKENS = 600
# What one provider-defined, client-run tool adds to the prompt besides its JSON (the
# largest, the text editor, adds 700 tokens).
DEFINED_TOOL_TOKENS = 1_000
DEFINED_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")

_DELTA_KEYS = {"text_delta": "text", "input_json_delta": "partial_json",
               "thinking_delta": "thinking"}


def _unbounded(what: str, param: str, hint: str = "") -> InvalidRequest:
    return InvalidRequest(f"{what} cannot be priced before the request is sent, so it cannot"
                          f" be paid for in advance{hint}.", param=param)


def _json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _source(block: dict[str, Any], where: str, image_tokens: int, text: list[str]) -> int:
    """An image's or document's source: what it adds to ``text``, and its media bound."""
    kind = block.get("type")
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest(f"An {kind} block needs a 'source' object.", param=f"{where}.source")
    how = source.get("type")
    if how == "file":
        raise _unbounded(f"An {kind} sent by file_id", f"{where}.source",
                         "; send it as base64 instead")
    if kind == "image":
        if how == "url":
            return image_tokens
        if how == "base64" and isinstance(source.get("data"), str):
            return max(image_tokens, data_tokens(source["data"]))
    elif how == "base64" and isinstance(source.get("data"), str):
        return document_tokens(source["data"], image_tokens)
    elif how == "text" and isinstance(source.get("data"), str):
        text.append(source["data"])
        return 0
    elif how == "content":
        content = source.get("content")
        if isinstance(content, str):
            text.append(content)
            return 0
        if isinstance(content, list):
            return _blocks(content, f"{where}.source.content", image_tokens, text)
    elif how == "url":
        raise _unbounded("A document sent by URL", f"{where}.source",
                         "; send it as base64 instead")
    raise InvalidRequest(f"An {kind} block's source of type {how!r} is not supported.",
                         param=f"{where}.source.type")


def _block(block: Any, where: str, image_tokens: int, text: list[str]) -> int:
    """Add a content block's billable text to ``text``; return its media bound."""
    if isinstance(block, str):
        text.append(block)
        return 0
    if not isinstance(block, dict):
        raise InvalidRequest("A content block must be an object.", param=where)
    kind = block.get("type")
    if kind == "text":
        if isinstance(block.get("text"), str):
            text.append(block["text"])
        return 0
    if kind in ("image", "document"):
        for key in ("title", "context"):
            if isinstance(block.get(key), str):
                text.append(block[key])
        return _source(block, where, image_tokens, text)
    if kind == "tool_use":
        for key in ("id", "name"):
            if isinstance(block.get(key), str):
                text.append(block[key])
        text.append(_json(block.get("input")))
        return 0
    if kind == "tool_result":
        if isinstance(block.get("tool_use_id"), str):
            text.append(block["tool_use_id"])
        content = block.get("content")
        if isinstance(content, list):
            return _blocks(content, f"{where}.content", image_tokens, text)
        if content is not None:
            text.append(_json(content))
        return 0
    if kind == "thinking":
        if isinstance(block.get("thinking"), str):
            text.append(block["thinking"])
        return 0
    if kind == "redacted_thinking":
        data = block.get("data")
        return data_tokens(data) if isinstance(data, str) else 0
    if kind == "search_result":
        for key in ("source", "title"):
            if isinstance(block.get(key), str):
                text.append(block[key])
        content = block.get("content")
        return _blocks(content, f"{where}.content", image_tokens, text) if isinstance(
            content, list) else 0
    if kind == "container_upload":
        raise _unbounded("A container_upload (a file stored at the provider)", where)
    raise InvalidRequest(
        f"Content blocks of type {kind!r} are not supported: what they cost cannot be"
        " bounded before the request is sent.", param=f"{where}.type")


def _blocks(blocks: list[Any], where: str, image_tokens: int, text: list[str]) -> int:
    return sum(_block(b, f"{where}[{j}]", image_tokens, text) for j, b in enumerate(blocks))


def _tools(tools: Any, text: list[str]) -> int:
    """Add the tools' JSON to ``text``; return what the provider adds for them."""
    if tools is None or tools == []:
        return 0
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list.", param="tools")
    media = TOOL_PROMPT_TOKENS
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest("A tool must be an object.", param=f"tools[{i}]")
        kind = tool.get("type")
        if kind is not None and kind != "custom":
            if not isinstance(kind, str) or not kind.startswith(DEFINED_TOOLS):
                raise InvalidRequest(
                    f"The tool type {kind!r} is not supported: server tools (web search,"
                    " web fetch, code execution, ...) cost fees per use that cannot be"
                    " bounded before the request is sent. Run the tool in your app and"
                    " declare it as a client tool instead.", param=f"tools[{i}].type")
            media += DEFINED_TOOL_TOKENS
        text.append(_json(tool))
    return media


def prompt_of(body: dict[str, Any], image_tokens: int) -> Prompt:
    """What a Messages request ``body`` is billed for (see the module doc); raises
    InvalidRequest, with the ``param`` at fault, for a part that cannot be bounded, and
    for a body nested deeper than it can be read (tool results inside tool results) or
    written back (orjson nests at most 254 levels deep: a tool's input, a schema)."""
    try:
        return _prompt_of(body, image_tokens)
    except (RecursionError, orjson.JSONEncodeError):
        raise InvalidRequest("The request body is nested too deeply.") from None


def _prompt_of(body: dict[str, Any], image_tokens: int) -> Prompt:
    text: list[str] = []
    media = 0
    system = body.get("system")
    if isinstance(system, str):
        text.append(system)
    elif isinstance(system, list):
        media += _blocks(system, "system", image_tokens, text)
    elif system is not None:
        raise InvalidRequest("'system' must be a string or a list of text blocks.",
                             param="system")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest("A message must be an object.", param=f"messages[{i}]")
        if isinstance(message.get("role"), str):
            text.append(message["role"])
        content = message.get("content")
        if isinstance(content, list):
            media += _blocks(content, f"messages[{i}].content", image_tokens, text)
        elif isinstance(content, str):
            text.append(content)
        else:
            raise InvalidRequest("A message's content must be a string or a list of blocks.",
                                 param=f"messages[{i}].content")
    media += _tools(body.get("tools"), text)
    if body.get("tool_choice") is not None:
        text.append(_json(body["tool_choice"]))
    return Prompt("\n".join(text), len(messages) + (1 if system else 0), media)


def block_output(block: Any, out: list[str]) -> None:
    """A content block's output strings (a whole answer's, or a ``content_block_start``'s):
    text, thinking, a tool call's name and input, a redacted thinking block's data."""
    if not isinstance(block, dict):
        return
    for key in ("text", "thinking", "name", "data"):
        value = block.get(key)
        if isinstance(value, str) and value:
            out.append(value)
    value = block.get("input")
    if value:  # a stream's tool_use starts with {}; its input follows as partial_json
        out.append(_json(value))


def message_output(data: Any, raw: bytes) -> str:
    """The output of a whole Messages answer, to count when its usage is missing or
    refused: its content blocks' output (:func:`block_output`), or, when the body
    ``raw`` did not parse as a JSON object (``data``), the body's own text."""
    if not isinstance(data, dict):
        return raw.decode("utf-8", "replace")
    out: list[str] = []
    content = data.get("content")
    for block in content if isinstance(content, list) else ():
        block_output(block, out)
    return "".join(out)


def message_usage(data: Any) -> Usage | None:
    """A whole answer's usage when it is charged as it is: None when there is none, when
    it is refused, or when it reports no output for an answer that has output."""
    if not isinstance(data, dict):
        return None
    usage = Usage.from_anthropic(data.get("usage"))
    if usage is not None and not usage.completion_tokens and message_output(data, b""):
        return None
    return usage


class StreamMeter(Meter):
    """An Anthropic stream on its way to the client, metered (see the module doc): the
    chat Meter's framing and usage rules over Anthropic's events. Bytes are passed on
    per complete event, with ``rename`` (the public model name) applied to each."""

    __slots__ = ("_usage",)

    def __init__(self, rename: Callable[[bytes], bytes] | None = None):
        super().__init__(True, None, rename)
        self._usage: dict[str, Any] = {}  # the counts reported so far, laid over each other

    def _read(self, event: Event) -> bytes | None:
        """Meter one event; it is passed on as it came (None)."""
        data = self._object(event)
        if data is None:
            return None
        kind = data.get("type")
        out: list[str] = []
        if kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, dict):
                how = delta.get("type")
                key = _DELTA_KEYS.get(how) if isinstance(how, str) else None
                value = delta.get(key) if key else None
                if isinstance(value, str) and value:
                    out.append(value)
            self._deliver(out)
        elif kind == "content_block_start":
            block_output(data.get("content_block"), out)
            self._deliver(out)
        elif kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                content = message.get("content")
                for block in content if isinstance(content, list) else ():
                    block_output(block, out)
                self._deliver(out)
                self._report(message.get("usage"), fresh=True)
        elif kind == "message_delta":
            self._report(data.get("usage"), fresh=False)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.failed = True
        return None

    def _report(self, usage: Any, fresh: bool) -> None:
        """Lay ``usage`` over what was reported before (message_delta's counts are
        cumulative and may include the input and cache counts as well)."""
        if not isinstance(usage, dict):
            if fresh:
                self._usage, self.reported = {}, None
            return
        self._usage = laid_over({} if fresh else self._usage, usage)
        self.reported = Usage.from_anthropic(self._usage)
        self._stale = False


def laid_over(before: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """A stream's usage so far, ``before``, with a later event's ``usage`` laid over it:
    the counts are cumulative, so each is the larger of the two (a ``message_delta``
    saying ``"input_tokens": 0`` after ``message_start`` said 10 leaves 10); a null
    leaves the count as it was, anything but a count replaces it (to be refused)."""
    out = dict(before)
    for key, value in usage.items():
        if value is None:
            continue
        old = out.get(key)
        out[key] = max(old, value) if _is_count(old) and _is_count(value) else value
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def message_id(request_id: str) -> str:
    return "msg_" + request_id.removeprefix("req_")


def error_event(error: ProxyError) -> bytes:
    """What ends a stream the provider broke off: an ``error`` event, which the Anthropic
    SDKs raise."""
    return b"event: error\ndata: " + error.anthropic_body() + b"\n\n"


def paywall_message(*, request_id: str, model: str, text: str, paywall: dict[str, Any],
                    stream: bool) -> tuple[bytes, str]:
    """A blocked request's answer as an ordinary assistant ``message`` with ``text`` (and
    the machine-readable ``paywall`` object), or for ``stream`` its full event sequence;
    the body and its content type."""
    usage = {"input_tokens": 0, "output_tokens": 0}
    message: dict[str, Any] = {
        "id": message_id(request_id), "type": "message", "role": "assistant",
        "model": model, "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": usage, "paywall": paywall,
    }
    if not stream:
        return orjson.dumps(message), "application/json"
    start = {**message, "content": [], "stop_reason": None}
    events = [
        encode("message_start", {"type": "message_start", "message": start}),
        encode("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}}),
        encode("content_block_stop", {"type": "content_block_stop", "index": 0}),
        encode("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": 0}}),
        encode("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(events), "text/event-stream"


# Options of a Messages request billed above a model's configured prices, with the
# values that are not (None: the field absent or null).
_PRICED_VALUES: dict[str, tuple[Any, ...]] = {
    "speed": (None, "standard"),  # fast mode bills a multiple of the prices
    "inference_geo": (None, "global"),  # pinning a region bills a premium
    "context_management": (None,),  # compaction is a model pass whose usage is apart
    "service_tier": (None, "auto", "standard_only"),
}
_CACHE_TTLS = (None, "5m")  # longer cache writes bill more than cache_write_per_million


def check_priced(body: dict[str, Any]) -> None:
    """Refuse (400) a Messages request that asks for what Anthropic bills above the
    model's configured prices: fast mode, a pinned region, compaction, a priority
    tier, or a cache write kept longer than five minutes (billed at twice the input
    price, where ``cache_write_per_million`` prices the five-minute one)."""
    for key, priced in _PRICED_VALUES.items():
        value = body.get(key)
        if not any(value == p for p in priced):
            raise InvalidRequest(f"'{key}' {value!r} is billed above this model's prices,"
                                 " so it cannot be paid for here.", param=key)
    # Every cache_control, wherever it stands (the request's own for automatic caching,
    # system, messages, tools, nested results), walked without recursion: the body may
    # be deep.
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            cache = value.get("cache_control")
            if isinstance(cache, dict) and cache.get("ttl") not in _CACHE_TTLS:
                raise InvalidRequest(
                    f"A cache_control ttl of {cache.get('ttl')!r} is billed above this"
                    " model's cache-write price; use the default five minutes.",
                    param=f"{where}.cache_control.ttl".lstrip("."))
            stack.extend((v, f"{where}.{k}".lstrip(".")) for k, v in value.items()
                         if k != "cache_control")
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
