from __future__ import annotations

import dataclasses

import orjson
import pytest

from proxy.metering import Meter
from proxy.pricing import Usage
from proxy.providers import Call, MockProvider
from proxy.settings import ProviderSettings


def mock(**kw: int) -> MockProvider:
    return MockProvider("mock", ProviderSettings(kind="mock", **kw))  # type: ignore[arg-type]


def call(payload: dict[str, object], stream: bool = False) -> Call:
    return Call(body=orjson.dumps(payload), stream=stream, request_id="req_1", headers={},
                api_key="", payload=payload)


async def test_mock_completion() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}
    reply = await mock(completion_tokens=3).send(call(payload))
    body = orjson.loads(await reply.read())
    assert reply.status == 200 and not reply.stream
    assert body["choices"][0]["message"]["content"] == "This is a"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_mock_json_mode() -> None:
    payload = {"model": "m", "messages": [], "response_format": {"type": "json_object"}}
    body = orjson.loads(await (await mock(completion_tokens=2).send(call(payload))).read())
    assert orjson.loads(body["choices"][0]["message"]["content"]) == {"answer": "This is"}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_mock_stream_is_valid_sse(include_usage: bool) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
               "stream_options": {"include_usage": include_usage}}
    reply = await mock(completion_tokens=4).send(call(payload, stream=True))
    meter = Meter(include_usage)
    async for chunk in reply.chunks:
        meter.feed(chunk)
    assert reply.stream and meter.done
    assert "".join(meter.text) == "This is a mock"
    assert meter.usage == (Usage(1, 4) if include_usage else None)


def test_a_keyed_call_is_the_call_with_its_key_and_body_and_every_other_field_kept() -> None:
    """``Call.keyed`` names each field: one added to Call and forgotten there would be
    reset to its default in every call sent, which this catches."""
    given = {f.name: f"{f.name}-value" for f in dataclasses.fields(Call)}
    given.update(body=b"body", stream=True, headers={"x": "1"}, payload={"model": "m"})
    call = Call(**given)  # type: ignore[arg-type]
    assert call.keyed("key") == dataclasses.replace(call, api_key="key")
    assert call.keyed("key", b"other") == dataclasses.replace(call, api_key="key",
                                                              body=b"other")
