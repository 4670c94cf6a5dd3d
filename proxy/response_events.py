"""The Responses API's answers, read for billing and written for a blocked request. Pure.

A Responses stream is a sequence of typed SSE events (``event: response.output_text.delta``
with ``data: {"type": ..., "sequence_number": ..., ...}``). :class:`ResponseMeter`
frames it like the chat :class:`~proxy.metering.Meter` does (each complete event passed
on as it came, the public model name put in) and keeps what billing needs:

- delivered output, each text once however many events show it: the ``delta`` of every
  ``*.delta`` event (output text, refusals, function-call arguments, reasoning text and
  summaries, custom tool input, audio...; the strings of a delta that is an object), and
  what the events that show a text whole add to what was shown before at the same place
  (output index, part index, member): a text's ``.done`` event, a part's ``.added`` and
  ``.done`` events, an output item's (a function call's name is in no delta), and the
  terminal response's ``output``. Each place keeps the text shown there; a whole text
  adds what it has past their common start (nothing when it is the same text or a
  shorter view of it). Text an event shows with no place it can be told by (no
  ``output_index``) is counted whole, as is the raw data of any event that is not a
  JSON object;
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
from proxy.sse import Event, encode

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Members of an output item that are bookkeeping, not output a client is shown.
# (Encrypted reasoning stands for reasoning tokens the provider reports; its bytes
# are no measure of them.)
_PLUMBING = frozenset({"id", "type", "status", "call_id", "item_id", "role", "phase",
                       "encrypted_content", "logprobs", "annotations"})


# Where a text event's text lies in its output item: the event's member that indexes a
# list of the item, that list's key, and the text's key (also the member of the `.done`
# event that holds the whole text). A delta of another kind has no known place: it is
# counted as it comes, beside whatever the item's events show.
_TEXTS: dict[str, tuple[str | None, str | None, str]] = {
    "response.output_text": ("content_index", "content", "text"),
    "response.refusal": ("content_index", "content", "refusal"),
    "response.reasoning_text": ("content_index", "content", "text"),
    "response.reasoning_summary_text": ("summary_index", "summary", "text"),
    "response.function_call_arguments": (None, None, "arguments"),
    "response.custom_tool_call_input": (None, None, "input"),
    "response.mcp_call_arguments": (None, None, "arguments"),
    "response.code_interpreter_call_code": (None, None, "code"),
}
# Events that show one part of an item whole: the member that indexes it, and its list.
_PARTS = {
    "response.content_part.added": ("content_index", "content"),
    "response.content_part.done": ("content_index", "content"),
    "response.reasoning_summary_part.added": ("summary_index", "summary"),
    "response.reasoning_summary_part.done": ("summary_index", "summary"),
}
# How deep in an item places are told apart; the strings below are one place's text.
# (Known places are three deep; a bound keeps a provider's deep nesting cheap.)
_DEPTH = 6
Place = tuple[Any, ...]  # (output_index, key or list index, ...)


def _leaves(value: Any, at: Place = (), depth: int = _DEPTH) -> list[tuple[Place, str]]:
    """The non-empty strings of ``value`` but its bookkeeping (:data:`_PLUMBING`), in
    order, each with its place: ``at`` and the keys and list indexes that lead to it,
    no more than ``depth`` of them. Iterative: a provider's JSON may nest deeper than
    Python's stack."""
    out: list[tuple[Place, str]] = []
    stack: list[tuple[Place, Any]] = [(at, value)]
    limit = len(at) + depth
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if v:
                out.append((where, v))
            continue
        if isinstance(v, dict):
            members: list[tuple[Any, Any]] = [(k, x) for k, x in v.items()
                                              if k not in _PLUMBING]
        elif isinstance(v, list):
            members = list(enumerate(v))
        else:
            continue
        deeper = len(where) < limit
        stack.extend(((*where, k) if deeper else where, x) for k, x in reversed(members))
    return out


def item_output(item: Any) -> list[str]:
    """Every non-empty string of one Responses output item, in order, but those under
    the bookkeeping keys of :data:`_PLUMBING` (ids, type, status, role, encrypted
    reasoning, logprobs, annotations...), whatever the item's type: so a message's text
    and refusals, a function call's name and arguments, a reasoning item's summary."""
    return [s for _, s in _leaves(item, depth=0)]


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


def _index(data: dict[str, Any], member: str = "output_index") -> int | None:
    index = data.get(member)
    return index if isinstance(index, int) and not isinstance(index, bool) else None


