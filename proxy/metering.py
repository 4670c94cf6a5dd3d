"""Metering a chat completion on its way through. Pure: bytes in, bytes out.

The :class:`Meter` sees the provider's SSE bytes, passes each complete event on
unchanged (but for the model's public name, :func:`public_names`), and keeps what
billing needs: the provider's usage, the output delivered
so far, whether ``[DONE]`` arrived. Two events are touched, both for billing: the
usage chunk the proxy asked for on the client's behalf is removed again, and the
usage chunk the client asked for gains ``cost``. :func:`completion_text` is the
same reading of output for a completion that is not streamed.

Nothing the provider sends is trusted to be free. Delivered output is every string
a client can be shown: content (a string, or the text and refusal strings of a list
of parts), refusals, reasoning (``reasoning_content``, ``reasoning``), tool-call and
legacy ``function_call`` names and arguments — and the raw data of any event that is
not a JSON object, since it reached the client all the same. The provider's usage
is read from the last chunk that carries one (:meth:`Usage.from_openai
<proxy.pricing.Usage.from_openai>` refuses odd counts); it is taken as it is only
when no output came after it, and only if it reports some output when there was
any. Otherwise the output is counted here, and the provider's report, if any, only
raises the count (:meth:`Meter.with_counted`).

Bytes are passed on per complete event (an event split across network reads is
held until its blank line arrives): a partial event is of no use to a client.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from proxy.pricing import Usage
from proxy.sse import Event, SSEParser

# An event ends where a line's end is followed by an empty line, each ended by CRLF,
# LF or CR (the SSE grammar), mixed or not: "\n\r\n" ends one too. A CR is a line end
# of its own only when no LF follows it.
_LINE_END = rb"(?:\r\n|\n|\r(?!\n))"
_EVENT_END = re.compile(_LINE_END + _LINE_END)
_TEXT_KEYS = ("reasoning_content", "reasoning", "content", "refusal")


class Meter:
    __slots__ = ("_buf", "_parser", "_stale", "client_wants_usage", "done", "failed",
                 "price", "rename", "reported", "text", "usage_is_ours")

    def __init__(self, client_wants_usage: bool,
                 price: Callable[[Usage], dict[str, Any]] | None = None,
                 rename: Callable[[bytes], bytes] | None = None,
                 usage_is_ours: bool = False):
        self._buf = b""
        # Usage on chunks with choices is the proxy's own (a translated stream puts the
        # prompt's on its first chunk): removed too when the client did not ask for it.
        self.usage_is_ours = usage_is_ours
        self.rename = rename  # puts the public model name in each event (public_names)
        self._parser = SSEParser()
        self._stale = False  # output arrived after the last usage-bearing chunk
        self.client_wants_usage = client_wants_usage
        self.price = price
        self.done = False
        self.failed = False  # an error event came: the provider gave up mid-stream
        # The usage of the last chunk that carried one (None: there was none, or the
        # last one was refused), whether or not output came after it.
        self.reported: Usage | None = None
        self.text: list[str] = []

    @property
    def usage(self) -> Usage | None:
        """The provider's usage when it covers all the output delivered, else None (and
        the output is to be counted, see :meth:`with_counted`). It does not when output
        came after it, nor when it reports no output tokens at all for output that was
        delivered (as a provider that puts zeros on every chunk does)."""
        r = self.reported
        if self._stale or (r is not None and not r.completion_tokens and self.text):
            return None
        return r

    @property
    def delivered(self) -> bool:
        """Whether any output reached the client."""
        return bool(self.text)

    def with_counted(self, counted: Usage) -> Usage:
        """What to charge when :attr:`usage` is None: ``counted`` (the usage counted here
        from :attr:`text`), each total raised to the provider's :attr:`reported` one.

        A provider that reported early and then went on, or reported the total up front,
        is charged neither less than it delivered nor twice for it."""
        return with_counted(self.reported, counted)

    def feed(self, chunk: bytes) -> bytes:
        """Take provider bytes; return the bytes to send to the client now."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            block = buf[start:m.end()]
            start = m.end()
            out.append(self._event(block))
        self._buf = buf[start:]
        sent = b"".join(out)
        return self.rename(sent) if self.rename is not None and sent else sent

    def flush(self) -> bytes:
        """What is left when the provider closes: an unterminated last event, metered
        like any other and passed on as it came (unless it is the proxy's usage chunk)."""
        rest, self._buf = self._buf, b""
        if not rest.strip():
            return rest
        out = self._event(rest + b"\n\n")
        sent = rest if out == rest + b"\n\n" else out
        return self.rename(sent) if self.rename is not None and sent else sent

    def _deliver(self, texts: list[str]) -> None:
        if texts:
            self.text.extend(texts)
            self._stale = True

    def _object(self, event: Event) -> dict[str, Any] | None:
        """``event``'s data as a JSON object; None for anything else, whose raw data is
        counted as output delivered (garbage reaches the client too)."""
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return data
        self._deliver([event.data] if event.data else [])
        return None

    def _event(self, block: bytes) -> bytes:
        """Meter every event ``block`` completes; return what to send for it. A block
        almost always holds one event; when odd line endings make it hold several, all
        are metered and the block is passed on as it came."""
        events = self._parser.feed(block)
        sent = [self._read(event) for event in events]
        if len(sent) == 1 and sent[0] is not None:
            return sent[0]
        return block

    def _read(self, event: Event) -> bytes | None:
        """Meter one event; return what to send instead of it, or None to pass it on."""
        if event.data == "[DONE]":
            self.done = True
            return None
        data = self._object(event)
        if data is None:
            return None
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                self._deliver(output(choice.get("delta")))
        if choices is None and data.get("error") is not None:
            self.failed = True
            return None
        if data.get("usage") is None:
            return None
        usage = self.reported = Usage.from_openai(data["usage"])
        self._stale = False  # this chunk's usage covers its own deltas
        if choices:
            if self.usage_is_ours:  # the translation's, for billing: only the last is shown
                if self.client_wants_usage:
                    data["usage"] = None
                else:
                    del data["usage"]
                return b"data: " + orjson.dumps(data) + b"\n\n"
            return None
        if not self.client_wants_usage:
            return b""  # the extra chunk the proxy asked for
        if usage is None or self.price is None:
            return None
        data["usage"].update(self.price(usage))
        return b"data: " + orjson.dumps(data) + b"\n\n"


