"""The ResponseMeter against streams that deliver output outside ``*.delta`` events, as a
table: provider events in, the text counted out. (The framer's ordinary cases are in
tests/test_responses.py.)

Each text reaches the client once however many events show it (deltas, then the
``.done`` event, the finished part, the finished item, the terminal response), and
nothing that reaches it goes uncounted."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.pricing import Usage
from proxy.response_events import ResponseMeter, item_output, response_text
from tests.responses_upstream import USAGE, frame

LONG = "word " * 1_200  # 6,000 characters
ARGS = '{"q": "' + "x" * 1_990 + '"}'
AT = {"item_id": "m", "output_index": 0, "content_index": 0}


def message(text: str, index: int = 0) -> dict[str, Any]:
    return {"id": f"m{index}", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def added(item: dict[str, Any], index: int = 0) -> bytes:
    return frame("response.output_item.added", 1, output_index=index, item=item)


def item_done(item: dict[str, Any], index: int = 0) -> bytes:
    return frame("response.output_item.done", 8, output_index=index, item=item)


def text_delta(text: Any, seq: int = 3, **at: Any) -> bytes:
    return frame("response.output_text.delta", seq, **{**AT, **at}, delta=text, logprobs=[])


def text_done(text: str, **at: Any) -> bytes:
    return frame("response.output_text.done", 6, **{**AT, **at}, text=text, logprobs=[])


def part(kind: str, text: str) -> bytes:
    return frame(kind, 7, **AT, part={"type": "output_text", "text": text, "annotations": []})


def completed(output: list[Any], usage: Any = None) -> bytes:
    return frame("response.completed", 9, response={"output": output, "usage": usage})


EMPTY = {**message(""), "status": "in_progress", "content": []}
CALL = {"id": "fc", "type": "function_call", "call_id": "c", "name": "search",
        "arguments": ""}
WHOLE_CALL = {**CALL, "arguments": ARGS, "status": "completed"}
REASONING = {"id": "rs", "type": "reasoning", "summary": []}
DEEP = {"id": "x", "type": "odd_call",
        "payload": [[[[[[[[{"a": "one", "b": "two"}]]]]]]]]}
SUMMARY_AT = {"item_id": "rs", "output_index": 0, "summary_index": 0}

# (name, provider frames, the text counted, the usage charged as it is)
CASES: list[tuple[str, list[bytes], str, Usage | None]] = [
    ("text only in output_text.done and content_part.done, then the stream breaks",
     [added(EMPTY), part("response.content_part.added", ""), text_done(LONG),
      part("response.content_part.done", LONG)], LONG, None),
    ("an empty item added, the whole item only in the terminal response",
     [added(EMPTY), completed([message(LONG)])], LONG, None),
    ("function-call arguments only in function_call_arguments.done",
     [added(CALL), frame("response.function_call_arguments.done", 3, item_id="fc",
                         output_index=0, arguments=ARGS)], "search" + ARGS, None),
    ("one small delta, the rest only in output_item.done",
     [added(EMPTY), text_delta("word"), item_done(message(LONG))], LONG, None),
    ("deltas, then every event that shows the whole text: counted once",
     [added(EMPTY), part("response.content_part.added", ""), text_delta(LONG[:7]),
      text_delta(LONG[7:], seq=4), text_done(LONG), part("response.content_part.done", LONG),
      item_done(message(LONG)), completed([message(LONG)], USAGE)], LONG,
     Usage(20, 7, cached_tokens=4, reasoning_tokens=2)),
    ("a done text that departs from its deltas: what it shows past their common start",
     [text_delta("word up"), text_done("word down")], "word up" + "down", None),
    ("a shorter view after the deltas adds nothing",
     [text_delta(LONG), part("response.content_part.done", "word")], LONG, None),
    ("a part added with its text already in it",
     [added(EMPTY), part("response.content_part.added", "pre"), text_delta(" and more"),
      text_done("pre and more")], "pre and more", None),
    ("each place has its own text: two parts, two items",
     [text_delta("a", content_index=0), text_delta("b", content_index=1),
      text_delta("c", output_index=1), item_done({**message("a"), "content": [
          {"type": "output_text", "text": "a"}, {"type": "output_text", "text": "b2"}]}),
      completed([message("a"), message("c"), message("d")])], "abc2d", None),
    ("a reasoning summary in its own events, once",
     [added(REASONING),
      frame("response.reasoning_summary_part.added", 2, **SUMMARY_AT,
            part={"type": "summary_text", "text": ""}),
      frame("response.reasoning_summary_text.delta", 3, **SUMMARY_AT, delta="think"),
      frame("response.reasoning_summary_text.done", 4, **SUMMARY_AT, text="thinking"),
      frame("response.reasoning_summary_part.done", 5, **SUMMARY_AT,
            part={"type": "summary_text", "text": "thinking"}),
      item_done({**REASONING, "summary": [{"type": "summary_text", "text": "thinking"}]})],
     "thinking", None),
    ("a refusal only in refusal.done", [frame("response.refusal.done", 4, **AT, refusal=LONG)],
     LONG, None),
    ("custom tool input only in its done event",
     [frame("response.custom_tool_call_input.done", 4, item_id="ct", output_index=0,
            input=ARGS)], ARGS, None),
    ("arguments streamed, then shown whole: once",
     [added(CALL), frame("response.function_call_arguments.delta", 2, item_id="fc",
                         output_index=0, delta=ARGS[:9]),
      frame("response.function_call_arguments.done", 3, item_id="fc", output_index=0,
            arguments=ARGS), item_done(WHOLE_CALL), completed([WHOLE_CALL])],
     "search" + ARGS, None),
    ("a delta that is an object: its strings", [text_delta({"text": "hidden", "n": 1})],
     "hidden", None),
    ("an item of deep strings, shown three times: once",
     [added(DEEP), item_done(DEEP), completed([DEEP])], "onetwo", None),
    ("a done event with no output_index: counted whole",
     [text_delta("word"), frame("response.output_text.done", 5, text="word")], "wordword",
     None),
]


@pytest.mark.parametrize(("frames", "text", "usage"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_output_outside_deltas_is_counted_once(frames: list[bytes], text: str,
                                               usage: Usage | None) -> None:
    meter = ResponseMeter()
    out = b"".join(meter.feed(f) for f in frames) + meter.flush()
    assert out == b"".join(frames)  # passed on unchanged
    assert ("".join(meter.text), meter.usage, meter.delivered) == (text, usage, bool(text))


def test_an_item_nested_deeper_than_the_stack_is_read() -> None:
    """A provider's JSON may nest past Python's recursion limit (orjson parses it, but
    cannot write it back): its strings still count."""
    raw = b'{"id":"x","type":"odd_call","payload":' + b"[" * 990 + b'"deep"' + b"]" * 990 + b"}"
    item = orjson.loads(raw)
    assert item_output(item) == ["deep"]
    assert response_text({"output": [item]}, b"") == "deep"
    meter = ResponseMeter()
    meter.feed(b'event: response.output_item.done\ndata: {"type":"response.output_item.done",'
               b'"sequence_number":1,"output_index":0,"item":' + raw + b"}\n\n")
    assert meter.text == ["deep"]
