"""The local upstream's OpenAI Responses API (``POST .../responses``), over real HTTP.

:class:`tests.upstream.Upstream` hands every request whose path ends in ``/responses``
to :func:`handle` (after recording it in ``seen``). What it answers depends on the model
it is asked for (the upstream name):

- ``r-echo`` (and anything unknown): a completed response whose message is
  ``"".join(WORDS)``, with usage ``USAGE``; streamed as the SDKs' event sequence, one
  ``response.output_text.delta`` per word.
- ``r-tool``: like ``r-echo``, but the output is one function call (``TOOL_NAME``,
  ``TOOL_ARGUMENTS``), its arguments streamed in ``response.function_call_arguments.delta``.
- ``r-no-usage``: like ``r-echo`` without usage (``"usage": null``).
- ``r-silent-after-K``: a stream of the first K words, then silence until the client
  side goes away.
- ``r-break-after-K``: a stream of the first K words, then, ``BREAK_PAUSE`` later, an
  error inside the app, so the server drops the connection mid-body.
- ``r-fail``: a stream that says ``response.created``, then ``response.failed``
  (no usage, no output).
- ``r-error-after-K``: a stream of the first K words, then the provider's own ``error``
  event, and the end of the stream.
- ``r-done-then-break``: a stream whose text is only in ``response.output_text.done``
  and ``response.content_part.done`` (no deltas), then a break as ``r-break-after-K``.
- ``r-output-at-end``: a stream that adds an empty message, then ends in
  ``response.completed`` with the whole message in its ``output`` and no usage.
- ``r-crash``: 500.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

WORDS = ["Paid", " words", " arrive", " one", " by", " one", "."]
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = ['{"city":', ' "Paris"}']
# What this provider bills each r-echo / r-tool response: 20 prompt tokens of which 4
# cached, 7 output tokens of which 2 reasoning.
USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 4},
         "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2},
         "total_tokens": 27}
BREAK_PAUSE = 0.3


class ResponsesBroke(Exception):
    """Raised by ``r-break-after-K``: the server then drops the connection."""


def _response(body: dict[str, Any], status: str, output: list[Any], usage: Any
              ) -> dict[str, Any]:
    return {"id": "resp_up", "object": "response", "created_at": 1, "status": status,
            "model": body.get("model"), "output": output, "usage": usage, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "metadata": {}, "parallel_tool_calls": True, "temperature": None,
            "tool_choice": "auto", "tools": body.get("tools") or [], "top_p": None,
            "max_output_tokens": body.get("max_output_tokens")}


def _message(words: list[str]) -> dict[str, Any]:
    return {"id": "msg_up", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "".join(words), "annotations": []}]}


def _tool_call() -> dict[str, Any]:
    return {"id": "fc_up", "type": "function_call", "status": "completed",
            "call_id": "call_up", "name": TOOL_NAME, "arguments": "".join(TOOL_ARGUMENTS)}


def whole(body: dict[str, Any]) -> dict[str, Any]:
    """The non-stream answer to ``body``."""
    model = str(body.get("model", ""))
    output = [_tool_call() if model == "r-tool" else _message(WORDS)]
    return _response(body, "completed", output, None if model == "r-no-usage" else USAGE)


def frame(kind: str, seq: int, **data: Any) -> bytes:
    return (b"event: " + kind.encode() + b"\ndata: "
            + orjson.dumps({"type": kind, "sequence_number": seq, **data}) + b"\n\n")


def opening(body: dict[str, Any]) -> list[bytes]:
    return [frame("response.created", 0, response=_response(body, "in_progress", [], None)),
            frame("response.in_progress", 1, response=_response(body, "in_progress", [], None)),
            frame("response.output_item.added", 2, output_index=0,
                  item={**_message([]), "status": "in_progress", "content": []}),
            frame("response.content_part.added", 3, item_id="msg_up", output_index=0,
                  content_index=0, part={"type": "output_text", "text": "", "annotations": []})]


def text_deltas(words: list[str], first_seq: int = 4) -> list[bytes]:
    return [frame("response.output_text.delta", first_seq + i, item_id="msg_up",
                  output_index=0, content_index=0, delta=w, logprobs=[])
            for i, w in enumerate(words)]


def echo_stream(body: dict[str, Any], usage: Any) -> list[bytes]:
    """The whole event sequence of an r-echo stream (``usage`` on its last event)."""
    seq = 4 + len(WORDS)
    text = "".join(WORDS)
    part = {"type": "output_text", "text": text, "annotations": []}
    at = {"item_id": "msg_up", "output_index": 0, "content_index": 0}
    return [*opening(body), *text_deltas(WORDS),
            frame("response.output_text.done", seq, **at, text=text, logprobs=[]),
            frame("response.content_part.done", seq + 1, **at, part=part),
            frame("response.output_item.done", seq + 2, output_index=0, item=_message(WORDS)),
            frame("response.completed", seq + 3,
                  response=_response(body, "completed", [_message(WORDS)], usage))]


def tool_stream(body: dict[str, Any]) -> list[bytes]:
    added = {**_tool_call(), "status": "in_progress", "arguments": ""}
    frames = [frame("response.created", 0, response=_response(body, "in_progress", [], None)),
              frame("response.output_item.added", 1, output_index=0, item=added)]
    frames += [frame("response.function_call_arguments.delta", 2 + i, item_id="fc_up",
                     output_index=0, delta=a) for i, a in enumerate(TOOL_ARGUMENTS)]
    seq = 2 + len(TOOL_ARGUMENTS)
    return [*frames,
            frame("response.function_call_arguments.done", seq, item_id="fc_up",
                  output_index=0, arguments="".join(TOOL_ARGUMENTS)),
            frame("response.output_item.done", seq + 1, output_index=0, item=_tool_call()),
            frame("response.completed", seq + 2,
                  response=_response(body, "completed", [_tool_call()], USAGE))]


def done_then_break(body: dict[str, Any]) -> list[bytes]:
    """``r-done-then-break``'s events before the break: the text in no delta."""
    text = "".join(WORDS)
    at = {"item_id": "msg_up", "output_index": 0, "content_index": 0}
    return [*opening(body),
            frame("response.output_text.done", 4, **at, text=text, logprobs=[]),
            frame("response.content_part.done", 5, **at,
                  part={"type": "output_text", "text": text, "annotations": []})]


