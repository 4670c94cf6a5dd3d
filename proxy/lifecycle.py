"""The one metered lifecycle every call that costs money runs through.

    admit (limits) ─▶ hold the worst case ─▶ decide ─┬─ blocked ─▶ the adapter's answer
                                                     └─ forward ─▶ provider ─▶ relay
    ─▶ settle (post the cost, or void) ─▶ release the leases

An :class:`Adapter` says what differs per wire format — how much to hold, how to send,
how to read usage and delivered output in the answer, what a blocked request is
answered with; :func:`run` does the rest, the same for all. Chat completions
(:mod:`proxy.chat`), the API gateway (:mod:`proxy.gateway`), the Responses API
(:mod:`proxy.responses`), embeddings (:mod:`proxy.embeddings`) and Anthropic's Messages
(:mod:`proxy.messages`) are adapters.

What a request acquires — its admission (a concurrency lease), its hold — is acquired
in tasks of its own and released by one :class:`Ticket`, whose :meth:`Ticket.close`
runs once, shielded, in a task of its own: a client that leaves, a provider that
fails, a cancellation at any await, all end there, and the hold is resolved and the
lease freed together or not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from proxy import guard
from proxy.decide import Action, Decision, UserState, decide
from proxy.errors import Forbidden, InvalidRequest, ProxyError, RateLimited
from proxy.ledger import Posted
from proxy.limits import Verdict
from proxy.observe import Record
from proxy.pricing import MAX_UNITS, Usage, format_amount
from proxy.reaper import Checkpoint
from proxy.relay import CLIENT_GONE, Framer, Outcome, StreamRelay, unless_client_leaves
from proxy.requestid import new_request_id
from proxy.routing import RoutingFailed
from proxy.services import Services, resolve_hold
from proxy.settings import PaywallSettings
from proxy.settler import Owed
from proxy.spool import JournalFile
from proxy.upstream import Reply

T = TypeVar("T")
log = logging.getLogger("proxy.lifecycle")


@dataclass(frozen=True, slots=True)
class Plan:
    """What a call may cost at most and where that is held; an adapter's first answer."""

    paywall_id: str
    paywall: PaywallSettings
    user: str
    limits: guard.Limits
    asset: str
    hold: int | None  # the worst case in the asset's smallest unit; None: nothing is held
    label: str  # the ledger entry's model ("gpt-4o", "api:search")
    assets: frozenset[str]  # the accounts a first-seen user is opened with
    tokens: int = 0  # counted against token limits at admission, corrected at the end
    cap_param: str = "max_tokens"  # the request field that bounds the worst case


@dataclass(frozen=True, slots=True)
class Charge:
    """How a forwarded call settles: ``amount`` posted (None voids the hold), with the
    usage it was priced from and the outcome the ledger records. ``amount`` is the exact
    cost: beyond the hold the ledger takes only what the balance covers, and records
    the rest as uncharged."""

    amount: int | None
    outcome: str
    usage: Usage | None = None

    @property
    def tokens(self) -> int:
        u = self.usage
        return u.prompt_tokens + u.completion_tokens if u else 0


FAILED = Charge(None, "failed")


class Adapter(Protocol):
    """One wire format's part of the lifecycle. Only :meth:`send` talks to a provider;
    the settle methods read what came back and count, no more."""

    plan: Plan

    @property
    def error_tail(self) -> Callable[[ProxyError], bytes] | None:
        """What ends a relayed answer the provider broke off; None: cut the connection."""

    async def blocked(self, decision: Decision, state: UserState) -> Response:
        """The answer to a request that is not forwarded (connect, top up, spend cap)."""

    async def send(self) -> Reply: ...

    def headers(self, reply: Reply, verdict: Verdict | None, relayed: bool
                ) -> list[tuple[bytes, bytes]]:
        """The response headers: the provider's (as the transport let them through) and
        the adapter's own."""

    def relays(self, reply: Reply) -> bool:
        """Whether a 2xx answer is relayed as it arrives (else read whole, then settled)."""

    def framer(self) -> Framer:
        """What the relay passes each chunk through, watching it for usage and output."""

    def checkpoint(self) -> Checkpoint | None:
        """What a live relay has delivered so far, for the reaper (None: nothing to say)."""

    def gone(self) -> Charge:
        """The charge for a client that left before the provider answered."""

    async def settle_relayed(self, framer: Framer, outcome: Outcome, sent: int) -> Charge: ...

    async def settle_whole(self, content: bytes) -> Charge: ...

    def answer(self, reply: Reply, content: bytes, charge: Charge, posted: Posted | None,
               verdict: Verdict | None) -> Response:
        """The client's response to a whole 2xx answer, once it is settled."""


