"""The Responses API's answers, read for billing and written for a blocked request. Pure.

A Responses stream is a sequence of typed SSE events (``event: response.output_text.delta``
with ``data: {"type": ..., "sequence_number": ..., ...}``). :class:`ResponseMeter`
frames it like the chat :class:`~proxy.metering.Meter` does (each complete event passed
on as it came, the public model name put in) and keeps what billing needs:

- delivered output: the ``delta`` string of every ``*.delta`` event (output text,
  refusals, function-call arguments, reasoning text and summaries, custom tool input,
  audio...), the strings of each output item as ``response.output_item.added`` shows it
  (a function call's name is in no delta), of an item whose ``.done`` event came with no
  deltas before it, and of the terminal response's items that no event showed; and the
  raw data of any event that is not a JSON object;
- the provider's usage, from the terminal event (``response.completed``,
  ``response.incomplete``, ``response.failed``; :meth:`Usage.from_responses
  <proxy.pricing.Usage.from_responses>` refuses odd counts), trusted on the chat Meter's
  terms (it must cover all output delivered, and report some when there was any);
- whether the provider ended the stream (``done``), failed it (``failed``: an ``error``
  event or ``response.failed``), and the last ``sequence_number``, which the proxy's own
  ``error`` event for a broken stream follows.

:func:`item_output` is the same reading of output for a whole response object, and
:func:`blocked_reply` the answer to a request that is not forwarded: an ordinary
``response`` object, or the event sequence the SDKs expect for ``stream: true``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.metering import Meter
from proxy.pricing import Usage
from proxy.sse import Event

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Members of an output item that are bookkeeping, not output a client is shown.
# (Encrypted reasoning stands for reasoning tokens the provider reports; its bytes
# are no measure of them.)
_PLUMBING = frozenset({"id", "type", "status", "call_id", "item_id", "role", "phase",
                       "encrypted_content", "logprobs", "annotations"})


def item_output(item: Any) -> list[str]:
    """Every non-empty string of one Responses output item, in order, but those under
    the bookkeeping keys of :data:`_PLUMBING` (ids, type, status, role, encrypted
    reasoning, logprobs, annotations...), whatever the item's type: so a message's text
    and refusals, a function call's name and arguments, a reasoning item's summary."""
    out: list[str] = []
    _strings(item, out)
    return out


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        if value:
            out.append(value)
    elif isinstance(value, dict):
        for key, v in value.items():
            if key not in _PLUMBING:
                _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def response_text(data: Any, raw: bytes) -> str:
    """The output of a whole response object (``data``, parsed from ``raw``), to count when
    its usage is missing or refused; the body's own text when it is not a JSON object."""
    if not isinstance(data, dict):
        return raw.decode("utf-8", "replace")
    items = data.get("output")
    return "".join(s for item in (items if isinstance(items, list) else ())
                   for s in item_output(item))


def response_usage(data: Any) -> Usage | None:
    """The provider's usage of a whole response object, when it is charged as it is: None
    when there is none, when it is refused, or when it reports no output tokens for a
    response that has output (then the output is counted, :func:`response_text`)."""
    if not isinstance(data, dict):
        return None
    usage = Usage.from_responses(data.get("usage"))
    if usage is not None and not usage.completion_tokens and response_text(data, b""):
        return None
    return usage


def _index(data: dict[str, Any]) -> int | None:
    index = data.get("output_index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


class ResponseMeter(Meter):
    """The chat Meter's framing and usage rules over a Responses stream (see the module
    doc for what is read). ``rename`` (:func:`proxy.metering.public_names`) is applied to
    every event passed on; ``price`` gives the ``cost`` fields added to the terminal
    event's usage."""

    __slots__ = ("_added", "_deltas", "_seen", "failed", "sequence")

    def __init__(self, rename: Callable[[bytes], bytes] | None = None,
                 price: Callable[[Usage], dict[str, Any]] | None = None):
        super().__init__(True, price, rename)
        self.failed = False
        self.sequence = -1  # the last sequence_number the provider sent
        self._deltas: set[int] = set()  # output indexes some delta was delivered for
        self._added: dict[int, list[str]] = {}  # what each output_item.added delivered
        self._seen: set[int] = set()  # output indexes some item event showed

    def _read(self, event: Event) -> bytes | None:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):  # garbage reaches the client too
            self._deliver([event.data] if event.data else [])
            return None
        seq = data.get("sequence_number")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > self.sequence:
            self.sequence = seq
        kind = data.get("type")
        if not isinstance(kind, str):
            kind = event.event
        if kind.endswith(".delta"):
            delta = data.get("delta")
            if isinstance(delta, str) and delta:
                self._deliver([delta])
                index = _index(data)
                if index is not None:
                    self._deltas.add(index)
            return None
        if kind == "response.output_item.added":
            self._item_added(data)
        elif kind == "response.output_item.done":
            self._item_done(data)
        elif kind in TERMINAL:
            return self._terminal(kind, data, event)
        elif kind == "error":
            self.failed = True
        return None

    def _item_added(self, data: dict[str, Any]) -> None:
        strings = item_output(data.get("item"))
        index = _index(data)
        if index is not None:
            self._seen.add(index)
            self._added[index] = strings
        self._deliver(strings)

    def _item_done(self, data: dict[str, Any]) -> None:
        index = _index(data)
        if index is not None and index in self._deltas:
            return  # its output came in deltas
        strings = item_output(data.get("item"))
        if index is not None:
            self._seen.add(index)
            for s in self._added.pop(index, ()):  # shown once already, when it was added
                if s in strings:
                    strings.remove(s)
        self._deliver(strings)

    def _terminal(self, kind: str, data: dict[str, Any], event: Event) -> bytes | None:
        self.done = True
        if kind == "response.failed":
            self.failed = True
        response = data.get("response")
        if not isinstance(response, dict):
            return None
        items = response.get("output")
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if i not in self._seen and i not in self._deltas:
                self._deliver(item_output(item))
        if response.get("usage") is None:
            return None
        usage = self.reported = Usage.from_responses(response["usage"])
        self._stale = False  # the terminal usage covers the whole response
        if usage is None or self.price is None or not isinstance(response["usage"], dict):
            return None
        response["usage"].update(self.price(usage))
        return sse(event.event if event.event != "message" else kind, data)


