"""The ``anthropic`` provider kind: Anthropic's Messages API behind the one transport.

A call to ``/messages`` carries a native Messages body and is posted as it is; its
answer comes back as Anthropic sent it (headers through :data:`ANTHROPIC_HEADERS`).

Every request carries ``x-api-key`` (the call's key), ``anthropic-version`` (the
client's own when it sent one, else the provider's setting), the client's
``anthropic-beta`` when it sent one, and the provider's configured headers and query
parameters. The credentials among them are scrubbed from whatever comes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.errors import InvalidRequest
from proxy.settings import ProviderSettings
from proxy.upstream import ANTHROPIC_HEADERS, Outbound, Reply, Transport, encoded, secret_values

if TYPE_CHECKING:  # proxy.providers builds this kind
    from proxy.providers import Call

MESSAGES = "/messages"


class AnthropicProvider:
    """``POST {base_url}/messages``, natively."""

    def __init__(self, provider_id: str, conf: ProviderSettings, transport: Transport):
        self.id = provider_id
        self.url = conf.base_url.rstrip("/") + MESSAGES
        self.conf = conf
        self.transport = transport
        self.secrets = encoded(secret_values(conf.headers, conf.query))

    def _headers(self, call: Call) -> dict[str, str]:
        headers = ANTHROPIC_HEADERS.request(call.headers)
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
        raise InvalidRequest(f"The provider '{self.id}' (anthropic) does not serve "
                             f"{call.path}.")