class ResponseMeter(Meter):
    """The chat Meter's framing and usage rules over a Responses stream (see the module
    doc for what is read). ``rename`` (:func:`proxy.metering.public_names`) is applied to
    every event passed on; ``price`` gives the ``cost`` fields added to the terminal
    event's usage."""

    __slots__ = ("_shown", "sequence")

    def __init__(self, rename: Callable[[bytes], bytes] | None = None,
                 price: Callable[[Usage], dict[str, Any]] | None = None):
        super().__init__(True, price, rename)
        self.sequence = -1  # the last sequence_number the provider sent
        # The text the client has been shown at each place of the output: the deltas
        # delivered there, or the longest whole text an event showed for it.
        self._shown: dict[Place, list[str]] = {}

    def _read(self, event: Event) -> bytes | None:
        data = self._object(event)
        if data is None:
            return None
        seq = data.get("sequence_number")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > self.sequence:
            self.sequence = seq
        kind = data.get("type")
        if not isinstance(kind, str):
            kind = event.event
        name, _, stage = kind.rpartition(".")
        if stage == "delta":
            self._delta(name, data)
        elif stage == "done" and name in _TEXTS:
            self._show(_text_place(name, data), data.get(_TEXTS[name][2]))
        elif kind in _PARTS:
            member, key = _PARTS[kind]
            index, j = _index(data), _index(data, member)
            self._show(None if index is None or j is None else (index, key, j),
                       data.get("part"))
        elif kind in ("response.output_item.added", "response.output_item.done"):
            index = _index(data)
            self._show(None if index is None else (index,), data.get("item"))
        elif kind in TERMINAL:
            return self._terminal(kind, data, event)
        elif kind == "error":
            self.failed = True
        return None

    def _delta(self, name: str, data: dict[str, Any]) -> None:
        delta = data.get("delta")
        if not isinstance(delta, str):  # an object of strings reached the client too
            self._deliver(item_output(delta))
            return
        if not delta:
            return
        self._deliver([delta])
        place = _text_place(name, data) if name in _TEXTS else None
        if place is not None:
            self._shown.setdefault(place, []).append(delta)

    def _show(self, at: Place | None, value: Any) -> None:
        """Count what ``value``, shown whole at ``at``, adds to what each of its places
        has shown: its text past their common start (a text shown again, or a shorter
        view of it, adds nothing). Unplaced (``at`` None), all of it is counted."""
        leaves = _leaves(value, at or ())
        if at is None:
            self._deliver([text for _, text in leaves])
            return
        texts: dict[Place, list[str]] = {}
        for place, text in leaves:  # the strings past _DEPTH share their place
            texts.setdefault(place, []).append(text)
        for place, parts in texts.items():
            text = parts[0] if len(parts) == 1 else "".join(parts)
            pieces = self._shown.get(place)
            known = pieces[0] if pieces and len(pieces) == 1 else "".join(pieces or ())
            if known.startswith(text):
                self._shown[place] = [known]
                continue
            common = _common(known, text)
            self._shown[place] = [text]
            self._deliver([text[common:]])

    def _terminal(self, kind: str, data: dict[str, Any], event: Event) -> bytes | None:
        self.done = True
        if kind == "response.failed":
            self.failed = True
        response = data.get("response")
        if not isinstance(response, dict):
            return None
        items = response.get("output")
        for i, item in enumerate(items if isinstance(items, list) else ()):
            self._show((i,), item)
        if response.get("usage") is None:
            return None
        usage = self.reported = Usage.from_responses(response["usage"])
        self._stale = False  # the terminal usage covers the whole response
        if usage is None or self.price is None or not isinstance(response["usage"], dict):
            return None
        response["usage"].update(self.price(usage))
        return encode(event.event if event.event != "message" else kind, data)


def _common(a: str, b: str) -> int:
    """The length of the longest start ``a`` and ``b`` share."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # halving: each comparison runs at C speed on long texts
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _text_place(name: str, data: dict[str, Any]) -> Place | None:
    """Where the text of a text event (``name`` in :data:`_TEXTS`) lies; None when the
    event does not say."""
    member, key, text = _TEXTS[name]
    index = _index(data)
    if index is None:
        return None
    if member is None:
        return (index, text)
    j = _index(data, member)
    return None if j is None else (index, key, j, text)


def error_event(code: str | None, message: str, param: str | None, sequence: int) -> bytes:
    """The Responses API's ``error`` event, numbered ``sequence`` (the one after the
    provider's last: :attr:`ResponseMeter.sequence` + 1)."""
    return encode("error", {"type": "error", "code": code, "message": message,
                            "param": param, "sequence_number": sequence})


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
    body = b"".join(encode(kind, {"type": kind, "sequence_number": n, **data})
                    for n, (kind, data) in enumerate(events))
    return body, "text/event-stream"