def output_at_end(body: dict[str, Any]) -> list[bytes]:
    """``r-output-at-end``'s events: the message only in the terminal response."""
    return [*opening(body)[:3],
            frame("response.completed", 3,
                  response=_response(body, "completed", [_message(WORDS)], None))]


async def _send_json(send: Any, status: int, data: Any) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": orjson.dumps(data)})


async def handle(body: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer one Responses request (its body already read)."""
    model = str(body.get("model", ""))
    if model == "r-crash":
        await _send_json(send, 500, {"error": {"message": "upstream broke",
                                               "type": "server_error", "param": None,
                                               "code": None}})
        return
    if not body.get("stream"):
        await _send_json(send, 200, whole(body))
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    async def out(frames: list[bytes], more: bool = True) -> None:
        for f in frames:
            await send({"type": "http.response.body", "body": f, "more_body": True})
        if not more:
            await send({"type": "http.response.body", "body": b""})

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(watch())
        try:
            if model.startswith("r-silent-after-"):
                await out([*opening(body),
                           *text_deltas(WORDS[:int(model.removeprefix("r-silent-after-"))])])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), 30)
                return
            if model == "r-done-then-break":
                await out(done_then_break(body))
                await asyncio.sleep(BREAK_PAUSE)
                raise ResponsesBroke(model)
            if model == "r-output-at-end":
                await out(output_at_end(body), more=False)
                return
            if model.startswith("r-break-after-"):
                await out([*opening(body),
                           *text_deltas(WORDS[:int(model.removeprefix("r-break-after-"))])])
                await asyncio.sleep(BREAK_PAUSE)  # the words reach the client first
                raise ResponsesBroke(model)
            if model == "r-fail":
                failed = {**_response(body, "failed", [], None),
                          "error": {"code": "server_error", "message": "it broke"}}
                await out([frame("response.created", 0,
                                 response=_response(body, "in_progress", [], None)),
                           frame("response.failed", 1, response=failed)], more=False)
                return
            if model.startswith("r-error-after-"):
                k = int(model.removeprefix("r-error-after-"))
                await out([*opening(body), *text_deltas(WORDS[:k]),
                           frame("error", 4 + k, code="server_error", message="it broke",
                                 param=None)], more=False)
                return
            if model == "r-tool":
                await out(tool_stream(body), more=False)
                return
            await out(echo_stream(body, None if model == "r-no-usage" else USAGE), more=False)
        except OSError:
            pass
        finally:
            watcher.cancel()
