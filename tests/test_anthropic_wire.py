"""The Anthropic wire format as tables: request bodies in, what is billed out; provider
events in, client bytes and billing facts out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy import anthropic_wire as wire
from proxy import errors
from proxy.errors import InvalidRequest, UpstreamUnavailable
from proxy.metering import public_names, with_counted
from proxy.pricing import Usage
from proxy.sse import SSEParser
from proxy.tokens import Prompt

IMG = 1_600  # the model's max_image_tokens in these tables


def body(messages: list[Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": messages, **extra}


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


B64 = "QUJD" * 1000  # 4,000 bytes of base64
TOOL = {"name": "weather", "description": "Weather", "input_schema": {"type": "object"}}

PROMPTS: list[tuple[str, dict[str, Any], Prompt]] = [
    ("a string message", body([{"role": "user", "content": "Hello"}]),
     Prompt("user\nHello", 1, 0)),
    ("system string and text blocks",
     body([user({"type": "text", "text": "a"}, "b")], system="sys"),
     Prompt("sys\nuser\na\nb", 2, 0)),
    ("system as blocks",
     body([{"role": "user", "content": "x"}],
          system=[{"type": "text", "text": "s1", "cache_control": {"type": "ephemeral"}}]),
     Prompt("s1\nuser\nx", 2, 0)),
    ("an image by url: the model's image bound",
     body([user({"type": "image", "source": {"type": "url", "url": "https://x/y.png"}})]),
     Prompt("user", 1, IMG)),
    ("a small inline image: the image bound",
     body([user({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "QUJD"}})]),
     Prompt("user", 1, IMG)),
    ("a large inline image: its bytes",
     body([user({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": B64}})]),
     Prompt("user", 1, 4000)),
    ("a base64 document: its bytes; title and context as text",
     body([user({"type": "document", "title": "T", "context": "C",
                 "source": {"type": "base64", "media_type": "application/pdf",
                            "data": "QUJDRA=="}})]),
     Prompt("user\nT\nC", 1, 8)),
    ("a text document: its text",
     body([user({"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "doc text"}})]),
     Prompt("user\ndoc text", 1, 0)),
    ("a content document: its blocks",
     body([user({"type": "document", "source": {"type": "content", "content": [
         {"type": "text", "text": "p1"},
         {"type": "image", "source": {"type": "url", "url": "u"}}]}})]),
     Prompt("user\np1", 1, IMG)),
    ("tool_use and tool_result, recursively",
     body([{"role": "assistant", "content": [
         {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
           user({"type": "tool_result", "tool_use_id": "toolu_1", "content": [
               {"type": "text", "text": "r"},
               {"type": "image", "source": {"type": "url", "url": "u"}}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "plain"})]),
     Prompt('assistant\ntoolu_1\nf\n{"a":1}\nuser\ntoolu_1\nr\ntoolu_2\nplain', 2, IMG)),
    ("thinking text; redacted thinking by its bytes",
     body([{"role": "assistant", "content": [
         {"type": "thinking", "thinking": "hmm", "signature": "s"},
         {"type": "redacted_thinking", "data": "ABCDEFGH"}]}]),
     Prompt("assistant\nhmm", 1, 8)),
    ("a search result: source, title, text",
     body([user({"type": "search_result", "source": "https://s", "title": "t",
                 "content": [{"type": "text", "text": "found"}]})]),
     Prompt("user\nhttps://s\nt\nfound", 1, 0)),
    ("tools: their JSON and the tool system prompt; tool_choice",
     body([{"role": "user", "content": "x"}], tools=[TOOL], tool_choice={"type": "auto"}),
     Prompt("user\nx\n" + orjson.dumps(TOOL).decode() + '\n{"type":"auto"}', 1,
            wire.TOOL_PROMPT_TOKENS)),
    ("a provider-defined client tool adds its own prompt",
     body([{"role": "user", "content": "x"}],
          tools=[{"type": "bash_20250124", "name": "bash"}]),
     Prompt('user\nx\n{"type":"bash_20250124","name":"bash"}', 1,
            wire.TOOL_PROMPT_TOKENS + wire.DEFINED_TOOL_TOKENS)),
]


@pytest.mark.parametrize(("case", "request_body", "expected"), PROMPTS,
                         ids=[c[0] for c in PROMPTS])
def test_prompt_of(case: str, request_body: dict[str, Any], expected: Prompt) -> None:
    assert wire.prompt_of(request_body, IMG) == expected


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("an image by file id",
     body([user({"type": "image", "source": {"type": "file", "file_id": "file_1"}})]),
     "messages[0].content[0].source"),
    ("a document by file id",
     body([user({"type": "document", "source": {"type": "file", "file_id": "file_1"}})]),
     "messages[0].content[0].source"),
    ("a document by url",
     body([user({"type": "document", "source": {"type": "url", "url": "https://x.pdf"}})]),
     "messages[0].content[0].source"),
    ("a container upload",
     body([user("x", {"type": "container_upload", "file_id": "file_1"})]),
     "messages[0].content[1]"),
    ("an unknown block", body([user({"type": "server_tool_use", "name": "web_search"})]),
     "messages[0].content[0].type"),
    ("a file inside a tool result",
     body([user({"type": "tool_result", "tool_use_id": "t", "content": [
         {"type": "document", "source": {"type": "file", "file_id": "f"}}]})]),
     "messages[0].content[0].content[0].source"),
    ("web search", body([user("x")], tools=[{"type": "web_search_20250305",
                                             "name": "web_search"}]), "tools[0].type"),
    ("code execution", body([user("x")], tools=[
        TOOL, {"type": "code_execution_20250522", "name": "code_execution"}]),
     "tools[1].type"),
    ("web fetch", body([user("x")], tools=[{"type": "web_fetch_20250910",
                                            "name": "web_fetch"}]), "tools[0].type"),
    ("tools not a list", body([user("x")], tools={"name": "f"}), "tools"),
    ("messages not a list", {"model": "m", "messages": "hi"}, "messages"),
    ("a message that is not an object", body(["hi"]), "messages[0]"),
    ("content neither string nor list", body([{"role": "user", "content": 5}]),
     "messages[0].content"),
    ("system neither string nor list", body([user("x")], system=5), "system"),
    ("an image without a source", body([user({"type": "image"})]),
     "messages[0].content[0].source"),
]


@pytest.mark.parametrize(("case", "request_body", "param"), REFUSED,
                         ids=[c[0] for c in REFUSED])
def test_prompt_of_refuses_what_cannot_be_bounded(case: str, request_body: dict[str, Any],
                                                   param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        wire.prompt_of(request_body, IMG)
    assert e.value.param == param
    assert e.value.status == 400


def nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def results(depth: int) -> Any:
    """A tool_result whose content holds a tool_result ... ``depth`` deep."""
    block: Any = {"type": "text", "text": "x"}
    for _ in range(depth):
        block = {"type": "tool_result", "tool_use_id": "t", "content": [block]}
    return block


DEEP: list[tuple[str, dict[str, Any]]] = [
    ("a tool_use input", body([{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": nested(300)}]}])),
    ("a tool's input_schema", body([user("x")], tools=[{**TOOL,
                                                         "input_schema": nested(300)}])),
    ("tool_choice", body([user("x")], tool_choice={"type": "auto", "x": nested(300)})),
    ("a tool_result's content object", body([user({"type": "tool_result", "tool_use_id": "t",
                                                    "content": {"k": nested(300)}})])),
    ("tool results inside tool results", body([user(results(400))])),
]


@pytest.mark.parametrize("request_body", [c[1] for c in DEEP], ids=[c[0] for c in DEEP])
def test_prompt_of_refuses_a_body_too_deep_to_read(request_body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as e:
        wire.prompt_of(request_body, IMG)
    assert (e.value.status, e.value.message) == (400, "The request body is nested too deeply.")


# --- the stream meter --------------------------------------------------------------


def ev(name: str, data: Any) -> bytes:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n"


def start(usage: dict[str, Any] | None, model: str = "up-model") -> bytes:
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant",
                               "model": model, "content": [], "stop_reason": None}
    if usage is not None:
        message["usage"] = usage
    return ev("message_start", {"type": "message_start", "message": message})


def block_start(block: dict[str, Any], index: int = 0) -> bytes:
    return ev("content_block_start", {"type": "content_block_start", "index": index,
                                      "content_block": block})


def delta(d: dict[str, Any], index: int = 0) -> bytes:
    return ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                      "delta": d})


def text(t: str) -> bytes:
    return delta({"type": "text_delta", "text": t})


def message_delta(usage: dict[str, Any]) -> bytes:
    return ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": usage})


STOP = ev("message_stop", {"type": "message_stop"})
PING = ev("ping", {"type": "ping"})
IN = {"input_tokens": 10, "output_tokens": 1}
CACHED = {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 40,
          "cache_creation_input_tokens": 24}
TEXT_BLOCK = block_start({"type": "text", "text": ""})

# (case, events, output strings, usage (covers the output), reported, done, failed)
STREAMS: list[tuple[str, list[bytes], list[str], Usage | None, Usage | None, bool, bool]] = [
    ("a whole stream: usage from message_delta over message_start",
     [start(IN), PING, TEXT_BLOCK, text("a"), text(" b"), message_delta({"output_tokens": 2}),
      STOP], ["a", " b"], Usage(10, 2), Usage(10, 2), True, False),
    ("cache counts from message_start are kept and priced apart",
     [start(CACHED), TEXT_BLOCK, text("a"), message_delta({"output_tokens": 3}), STOP],
     ["a"], Usage(74, 3, cached_tokens=40, cache_write_tokens=24),
     Usage(74, 3, cached_tokens=40, cache_write_tokens=24), True, False),
    ("message_delta may carry the input and cache counts too (cumulative)",
     [start(IN), TEXT_BLOCK, text("a"),
      message_delta({"output_tokens": 5, "input_tokens": 12, "cache_read_input_tokens": 3,
                     "cache_creation_input_tokens": None}), STOP],
     ["a"], Usage(15, 5, cached_tokens=3), Usage(15, 5, cached_tokens=3), True, False),
    ("cut after output: message_start's usage does not cover it",
     [start(IN), TEXT_BLOCK, text("a"), text(" b")], ["a", " b"], None, Usage(10, 1),
     False, False),
    ("tool use: the name, then the input's pieces",
     [start(IN), block_start({"type": "tool_use", "id": "toolu_1", "name": "weather",
                              "input": {}}, 0),
      delta({"type": "input_json_delta", "partial_json": '{"city"'}),
      delta({"type": "input_json_delta", "partial_json": ': "Paris"}'}),
      message_delta({"output_tokens": 7}), STOP],
     ["weather", '{"city"', ': "Paris"}'], Usage(10, 7), Usage(10, 7), True, False),
    ("thinking counts, its signature does not",
     [start(IN), block_start({"type": "thinking", "thinking": "", "signature": ""}),
      delta({"type": "thinking_delta", "thinking": "hmm"}),
      delta({"type": "signature_delta", "signature": "sig"}),
      message_delta({"output_tokens": 4}), STOP], ["hmm"], Usage(10, 4), Usage(10, 4),
     True, False),
    ("a block that starts with content: it counts",
     [start(IN), block_start({"type": "text", "text": "pre"}),
      block_start({"type": "redacted_thinking", "data": "xyz"}, 1)],
     ["pre", "xyz"], None, Usage(10, 1), False, False),
    ("zero output reported for delivered output is refused",
     [start({"input_tokens": 10, "output_tokens": 0}), TEXT_BLOCK, text("a"),
      message_delta({"output_tokens": 0}), STOP], ["a"], None, Usage(10, 0), True, False),
    ("a message_delta's lower counts do not lower message_start's (they are cumulative)",
     [start({**CACHED, "output_tokens": 6}), TEXT_BLOCK, text("a"),
      message_delta({"output_tokens": 3, "input_tokens": 0, "cache_read_input_tokens": 0,
                     "cache_creation_input_tokens": 1}), STOP],
     ["a"], Usage(74, 6, cached_tokens=40, cache_write_tokens=24),
     Usage(74, 6, cached_tokens=40, cache_write_tokens=24), True, False),
    ("an odd count in a message_delta is still refused",
     [start(IN), TEXT_BLOCK, text("a"), message_delta({"output_tokens": 3, "input_tokens": -1}),
      STOP], ["a"], None, None, True, False),
    ("odd usage is refused",
     [start(IN), TEXT_BLOCK, text("a"), message_delta({"output_tokens": "2"}), STOP],
     ["a"], None, None, True, False),
    ("output after the last usage makes it stale",
     [start(IN), TEXT_BLOCK, text("a"), message_delta({"output_tokens": 1}), text("b"), STOP],
     ["a", "b"], None, Usage(10, 1), True, False),
    ("an error event from the provider",
     [start(IN), TEXT_BLOCK, text("a"),
      ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "o"}})],
     ["a"], None, Usage(10, 1), False, True),
    ("garbage data is output",
     [start(IN), ev("content_block_delta", b"not json")], ["not json"], None,
     Usage(10, 1), False, False),
    ("no usage anywhere", [start(None), TEXT_BLOCK, text("a"), STOP], ["a"], None, None,
     True, False),
    ("before any output: message_start's usage", [start(IN), PING], [], Usage(10, 1),
     Usage(10, 1), False, False),
]


@pytest.mark.parametrize(("case", "events", "output", "usage", "reported", "done", "failed"),
                         STREAMS, ids=[c[0] for c in STREAMS])
@pytest.mark.parametrize("split", [0, 1, 7], ids=["whole", "bytewise", "by7"])
def test_stream_meter(case: str, events: list[bytes], output: list[str],
                      usage: Usage | None, reported: Usage | None, done: bool, failed: bool,
                      split: int) -> None:
    meter = wire.StreamMeter()
    raw = b"".join(events)
    chunks = [raw] if not split else [raw[i:i + split] for i in range(0, len(raw), split)]
    sent = b"".join(meter.feed(c) for c in chunks) + meter.flush()
    assert sent == raw  # passed on unchanged
    assert meter.text == output
    assert meter.usage == usage
    assert meter.reported == reported
    assert (meter.done, meter.failed, meter.delivered) == (done, failed, bool(output))


def test_stream_meter_holds_a_partial_event_until_it_is_complete() -> None:
    meter = wire.StreamMeter()
    event = text("hello")
    assert meter.feed(event[:10]) == b""
    assert meter.feed(event[10:]) == event
    assert meter.text == ["hello"]


def test_stream_meter_flushes_an_unterminated_last_event() -> None:
    meter = wire.StreamMeter()
    tail = text("end").rstrip(b"\n")
    assert meter.feed(tail) == b""
    assert meter.flush() == tail
    assert meter.text == ["end"]


def test_stream_meter_puts_the_public_model_name_in_the_events() -> None:
    meter = wire.StreamMeter(public_names("up-model", "public"))
    sent = meter.feed(start(IN) + text('"model": "up-model"'))
    assert sent == start(IN, "public") + text('"model": "up-model"')  # text left alone


def test_with_counted_raises_each_total_and_keeps_cache_counts() -> None:
    reported = Usage(74, 1, cached_tokens=40, cache_write_tokens=24)
    assert with_counted(reported, Usage(12, 9)) == Usage(
        74, 9, cached_tokens=40, cache_write_tokens=24)
    assert with_counted(None, Usage(12, 9)) == Usage(12, 9)
    assert with_counted(Usage(5, 30), Usage(12, 9)) == Usage(12, 30)


# --- whole answers -------------------------------------------------------------------

ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
          "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                      {"type": "text", "text": "hi"},
                      {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
          "usage": {"input_tokens": 3, "output_tokens": 5}}

WHOLE: list[tuple[str, Any, bytes, str, Usage | None]] = [
    ("usage as reported", ANSWER, b"", 't' 'hi' 'f{"a":1}', Usage(3, 5)),
    ("cache counts", {**ANSWER, "usage": {"input_tokens": 3, "output_tokens": 5,
                                         "cache_read_input_tokens": 7,
                                         "cache_creation_input_tokens": 2}},
     b"", 'thif{"a":1}', Usage(12, 5, cached_tokens=7, cache_write_tokens=2)),
    ("no usage", {**ANSWER, "usage": None}, b"", 'thif{"a":1}', None),
    ("zero output for output", {**ANSWER, "usage": {"input_tokens": 3, "output_tokens": 0}},
     b"", 'thif{"a":1}', None),
    ("zero output for no output",
     {**ANSWER, "content": [], "usage": {"input_tokens": 3, "output_tokens": 0}}, b"", "",
     Usage(3, 0)),
    ("negative counts", {**ANSWER, "usage": {"input_tokens": -3, "output_tokens": 5}}, b"",
     'thif{"a":1}', None),
    ("not JSON", None, b"plain text", "plain text", None),
]


@pytest.mark.parametrize(("case", "data", "raw", "output", "usage"), WHOLE,
                         ids=[c[0] for c in WHOLE])
def test_whole_answers(case: str, data: Any, raw: bytes, output: str,
                       usage: Usage | None) -> None:
    assert wire.message_output(data, raw) == output
    assert wire.message_usage(data) == usage


# --- what a blocked request is told ------------------------------------------------------

PAYWALL = {"connected": False, "connect_link": "https://pay/connect"}


def test_a_blocked_message() -> None:
    raw, media = wire.paywall_message(request_id="req_abc", model="claude-public",
                                      text="Connect: https://pay/connect", paywall=PAYWALL,
                                      stream=False)
    assert media == "application/json"
    assert orjson.loads(raw) == {
        "id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-public",
        "content": [{"type": "text", "text": "Connect: https://pay/connect"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0}, "paywall": PAYWALL}


def test_a_blocked_stream_is_the_whole_event_sequence() -> None:
    raw, media = wire.paywall_message(request_id="req_abc", model="claude-public",
                                      text="Top up", paywall=PAYWALL, stream=True)
    assert media == "text/event-stream"
    events = SSEParser().feed(raw)
    assert [e.event for e in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    data = [orjson.loads(e.data) for e in events]
    assert [d["type"] for d in data] == [e.event for e in events]
    assert data[0]["message"]["model"] == "claude-public"
    assert data[0]["message"]["paywall"] == PAYWALL
    assert data[0]["message"]["content"] == []
    assert data[2]["delta"] == {"type": "text_delta", "text": "Top up"}
    assert data[4]["delta"]["stop_reason"] == "end_turn"
    # Metered as any stream, it delivers the text and reports no usage but zeros.
    meter = wire.StreamMeter()
    assert meter.feed(raw) == raw
    assert meter.text == ["Top up"] and meter.done


def test_the_error_tail_is_an_anthropic_error_event() -> None:
    tail = wire.error_event(UpstreamUnavailable("The provider 'a' broke off."))
    (event,) = SSEParser().feed(tail)
    assert event.event == "error"
    assert orjson.loads(event.data) == {"type": "error", "error": {
        "type": "api_error", "message": "The provider 'a' broke off."}}


ERRORS: list[tuple[errors.ProxyError, str]] = [
    (errors.InvalidRequest("x"), "invalid_request_error"),
    (errors.PayloadTooLarge("x"), "request_too_large"),
    (errors.NotFound("x"), "not_found_error"),
    (errors.ModelNotFound("x"), "not_found_error"),
    (errors.MethodNotAllowed("x"), "invalid_request_error"),
    (errors.AuthenticationFailed("x"), "authentication_error"),
    (errors.Forbidden("x"), "permission_error"),
    (errors.PaymentRequired("x"), "billing_error"),
    (errors.Conflict("x"), "invalid_request_error"),
    (errors.RateLimited("x", "tokens", {}), "rate_limit_error"),
    (errors.LimiterUnavailable("x"), "overloaded_error"),
    (errors.DatabaseUnavailable("x"), "overloaded_error"),
    (errors.UpstreamUnavailable("x"), "api_error"),
    (errors.UpstreamTimeout("x"), "timeout_error"),
    (errors.ProxyError("x"), "api_error"),
]


@pytest.mark.parametrize(("error", "kind"), ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_errors_in_anthropics_shape(error: errors.ProxyError, kind: str) -> None:
    assert orjson.loads(error.anthropic_body()) == {
        "type": "error", "error": {"type": kind, "message": "x"}}


EPHEMERAL = {"type": "ephemeral"}


@pytest.mark.parametrize(("body", "param"), [
    ({}, None),
    ({"speed": "standard", "inference_geo": "global", "service_tier": "auto"}, None),
    ({"speed": "fast"}, "speed"),
    ({"inference_geo": "us"}, "inference_geo"),
    ({"context_management": {"edits": [{"type": "compact_20260112"}]}},
     "context_management"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"system": [{"type": "text", "text": "s", "cache_control": EPHEMERAL}]}, None),
    ({"system": [{"type": "text", "text": "s", "cache_control": {**EPHEMERAL, "ttl": "5m"}}]},
     None),
    ({"system": [{"type": "text", "text": "s", "cache_control": {**EPHEMERAL, "ttl": "1h"}}]},
     "system[0].cache_control.ttl"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "text", "text": "r",
                                                              "cache_control": {
                                                                  **EPHEMERAL, "ttl": "1h"}}]}]}]},
     "messages[0].content[0].content[0].cache_control.ttl"),
    ({"tools": [{"name": "t", "input_schema": {}, "cache_control": {**EPHEMERAL, "ttl": "1h"}}]},
     "tools[0].cache_control.ttl"),
    # the request's own, for automatic caching
    ({"cache_control": {**EPHEMERAL, "ttl": "1h"}}, "cache_control.ttl"),
    ({"cache_control": EPHEMERAL}, None),
])
def test_options_billed_above_the_prices_are_refused(body: dict[str, Any],
                                                     param: str | None) -> None:
    if param is None:
        wire.check_priced(body)
        return
    with pytest.raises(InvalidRequest) as refused:
        wire.check_priced(body)
    assert refused.value.param == param


def test_a_deep_body_is_checked_without_recursion() -> None:
    deep: Any = {"type": "text", "text": "x"}
    for _ in range(5000):
        deep = {"content": [deep]}
    wire.check_priced({"messages": [deep]})
