"""Payments through Stripe: Checkout top-ups, the signed webhook that deposits them once,
refunds and disputes, automatic recharge, and reconciliation.

Stripe is called with the official ``stripe`` library (one client per paywall, over
aiohttp). Money moves only through the ledger's payment operations
(:meth:`proxy.ledger.Ledger.pay`, :meth:`~proxy.ledger.Ledger.reverse`), each one
durable transaction keyed by the payment, so the webhook, the receipt page, an
automatic recharge's own answer and a reconciliation may all report the same payment:
it is deposited once.

What each webhook event does (``POST /webhooks/stripe/{paywall}``):

- ``checkout.session.completed`` (paid) and ``checkout.session.async_payment_succeeded``:
  deposit the session's top-up; a completed session still unpaid (a bank debit) waits
  for the second.
- ``checkout.session.async_payment_failed``: nothing moves; counted and logged.
- ``payment_intent.succeeded`` of an automatic recharge: deposit it;
  ``payment_intent.payment_failed``: record the recharge's failure.
- ``charge.refunded``: take back the refunded share of the deposit.
- ``charge.dispute.created`` / ``.updated`` / ``.closed``: take back the disputed share
  while the dispute is open or lost, give it back once it is won.
- anything else: acknowledged, nothing done.

An event whose signature does not verify (missing, tampered, another secret, a
timestamp outside the tolerance) is refused with 400 before it is read. An event for
another paywall or naming no valid user is acknowledged (200) and logged, so Stripe does
not retry it for days. Should the database be down, the answer is 503: Stripe retries,
and the retry deposits once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import lazy
from proxy.errors import (
    DatabaseUnavailable,
    InvalidRequest,
    NotFound,
    ProxyError,
    ServiceUnavailable,
)
from proxy.events import Events
from proxy.ledger import Ledger, Opening, Payment
from proxy.observe import Metrics
from proxy.recharges import Recharges
from proxy.requestid import new_request_id
from proxy.services import json_response, read_body, services_of
from proxy.settings import PaywallSettings, Settings
from proxy.topups import Choice, Skip, payment_of, recharge_payment, session_params

if TYPE_CHECKING:
    import stripe
else:  # loaded when first used, or at start for a paywall with Stripe keys (proxy.lazy)
    stripe = lazy.module("stripe")

log = logging.getLogger("proxy.payments")
T = TypeVar("T")

RECHARGE_STALE_SECONDS = 600.0  # a recharge pending this long is sent again (same key)
_INQUIRY = frozenset({"warning_needs_response", "warning_under_review", "warning_closed"})


class CheckoutFailed(ProxyError):
    """Stripe refused to open a Checkout Session; the message is Stripe's, for the page."""

    status = 502
    type = "api_error"
    code = "checkout_failed"


@dataclass
class Reconciled:
    """What a reconciliation found: sessions deposited now, already deposited, whose
    refunds were applied now, skipped (unpaid), and mismatches between Stripe and the
    ledger."""

    deposited: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    reversed: list[str] = field(default_factory=list)  # refunds applied now
    skipped: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def load_stripe() -> None:
    """Load the Stripe library and the parts of it payments use (it loads its own
    classes when first read), so that a first payment does not wait for them: at start,
    off the event loop, when a paywall takes payments."""
    for name in ("StripeClient", "AIOHTTPClient", "WebhookSignature", "StripeError"):
        getattr(lazy.load("stripe"), name)


