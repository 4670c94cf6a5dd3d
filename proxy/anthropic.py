"""The ``anthropic`` provider kind: Anthropic's Messages API behind the one transport.

A call to ``/messages`` carries a native Messages body and is posted as it is; its
answer comes back as Anthropic sent it (headers through :data:`ANTHROPIC_HEADERS`).
A call to ``/chat/completions`` carries the Messages request the chat adapter
translated its payload into (:func:`proxy.translate.to_messages`, once: it bounds the
hold on it too), and the answer — whole, streamed, or an error — comes back as OpenAI's
chat completions would have sent it, so chat's metering reads it unchanged.

Every request carries ``x-api-key`` (the call's key), ``anthropic-version`` (the
client's own when it sent one, else the provider's setting), those of the client's
``anthropic-beta`` features the provider allows (``anthropic_betas``: a beta may bill
above the model's prices, so none passes unless the operator says so), and the
provider's configured headers and query parameters. The credentials among them are
scrubbed from whatever comes back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import orjson

from proxy.errors import InvalidRequest
from proxy.settings import ProviderSettings
from proxy.translate import (
    ChunkTranslator,
    answer_tool,
    to_completion,
    to_openai_error,
)
from proxy.upstream import ANTHROPIC_HEADERS, Outbound, Reply, Transport, encoded, secret_values

if TYPE_CHECKING:  # proxy.providers builds this kind
    from proxy.providers import Call

MESSAGES = "/messages"
CHAT = "/chat/completions"


class AnthropicProvider:
    """``POST {base_url}/messages``, natively."""

    def __init__(self, provider_id: str, conf: ProviderSettings, transport: Transport):
        self.id = provider_id
        self.url = conf.base_url.rstrip("/") + MESSAGES
        self.conf = conf
        self.transport = transport
        self.secrets = encoded(secret_values(conf.headers, conf.query))
        self.betas = frozenset(conf.anthropic_betas)

    def _headers(self, call: Call) -> dict[str, str]:
        headers = ANTHROPIC_HEADERS.request(call.headers)
        asked = headers.pop("anthropic-beta", "").split(",")
        allowed = [beta for beta in (b.strip() for b in asked) if beta in self.betas]
        if allowed:
            headers["anthropic-beta"] = ",".join(allowed)
        headers.setdefault("anthropic-version", self.conf.anthropic_version)
        headers["content-type"] = "application/json"
        headers.update(self.conf.headers)
        headers["x-request-id"] = call.request_id
        if call.api_key:
            headers["x-api-key"] = call.api_key
        return headers

    async def _post(self, call: Call, body: bytes, stream: bool) -> Reply:
        secrets = (*encoded([call.api_key]), *self.secrets) if call.api_key else self.secrets
        return await self.transport.send(Outbound(
            self.id, "POST", self.url, self._headers(call), body, stream, ANTHROPIC_HEADERS,
            secrets, self.conf.query or None))

    async def send(self, call: Call) -> Reply:
        if call.path == MESSAGES:
            return await self._post(call, call.body, call.stream)
        if call.path == CHAT:
            return await self._chat(call)
        raise InvalidRequest(f"The provider '{self.id}' (anthropic) does not serve "
                             f"{call.path}.")

    async def _chat(self, call: Call) -> Reply:
        """A chat completion, sent as Messages, answered as a chat completion."""
        reply = await self._post(call, call.body, call.stream)
        created = int(time.time())
        headers = [(k, v) for k, v in reply.headers if k != "content-type"]
        answer = answer_tool(call.payload)
        if reply.ok and call.stream and reply.stream:
            options = call.payload.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            stream = ChunkTranslator(include_usage, created,
                                     str(call.payload.get("model") or ""), answer)
            return Reply(reply.status, [("content-type", "text/event-stream"), *headers],
                         _translated(reply, stream.feed), stream=True, _closer=reply.close)

        def whole(raw: bytes) -> bytes:
            if not reply.ok:
                return to_openai_error(reply.status, raw)
            try:
                completion = to_completion(orjson.loads(raw), created, answer)
            except orjson.JSONDecodeError:
                completion = None
            return raw if completion is None else orjson.dumps(completion)

        return Reply(reply.status, [("content-type", "application/json"), *headers],
                     _translated(reply, whole, whole=True), stream=False, _closer=reply.close)


async def _translated(reply: Reply, translate: Callable[[bytes], bytes], whole: bool = False
                      ) -> AsyncIterator[bytes]:
    """``reply``'s body through ``translate``: chunk by chunk, or ``whole`` in one go.
    An error the body ends in is raised after what came before it is delivered."""
    try:
        if whole:
            yield translate(b"".join([c async for c in reply.chunks]))
            return
        async for chunk in reply.chunks:
            out = translate(chunk)
            if out:
                yield out
    finally:
        aclose = getattr(reply.chunks, "aclose", None)
        if aclose is not None:
            await aclose()
