"""The Meter as a table: provider bytes in, client bytes and billing facts out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.metering import Meter, completion_text, completion_usage, output, public_names
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


LATER = {"prompt_tokens": 3, "completion_tokens": 9}
ZEROS = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
NEGATIVE = {"prompt_tokens": 3, "completion_tokens": -2}
REASONING_DELTA = {"choices": [{"delta": {"reasoning_content": "think", "reasoning": "more",
                                          "content": "say"}}]}
FUNCTION_DELTA = {"choices": [{"delta": {"function_call": {"name": "f", "arguments": '{"a"'}}}]}
PARTS_DELTA = {"choices": [{"delta": {"content": [
    {"type": "text", "text": "a"}, "b", {"type": "refusal", "refusal": "no"},
    {"type": "image_url", "image_url": {"url": "x"}}]}}]}
ODD_DELTA = {"choices": [None, {"delta": None}, {"delta": {"content": 5, "tool_calls": {},
                                                           "function_call": "f"}}]}


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
    ("not JSON passes, and is output", True, [event(b"{oops"), delta("x")],
     event(b"{oops") + delta("x"), ["{oops", "x"], None, False),
    ("JSON that is not an object is output", True, [event(b"[1, 2]"), event(b'"hi"')],
     event(b"[1, 2]") + event(b'"hi"'), ["[1, 2]", '"hi"'], None, False),
    ("multi-line garbage is output", False, [b"data: a\ndata: b\n\n"], b"data: a\ndata: b\n\n",
     ["a\nb"], None, False),
    ("garbage after the usage makes it stale", False, [USAGE_CHUNK, event(b"junk"), DONE],
     event(b"junk") + DONE, ["junk"], None, True),
    ("odd line endings: every event of a block is metered", False,
     [b"data: {junk\n\r\n" + delta("x") + DONE], b"data: {junk\n\r\n" + delta("x") + DONE,
     ["{junk", "x"], None, True),
    ("a byte order mark does not hide the first event", True, [b"\xef\xbb\xbf" + delta("x")],
     b"\xef\xbb\xbf" + delta("x"), ["x"], None, False),
    ("an object without choices is not output", True, [event({"error": {"message": "x"}})],
     event({"error": {"message": "x"}}), [], None, False),
    ("empty strings deliver nothing", True,
     [event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})],
     event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), [], None, False),
    ("comments pass", True, [b": keep-alive\n\n", delta("x")], b": keep-alive\n\n" + delta("x"),
     ["x"], None, False),
    ("an event split across reads is sent whole", True, [delta("ab")[:9], delta("ab")[9:]],
     delta("ab"), ["ab"], None, False),
    ("CRLF events", True, [b"data: [DONE]\r\n\r\n"], b"data: [DONE]\r\n\r\n", [], None, True),
    ("tool-call deltas count as delivered", True, [event(TOOL_DELTA)], event(TOOL_DELTA),
     ["f", "{}"], None, False),
    ("refusals count as delivered", True, [event({"choices": [{"delta": {"refusal": "no"}}]})],
     event({"choices": [{"delta": {"refusal": "no"}}]}), ["no"], None, False),
    ("reasoning counts as delivered", True, [event(REASONING_DELTA)], event(REASONING_DELTA),
     ["think", "more", "say"], None, False),
    ("legacy function calls count as delivered", True, [event(FUNCTION_DELTA)],
     event(FUNCTION_DELTA), ["f", '{"a"'], None, False),
    ("content parts count as delivered", True, [event(PARTS_DELTA)], event(PARTS_DELTA),
     ["a", "b", "no"], None, False),
    ("every choice counts", True, [event({"choices": [
        {"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]})],
     event({"choices": [{"index": 0, "delta": {"content": "a"}},
                        {"index": 1, "delta": {"content": "b"}}]}), ["a", "b"], None, False),
    ("odd shapes are skipped", True, [event(ODD_DELTA)], event(ODD_DELTA), [], None, False),
    # Usage: the last chunk that carries one, and only if no output came after it.
    ("usage before the output is stale", False, [USAGE_CHUNK, delta("a"), DONE],
     delta("a") + DONE, ["a"], None, True),
    ("the last usage counts", False,
     [USAGE_CHUNK, delta("a"), event({"choices": [], "usage": LATER}), DONE],
     delta("a") + DONE, ["a"], Usage(3, 9), True),
    ("a usage on the last delta covers it", False,
     [event({"choices": [], "usage": USAGE}), event({"choices": [{"delta": {"content": "x"}}],
                                                     "usage": LATER})],
     event({"choices": [{"delta": {"content": "x"}}], "usage": LATER}), ["x"], Usage(3, 9),
     False),
    ("zero output tokens for delivered output do not cover it", False,
     [event({"choices": [{"delta": {"content": "x"}}], "usage": ZEROS})],
     event({"choices": [{"delta": {"content": "x"}}], "usage": ZEROS}), ["x"], None, False),
    ("zero output tokens for no output stand", False,
     [event({"choices": [], "usage": ZEROS}), DONE], DONE, [], Usage(0, 0), True),
    ("a refused usage is no usage", True,
     [delta("a"), event({"choices": [], "usage": NEGATIVE}), DONE],
     delta("a") + event({"choices": [], "usage": NEGATIVE}) + DONE, ["a"], None, True),
    ("a refused usage the proxy asked for is still removed", False,
     [delta("a"), event({"choices": [], "usage": NEGATIVE}), DONE], delta("a") + DONE, ["a"],
     None, True),
    ("a refused last usage hides an earlier one", False,
     [delta("a"), USAGE_CHUNK, event({"choices": [], "usage": NEGATIVE})], delta("a"), ["a"],
     None, False),
    ("null usage is no usage-bearing chunk", False,
     [delta("a"), USAGE_CHUNK, event({"choices": [], "usage": None})],
     delta("a") + event({"choices": [], "usage": None}), ["a"], Usage(3, 2), False),
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


COUNTED = Usage(4, 500)

CHARGED: list[tuple[str, list[bytes], Usage]] = [
    ("no usage: what was counted", [delta("a")], COUNTED),
    ("usage up front, then the output: the output", [USAGE_CHUNK, delta("a")],
     Usage(4, 500)),
    ("the total up front: not twice", [event({"choices": [], "usage": {
        "prompt_tokens": 9, "completion_tokens": 600,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 100}}}), delta("a")],
     Usage(9, 600, 2, 100)),
    ("a refused usage: what was counted", [event({"choices": [], "usage": NEGATIVE}),
                                           delta("a")], COUNTED),
    ("the prompt's cache split kept (a translated Anthropic stream cut short)",
     [event({"choices": [{"index": 0, "delta": {"role": "assistant"}}], "usage": {
         "prompt_tokens": 30, "completion_tokens": 0,
         "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 15}}}),
      delta("a")],
     Usage(30, 500, cached_tokens=10, cache_write_tokens=15)),
]


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in CHARGED],
                         ids=[c[0] for c in CHARGED])
def test_with_counted(chunks: list[bytes], expected: Usage) -> None:
    meter = Meter(False)
    for c in chunks:
        meter.feed(c)
    assert meter.usage is None
    assert meter.with_counted(COUNTED) == expected


def test_stale_usage_is_still_reported() -> None:
    meter = Meter(True, priced)
    sent = meter.feed(USAGE_CHUNK + delta("a"))
    assert (meter.usage, meter.reported) == (None, Usage(3, 2))
    # The client asked for usage: the chunk is priced on what it says, all that is known.
    assert b'"cost":"5"' in sent


def completion(message: Any) -> dict[str, Any]:
    return {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}


TEXTS: list[tuple[str, Any, bytes, str]] = [
    ("content", completion({"role": "assistant", "content": "hi"}), b"", "hi"),
    ("content parts", completion({"content": [
        {"type": "text", "text": "a"}, {"type": "refusal", "refusal": "b"},
        {"type": "image_url", "image_url": {"url": "u"}}, "c"]}), b"", "abc"),
    ("refusal", completion({"content": None, "refusal": "no"}), b"", "no"),
    ("reasoning", completion({"reasoning_content": "r", "reasoning": "s", "content": "t"}),
     b"", "rst"),
    ("tool calls", completion({"content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "2", "type": "function", "function": {"name": "g", "arguments": "[]"}}]}),
     b"", "f{}g[]"),
    ("legacy function call", completion({"function_call": {"name": "f", "arguments": "x"}}),
     b"", "fx"),
    ("every choice", {"choices": [{"message": {"content": "a"}}, {"message": {"content": "b"}},
                                  None, {"message": "odd"}]}, b"", "ab"),
    ("no choices", {"object": "chat.completion"}, b"{}", ""),
    ("not JSON: the body itself", None, b"<html>oops</html>", "<html>oops</html>"),
    ("JSON but not an object: the body itself", ["a"], b'["a"]', '["a"]'),
    ("bytes that are not UTF-8", None, b"\xff ok", "\ufffd ok"),
]


@pytest.mark.parametrize(("data", "raw", "expected"), [c[1:] for c in TEXTS],
                         ids=[c[0] for c in TEXTS])
def test_completion_text(data: Any, raw: bytes, expected: str) -> None:
    assert completion_text(data, raw) == expected


ANSWER = completion({"content": "hi"})

COMPLETION_USAGE: list[tuple[str, Any, Usage | None]] = [
    ("reported", {**ANSWER, "usage": USAGE}, Usage(3, 2)),
    ("none", ANSWER, None),
    ("refused", {**ANSWER, "usage": NEGATIVE}, None),
    ("no output tokens for output", {**ANSWER, "usage": ZEROS}, None),
    ("no output tokens for no output", {**completion({"content": ""}), "usage": ZEROS},
     Usage(0, 0)),
    ("not an object", [USAGE], None),
    ("not JSON", None, None),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in COMPLETION_USAGE],
                         ids=[c[0] for c in COMPLETION_USAGE])
def test_completion_usage(data: Any, expected: Usage | None) -> None:
    assert completion_usage(data) == expected


@pytest.mark.parametrize(("message", "expected"), [
    ({"content": "hi"}, ["hi"]),
    ({"content": ""}, []),
    # Spoken output: its transcript and its data are delivered.
    ({"audio": {"id": "a1", "transcript": "hello", "data": "UklGRg=="}},
     ["hello", "UklGRg=="]),
    ({"audio": {"transcript": ""}}, []),
    # A custom tool call's name and input, beside function calls.
    ({"tool_calls": [{"type": "custom", "custom": {"name": "sh", "input": "ls -la"}}]},
     ["sh", "ls -la"]),
    ({"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}, ["f", "{}"]),
    ({"function_call": {"name": "g", "arguments": "[1]"}}, ["g", "[1]"]),
    (None, []),
])
def test_output(message: object, expected: list[str]) -> None:
    assert output(message) == expected


@pytest.mark.parametrize(("upstream", "data", "expected"), [
    ("gpt-4o", b'{"model":"gpt-4o"}', b'{"model":"mine"}'),
    ("gpt-4o", b'{"model": "gpt-4o-2024-08-06"}', b'{"model": "mine"}'),
    ("claude-sonnet-4-5", b'{"model":"claude-sonnet-4-5-20250929"}', b'{"model":"mine"}'),
    ("gpt-4o", b'{"model":"gpt-4o-mini"}', b'{"model":"gpt-4o-mini"}'),  # another model
    ("gpt-4o", b'{"model":"gpt-4o-2024"}', b'{"model":"gpt-4o-2024"}'),
    ("gpt-4o", b'{"content":"\\"model\\":\\"gpt-4o\\""}',
     b'{"content":"\\"model\\":\\"gpt-4o\\""}'),  # text that looks like it
    ("a.b", b'{"model":"aXb"}', b'{"model":"aXb"}'),  # the name is not a pattern
])
def test_public_names(upstream: str, data: bytes, expected: bytes) -> None:
    rename = public_names(upstream, "mine")
    assert rename is not None and rename(data) == expected
    assert public_names("same", "same") is None


def test_an_error_event_marks_the_stream_failed() -> None:
    meter = Meter(False)
    meter.feed(delta("a") + event({"error": {"message": "overloaded", "type": "x"}}))
    assert meter.failed and meter.text == ["a"]
    ok = Meter(False)
    ok.feed(delta("a") + b"data: [DONE]\n\n")
    assert not ok.failed and ok.done


@pytest.mark.parametrize(("wants", "shown"), [(True, None), (False, "absent")])
def test_the_translations_early_usage_is_never_shown(wants: bool, shown: object) -> None:
    first = event({"choices": [{"index": 0, "delta": {"role": "assistant"}}],
                   "usage": {"prompt_tokens": 30, "completion_tokens": 0}})
    meter = Meter(wants, usage_is_ours=True)
    sent = orjson.loads(meter.feed(first).removeprefix(b"data: "))
    assert sent.get("usage", "absent") == shown
    assert meter.reported == Usage(30, 0)  # still read, for billing


@pytest.mark.parametrize("ending", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n",
                                    b"\n\r"])
def test_every_blank_line_ends_an_event_at_once(ending: bytes) -> None:
    """Each event is passed on as soon as it is complete, whatever mix of line ends the
    provider uses: "\\n\\r\\n" held the whole stream back until it ended."""
    meter = Meter(False)
    first = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]})
    second = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "b"}}]})
    assert meter.feed(first + ending) == first + ending
    assert meter.feed(second + ending) == second + ending
    assert meter.text == ["a", "b"]


def test_a_crlf_split_across_reads_is_one_line_end() -> None:
    meter = Meter(False)
    event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]})
    sent = meter.feed(event + b"\r") + meter.feed(b"\n\r") + meter.feed(b"\n") + meter.flush()
    assert sent.replace(b"\r", b"").replace(b"\n", b"") == event
    assert meter.text == ["a"]
