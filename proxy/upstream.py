"""The one HTTP client to providers: requests out, replies in, errors translated.

Everything the proxy sends to a provider — a chat completion, a gateway call — goes
through :meth:`Transport.send`. It owns the header policy both ways (what of the
client's request may travel, what of the provider's answer the client may see),
secret scrubbing, timeouts, and redirects (never followed: a 3xx is relayed as it
came). aiohttp's errors become the project's in :func:`_translate`, the one place.

A :class:`Reply`'s body is a stream of byte chunks. Every byte the provider sent is
delivered before an error that followed it (aiohttp raises a broken connection's
error before handing over what it had already buffered; :func:`_chunks` drains the
buffer first).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.settings import UpstreamSettings

_MASKED_SECRET = re.compile(rb"[A-Za-z0-9_\-]*\*{4,}[A-Za-z0-9_\-]*")
# Header and query names whose values are credentials (scrubbed wherever they appear).
_SECRET_NAME = re.compile(r"auth|key|token|secret|signature|password|credential", re.I)
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Which headers cross the proxy. Requests: only ``forward`` (never the client's
    credentials or cookies). Responses: only ``relay`` when it is set, else everything
    but ``drop`` (the gateway relays any provider's own headers)."""

    forward: frozenset[str]
    relay: frozenset[str] | None = None
    drop: frozenset[str] = frozenset()

    def request(self, client: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in client.items() if k in self.forward}

    def response(self, provider: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for name, value in provider:
            name = name.lower()
            if (name in self.relay) if self.relay is not None else (name not in self.drop):
                out.append((name, value))
        return out


# Chat completions: an allowlist both ways.
OPENAI_HEADERS = HeaderPolicy(
    forward=frozenset({"accept", "accept-language", "content-type", "openai-beta",
                       "user-agent"}),
    relay=frozenset({"content-type", "retry-after", "retry-after-ms",
                     "openai-processing-ms", "openai-version"}),
)
# Anthropic's Messages API: an allowlist both ways (its rate-limit headers by name).
ANTHROPIC_HEADERS = HeaderPolicy(
    forward=frozenset({"accept", "accept-language", "content-type", "anthropic-version",
                       "anthropic-beta", "user-agent"}),
    relay=frozenset({"content-type", "retry-after", "request-id",
                     *(f"anthropic-ratelimit-{kind}-{what}"
                       for kind in ("requests", "tokens", "input-tokens", "output-tokens")
                       for what in ("limit", "remaining", "reset"))}),
)
# The gateway: the provider's own headers reach the client, but hop-by-hop, framing,
# cookies, CORS (the proxy answers CORS itself) and the two the proxy sets (one each,
# RFC 9110 §5.3).
GATEWAY_HEADERS = HeaderPolicy(
    forward=frozenset({"accept", "accept-language", "content-type", "openai-beta",
                       "anthropic-version", "anthropic-beta", "user-agent"}),
    drop=frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                    "content-encoding", "set-cookie", "proxy-authenticate", "trailer",
                    "upgrade", "alt-svc", "strict-transport-security", "vary",
                    "access-control-allow-origin", "access-control-allow-credentials",
                    "access-control-allow-headers", "access-control-allow-methods",
                    "access-control-expose-headers", "access-control-max-age",
                    "date", "x-request-id"}),
)


def secret_values(headers: Mapping[str, str], query: Mapping[str, str] = {}) -> list[str]:
    """The credentials among a provider's configured headers and query parameters, each
    also without its auth scheme ("Bearer <key>" → "<key>"): what a provider echoes is
    the key alone. Other values (a content type, a version) are not secrets."""
    values = [v for k, v in [*headers.items(), *query.items()] if _SECRET_NAME.search(k)]
    return values + [v.split(" ", 1)[1] for v in values if " " in v]


def encoded(secrets: Iterable[str]) -> tuple[bytes, ...]:
    """The secrets worth hunting for (8 characters or more), as bytes, once."""
    return tuple(s.encode() for s in secrets if len(s) >= 8)


def scrub(body: bytes, secrets: Iterable[str | bytes], masked: bool = False) -> bytes:
    """Remove ``secrets`` from ``body``; with ``masked``, also keys shown masked
    (``sk-...****abcd``), as providers do in error messages."""
    for secret in secrets:
        raw = secret.encode() if isinstance(secret, str) else secret
        if len(raw) >= 8 and raw in body:
            body = body.replace(raw, b"[redacted]")
    return _MASKED_SECRET.sub(b"[redacted]", body) if masked else body


def _could_begin(data: bytes, secret: bytes) -> int:
    """How many bytes at the end of ``data`` could be the start of ``secret``."""
    i = data.find(secret[:1], max(0, len(data) - len(secret) + 1))
    while i != -1:
        if secret.startswith(data[i:]):
            return len(data) - i
        i = data.find(secret[:1], i + 1)
    return 0


