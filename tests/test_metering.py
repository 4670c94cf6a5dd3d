"""The Meter as a table: provider bytes in, client bytes and billing facts out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.metering import Meter
from proxy.pricing import Usage


def event(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def delta(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
USAGE_CHUNK = event({"choices": [], "usage": USAGE})
DONE = event(b"[DONE]")
TOOL_DELTA = {"choices": [{"delta": {"tool_calls": [
    {"index": 0, "function": {"name": "f", "arguments": "{}"}}]}}]}


def priced(usage: Usage) -> dict[str, Any]:
    return {"cost": str(usage.prompt_tokens + usage.completion_tokens), "cost_asset": "usd"}


CASES: list[tuple[str, bool, list[bytes], bytes, list[str], Usage | None, bool]] = [
    ("text and done pass unchanged", True, [delta("a"), delta("b"), DONE],
     delta("a") + delta("b") + DONE, ["a", "b"], None, True),
    ("usage chunk the client asked for gains cost", True, [delta("a"), USAGE_CHUNK, DONE],
     delta("a") + event({"choices": [], "usage": {**USAGE, "cost": "5", "cost_asset": "usd"}})
     + DONE, ["a"], Usage(3, 2), True),
    ("usage chunk the proxy asked for is removed", False, [delta("a"), USAGE_CHUNK, DONE],
     delta("a") + DONE, ["a"], Usage(3, 2), True),
    ("null usage on ordinary chunks passes", False,
     [event({"choices": [{"delta": {"content": "x"}}], "usage": None})],
     event({"choices": [{"delta": {"content": "x"}}], "usage": None}), ["x"], None, False),
    ("usage on a chunk with choices is kept", False,
     [event({"choices": [{"delta": {"content": "x"}}], "usage": USAGE})],
     event({"choices": [{"delta": {"content": "x"}}], "usage": USAGE}), ["x"], Usage(3, 2),
     False),
    ("not JSON passes", True, [event(b"{oops"), delta("x")], event(b"{oops") + delta("x"),
     ["x"], None, False),
    ("comments pass", True, [b": keep-alive\n\n", delta("x")], b": keep-alive\n\n" + delta("x"),
     ["x"], None, False),
    ("an event split across reads is sent whole", True, [delta("ab")[:9], delta("ab")[9:]],
     delta("ab"), ["ab"], None, False),
    ("CRLF events", True, [b"data: [DONE]\r\n\r\n"], b"data: [DONE]\r\n\r\n", [], None, True),
    ("tool-call deltas count as delivered", True, [event(TOOL_DELTA)], event(TOOL_DELTA),
     ["f", "{}"], None, False),
    ("refusals count as delivered", True, [event({"choices": [{"delta": {"refusal": "no"}}]})],
     event({"choices": [{"delta": {"refusal": "no"}}]}), ["no"], None, False),
    ("an unterminated last event is metered too", False, [USAGE_CHUNK[:-2]], b"", [],
     Usage(3, 2), False),
]


@pytest.mark.parametrize(("wants", "chunks", "out", "text", "usage", "done"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_meter(wants: bool, chunks: list[bytes], out: bytes, text: list[str],
               usage: Usage | None, done: bool) -> None:
    meter = Meter(wants, priced)
    sent = b"".join(meter.feed(c) for c in chunks) + meter.flush()
    assert sent == out
    assert (meter.text, meter.usage, meter.done) == (text, usage, done)


def test_partial_event_is_held_until_complete_then_flushed() -> None:
    meter = Meter(True)
    assert meter.feed(b"data: {\"choices\"") == b""
    assert meter.flush() == b"data: {\"choices\""
