"""What the adapters that meter tokens share: chat, Responses, Messages, embeddings.

:class:`Metered` prices a call's usage, tells a blocked request why (the notice, with
the connect version fetched), sends through the model's provider and charges a client
gone before the answer its prompt. :class:`Streamed` adds what the three that relay
streams share: the reaper's checkpoint, counting output when the provider reports
none, and the one rule a relayed stream settles by (:meth:`Streamed.settle_relayed`)
and a whole answer too (:meth:`Streamed.settle_whole`). Each adapter adds its wire
format: its meter, where its usage and output stand, its blocked reply and its answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response

from proxy.decide import Action, Decision, UserState
from proxy.errors import ModelNotFound
from proxy.ledger import Posted
from proxy.lifecycle import Charge, Plan, StreamCheckpoint, answer_headers, cost_headers
from proxy.limits import Verdict
from proxy.metering import Meter
from proxy.pricing import Price, Usage, cost, format_amount
from proxy.providers import Call
from proxy.relay import Framer, Outcome
from proxy.replies import Notice, notice
from proxy.routing import Route
from proxy.services import Services
from proxy.settings import ModelSettings, Settings
from proxy.upstream import Reply


def model_of(settings: Settings, name: str) -> ModelSettings:
    """The model a request names; 404 ``model_not_found`` when there is none."""
    model = settings.models.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model '{name}' does not exist or you do not have access to it.", param="model")
    return model


@dataclass(slots=True)
class Metered:
    """A call priced by its tokens at ``price`` (and the paywall's ``markup_bps``)."""

    plan: Plan
    services: Services
    route: Route
    call: Call
    price: Price
    scale: int
    markup_bps: int
    prompt_tokens: int  # counted here, for when the provider reports nothing
    # A whole answer, parsed, and whether its usage was the provider's.
    answered: tuple[Any, bool] = field(default=(None, False), kw_only=True)
    headers = staticmethod(answer_headers)

    def cost(self, usage: Usage) -> int:
        return cost(usage, self.price, self.markup_bps)  # the ledger bounds the charge

    def cost_fields(self, usage: Usage) -> dict[str, Any]:
        return {"cost": format_amount(self.cost(usage), self.scale),
                "cost_asset": self.price.asset}

    def priced(self, usage: Usage, outcome: str) -> Charge:
        return Charge(self.cost(usage), outcome, usage)

    async def told(self, decision: Decision, state: UserState) -> Notice:
        """What the blocked request is told; a connect link is issued against the
        user's connection version."""
        p = self.plan
        version = (await self.services.ledger.connect_version(p.paywall_id, p.user)
                   if decision.action is Action.CONNECT else 0)
        return notice(self.services.signer, p.paywall_id, p.paywall, p.user,
                      decision.action, state, self.scale, self.price.asset, version)

    async def send(self) -> Reply:
        reply = await self.route.send(self.call, self.plan.paywall.provider_keys)
        self.price = self.route.prices.get(reply.deployment, self.price)  # priced apart
        return reply

    def relays(self, reply: Reply) -> bool:
        return self.call.stream and reply.stream

    def gone(self) -> Charge:
        return self.priced(Usage(self.prompt_tokens, 0), Outcome.ABORTED.value)

    def costed(self, content: bytes, charge: Charge, posted: Posted | None,
               usage_object: Callable[[Usage], dict[str, Any]]) -> bytes:
        """A whole answer (``content``, as :attr:`answered` parsed it) with ``usage.cost``
        and ``usage.cost_asset`` added, its usage written as ``usage_object`` shapes the
        charged one when the provider reported none that could be used."""
        data, reported = self.answered
        if posted is None or charge.usage is None or not isinstance(data, dict):
            return content
        if not reported:
            data["usage"] = usage_object(charge.usage)
        data["usage"]["cost"] = format_amount(posted.charged, self.scale)
        data["usage"]["cost_asset"] = self.price.asset
        return orjson.dumps(data)

    def respond(self, reply: Reply, body: bytes, posted: Posted | None,
                verdict: Verdict | None, rename: Callable[[bytes], bytes] | None
                ) -> Response:
        """The client's response to a whole answer: ``body`` in the public model name, the
        provider's headers as let through, the limits' and the cost's."""
        response = Response(rename(body) if rename is not None else body, status_code=200)
        response.raw_headers += self.headers(reply, verdict, relayed=False)
        response.raw_headers += cost_headers(posted, self.scale)
        return response


@dataclass(slots=True)
class Streamed(Metered):
    """A call whose answer may be relayed as a stream, metered by :attr:`meter`."""

    model: str  # the public name
    upstream_model: str
    encoding: str
    meter: Meter | None = field(default=None, kw_only=True)

    def usage_in(self, data: Any) -> Usage | None:
        """The provider's usage in a whole answer (``data``, parsed), when it is charged
        as it is; None: the output is counted."""
        raise NotImplementedError

    def output_in(self, data: Any, raw: bytes) -> str:
        """The output of a whole answer, to count when its usage is None."""
        raise NotImplementedError

    async def counted(self, text: str) -> Usage:
        completion = await self.services.tokenizer.count_async(text, self.upstream_model,
                                                               self.encoding)
        return Usage(self.prompt_tokens, completion)

    def checkpoint(self) -> StreamCheckpoint | None:
        return StreamCheckpoint(self) if self.call.stream else None

    async def settle_relayed(self, framer: Framer, outcome: Outcome, sent: int) -> Charge:
        """A provider that failed (broke off, or said so in an error event) before any
        output is owed nothing, and after output what it delivered (``partial``). The
        provider's usage is charged when it covers what was delivered, else the output
        delivered is counted; a client gone before any output owes the prompt."""
        meter = self.meter
        assert meter is not None and framer is meter
        if meter.failed:
            outcome = Outcome.PARTIAL
        if outcome is Outcome.PARTIAL and not meter.delivered:
            return Charge(None, outcome.value)
        if meter.usage is not None:
            done = meter.done and not meter.failed
            return self.priced(meter.usage, "completed" if done else outcome.value)
        if meter.delivered:
            counted = await self.counted("".join(meter.text))
            return self.priced(meter.with_counted(counted), outcome.value)
        return self.priced(Usage(self.prompt_tokens, 0), outcome.value)

    async def settle_whole(self, content: bytes) -> Charge:
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            data = None
        usage = self.usage_in(data)
        self.answered = data, usage is not None
        if usage is None:  # none, or refused: the output is counted
            usage = await self.counted(self.output_in(data, content))
        return self.priced(usage, "completed")