class Counting(Protocol):
    """What a stream's meter keeps (:class:`proxy.metering.Meter`): the provider's usage
    when it covers the output, the output delivered so far, and the charge for it counted."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def text(self) -> list[str]: ...

    def with_counted(self, counted: Usage) -> Usage: ...


class Streaming(Protocol):
    """What an adapter that relays streams tells its :class:`StreamCheckpoint`."""

    @property
    def services(self) -> Services: ...

    @property
    def meter(self) -> Counting | None:
        """The live stream's meter; None until the relay starts."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def upstream_model(self) -> str: ...

    @property
    def encoding(self) -> str: ...

    def cost(self, usage: Usage) -> int: ...


class StreamCheckpoint:
    """What a live stream has delivered so far, for the reaper: the provider's usage
    when it covers the output, else the output counted as it grows (each text once)."""

    def __init__(self, call: Streaming):
        self.call = call
        self.seen = 0  # of meter.text, counted so far
        self.tokens = 0

    def __call__(self) -> dict[str, Any] | None:
        c = self.call
        meter = c.meter
        if meter is None:
            return None
        usage = meter.usage
        if usage is None:
            new = "".join(meter.text[self.seen:])
            self.seen = len(meter.text)
            self.tokens += c.services.tokenizer.count(new, c.upstream_model, c.encoding)
            if not self.tokens:
                return None
            usage = meter.with_counted(Usage(c.prompt_tokens, self.tokens))
        return {"prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens, "cost": c.cost(usage)}


# Keep proxies between here and the client from buffering a relayed stream.
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def answer_headers(reply: Reply, verdict: Verdict | None, relayed: bool
                   ) -> list[tuple[bytes, bytes]]:
    """A model answer's headers (:meth:`Adapter.headers`): the provider's, as the
    transport let them through; the limits' ``verdict`` on a relayed or 2xx answer; and
    :data:`STREAM_HEADERS` when it is relayed."""
    out = reply.raw_headers()
    if reply.deployment:
        out.append((b"x-upstream-deployment", reply.deployment.encode()))
    if verdict is not None and (relayed or reply.ok):
        out += verdict.raw_headers()
    return out + STREAM_HEADERS if relayed else out


def cost_headers(posted: Posted | None, scale: int) -> list[tuple[bytes, bytes]]:
    """What a whole answer was charged and the balance after (``x-paywall-cost``,
    ``x-paywall-balance``, in the asset's units of ``scale``); none when nothing was
    posted."""
    if posted is None:
        return []
    return [(b"x-paywall-cost", format_amount(posted.charged, scale).encode()),
            (b"x-paywall-balance", format_amount(posted.balance_after, scale).encode())]


def resolution(state: UserState | None, action: Action | None, charge: Charge | None
               ) -> tuple[str, int | None]:
    """What becomes of a request's hold at the end: ("none", None) when there is no
    hold, ("void", None), or ("post", amount). Pure; the rule :class:`Ticket` follows."""
    if state is None or state.hold_id is None:
        return "none", None
    if action is not Action.FORWARD or charge is None or charge.amount is None:
        return "void", None
    return "post", charge.amount


class Ticket:
    """What one request holds — its admission, its hold — and the one place that
    releases them."""

    def __init__(self, services: Services, rec: Record, call: Adapter):
        self.services = services
        self.rec = rec
        self.call = call
        self.plan = call.plan
        self.lease = ""  # the limiter's id for this request, set on admission
        self.action: Action | None = None
        self.charge: Charge | None = None
        self._admitting: asyncio.Task[Verdict | None] | None = None
        self._holding: asyncio.Task[UserState] | None = None
        self._closing: asyncio.Task[Posted | None] | None = None
        self._known: asyncio.Future[Posted | None] | None = None  # close(answered=True)

    async def admit(self) -> Verdict | None:
        p = self.plan
        rules = guard.rules(p.limits, p.paywall_id, p.user, p.tokens)
        if not rules:  # nothing to count, nothing to acquire
            return None
        self.lease = new_request_id()  # never the client's X-Request-Id
        # In a task of its own, kept before it is awaited: a request cancelled while it
        # runs still learns, in close(), what it acquired.
        self._admitting = self.services.tasks.spawn(self.services.gate.admit(
            rules, self.lease, p.limits.lease_seconds, p.limits.fail_open))
        return await asyncio.shield(self._admitting)  # a cancelled wait leaves it be

    async def hold(self) -> UserState:
        self._holding = self.services.tasks.spawn(self._place())
        return await asyncio.shield(self._holding)

    async def _place(self) -> UserState:
        p = self.plan
        services = self.services
        ledger = services.ledger
        amount = p.hold
        assert amount is not None
        caps = guard.spend_caps(p.limits, p.user, p.asset, services.settings.assets)

        async def place() -> UserState:
            return await ledger.hold(p.paywall_id, p.user, p.asset, amount,
                                     request_id=self.rec.request_id, model=p.label,
                                     require_connect=p.paywall.require_connect, caps=caps,
                                     timezone=p.limits.timezone)

        state = await place()
        if not state.exists or (state.hold_id is None and not state.has_account):
            await ledger.open_user(p.paywall_id, p.user, assets=set(p.assets),
                                   grants=services.grants[p.paywall_id])
            state = await place()
        return state

    async def _price(self, price: Callable[[], Awaitable[Charge]]) -> Charge:
        try:
            self.charge = await price()
        except Exception:  # a bug: still charge what is surely owed
            log.exception("pricing the answer of %s failed", self.rec.request_id)
            self.charge = self.call.gone()
        return self.charge

    def _foreseen(self, state: UserState, what: str, amount: int | None) -> Posted | None:
        """The post of ``amount``, known without the ledger when it is within the hold:
        the charge, and the balance at the hold less it (true unless another request of
        the user moves the balance meanwhile). None when there is nothing to post or
        the charge exceeds the hold (what the ledger takes beyond it depends on what is
        available then)."""
        if what != "post" or amount is None or state.balance is None or (
                self.plan.hold is None or amount > self.plan.hold):
            return None
        return Posted(amount, state.balance - amount)

    async def close(self, price: Callable[[], Awaitable[Charge]] | None = None, *,
                    answered: bool = False) -> Posted | None:
        """Resolve the hold (post :attr:`charge`, or what ``price`` finds, or void) and
        free the leases; once, in a task of its own (tracked: shutdown waits for it).
        Pricing runs inside it too: a request cancelled while its answer is counted is
        still charged for it.

        ``answered`` (``billing.settle_after_answer``; the answer is whole, or relayed
        to its end): returns as soon as the post is known, a charge within the hold
        (:meth:`_foreseen`), having written it in the request's record; the post
        follows, riding a later batch, and the leases end without waiting for it. A
        charge beyond the hold is posted first, as when not ``answered``."""
        if self._closing is None:
            if answered:
                self._known = asyncio.get_running_loop().create_future()
            self._closing = self.services.tasks.spawn(self._close(price, answered))
            if answered:
                self._closing.add_done_callback(self._closed)
        if self._known is not None:
            return await asyncio.shield(self._known)
        return await asyncio.shield(self._closing)

    def _closed(self, task: asyncio.Task[Posted | None]) -> None:
        self._know(None)  # a close cancelled before it ran
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("settling %s after its answer failed", self.rec.request_id,
                      exc_info=e)

    def _know(self, posted: Posted | None) -> None:
        if self._known is not None and not self._known.done():
            self._known.set_result(posted)

    async def _close(self, price: Callable[[], Awaitable[Charge]] | None,
                     answered: bool) -> Posted | None:
        verdict = await _outcome_of(self._admitting)
        state = await _outcome_of(self._holding)
        apart = False  # the post is known before it is written: the leases end apart
        posted: Posted | None = None
        try:
            if price is not None:
                await self._price(price)
            what, amount = resolution(state, self.action, self.charge)
            if what == "none":
                return None
            assert state is not None and state.hold_id is not None
            charge = self.charge or FAILED
            usage = charge.usage if what == "post" else None
            self._counted(usage)
            rec = self.rec
            meta = ({"deployment": rec.deployment, "attempts": rec.attempts}
                    if rec.deployment and what == "post" else None)
            known = self._foreseen(state, what, amount) if answered else None
            entry = None if known is None else await self._journaled(
                Owed(state.hold_id, amount, usage, charge.outcome, meta, rec.request_id))
            if known is not None and entry is not None:
                apart = True
                rec.settlement = charge.outcome
                rec.cost, rec.uncharged = known.charged, known.uncharged
                self._know(known)
                self._release_apart(verdict)  # it starts after the post is queued, below
            posted = await resolve_hold(self.services, rec, state.hold_id, amount, usage,
                                        charge.outcome, meta, answered=apart)
            if entry is not None:  # in the ledger, or owed (and journaled as such)
                self.services.settlements.journal.done(entry)
            return posted
        finally:
            try:
                if not apart:  # else started above, with the answer
                    await self._release(verdict)
            finally:
                self._know(posted)  # whatever happened: the answer must not wait forever

    async def _journaled(self, owed: Owed) -> JournalFile | None:
        """``owed`` in the journal before its answer goes out, on disk unless
        ``billing.synchronous_commit`` is off: a process or a machine that stops before
        the post loses nothing (the journal is replayed). None when it could not be
        written: the post then goes first, as when not ``answered``."""
        journal = self.services.settlements.journal
        try:
            entry = journal.append(owed.line())
        except OSError:
            journal.trouble("the settlement journal could not be written; %s is settled "
                            "before its answer", self.rec.request_id)
            return None
        if self.services.settings.billing.synchronous_commit:
            try:
                await journal.durable()
            except OSError:
                journal.trouble("the settlement journal could not be synced; %s is "
                                "settled before its answer", self.rec.request_id)
                journal.done(entry)  # posted below, before the answer: a replay finds it so
                return None
        return entry

    def _counted(self, usage: Usage | None) -> None:
        if usage is not None:
            self.rec.prompt_tokens = usage.prompt_tokens
            self.rec.completion_tokens = usage.completion_tokens

    def _release_apart(self, verdict: Verdict | None) -> None:
        """:meth:`_release` in a task of its own; its failure is logged."""
        if self._admitting is None:  # nothing to release
            return

        async def release() -> None:
            try:
                await self._release(verdict)
            except Exception:
                log.exception("freeing the leases of %s failed", self.rec.request_id)

        self.services.tasks.spawn(release())

    async def _release(self, verdict: Verdict | None) -> None:
        """Free the admission's leases, correcting its token count by what was used."""
        used = self.charge.tokens if self.charge and self.charge.amount is not None else 0
        if self._admitting is not None:
            await self.services.gate.finish(verdict, self.lease, used - self.plan.tokens)


async def _outcome_of(task: asyncio.Task[T] | None) -> T | None:
    """The task's result once it ends; None when it failed or there was none."""
    if task is None:
        return None
    try:
        return await task
    except Exception:
        return None


async def run(request: Request, services: Services, rec: Record, call: Adapter
              ) -> Response | StreamRelay:
    """Carry ``call`` through the lifecycle; the answer for the client."""
    plan = call.plan
    if plan.hold is not None and plan.hold > MAX_UNITS:
        raise InvalidRequest("This request's worst case is more than a balance can hold; "
                             f"lower {plan.cap_param}.", param=plan.cap_param)
    if plan.limits.blocked:
        _tell(services, rec, "request.blocked", "blocked", {})
        raise Forbidden("This user is blocked by the app's operator.", code="user_blocked")
    ticket = Ticket(services, rec, call)
    relay: StreamRelay | None = None
    try:
        try:
            verdict = await ticket.admit()
        except RateLimited as e:
            _tell(services, rec, "limit.reached", e.limit, {"message": e.message})
            raise
        if plan.hold is not None:
            state = await ticket.hold()
            decision = decide(plan.paywall, True, state, plan.hold)
            ticket.action = decision.action
            rec.outcome = decision.action.value
            if decision.action is not Action.FORWARD:
                _told_blocked(services, rec, decision, state)
                return await call.blocked(decision, state)
            assert state.hold_id is not None
            rec.hold_id = state.hold_id
            services.live.add(state.hold_id, call.checkpoint())
        else:
            ticket.action = Action.FORWARD
            rec.outcome = Action.FORWARD.value
        rec.upstream_started = time.perf_counter()
        try:
            got = await unless_client_leaves(request, _answer(call))
        except ProxyError as e:
            services.metrics.errors.labels("upstream").inc()
            if isinstance(e, RoutingFailed):
                rec.attempts = len(e.attempts)
            raise
        if got is None:  # the client left before the provider's answer was in
            ticket.charge = call.gone()
            return Response(status_code=CLIENT_GONE)
        reply, content = got
        rec.deployment, rec.attempts = reply.deployment, reply.attempts
        if content is None:
            relay = _relay(services, rec, ticket, call, reply, verdict)
            return relay
        rec.upstream_first = rec.upstream_ended = time.perf_counter()
        if not reply.ok:
            rec.error = f"upstream_{reply.status}"
            services.metrics.errors.labels("upstream").inc()
            ticket.charge = FAILED
            response = Response(content, status_code=reply.status)
            response.raw_headers += call.headers(reply, verdict, relayed=False)
            return response
        posted = await ticket.close(lambda: call.settle_whole(content),
                                    answered=services.settings.billing.settle_after_answer)
        assert ticket.charge is not None
        return call.answer(reply, content, ticket.charge, posted, verdict)
    finally:
        if relay is None:
            await ticket.close()  # once: after the close above, it waits for nothing new


def _tell(services: Services, rec: Record, event_type: str, reason: str,
          data: dict[str, Any]) -> None:
    """A sampled event about this request, written off its answer's path."""
    services.events.sampled(rec.paywall, rec.user or None, event_type, reason,
                            {"model": rec.model or None, **data}, rec.request_id)


def _told_blocked(services: Services, rec: Record, decision: Decision,
                  state: UserState) -> None:
    reason = decision.action.value
    _tell(services, rec, "request.blocked", reason, {"available": state.available})
    if decision.action is Action.SPEND_CAP and state.cap is not None:
        _tell(services, rec, "limit.reached", state.cap.name,
              {"cap": state.cap.cap, "used": state.cap.used,
               "resets_at": state.cap.resets_at})
    elif decision.action is Action.TOP_UP:
        services.tasks.spawn(services.events.depleted(
            rec.paywall, rec.user, {"available": state.available}, rec.request_id))


async def _answer(call: Adapter) -> tuple[Reply, bytes | None]:
    """The provider's reply and, unless it is relayed as it arrives, its whole body."""
    reply = await call.send()
    if reply.ok and call.relays(reply):
        return reply, None
    try:
        return reply, await reply.read()
    finally:
        await reply.aclose()


def _relay(services: Services, rec: Record, ticket: Ticket, call: Adapter, reply: Reply,
           verdict: Verdict | None) -> StreamRelay:
    framer = call.framer()

    async def on_done(outcome: Outcome) -> None:
        rec.upstream_first, rec.upstream_ended = relay.first_at, relay.ended_at
        if outcome is Outcome.PARTIAL:
            services.metrics.errors.labels("upstream").inc()
        await ticket.close(lambda: call.settle_relayed(framer, outcome, relay.sent),
                           answered=services.settings.billing.settle_after_answer)

    relay = StreamRelay(reply, call.headers(reply, verdict, relayed=True),
                        services.settings.upstream.stream_max_seconds, framer, on_done,
                        error_tail=call.error_tail)
    return relay