def with_counted(reported: Usage | None, counted: Usage) -> Usage:
    """What to charge when the output is counted here: ``counted``, each total raised to
    the provider's ``reported`` one, whose cache and reasoning counts keep their own
    prices."""
    if reported is None:
        return counted
    return Usage(max(reported.prompt_tokens, counted.prompt_tokens),
                 max(reported.completion_tokens, counted.completion_tokens),
                 reported.cached_tokens, reported.reasoning_tokens,
                 reported.cache_write_tokens)


def output(message: Any) -> list[str]:
    """The output strings of a chat ``message`` or stream ``delta`` (empty ones left out):
    its content, refusal and reasoning, its audio's transcript and data, and its tool
    calls' (function and custom) and legacy function call's names and arguments. (Runs
    once per stream event: no generators, few lookups.)"""
    out: list[str] = []
    if not isinstance(message, dict):
        return out
    for key in _TEXT_KEYS:
        value = message.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if value:
                out.append(value)
        elif isinstance(value, list):  # content parts: text, refusal
            for part in value:
                if isinstance(part, str):
                    if part:
                        out.append(part)
                elif isinstance(part, dict):
                    for field in ("text", "refusal"):
                        text = part.get(field)
                        if isinstance(text, str) and text:
                            out.append(text)
    audio = message.get("audio")
    if isinstance(audio, dict):  # spoken output: its transcript and its data
        for key in ("transcript", "data"):
            text = audio.get(key)
            if isinstance(text, str) and text:
                out.append(text)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                _function(call.get("function"), out)
                _function(call.get("custom"), out)
    _function(message.get("function_call"), out)
    return out


def _function(fn: Any, out: list[str]) -> None:
    """A function call's (or a custom tool call's) name and arguments (or input)."""
    if isinstance(fn, dict):
        for key in ("name", "arguments", "input"):
            text = fn.get(key)
            if isinstance(text, str) and text:
                out.append(text)


def completion_text(data: Any, raw: bytes) -> str:
    """The output of a completion that is not streamed, to count when its usage is missing
    or refused: what its choices' messages deliver (see :func:`output`), or, when the body
    ``raw`` did not parse as a JSON object (``data``), the body's own text."""
    if not isinstance(data, dict):
        return raw.decode("utf-8", "replace")
    choices = data.get("choices")
    return "".join(text for choice in (choices if isinstance(choices, list) else ())
                   if isinstance(choice, dict) for text in output(choice.get("message")))


def completion_usage(data: Any) -> Usage | None:
    """The provider's usage of a completion that is not streamed (``data``, its parsed
    body), when it is charged as it is: None when there is none, when it is refused, or
    when it reports no output tokens for an answer that has output — then the output is
    counted (:func:`completion_text`)."""
    if not isinstance(data, dict):
        return None
    usage = Usage.from_openai(data.get("usage"))
    if usage is not None and not usage.completion_tokens and completion_text(data, b""):
        return None
    return usage


@functools.lru_cache(maxsize=1024)  # one per configured model: built once, not per request
def public_names(upstream: str | Sequence[str], public: str
                 ) -> Callable[[bytes], bytes] | None:
    """What puts the ``public`` model name in place of the provider's (``upstream``, or
    any of several: a routed model's deployments may name it differently) in an
    answer's JSON bytes, body or stream events alike; None when they are all the same.

    Only a ``"model"`` member whose value is the provider's name is rewritten — as it
    was sent, or with the dated snapshot suffix providers answer an alias with
    (``gpt-4o`` → ``gpt-4o-2024-08-06``, ``claude-sonnet-4-5`` → ``…-20250929``) —
    wherever it stands (a Responses stream repeats it in each ``response`` object). A
    string inside a JSON string has its quotes escaped, so text that merely looks like
    one (``\\"model\\": ...`` in content) is never touched."""
    names = [n for n in ([upstream] if isinstance(upstream, str) else upstream) if n != public]
    if not names:
        return None
    name = b"(?:" + b"|".join(re.escape(orjson.dumps(n)[1:-1]) for n in names) + b")"
    pattern = re.compile(rb'("model"\s*:\s*)"' + name + rb'(?:-\d{4}-\d{2}-\d{2}|-\d{8})?"')
    replacement = b"\\g<1>" + orjson.dumps(public).replace(b"\\", b"\\\\")

    def rename(data: bytes) -> bytes:
        return pattern.sub(replacement, data) if b'"model"' in data else data

    return rename
