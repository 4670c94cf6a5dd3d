"""Provider kinds: what a chat completion becomes on its way to a provider.

A provider turns a :class:`Call` into a :class:`~proxy.upstream.Reply`. ``openai``
covers every OpenAI-compatible HTTP API (its URL, its auth header, extra headers and
query parameters) and sends through the one :class:`~proxy.upstream.Transport`;
``anthropic`` (:mod:`proxy.anthropic`) speaks Anthropic's Messages API through it, and
answers chat completions translated; ``mock`` answers itself (chat completions and
embeddings), for the quick start, demos and benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from proxy.anthropic import AnthropicProvider
from proxy.settings import ProviderSettings
from proxy.upstream import OPENAI_HEADERS, Outbound, Reply, Transport, encoded, one, secret_values


@dataclass(frozen=True, slots=True)
class Call:
    """One call to send: the body is final (model already mapped, and in the
    provider's own format when it is not the client's), ``payload`` the client's
    request as parsed. ``path`` is the endpoint under the provider's base URL."""

    body: bytes
    stream: bool
    request_id: str
    headers: Mapping[str, str]
    api_key: str = ""  # the route sets the deployment's
    payload: Mapping[str, Any] = field(default_factory=dict)
    path: str = "/chat/completions"

    def keyed(self, api_key: str, body: bytes | None = None) -> Call:
        """This call with ``api_key`` (and ``body``): ``dataclasses.replace``, at a
        third of its cost (it is made for every request)."""
        return Call(self.body if body is None else body, self.stream, self.request_id,
                    self.headers, api_key, self.payload, self.path)


class Provider(Protocol):
    async def send(self, call: Call) -> Reply: ...


class OpenAIProvider:
    """Any OpenAI-compatible API: ``POST {base_url}{call.path}``."""

    def __init__(self, provider_id: str, conf: ProviderSettings, transport: Transport):
        self.id = provider_id
        self.base_url = conf.base_url.rstrip("/")
        self.conf = conf
        self.transport = transport
        self.auth_header = conf.auth_header.lower()
        self.secrets = encoded(secret_values(conf.headers, conf.query))

    def _headers(self, call: Call) -> dict[str, str]:
        headers = OPENAI_HEADERS.request(call.headers)
        headers["content-type"] = "application/json"
        headers.update(self.conf.headers)
        headers["x-request-id"] = call.request_id
        if call.api_key:
            if self.auth_header == "authorization":
                headers["authorization"] = f"Bearer {call.api_key}"
            else:
                headers[self.auth_header] = call.api_key
        return headers

    async def send(self, call: Call) -> Reply:
        secrets = (*encoded([call.api_key]), *self.secrets) if call.api_key else self.secrets
        return await self.transport.send(Outbound(
            self.id, "POST", self.base_url + call.path, self._headers(call), call.body, call.stream,
            OPENAI_HEADERS, secrets, self.conf.query or None))


MOCK_DIMENSIONS = 16  # a mock embedding's length, unless the request says
MOCK_MAX_DIMENSIONS = 4096


class MockProvider:
    """Answers like an OpenAI-compatible API would, deterministically, with no network.

    A chat completion is ``completion_tokens`` words; usage counts one token per word of
    the prompt and of the answer. Streams send one word per chunk, ``chunk_delay_ms``
    apart, and a usage chunk when ``stream_options.include_usage`` asks for it.

    Embeddings (``call.path`` ``/embeddings``) are vectors derived from each input
    (:meth:`vector`, ``dimensions`` long, else :data:`MOCK_DIMENSIONS`), one token per
    word of a string and per id of a token array.
    """

    WORDS = ("This", "is", "a", "mock", "answer", "from", "the", "paywall", "proxy.")

    def __init__(self, provider_id: str, conf: ProviderSettings):
        self.id = provider_id
        self.conf = conf

    def _words(self) -> list[str]:
        n = self.conf.completion_tokens
        return [self.WORDS[i % len(self.WORDS)] for i in range(n)]

    @staticmethod
    def _prompt_tokens(payload: Mapping[str, Any]) -> int:
        count = 0
        for message in payload.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                count += len(content.split())
            elif isinstance(content, list):
                count += sum(len(str(p.get("text", "")).split())
                             for p in content if isinstance(p, dict))
        return count

    @staticmethod
    def vector(item: str | list[int], dimensions: int) -> list[float]:
        """A deterministic embedding of one input, values in [-1, 1)."""
        seed = orjson.dumps(item)
        out: list[float] = []
        block = 0
        while len(out) < dimensions:
            digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
            out.extend((b - 128) / 128 for b in digest)
            block += 1
        return out[:dimensions]

    async def send(self, call: Call) -> Reply:
        if self.conf.latency_ms:
            await asyncio.sleep(self.conf.latency_ms / 1000)
        if call.path == "/embeddings":
            return self._embeddings(call.payload)
        p = call.payload
        model = str(p.get("model", "mock"))
        words = self._words()
        text = " ".join(words)
        fmt = p.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            text = orjson.dumps({"answer": text}).decode()
            words = [text]
        usage = {"prompt_tokens": self._prompt_tokens(p),
                 "completion_tokens": self.conf.completion_tokens,
                 "total_tokens": self._prompt_tokens(p) + self.conf.completion_tokens}
        cid = "chatcmpl-" + call.request_id.removeprefix("req_")
        created = int(time.time())
        headers = [("x-upstream-request-id", cid)]
        if not call.stream:
            body = orjson.dumps({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage,
            })
            return Reply(200, [("content-type", "application/json"), *headers], one(body),
                         stream=False)
        opts = p.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        return Reply(200, [("content-type", "text/event-stream"), *headers],
                     self._stream(cid, created, model, words, usage, include_usage), stream=True)

    def _embeddings(self, p: Mapping[str, Any]) -> Reply:
        raw = p["input"]
        items: list[Any] = ([raw] if isinstance(raw, str) or isinstance(raw[0], int)
                            else list(raw))
        dims = min(p.get("dimensions") or MOCK_DIMENSIONS, MOCK_MAX_DIMENSIONS)
        as_base64 = p.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(items):
            vector: list[float] | str = self.vector(item, dims)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in items)
        body = orjson.dumps({"object": "list", "data": data, "model": p.get("model"),
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return Reply(200, [("content-type", "application/json")], one(body), stream=False)

    async def _stream(self, cid: str, created: int, model: str, words: list[str],
                      usage: dict[str, int], include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(choices: list[Any], **extra: Any) -> bytes:
            event = {"id": cid, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                event["usage"] = None
            return b"data: " + orjson.dumps(event) + b"\n\n"

        delay = self.conf.chunk_delay_ms / 1000
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}])
        for i, word in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            piece = word if i == 0 else " " + word
            yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if include_usage:
            yield chunk([], usage=usage)
        yield b"data: [DONE]\n\n"


def build_providers(providers: Mapping[str, ProviderSettings], transport: Transport
                    ) -> dict[str, Provider]:
    built: dict[str, Provider] = {}
    for pid, conf in providers.items():
        if conf.kind == "mock":
            built[pid] = MockProvider(pid, conf)
        elif conf.kind == "anthropic":
            built[pid] = AnthropicProvider(pid, conf, transport)
        else:
            built[pid] = OpenAIProvider(pid, conf, transport)
    return built