class StreamScrubber:
    """Secrets out of a body that arrives in chunks, also one split across two: the end
    of a chunk that could begin a secret waits for the next chunk. (An SSE event ends
    in a blank line, which begins no secret, so no event is ever held back.)"""

    __slots__ = ("_held", "secrets")

    def __init__(self, secrets: tuple[bytes, ...]):
        self.secrets = secrets
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = scrub(self._held + chunk if self._held else chunk, self.secrets)
        keep = max(_could_begin(data, s) for s in self.secrets)
        self._held = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep] if keep else data

    def flush(self) -> bytes:
        rest, self._held = self._held, b""
        return rest


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request to a provider, final: URL, headers and body as they will be sent."""

    provider_id: str
    method: str
    url: str | URL
    headers: Mapping[str, str]
    body: bytes | None
    stream: bool  # a stream is held to the idle timeout between chunks, not a total
    policy: HeaderPolicy
    secrets: tuple[bytes, ...] = ()  # see encoded()
    params: Any = None
    slow_start: bool = False  # a stream may take read_timeout to begin (the gateway)


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterator[bytes]
    stream: bool
    _closer: Any = field(default=None, repr=False)
    deployment: str = ""  # set by a routed model's route: the deployment that answered
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers as ASGI sends them, values in the bytes the provider sent
        (aiohttp decodes them with surrogateescape)."""
        return [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in self.headers]

    async def read(self) -> bytes:
        """The whole body (its chunks are scrubbed of the provider's credentials; an
        error body also of keys shown masked)."""
        body = b"".join([c async for c in self.chunks])
        return body if self.ok else scrub(body, (), masked=True)

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


async def one(body: bytes) -> AsyncIterator[bytes]:
    yield body


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


_NO_USER_AGENT = ("User-Agent",)


def _has_user_agent(headers: Mapping[str, str]) -> bool:
    return any(len(k) == 10 and k.lower() == "user-agent" for k in headers)


class Transport:
    """Its session must skip no auto headers: a request that carries no User-Agent is
    sent without aiohttp's (asking for that on every request, as a session setting,
    costs aiohttp a header copy and merge each time)."""

    def __init__(self, session: aiohttp.ClientSession, limits: UpstreamSettings):
        self.session = session
        self.limits = limits
        # A whole answer; a stream; a stream that may be slow to start (see send()).
        self._timeouts = (
            aiohttp.ClientTimeout(total=limits.read_timeout,
                                  sock_connect=limits.connect_timeout),
            aiohttp.ClientTimeout(total=None, connect=limits.read_timeout,
                                  sock_connect=limits.connect_timeout,
                                  sock_read=limits.stream_idle_timeout),
            aiohttp.ClientTimeout(total=None, connect=limits.read_timeout,
                                  sock_connect=limits.connect_timeout))

    async def send(self, out: Outbound) -> Reply:
        """The provider's status and headers; the body follows in ``Reply.chunks``.

        A whole answer (not ``stream``) must come within ``read_timeout``. A stream may
        run long but not stall: every read, the first included, within
        ``stream_idle_timeout`` — but with ``slow_start`` the answer may take
        ``read_timeout`` to begin. aiohttp keeps these timers itself where it can (one
        per request, not one per chunk).
        """
        limits = self.limits
        # Waiting for a free pooled connection is waiting for the answer; only the TCP
        # (and TLS) connect itself is held to connect_timeout.
        timeout = self._timeouts[0 if not out.stream else 2 if out.slow_start else 1]
        sent = dict(out.headers)
        sending = self.session.request(
            out.method, out.url, params=out.params, data=out.body, headers=sent,
            timeout=timeout, auto_decompress=True, allow_redirects=False,
            skip_auto_headers=None if _has_user_agent(sent) else _NO_USER_AGENT)
        with _translate(out.provider_id):
            if out.slow_start:
                async with asyncio.timeout(limits.read_timeout):
                    resp = await sending
            else:
                resp = await sending
        headers = out.policy.response(resp.headers.items())
        upstream_id = resp.headers.get("x-request-id")
        if upstream_id and _PRINTABLE_ASCII.fullmatch(upstream_id):  # else dropped
            headers.append(("x-upstream-request-id", upstream_id))
        streamed = "text/event-stream" in resp.headers.get("content-type", "")
        if not out.stream:
            chunks = _whole(resp, out.provider_id, out.secrets)
        else:
            idle = limits.stream_idle_timeout if out.slow_start else None
            chunks = _chunks(resp, out.provider_id, idle, out.secrets)
        return Reply(resp.status, headers, chunks, stream=streamed, _closer=resp.close)


async def _whole(resp: aiohttp.ClientResponse, provider_id: str,
                 secrets: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    try:
        with _translate(provider_id):
            body = await resp.read()
    finally:
        resp.release()
    yield scrub(body, secrets) if secrets else body


async def _chunks(resp: aiohttp.ClientResponse, provider_id: str, idle: float | None,
                  secrets: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    """The body as it arrives, each read within ``idle`` seconds when that is set here
    (else aiohttp's ``sock_read`` keeps that time)."""
    content = resp.content
    scrubber = StreamScrubber(secrets) if secrets else None
    try:
        while True:
            try:
                if idle is None:
                    chunk = await content.readany()
                else:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError):
                # What arrived before the failure is the client's: deliver it first.
                rest = _buffered(content)
                if scrubber is not None:
                    rest = scrubber.feed(rest) + scrubber.flush()
                if rest:
                    yield rest
                raise
            if not chunk:
                if scrubber is not None and (rest := scrubber.flush()):
                    yield rest
                return
            if scrubber is not None:
                chunk = scrubber.feed(chunk)
                if not chunk:
                    continue
            yield chunk
    except TimeoutError as e:
        raise UpstreamTimeout(
            f"The provider '{provider_id}' stalled: it did not answer in time.") from e
    except aiohttp.ClientError as e:
        raise UpstreamUnavailable(f"The provider '{provider_id}' broke off.") from e
    finally:
        resp.release()


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """The bytes ``content`` holds, without the error that its public readers raise
    before them."""
    return content._read_nowait(-1) if content._buffer else b""
