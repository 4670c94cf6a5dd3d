"""The upstream's fixed answers for the Responses API and embeddings, and the requests
bench/endpoints.py sends for them. Pure data: bench/common.py puts the answers in nginx's
configuration, one ``location`` each, beside the chat completion's.

- ``/v1/responses``: a completed ``response`` object with a ``usage`` object
  (``input_tokens``, ``output_tokens``, ``total_tokens`` and both ``*_details``);
- ``/stream/v1/responses``: the events of that response as a ``text/event-stream``
  (``response.created`` ... ``response.completed``), each ``event: TYPE`` then
  ``data: {...}`` with its ``sequence_number``; no ``[DONE]``, as the API ends with the
  terminal event;
- ``/v1/embeddings``: a ``list`` of one 16-dimension ``embedding`` with ``usage``
  (``prompt_tokens``, ``total_tokens``).

The texts and counts mirror the chat completion's (9 prompt tokens, 9 output tokens), so
that the three endpoints are priced on the same usage where they can be.
"""

from __future__ import annotations

import json
from typing import Any

RESPONSES_PATH = "/v1/responses"
STREAM_RESPONSES_PATH = "/stream/v1/responses"
EMBEDDINGS_PATH = "/v1/embeddings"

TEXT = "Hello! How can I help you today?"
DELTAS = ("Hello!", " How can I help", " you today?")
CREATED = 1767225600
RESPONSE_USAGE: dict[str, Any] = {
    "input_tokens": 9, "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 18,
}
EMBEDDING_INPUT = "The quick brown fox"
EMBEDDING_USAGE: dict[str, Any] = {"prompt_tokens": 4, "total_tokens": 4}
# Deterministic, small, and free of characters nginx's quoted string would need escaped.
VECTOR = [round(((i * 37) % 17 - 8) / 16, 4) for i in range(16)]


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _message(status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text,
                                        "annotations": [], "logprobs": []}]
    return {"type": "message", "id": "msg_bench", "status": status, "role": "assistant",
            "content": content}


def response_object(model: str, status: str = "completed") -> dict[str, Any]:
    """A ``response`` as the API returns it; in progress, it has no output and no usage."""
    done = status == "completed"
    return {
        "id": "resp_bench", "object": "response", "created_at": CREATED, "status": status,
        "error": None, "incomplete_details": None, "instructions": None,
        "max_output_tokens": None, "model": model,
        "output": [_message("completed", TEXT)] if done else [],
        "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": False,
        "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "top_p": 1.0, "truncation": "disabled",
        "usage": RESPONSE_USAGE if done else None, "user": None, "metadata": {},
    }


def response_events(model: str) -> list[dict[str, Any]]:
    """The stream of :func:`response_object`: lifecycle, one message, three text deltas."""
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    item = {"item_id": "msg_bench", "output_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object(model, "in_progress")},
        {"type": "response.in_progress", "response": response_object(model, "in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": _message("in_progress", None)},
        {"type": "response.content_part.added", **item, "content_index": 0, "part": part},
        *({"type": "response.output_text.delta", **item, "content_index": 0, "delta": d,
           "logprobs": []} for d in DELTAS),
        {"type": "response.output_text.done", **item, "content_index": 0, "text": TEXT,
         "logprobs": []},
        {"type": "response.content_part.done", **item, "content_index": 0,
         "part": {**part, "text": TEXT}},
        {"type": "response.output_item.done", "output_index": 0,
         "item": _message("completed", TEXT)},
        {"type": "response.completed", "response": response_object(model)},
    ]
    return [{**e, "sequence_number": n} for n, e in enumerate(events)]


def response_body(model: str = "bench-responses") -> str:
    return compact(response_object(model))


def response_stream_body(model: str = "bench-responses-stream") -> str:
    return "".join(f"event: {e['type']}\ndata: {compact(e)}\n\n"
                   for e in response_events(model))


def embeddings_body(model: str = "bench-embed") -> str:
    return compact({"object": "list", "model": model, "usage": EMBEDDING_USAGE,
                    "data": [{"object": "embedding", "index": 0, "embedding": VECTOR}]})


def responses_request(model: str, stream: bool, user: str = "bench-user") -> bytes:
    """A small Responses request; chat.lua gives ``"bench-user"`` a number per request."""
    body: dict[str, Any] = {"model": model, "user": user, "input": "Hello"}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def embeddings_request(model: str, user: str = "bench-user") -> bytes:
    return json.dumps({"model": model, "user": user, "input": EMBEDDING_INPUT}).encode()