class Payments:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics,
                 grants: Mapping[str, Mapping[str, int]], events: Events | None = None):
        self.settings = settings
        self.events = events
        self.ledger = ledger
        self.recharges = Recharges(ledger.pool)
        self.metrics = metrics
        self.grants = grants
        self._clients: dict[str, stripe.StripeClient] = {}
        self._http: list[stripe.AIOHTTPClient] = []
        self._nudged: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()

    def configured(self, paywall_id: str) -> bool:
        paywall = self.settings.paywalls.get(paywall_id)
        return paywall is not None and bool(paywall.payments.stripe_secret_key)

    def client(self, paywall_id: str) -> stripe.StripeClient:
        if paywall_id not in self._clients:
            p = self.settings.paywalls[paywall_id].payments
            http = stripe.AIOHTTPClient(timeout=20)
            self._http.append(http)
            self._clients[paywall_id] = stripe.StripeClient(
                p.stripe_secret_key, base_addresses={"api": p.stripe_api_base},
                http_client=http, max_network_retries=2)
        return self._clients[paywall_id]

    async def close(self) -> None:
        for http in self._http:
            await http.close_async()  # type: ignore[no-untyped-call]
        self._http.clear()
        self._clients.clear()

    async def tell_failed(self, paywall_id: str, user_id: Any, data: Mapping[str, Any],
                          request_id: str) -> None:
        """``topup.failed`` for a payment that did not go through (nothing moved), once
        per payment however often Stripe reports it."""
        if self.events is not None and isinstance(user_id, str):
            await self.events.once(paywall_id, f"topup.failed:{data.get('payment')}",
                                   user_id, "topup.failed", data, request_id)

    @staticmethod
    async def _stripe(call: Awaitable[T]) -> T:
        """Stripe's answer to ``call``; Stripe out of reach (or failing) is a 503, so a
        webhook that needed to ask it is retried."""
        try:
            return await call
        except stripe.StripeError as e:
            log.warning("Stripe could not be asked: %s", e)
            raise ServiceUnavailable("Stripe could not be asked; try again.",
                                     code="stripe_unavailable") from None

    def _opening(self, paywall_id: str, asset: str) -> Opening:
        return Opening(frozenset({asset}), self.grants[paywall_id])

    def _count(self, paywall_id: str, event: str, outcome: str) -> None:
        self.metrics.payments.labels(paywall_id, event, outcome).inc()

    # ---- checkout ------------------------------------------------------------------------

    async def checkout(self, paywall_id: str, user_id: str, choice: Choice, *,
                       success_url: str, cancel_url: str,
                       recharge: Mapping[str, str] | None = None) -> str:
        """Open a Checkout Session selling ``choice``; its URL, to redirect to."""
        p = self.settings.paywalls[paywall_id].payments
        saved = None if recharge is None else await self.recharges.of(paywall_id, user_id)
        params = session_params(paywall_id, user_id, choice, p.currency,
                                success_url=success_url, cancel_url=cancel_url,
                                save_card=recharge is not None, recharge=recharge,
                                customer=saved["customer"] if saved else None)
        try:
            session = await self.client(paywall_id).v1.checkout.sessions.create_async(
                params)  # type: ignore[arg-type]
        except stripe.StripeError as e:
            log.warning("paywall %s: Stripe refused a Checkout Session: %s", paywall_id, e)
            raise CheckoutFailed(e.user_message or "The payment page could not be opened; "
                                 "please try again.") from None
        self._count(paywall_id, "checkout.session.created", "opened")
        return str(session.url)

    async def session(self, paywall_id: str, session_id: str) -> dict[str, Any] | None:
        """The Checkout Session as Stripe has it now; None if it has none of that id,
        CheckoutFailed when Stripe cannot be asked."""
        try:
            s = await self.client(paywall_id).v1.checkout.sessions.retrieve_async(session_id)
        except stripe.InvalidRequestError:
            return None
        except stripe.StripeError as e:
            log.warning("paywall %s: could not read session %s back: %s", paywall_id,
                        session_id, e)
            raise CheckoutFailed("Stripe could not be asked about this payment.") from None
        return s.to_dict()

    # ---- deposits ------------------------------------------------------------------------

    async def fulfill(self, paywall_id: str, session: Mapping[str, Any], request_id: str,
                      event: str = "checkout.session.completed") -> str:
        """Deposit a paid Checkout Session once; what happened ("deposited", "duplicate"
        or why it was skipped)."""
        payment = payment_of(self.settings, paywall_id, session)
        if isinstance(payment, Skip):
            log.info("paywall %s: session %s deposits nothing: %s", paywall_id,
                     session.get("id"), payment.reason)
            self._count(paywall_id, event, "skipped")
            return payment.reason
        outcome = await self._pay(paywall_id, payment, request_id, event)
        meta = session.get("metadata") or {}
        if meta.get("recharge_threshold") and payment.customer and (
                outcome == "deposited"
                or await self.recharges.of(paywall_id, payment.user_id) is None):
            await self._save_card(paywall_id, payment, meta)
        return outcome

    async def _pay(self, paywall_id: str, payment: Payment, request_id: str,
                   event: str) -> str:
        """Deposit ``payment`` through the ledger's once-only path; "deposited" or
        "duplicate", counted under ``event``."""
        fresh = await self.ledger.pay(paywall_id, payment,
                                      opening=self._opening(paywall_id, payment.asset),
                                      request_id=request_id)
        outcome = "deposited" if fresh else "duplicate"
        self._count(paywall_id, event, outcome)
        if fresh:
            log.info("paywall %s: deposited payment %s for %s: %s %s", paywall_id, payment.id,
                     payment.user_id, payment.amount, payment.asset)
        return outcome

    async def _pay_recharge(self, paywall_id: str, intent: Mapping[str, Any],
                            request_id: str, event: str) -> str:
        """Deposit a succeeded automatic recharge (keyed by its PaymentIntent); what
        happened, or why it deposits nothing."""
        payment = recharge_payment(self.settings, paywall_id, intent)
        if isinstance(payment, Skip):
            return payment.reason
        return await self._pay(paywall_id, payment, request_id, event)

    async def _save_card(self, paywall_id: str, payment: Payment,
                         meta: Mapping[str, Any]) -> None:
        threshold, amount = str(meta.get("recharge_threshold")), str(meta.get("recharge_amount"))
        if not (threshold.isdigit() and amount.isdigit() and payment.payment_intent
                and payment.customer) or not int(threshold) or not int(amount):
            return
        intent = await self._stripe(self.client(paywall_id).v1.payment_intents.retrieve_async(
            payment.payment_intent))
        method = intent.payment_method
        method_id = method if isinstance(method, str) else getattr(method, "id", None)
        if not method_id:
            log.warning("paywall %s: payment %s saved no card to recharge with", paywall_id,
                        payment.id)
            return
        await self.recharges.set(
            paywall_id, payment.user_id, asset=self.settings.paywalls[paywall_id].asset,
            threshold=int(threshold), amount=int(amount), currency=payment.currency,
            customer=payment.customer, payment_method=method_id)

    async def handle(self, paywall_id: str, event: Mapping[str, Any]) -> str:
        """Carry out one verified webhook event; what happened, for the answer and log."""
        kind = str(event.get("type"))
        obj = (event.get("data") or {}).get("object") or {}
        request_id = f"stripe:{event.get('id')}"
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            return await self.fulfill(paywall_id, obj, request_id, kind)
        if kind == "checkout.session.async_payment_failed":
            meta = obj.get("metadata") or {}
            if meta.get("paywall") == paywall_id:
                log.warning("paywall %s: the payment of session %s failed", paywall_id,
                            obj.get("id"))
                self._count(paywall_id, kind, "failed")
                await self.tell_failed(paywall_id, meta.get("user"), {
                    "payment": obj.get("id"), "item": meta.get("item"),
                    "paid": obj.get("amount_total"), "currency": obj.get("currency"),
                    "reason": "the delayed payment failed"}, request_id)
            return "failed"
        if kind == "payment_intent.succeeded":
            return await self._pay_recharge(paywall_id, obj, request_id, kind)
        if kind == "payment_intent.payment_failed":
            return await self._recharge_failed_event(paywall_id, obj)
        if kind == "charge.refunded":
            return await self._reverse(paywall_id, kind, obj, request_id,
                                       refunded=int(obj.get("amount_refunded") or 0))
        if kind in ("charge.dispute.created", "charge.dispute.updated",
                    "charge.dispute.closed"):
            # Events of one dispute may come in any order (a failed delivery is retried
            # for days): act on the dispute as Stripe has it now, not as the event did.
            dispute = (await self._stripe(
                self.client(paywall_id).v1.disputes.retrieve_async(str(obj.get("id"))))
            ).to_dict()
            status = str(dispute.get("status"))
            held = 0 if status == "won" or status in _INQUIRY else int(dispute.get("amount") or 0)
            return await self._reverse(paywall_id, kind, dispute, request_id,
                                       dispute=(str(dispute.get("id")), held))
        return "ignored"

    async def _reverse(self, paywall_id: str, kind: str, obj: Mapping[str, Any],
                       request_id: str, refunded: int | None = None,
                       dispute: tuple[str, int] | None = None) -> str:
        intent = obj.get("payment_intent")
        intent_id = intent.get("id") if isinstance(intent, Mapping) else intent
        if not isinstance(intent_id, str):
            return "no payment intent"
        done = await self.ledger.reverse(paywall_id, intent_id, request_id=request_id,
                                         refunded=refunded, dispute=dispute,
                                         source=str(obj.get("id")))
        if done is None and await self._deposit_first(paywall_id, intent_id, request_id):
            # The refund or dispute overtook the deposit's own event: deposit, then reverse.
            done = await self.ledger.reverse(paywall_id, intent_id, request_id=request_id,
                                             refunded=refunded, dispute=dispute,
                                             source=str(obj.get("id")))
        if done is None:
            log.info("paywall %s: %s of %s: no deposit of this paywall", paywall_id, kind,
                     intent_id)
            self._count(paywall_id, kind, "skipped")
            return "not a payment of this paywall"
        self._count(paywall_id, kind, "reversed" if done.moved or done.owed else "duplicate")
        return "reversed" if done.moved or done.owed else "duplicate"

    async def _deposit_first(self, paywall_id: str, intent_id: str, request_id: str) -> bool:
        """Deposit the payment behind ``intent_id``, read back from Stripe, if it is one of
        this paywall's not deposited yet; whether there now is a deposit to reverse."""
        client = self.client(paywall_id)
        try:
            intent = (await client.v1.payment_intents.retrieve_async(intent_id)).to_dict()
        except stripe.InvalidRequestError:
            return False  # not a payment of this Stripe account
        except stripe.StripeError as e:
            log.warning("Stripe could not be asked about %s: %s", intent_id, e)
            raise ServiceUnavailable("Stripe could not be asked; try again.",
                                     code="stripe_unavailable") from None
        if (intent.get("metadata") or {}).get("paywall") != paywall_id:
            return False
        if (intent.get("metadata") or {}).get("item") == "recharge":
            return await self._pay_recharge(paywall_id, intent, request_id, "reversal") in (
                "deposited", "duplicate")
        page = await self._stripe(client.v1.checkout.sessions.list_async(
            {"payment_intent": intent_id, "limit": 1}))
        for session in page.data:
            return await self.fulfill(paywall_id, session.to_dict(), request_id,
                                      "reversal") in ("deposited", "duplicate")
        return False

    async def _recharge_failed_event(self, paywall_id: str, intent: Mapping[str, Any]) -> str:
        meta = intent.get("metadata") or {}
        trigger = str(meta.get("trigger") or "")
        if meta.get("paywall") != paywall_id or meta.get("item") != "recharge" \
                or not trigger.isdigit():
            return "ignored"
        error = (intent.get("last_payment_error") or {}).get("message") or "the charge failed"
        if await self.recharges.failed(paywall_id, str(meta.get("user")), int(trigger),
                                             str(error)):
            self._count(paywall_id, "payment_intent.payment_failed", "recharge_failed")
        return "recharge failed"

    # ---- automatic recharge --------------------------------------------------------------

    def nudge(self, paywall_id: str, user_id: str) -> None:
        """A settlement of this user's was written: check whether to recharge them."""
        if self.configured(paywall_id) and \
                self.settings.paywalls[paywall_id].payments.auto_recharge:
            self._nudged.add((paywall_id, user_id))
            self._wake.set()

    def _recharging(self) -> dict[str, PaywallSettings]:
        return {pid: w for pid, w in self.settings.paywalls.items()
                if w.payments.stripe_secret_key and w.payments.auto_recharge}

    async def recharge_round(self, sweep: bool) -> int:
        """Start the recharges due (for the users nudged, or all on a ``sweep``) and send
        them; how many were sent."""
        nudged, self._nudged = self._nudged, set()
        sent = 0
        for pid, w in self._recharging().items():
            users = None if sweep else [u for p, u in nudged if p == pid]
            if users == []:
                continue
            claims = await self.recharges.claim(
                pid, users, max_failures=w.payments.recharge_max_failures,
                retry_seconds=w.payments.recharge_retry_seconds,
                stale_seconds=RECHARGE_STALE_SECONDS)
            for claim in claims:
                await self._recharge(pid, claim)
                sent += 1
        return sent

    async def run_recharges(self, interval: float) -> None:
        """The recharge loop of a worker: on every nudge, and a sweep each ``interval``."""
        if not self._recharging():
            return
        while True:
            sweep = False
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                sweep = True
            self._wake.clear()
            try:
                await self.recharge_round(sweep)
            except DatabaseUnavailable:
                log.warning("automatic recharge: the database is unavailable; retrying")
            except Exception:
                log.exception("automatic recharge round failed")

    async def _recharge(self, paywall_id: str, claim: Any) -> None:
        """Charge one recharge off-session, or look up the one already created for its
        trigger; deposit it, or record its failure."""
        user, trigger = claim["user_id"], int(claim["triggers"])
        client = self.client(paywall_id)
        try:
            if claim["payment_intent"]:
                intent = await client.v1.payment_intents.retrieve_async(claim["payment_intent"])
            else:
                intent = await client.v1.payment_intents.create_async({
                    "amount": int(claim["amount"]), "currency": claim["currency"],
                    "customer": claim["customer"], "payment_method": claim["payment_method"],
                    "off_session": True, "confirm": True,
                    # Off-session: nothing may need the card holder to be redirected.
                    "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
                    "description": "Automatic recharge of "
                                   f"{self.settings.paywalls[paywall_id].name or paywall_id}",
                    "metadata": {"paywall": paywall_id, "user": user, "item": "recharge",
                                 "trigger": str(trigger)},
                }, {"idempotency_key": f"recharge:{paywall_id}:{user}:{trigger}"})
        except (stripe.APIConnectionError, stripe.RateLimitError) as e:
            # Not answered, or not now: the same trigger is looked at again later.
            log.warning("paywall %s: automatic recharge %s of %s not sent: %s", paywall_id,
                        trigger, user, e)
            return
        except stripe.StripeError as e:
            if isinstance(e, stripe.APIError) and not isinstance(e, stripe.CardError) \
                    and (e.http_status or 500) >= 500:
                log.warning("paywall %s: Stripe failed recharge %s of %s: %s", paywall_id,
                            trigger, user, e)
                return
            # Refused for good (a declined card, a customer gone, bad parameters): a
            # failure, counted toward recharge_max_failures.
            await self.recharges.failed(paywall_id, user, trigger, e.user_message or str(e))
            self._count(paywall_id, "payment_intent.create", "recharge_failed")
            log.warning("paywall %s: automatic recharge %s of %s failed: %s", paywall_id,
                        trigger, user, e.user_message or e)
            return
        data = intent.to_dict()
        await self.recharges.sent(paywall_id, user, trigger, str(data["id"]))
        status = data.get("status")
        if status == "succeeded":
            await self._pay_recharge(paywall_id, data, new_request_id(), "payment_intent.create")
        elif status in ("requires_payment_method", "requires_action", "canceled"):
            await self.recharges.failed(paywall_id, user, trigger,
                                        f"the charge needs the card holder ({status})")
        # processing: its webhook (or the next look, RECHARGE_STALE_SECONDS on) says.

    # ---- reconciliation ------------------------------------------------------------------

    async def _refunds_of(self, paywall_id: str, intent_id: str, request_id: str) -> bool:
        """Bring a deposit in line with what Stripe says was refunded of its charge (the
        refund's webhook may have been lost too); whether that changed anything."""
        intent = (await self.client(paywall_id).v1.payment_intents.retrieve_async(
            intent_id, {"expand": ["latest_charge"]})).to_dict()
        charge = intent.get("latest_charge")
        if not isinstance(charge, dict) or not charge.get("amount_refunded"):
            return False
        done = await self.ledger.reverse(paywall_id, intent_id, request_id=request_id,
                                         refunded=int(charge["amount_refunded"]),
                                         source=str(charge.get("id")))
        return done is not None and bool(done.moved or done.owed)

    async def reconcile(self, paywall_id: str, since: datetime | None) -> Reconciled:
        """Deposit every paid Checkout Session of this paywall at Stripe (created since
        ``since``) whose deposit is missing, through the same path as the webhook, and
        report what does not match."""
        out = Reconciled()
        params: dict[str, Any] = {"limit": 100, "status": "complete"}
        if since is not None:
            params["created"] = {"gte": int(since.timestamp())}
        page = await self.client(paywall_id).v1.checkout.sessions.list_async(
            params)  # type: ignore[arg-type]
        seen: dict[str, dict[str, Any]] = {}
        async for s in page.auto_paging_iter():
            session = s.to_dict()
            if (session.get("metadata") or {}).get("paywall") != paywall_id:
                continue
            seen[str(session["id"])] = session
            outcome = await self.fulfill(paywall_id, session, f"reconcile:{session['id']}",
                                         "reconcile")
            {"deposited": out.deposited, "duplicate": out.already}.get(
                outcome, out.skipped).append(str(session["id"]))
            intent = session.get("payment_intent")
            if outcome in ("deposited", "duplicate") and isinstance(intent, str) \
                    and await self._refunds_of(paywall_id, intent, f"reconcile:{session['id']}"):
                out.reversed.append(str(session["id"]))
        for row in await self.ledger.payments_of(paywall_id, since):
            if row["item"] == "recharge":
                continue
            found = seen.get(row["id"])
            if found is None:
                out.mismatches.append(f"{row['id']}: deposited here, not a paid session "
                                      "of this paywall at Stripe")
            elif found.get("amount_total") != row["paid"]:
                out.mismatches.append(f"{row['id']}: paid {found.get('amount_total')} at "
                                      f"Stripe, {row['paid']} here")
        return out


