"""The zero-branching replies: a connect or top-up link as an ordinary assistant message.

They are shaped like a provider's own answer — a ``chat.completion``, or for
``stream: true`` a ``chat.completion.chunk`` SSE stream ending in ``[DONE]`` — so an
app renders them with the code it already has. The body also carries a
machine-readable ``paywall`` object. Pure: they build bytes and send nothing.
"""

from __future__ import annotations

import time
from typing import Any

import orjson


def paywall_reply(*, request_id: str, model: str, text: str, paywall: dict[str, Any],
                  stream: bool, include_usage: bool) -> tuple[bytes, str]:
    """The reply body and its content type."""
    cid = "chatcmpl-" + request_id.removeprefix("req_")
    created = int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        body = {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text, "refusal": None}}],
            "usage": usage, "paywall": paywall,
        }
        return orjson.dumps(body), "application/json"

    def chunk(choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}) + b"\n\n"

    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": text},
                "finish_reason": None}], paywall=paywall),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ]
    if include_usage:
        events.append(chunk([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events), "text/event-stream"
