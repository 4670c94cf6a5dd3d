"""Blocked replies: the text and its link wherever the client's parser will take it —
content, refusal, or a JSON object — pure, then through the official SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import openai
import orjson
import pytest
from openai import OpenAI
from pydantic import BaseModel

from proxy.replies import paywall_reply
from tests.conftest import Running, mint_key, new_user

INFO = {"connected": True, "topup_link": "http://x/t"}
HELLO = [{"role": "user", "content": "hello"}]


def reply(stream: bool, reply_format: str) -> Any:
    body, media = paywall_reply(request_id="req_1", model="m", text="Top up: http://x/t",
                                paywall=INFO, stream=stream, include_usage=False,
                                reply_format=reply_format)
    if not stream:
        assert media == "application/json"
        return orjson.loads(body)["choices"][0]["message"]
    assert media == "text/event-stream"
    events = [orjson.loads(line.removeprefix(b"data: ")) for line in body.split(b"\n\n")
              if line.startswith(b"data: {")]
    return events[0]["choices"][0]["delta"]


@pytest.mark.parametrize(("reply_format", "stream", "expected"), [
    ("text", False, {"role": "assistant", "content": "Top up: http://x/t", "refusal": None}),
    ("text", True, {"role": "assistant", "content": "Top up: http://x/t"}),
    ("refusal", False, {"role": "assistant", "content": None, "refusal": "Top up: http://x/t"}),
    ("refusal", True, {"role": "assistant", "refusal": "Top up: http://x/t"}),
    ("json_object", False, {"role": "assistant", "refusal": None, "content": orjson.dumps(
        {"message": "Top up: http://x/t", "paywall": INFO}).decode()}),
    ("json_object", True, {"role": "assistant", "content": orjson.dumps(
        {"message": "Top up: http://x/t", "paywall": INFO}).decode()}),
])
def test_where_the_text_goes(reply_format: str, stream: bool, expected: dict[str, Any]
                             ) -> None:
    assert reply(stream, reply_format) == expected


class Weather(BaseModel):
    city: str
    degrees: int


@pytest.fixture(scope="module")
def broke(running: Running, database_url: str) -> Iterator[OpenAI]:
    """A client of the paywall whose users start with nothing: every priced call is
    blocked (gpt-test is priced)."""
    with OpenAI(base_url=running.proxy.base_url, api_key=mint_key(database_url, "other"),
                max_retries=0) as made:
        yield made


def test_parse_with_a_schema_returns_a_refusal(broke: OpenAI) -> None:
    done = broke.chat.completions.parse(model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
                                        response_format=Weather, user=new_user("parse"))
    message = done.choices[0].message
    assert message.parsed is None and message.content is None
    assert message.refusal is not None and "/topup?token=" in message.refusal
    with broke.chat.completions.stream(model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
                                       response_format=Weather,
                                       user=new_user("parse-stream")) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message
    assert streamed.parsed is None and streamed.content is None
    assert "/topup?token=" in (streamed.refusal or "")


def test_json_mode_gets_a_json_object(broke: OpenAI) -> None:
    done = broke.chat.completions.create(model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
                                         response_format={"type": "json_object"},
                                         user=new_user("json"))
    content = orjson.loads(done.choices[0].message.content or "")
    assert "/topup?token=" in content["message"]
    assert content["paywall"]["topup_link"] in content["message"]


def test_a_forced_tool_still_gets_text(broke: OpenAI) -> None:
    tools: Any = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    done = broke.chat.completions.create(model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
                                         tools=tools, tool_choice="required",
                                         user=new_user("tool"))
    message = done.choices[0].message
    assert message.tool_calls is None and "/topup?token=" in (message.content or "")


def test_answers_carry_the_public_model_name(running: Running,
                                             request: pytest.FixtureRequest) -> None:
    c = OpenAI(base_url=running.proxy.base_url, api_key=running.key, max_retries=0)
    request.addfinalizer(c.close)
    done = c.chat.completions.create(model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
                                     user=new_user("names"))
    assert running.upstream.last().body["model"] == "echo"  # the provider's name upstream
    assert done.model == "gpt-test"
    chunks = list(c.chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, user=new_user("names")))
    assert chunks and {chunk.model for chunk in chunks} == {"gpt-test"}
    assert chunks[-1].usage is not None


def test_safety_identifier_names_the_user(running: Running, database_url: str,
                                          request: pytest.FixtureRequest) -> None:
    user = new_user("safety")
    c = OpenAI(base_url=running.proxy.base_url, api_key=running.key, max_retries=0)
    request.addfinalizer(c.close)
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
        extra_body={"safety_identifier": user})
    assert raw.headers["x-paywall-cost"]

    async def owner() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(
                "SELECT a.user_id FROM entries e JOIN accounts a ON a.id = e.account_id"
                " WHERE e.request_id = $1", raw.headers["x-request-id"])
        finally:
            await conn.close()

    assert asyncio.run(owner()) == user
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="gpt-test", messages=HELLO,  # type: ignore[arg-type]
                                  extra_body={"safety_identifier": "not valid"})
    assert bad.value.code == "invalid_user"
