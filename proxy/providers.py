"""Providers: where a chat completion is sent, and what comes back.

A provider turns a :class:`Call` into a :class:`Reply`: a status, the headers the
client may see, and the body as a stream of byte chunks that the relay passes on
unchanged. ``openai`` covers every OpenAI-compatible HTTP API; ``mock`` answers
itself, for the quick start, demos and benchmarks.

Errors from the HTTP client become the proxy's own errors in exactly one place,
:func:`_translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.settings import ProviderSettings, UpstreamSettings

# Client headers that may travel upstream; everything else (the paywall key, cookies,
# other credentials, hop-by-hop headers) stays here.
REQUEST_HEADERS = frozenset({"accept", "accept-language", "content-type", "openai-beta",
                             "user-agent"})
# Provider headers the client may see.
RESPONSE_HEADERS = frozenset({"content-type", "retry-after", "retry-after-ms",
                              "openai-processing-ms", "openai-version"})
_MASKED_SECRET = re.compile(rb"[A-Za-z0-9_\-]*\*{4,}[A-Za-z0-9_\-]*")


@dataclass(frozen=True, slots=True)
class Call:
    """One chat completion to send: the body is final (model already mapped)."""

    body: bytes
    stream: bool
    request_id: str
    headers: Mapping[str, str]
    api_key: str
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterator[bytes]
    stream: bool
    _closer: Any = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks])

    def close(self) -> None:
        """Drop the upstream connection; mid-body, this cancels the provider's work."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    async def aclose(self) -> None:
        self.close()
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class Provider(Protocol):
    async def send(self, call: Call) -> Reply: ...


def scrub(body: bytes, secrets: list[str]) -> bytes:
    """Remove secrets, whole or masked (``sk-...****abcd``), from an upstream error body."""
    for secret in secrets:
        if len(secret) >= 8:
            body = body.replace(secret.encode(), b"[redacted]")
    return _MASKED_SECRET.sub(b"[redacted]", body)


@contextlib.contextmanager
def _translate(provider_id: str) -> Iterator[None]:
    try:
        yield
    except TimeoutError as e:
        raise UpstreamTimeout(f"The provider '{provider_id}' did not answer in time.") from e
    except aiohttp.ClientError as e:
        raise UpstreamUnavailable(
            f"The provider '{provider_id}' could not be reached ({type(e).__name__})."
        ) from e


class OpenAIProvider:
    """Any OpenAI-compatible API: ``POST {base_url}/chat/completions``."""

    def __init__(self, provider_id: str, conf: ProviderSettings, limits: UpstreamSettings,
                 session: aiohttp.ClientSession):
        self.id = provider_id
        self.url = conf.base_url.rstrip("/") + "/chat/completions"
        self.conf = conf
        self.limits = limits
        self.session = session
        self.auth_header = conf.auth_header.lower()

    def _headers(self, call: Call) -> dict[str, str]:
        headers = {k: v for k, v in call.headers.items() if k in REQUEST_HEADERS}
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
        timeout = aiohttp.ClientTimeout(
            total=None if call.stream else self.limits.read_timeout,
            # Waiting for a free pooled connection is waiting for the answer; only the
            # TCP (and TLS) connect itself is held to connect_timeout.
            connect=self.limits.read_timeout, sock_connect=self.limits.connect_timeout,
            sock_read=self.limits.stream_idle_timeout if call.stream else None,
        )
        with _translate(self.id):
            resp = await self.session.post(
                self.url, data=call.body, headers=self._headers(call),
                params=self.conf.query or None, timeout=timeout, auto_decompress=True,
                allow_redirects=False,
            )
            headers = [(k.lower(), v) for k, v in resp.headers.items()
                       if k.lower() in RESPONSE_HEADERS]
            if upstream_id := resp.headers.get("x-request-id"):
                headers.append(("x-upstream-request-id", upstream_id))
            if not 200 <= resp.status < 300:
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
                body = scrub(raw, [call.api_key, *self.conf.headers.values(),
                                   *self.conf.query.values()])
                return Reply(resp.status, headers, _one(body), stream=False)
            if not call.stream:
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
                return Reply(resp.status, headers, _one(raw), stream=False)
        streamed = "text/event-stream" in resp.headers.get("content-type", "")
        return Reply(resp.status, headers, self._relay(resp), stream=streamed,
                     _closer=resp.close)

    async def _relay(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            with _translate(self.id):
                async for chunk in resp.content.iter_any():
                    yield chunk
        finally:
            resp.release()


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


class MockProvider:
    """Answers like an OpenAI-compatible API would, deterministically, with no network.

    The answer is ``completion_tokens`` words; usage counts one token per word of the
    prompt and of the answer. Streams send one word per chunk, ``chunk_delay_ms`` apart,
    and a usage chunk when ``stream_options.include_usage`` asks for it.
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

    async def send(self, call: Call) -> Reply:
        if self.conf.latency_ms:
            await asyncio.sleep(self.conf.latency_ms / 1000)
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
            return Reply(200, [("content-type", "application/json"), *headers], _one(body),
                         stream=False)
        opts = p.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        return Reply(200, [("content-type", "text/event-stream"), *headers],
                     self._stream(cid, created, model, words, usage, include_usage), stream=True)

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


def build_providers(providers: Mapping[str, ProviderSettings], limits: UpstreamSettings,
                    session: aiohttp.ClientSession) -> dict[str, Provider]:
    built: dict[str, Provider] = {}
    for pid, conf in providers.items():
        if conf.kind == "mock":
            built[pid] = MockProvider(pid, conf)
        else:
            built[pid] = OpenAIProvider(pid, conf, limits, session)
    return built
