"""StreamWatch as a table: what it keeps from a chat-completion stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.relay import StreamWatch


def event(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def delta(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

CASES = [
    ("text and done", [delta("a"), delta("b"), event(b"[DONE]")], ["a", "b"], None, True),
    ("usage chunk", [delta("a"), event({"choices": [], "usage": USAGE}), event(b"[DONE]")],
     ["a"], USAGE, True),
    ("null usage is ignored", [event({"choices": [], "usage": None})], [], None, False),
    ("not JSON is skipped", [event(b"{oops"), delta("x")], ["x"], None, False),
    ("tool-call deltas carry no text", [event({"choices": [{"delta": {"tool_calls": []}}]})],
     [], None, False),
    ("split mid-event", [delta("ab")[:9], delta("ab")[9:]], ["ab"], None, False),
]


@pytest.mark.parametrize(("chunks", "text", "usage", "done"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_watch(chunks: list[bytes], text: list[str], usage: Any, done: bool) -> None:
    watch = StreamWatch()
    for chunk in chunks:
        watch.feed(chunk)
    assert (watch.text, watch.usage, watch.done) == (text, usage, done)
