"""OpenAI chat ⇄ Anthropic Messages, as tables of inputs and expected outputs."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.errors import InvalidRequest
from proxy.translate import (
    ChunkTranslator,
    check,
    to_completion,
    to_messages,
    to_openai_error,
)
from tests.anthropic_upstream import Plan, event, stream_events


def req(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "messages": messages, "max_completion_tokens": 100, **extra}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


IMG = "data:image/png;base64,iVBORw0KGgo="
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
TOOL = {"type": "function", "function": {"name": "weather", "description": "Weather now",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}

REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("text", req([user("hi")]),
     {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}],
      "max_tokens": 100}),
    ("max_tokens field", {"model": "m", "messages": [user("hi")], "max_tokens": 7},
     {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}),
    ("system and developer hoisted, joined",
     req([{"role": "system", "content": "Be brief."}, user("hi"),
          {"role": "developer", "content": [{"type": "text", "text": "No jokes."}]}]),
     {"model": "claude-x", "system": "Be brief.\n\nNo jokes.",
      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}),
    ("system with cache_control stays blocks",
     req([{"role": "system", "content": [
         {"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}}]},
         user("hi")]),
     {"model": "claude-x",
      "system": [{"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}}],
      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}),
    ("images: data URL and https URL",
     req([user([{"type": "text", "text": "what?"},
                {"type": "image_url", "image_url": {"url": IMG, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}])]),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "what?"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                      "data": "iVBORw0KGgo="}},
         {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]}]}),
    ("consecutive user messages merged",
     req([user("one"), user("two")]),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]}),
    ("tools, tool calls, tool results merged, then text",
     req([user("weather?"),
          {"role": "assistant", "content": "Checking.",
           "tool_calls": [CALL, {**CALL, "id": "call_2",
                                 "function": {"name": "weather", "arguments": ""}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
          {"role": "tool", "tool_call_id": "call_2",
           "content": [{"type": "text", "text": "rain"}]},
          user("and so?")],
         tools=[TOOL], tool_choice="required", parallel_tool_calls=False),
     {"model": "claude-x", "max_tokens": 100,
      "messages": [
          {"role": "user", "content": "weather?"},
          {"role": "assistant", "content": [
              {"type": "text", "text": "Checking."},
              {"type": "tool_use", "id": "call_1", "name": "weather",
               "input": {"city": "Paris"}},
              {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}}]},
          {"role": "user", "content": [
              {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
              {"type": "tool_result", "tool_use_id": "call_2",
               "content": [{"type": "text", "text": "rain"}]},
              {"type": "text", "text": "and so?"}]}],
      "tools": [{"name": "weather", "description": "Weather now",
                 "input_schema": {"type": "object",
                                  "properties": {"city": {"type": "string"}}}}],
      "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}),
    ("assistant with only tool calls; null content",
     req([user("q"), {"role": "assistant", "content": None, "tool_calls": [CALL]}]),
     {"model": "claude-x", "max_tokens": 100, "messages": [
         {"role": "user", "content": "q"},
         {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1",
                                            "name": "weather", "input": {"city": "Paris"}}]}]}),
    ("tool_choice named; tool without parameters",
     req([user("q")], tools=[{"type": "function", "function": {"name": "now"}}],
         tool_choice={"type": "function", "function": {"name": "now"}}),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "tools": [{"name": "now", "input_schema": {"type": "object", "properties": {}}}],
      "tool_choice": {"type": "tool", "name": "now"}}),
    ("tool_choice none, auto; parallel off without a choice",
     req([user("q")], tools=[TOOL], tool_choice="none", parallel_tool_calls=False),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "tools": [{"name": "weather", "description": "Weather now",
                 "input_schema": TOOL["function"]["parameters"]}],
      "tool_choice": {"type": "none"}}),
    ("parallel off alone means auto",
     req([user("q")], tools=[TOOL], parallel_tool_calls=False),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "tools": [{"name": "weather", "description": "Weather now",
                 "input_schema": TOOL["function"]["parameters"]}],
      "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}),
    ("stop, sampling, user, stream; the rest left out",
     req([user("q")], stop="END", temperature=0.2, top_p=0.9, user="u-1", stream=True,
         stream_options={"include_usage": True}, seed=4, presence_penalty=0.1, n=1,
         logprobs=False, response_format={"type": "text"}),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9,
      "metadata": {"user_id": "u-1"}, "stream": True}),
    ("safety_identifier names the user",
     req([user("q")], safety_identifier="u-2"),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "metadata": {"user_id": "u-2"}}),
    ("json_schema: one forced tool",
     req([user("q")], response_format={"type": "json_schema", "json_schema": {
         "name": "city", "description": "A city", "strict": True,
         "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "tools": [{"name": "city", "description": "A city", "input_schema": {
          "type": "object", "properties": {"name": {"type": "string"}}}}],
      "tool_choice": {"type": "tool", "name": "city"}}),
    ("json_object: a forced tool taking any object",
     req([user("q")], response_format={"type": "json_object"}),
     {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}],
      "tools": [{"name": "json_answer", "description": "Give the answer as this tool's input.",
                 "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "tool", "name": "json_answer"}}),
    ("stop list; empty assistant turn dropped",
     req([user("q"), {"role": "assistant", "content": ""}, user("r")], stop=["a", "b"]),
     {"model": "claude-x", "max_tokens": 100, "stop_sequences": ["a", "b"],
      "messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                {"type": "text", "text": "r"}]}]}),
]


@pytest.mark.parametrize(("payload", "expected"), [(p, e) for _, p, e in REQUESTS],
                         ids=[name for name, _, _ in REQUESTS])
def test_request(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    assert to_messages(payload) == expected
    check(payload)


REFUSED: list[tuple[dict[str, Any], str]] = [
    (req([user("q")], n=2), "n"),
    (req([user("q")], logprobs=True), "logprobs"),
    (req([user("q")], top_logprobs=2), "top_logprobs"),
    (req([user("q")], modalities=["text", "audio"]), "modalities"),
    (req([user("q")], audio={"voice": "alloy", "format": "wav"}), "audio"),
    (req([user("q")], response_format={"type": "json_schema", "json_schema": {}}),
     "response_format.json_schema.schema"),
    (req([user("q")], response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array"}}}), "response_format.json_schema.schema"),
    (req([user("q")], response_format={"type": "json_object"}, tools=[TOOL]),
     "response_format"),
    (req([user("q")], response_format={"type": "yaml"}), "response_format"),
    (req([user("q")], prediction={"type": "content", "content": "x"}), "prediction"),
    (req([user("q"), {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "weather", "arguments": "{not json"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (req([user("q"), {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "weather", "arguments": "[1]"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (req([user([{"type": "input_audio", "input_audio": {}}])]), "messages[0].content[0]"),
    (req([user([{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}])]),
     "messages[0].content[0].image_url.url"),
    (req([user([{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}])]),
     "messages[0].content[0].image_url.url"),
    (req([{"role": "function", "name": "f", "content": "x"}]), "messages[0].role"),
    (req([{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    (req([user("q")], tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0]"),
    (req([user("q")], tools=[TOOL], tool_choice="sometimes"), "tool_choice"),
    (req([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": IMG}}]}]),
     "messages[0].content[0]"),
]


@pytest.mark.parametrize(("payload", "param"), REFUSED)
def test_refused(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as got:
        check(payload)
    assert got.value.status == 400 and got.value.param == param


def msg(content: list[dict[str, Any]], stop: str = "end_turn",
        usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": usage or {"input_tokens": 10, "output_tokens": 3}}


def completion(message: dict[str, Any], finish: str, usage: dict[str, Any] | None
               ) -> dict[str, Any]:
    out = {"id": "msg_1", "object": "chat.completion", "created": 42, "model": "claude-x",
           "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None,
                                                **message},
                        "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    return out


def chat_usage(prompt: int, completion: int, cached: int = 0, written: int = 0
               ) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written}}


RESPONSES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("text", msg([{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]),
     completion({"content": "Hello"}, "stop", chat_usage(10, 3))),
    ("tool use", msg([{"type": "text", "text": "Checking."},
                      {"type": "tool_use", "id": "toolu_1", "name": "weather",
                       "input": {"city": "Paris"}}], "tool_use"),
     completion({"content": "Checking.", "tool_calls": [
         {"id": "toolu_1", "type": "function",
          "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
         "tool_calls", chat_usage(10, 3))),
    ("thinking; only a tool call", msg([
        {"type": "thinking", "thinking": "Hmm.", "signature": "s"},
        {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}], "tool_use"),
     completion({"content": None, "reasoning_content": "Hmm.", "tool_calls": [
         {"id": "toolu_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
         "tool_calls", chat_usage(10, 3))),
    ("max_tokens", msg([{"type": "text", "text": "a"}], "max_tokens"),
     completion({"content": "a"}, "length", chat_usage(10, 3))),
    ("stop_sequence", msg([{"type": "text", "text": "a"}], "stop_sequence"),
     completion({"content": "a"}, "stop", chat_usage(10, 3))),
    ("refusal", msg([], "refusal"), completion({"content": None}, "content_filter",
                                               chat_usage(10, 3))),
    ("pause_turn", msg([{"type": "text", "text": "a"}], "pause_turn"),
     completion({"content": "a"}, "stop", chat_usage(10, 3))),
    ("cache read and write", msg([{"type": "text", "text": "a"}], usage={
        "input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 30}),
     completion({"content": "a"}, "stop", chat_usage(135, 2, 100, 30))),
    ("cache counts null", msg([{"type": "text", "text": "a"}], usage={
        "input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": None,
        "cache_creation_input_tokens": None}),
     completion({"content": "a"}, "stop", chat_usage(5, 2))),
    ("odd usage is left out", msg([{"type": "text", "text": "a"}], usage={
        "input_tokens": 5, "output_tokens": "2"}),
     completion({"content": "a"}, "stop", None)),
]


@pytest.mark.parametrize(("answer", "expected"), [(a, e) for _, a, e in RESPONSES],
                         ids=[name for name, _, _ in RESPONSES])
def test_response(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    assert to_completion(answer, 42) == expected


def test_response_through_the_answer_tool() -> None:
    answer = msg([{"type": "tool_use", "id": "toolu_1", "name": "city",
                   "input": {"name": "Paris"}}], "tool_use")
    assert to_completion(answer, 42, "city") == completion(
        {"content": '{"name":"Paris"}'}, "stop", chat_usage(10, 3))
    # A call of another tool is still a tool call.
    assert to_completion(answer, 42, "other")["choices"][0]["finish_reason"] == "tool_calls"  # type: ignore[index]


@pytest.mark.parametrize("answer", [None, [], {"type": "error"}, {"id": "msg_1"}])
def test_response_not_a_message(answer: Any) -> None:
    assert to_completion(answer, 42) is None


def test_odd_content_still_carries_the_usage() -> None:
    """What the provider billed is charged: an answer whose content is a string is its
    text, one whose content is missing or odd has none, and the usage comes across."""
    as_text = {**msg([]), "content": "plain text"}
    assert to_completion(as_text, 42) == completion({"content": "plain text"}, "stop",
                                                    chat_usage(10, 3))
    for odd in ({k: v for k, v in msg([]).items() if k != "content"},
                {**msg([]), "content": {"text": "x"}}):
        assert to_completion(odd, 42) == completion({"content": None}, "stop",
                                                    chat_usage(10, 3))


@pytest.mark.parametrize(("status", "body", "expected"), [
    (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
     {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}),
    (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"},'
          b'"request_id":"req_1"}',
     {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}),
    (502, b"<html>Bad gateway</html>",
     {"message": "The provider answered 502: <html>Bad gateway</html>",
      "type": "upstream_error", "param": None, "code": None}),
])
def test_error(status: int, body: bytes, expected: dict[str, Any]) -> None:
    assert orjson.loads(to_openai_error(status, body)) == {"error": expected}


# ---- streams ------------------------------------------------------------------------

BODY = {"model": "claude-x", "messages": [{"role": "user", "content": "one two three"}]}
TOOLS_PLAN = Plan([("text", ["Let", " me"], {}),
                   ("tool_use", ['{"ci', 'ty": ', '"Paris"}'], {"id": "toolu_a", "name": "a"}),
                   ("tool_use", ['{}'], {"id": "toolu_b", "name": "b"})], "tool_use")


def chunk(delta: dict[str, Any] | None, finish: str | None = None,
          usage: Any = None, with_usage: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "msg_up1", "object": "chat.completion.chunk", "created": 42, "model": "claude-x",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]}
    if with_usage:
        out["usage"] = usage
    return out


def translated(raw: bytes, include_usage: bool, split: int) -> list[Any]:
    """The data of each event the translator emits, fed ``raw`` ``split`` bytes at a time."""
    t = ChunkTranslator(include_usage, 42)
    out = b"".join(t.feed(raw[i:i + split]) for i in range(0, len(raw), split))
    assert out.endswith(b"\n\n") or not out
    events = [e.removeprefix(b"data: ") for e in out.split(b"\n\n") if e]
    return [e.decode() if e == b"[DONE]" else orjson.loads(e) for e in events]


@pytest.mark.parametrize("split", [1, 7, 64, 100_000])
def test_stream_with_tools(split: int) -> None:
    raw = b"".join(stream_events(BODY, TOOLS_PLAN))  # input: 3 words; output: 6 deltas
    assert translated(raw, True, split) == [
        chunk({"role": "assistant", "content": ""}, usage=chat_usage(3, 0)),
        chunk({"content": "Let"}),
        chunk({"content": " me"}),
        chunk({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function",
                               "function": {"name": "a", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "toolu_b", "type": "function",
                               "function": {"name": "b", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
        chunk(None, usage=chat_usage(3, 6)),
        "[DONE]",
    ]


def test_stream_through_the_answer_tool() -> None:
    plan = Plan([("tool_use", ['{"na', 'me": "Paris"}'], {"id": "toolu_a", "name": "city"})],
                "tool_use")
    raw = b"".join(stream_events(BODY, plan))
    t = ChunkTranslator(False, 42, answer="city")
    events = [e.removeprefix(b"data: ") for e in t.feed(raw).split(b"\n\n") if e]
    assert [orjson.loads(e) if e != b"[DONE]" else "[DONE]" for e in events] == [
        chunk({"role": "assistant", "content": ""}, with_usage=False),
        chunk({"content": '{"na'}, with_usage=False),
        chunk({"content": 'me": "Paris"}'}, with_usage=False),
        chunk({}, "stop", with_usage=False),
        "[DONE]",
    ]


def test_stream_thinking_without_usage_asked() -> None:
    plan = Plan([("thinking", ["Hm", "m."], {"signature": "sig"}), ("text", ["Yes"], {})],
                "max_tokens")
    raw = b"".join(stream_events(BODY, plan))
    assert translated(raw, False, 5) == [
        chunk({"role": "assistant", "content": ""}, with_usage=False),
        chunk({"reasoning_content": "Hm"}, with_usage=False),
        chunk({"reasoning_content": "m."}, with_usage=False),
        chunk({"content": "Yes"}, with_usage=False),
        chunk({}, "length", with_usage=False),
        "[DONE]",
    ]


def test_stream_cache_usage_and_cumulative_output() -> None:
    start = {"type": "message_start", "message": {
        "id": "msg_up1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "usage": {"input_tokens": 4, "output_tokens": 1,
                                 "cache_read_input_tokens": 50,
                                 "cache_creation_input_tokens": 20}}}
    raw = b"".join([
        event("message_start", start), event("ping", {"type": "ping"}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "ok"}}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": None},
                                "usage": {"output_tokens": 3}}),
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 9}}),
        event("message_stop", {"type": "message_stop"})])
    assert translated(raw, True, 3) == [
        chunk({"role": "assistant", "content": ""}, usage=chat_usage(74, 0, 50, 20)),
        chunk({"content": "ok"}),
        chunk({}, "stop"),
        chunk(None, usage=chat_usage(74, 9, 50, 20)),
        "[DONE]",
    ]


def test_stream_error_event() -> None:
    raw = b"".join(stream_events(BODY, Plan([("text", ["a"], {})], "end_turn"))[:4]) + event(
        "error", {"type": "error", "error": {"type": "overloaded_error",
                                             "message": "Overloaded"}})
    assert translated(raw, False, 9)[-1] == {"error": {
        "message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}


def test_stream_ignores_garbage_and_unknown_events() -> None:
    t = ChunkTranslator(False, 42)
    assert t.feed(b"event: ping\ndata: {\"type\": \"ping\"}\n\n") == b""
    assert t.feed(b"data: not json\n\ndata: [1]\n\n") == b""
    assert t.feed(b'data: {"type": "content_block_delta", "index": 3, '
                  b'"delta": {"type": "input_json_delta", "partial_json": "x"}}\n\n') == b""
    assert t.feed(b'data: {"type": "some_future_event"}\n\n') == b""


def test_stream_usage_never_goes_down() -> None:
    """A message_delta's counts are cumulative: one saying 0 input and cache tokens after
    message_start said more does not take the prompt down."""
    start = {"type": "message_start", "message": {
        "id": "msg_up1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "usage": {"input_tokens": 4, "output_tokens": 1,
                                 "cache_read_input_tokens": 50,
                                 "cache_creation_input_tokens": 20}}}
    raw = b"".join([
        event("message_start", start),
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 9, "input_tokens": 0,
                                          "cache_read_input_tokens": 0,
                                          "cache_creation_input_tokens": None}}),
        event("message_stop", {"type": "message_stop"})])
    assert translated(raw, True, 1000)[-2] == chunk(None, usage=chat_usage(74, 9, 50, 20))