@contextlib.asynccontextmanager
async def recharging(payments: Payments, interval: float) -> AsyncIterator[None]:
    """Run the automatic-recharge loop (where a paywall offers it) until exit."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(payments.run_recharges(interval))
        try:
            yield
        finally:
            task.cancel()


# ---- the webhook route ---------------------------------------------------------------------

async def stripe_webhook(request: Request) -> Response:
    services = services_of(request)
    paywall_id = request.path_params["paywall"]
    payments: Payments = services.payments
    if not payments.configured(paywall_id):
        raise NotFound(f"No paywall {paywall_id!r} takes payments here.")
    p = services.settings.paywalls[paywall_id].payments
    payload = await read_body(request, services.settings.server.max_body_bytes)
    header = request.headers.get("stripe-signature")
    try:
        text = payload.decode("utf-8")
        stripe.WebhookSignature.verify_header(text, header, p.stripe_webhook_secret,
                                              p.webhook_tolerance_seconds)
        if _signed_at(header or "") > time.time() + p.webhook_tolerance_seconds:
            raise ValueError("signed in the future")  # the library checks the past only
        event = orjson.loads(payload)
    except (stripe.SignatureVerificationError, ValueError):
        payments.metrics.payments.labels(paywall_id, "webhook", "refused").inc()
        raise InvalidRequest("The webhook's Stripe-Signature does not verify.",
                             code="invalid_signature") from None
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        raise InvalidRequest("The webhook's body is not a Stripe event.")
    outcome = await payments.handle(paywall_id, event)
    return json_response({"received": True, "outcome": outcome})


def _signed_at(header: str) -> int:
    """The ``t=`` timestamp of a ``Stripe-Signature`` header (already verified)."""
    for item in header.split(","):
        name, _, value = item.partition("=")
        if name.strip() == "t" and value.strip().isdigit():
            return int(value)
    raise ValueError("no timestamp")


routes = [Route("/webhooks/stripe/{paywall}", stripe_webhook, methods=["POST"])]