def error_event(code: str | None, message: str, param: str | None, sequence: int) -> bytes:
    """The Responses API's ``error`` event, numbered ``sequence`` (the one after the
    provider's last: :attr:`ResponseMeter.sequence` + 1)."""
    return sse("error", {"type": "error", "code": code, "message": message, "param": param,
                         "sequence_number": sequence})


def sse(kind: str, data: Any) -> bytes:
    """One Responses SSE event."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _usage(prompt: int = 0, completion: int = 0) -> dict[str, Any]:
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def usage_object(usage: Usage) -> dict[str, Any]:
    """``usage`` as a Responses ``usage`` object."""
    out = _usage(usage.prompt_tokens, usage.completion_tokens)
    out["input_tokens_details"]["cached_tokens"] = usage.cached_tokens
    out["input_tokens_details"]["cache_write_tokens"] = usage.cache_write_tokens
    out["output_tokens_details"]["reasoning_tokens"] = usage.reasoning_tokens
    return out


def blocked_reply(*, request_id: str, model: str, text: str, paywall: dict[str, Any],
                  stream: bool, reply_format: str = "text") -> tuple[bytes, str]:
    """The answer to a request that is not forwarded, and its content type: a completed
    ``response`` whose one message says ``text``, usage zeros, the app's ``paywall``
    object beside; or, for ``stream``, the events that build it. ``reply_format`` says
    how ``text`` is carried, as :func:`proxy.replies.paywall_reply` does for chat:
    "text" (an ``output_text`` part), "refusal" (a ``refusal`` part: a structured-output
    parser then has no JSON to choke on) or "json_object" (an ``output_text`` part
    holding a JSON object of ``message`` and ``paywall``: for JSON mode)."""
    rid = request_id.removeprefix("req_")
    created = int(time.time())
    refusal = reply_format == "refusal"
    if reply_format == "json_object":
        text = orjson.dumps({"message": text, "paywall": paywall}).decode()
    field = "refusal" if refusal else "text"
    part: dict[str, Any] = ({"type": "refusal", "refusal": text} if refusal else
                            {"type": "output_text", "text": text, "annotations": []})
    item = {"id": "msg_" + rid, "type": "message", "role": "assistant",
            "status": "completed", "content": [part]}

    def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        return {"id": "resp_" + rid, "object": "response", "created_at": created,
                "status": status, "model": model, "output": output, "usage": usage,
                "error": None, "incomplete_details": None, "instructions": None,
                "metadata": {}, "parallel_tool_calls": True, "temperature": None,
                "tool_choice": "auto", "tools": [], "top_p": None, "paywall": paywall}

    if not stream:
        return orjson.dumps(response("completed", [item], _usage())), "application/json"
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    empty = {**part, field: ""}
    delta = "response.refusal.delta" if refusal else "response.output_text.delta"
    done = "response.refusal.done" if refusal else "response.output_text.done"
    logprobs: dict[str, Any] = {} if refusal else {"logprobs": []}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": response("in_progress", [], None)}),
        ("response.in_progress", {"response": response("in_progress", [], None)}),
        ("response.output_item.added", {"output_index": 0, "item": {
            **item, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {**at, "part": empty}),
        (delta, {**at, "delta": text, **logprobs}),
        (done, {**at, field: text, **logprobs}),
        ("response.content_part.done", {**at, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": response("completed", [item], _usage())}),
    ]
    body = b"".join(sse(kind, {"type": kind, "sequence_number": n, **data})
                    for n, (kind, data) in enumerate(events))
    return body, "text/event-stream"
