"""What a top-up sells and what a paid one deposits: pure values, no I/O.

A paywall's offer (:func:`offer_of`) is its fixed amounts, an optional custom amount
within a range, and its credit packs. The end user's choice (:func:`choose`) becomes
the parameters of a Stripe Checkout Session (:func:`session_params`) whose metadata
names the paywall, the user and what is bought; once Stripe reports the session paid,
:func:`payment_of` reads from it what to deposit. Amounts are deposited from what was
paid (``amount_total``), converted exactly into the paywall's asset; a pack deposits the
credits its metadata names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from proxy.ledger import Payment
from proxy.pricing import currency_exponent, format_minor, to_minor, units_per_minor

if TYPE_CHECKING:
    from proxy.settings import PaywallSettings, Settings

_USER = re.compile(r"[A-Za-z0-9._:@|-]{1,128}")


@dataclass(frozen=True, slots=True)
class Choice:
    """One thing the top-up page sells: ``paid`` minor units (None: a Stripe price
    decides) for ``units`` of ``asset``. ``item`` is "amount" or "pack:<id>"."""

    item: str
    label: str
    asset: str
    units: int
    paid: int | None
    stripe_price: str = ""


@dataclass(frozen=True, slots=True)
class Offer:
    currency: str
    asset: str
    fixed: tuple[Choice, ...]
    custom: tuple[int, int] | None  # (min, max) in minor units
    packs: tuple[Choice, ...]
    rate: int  # smallest asset units per minor unit, for amounts


def offer_of(settings: Settings, paywall: PaywallSettings) -> Offer:
    p = paywall.payments
    cur = p.currency
    is_currency = settings.assets[paywall.asset].kind == "currency"
    rate = units_per_minor(p.asset_per_unit, cur, settings.assets[paywall.asset].scale) \
        if is_currency else 0
    fixed = tuple(Choice("amount", format_minor(to_minor(a, cur), cur), paywall.asset,
                         to_minor(a, cur) * rate, to_minor(a, cur))
                  for a in p.amounts) if is_currency else ()
    custom = (to_minor(p.custom_min, cur), to_minor(p.custom_max, cur)) \
        if is_currency and p.custom_min else None
    packs = tuple(Choice(f"pack:{k}", k_.name or f"{k_.credits} {k_.asset}", k_.asset,
                         k_.credits, None if k_.stripe_price else to_minor(k_.price, cur),
                         k_.stripe_price)
                  for k, k_ in p.packs.items())
    return Offer(cur, paywall.asset, fixed, custom, packs, rate)


class BadChoice(ValueError):
    """The form asked for something the offer does not sell; the message says what."""


def choose(offer: Offer, form: Mapping[str, str]) -> Choice:
    """The choice a top-up form makes: ``pack=<id>``, ``amount=<minor units>`` (one of the
    fixed amounts), or ``amount=custom`` with ``custom=<decimal amount>`` (within the
    custom range). BadChoice, saying what is wrong, for anything else."""
    if form.get("pack"):
        for c in offer.packs:
            if c.item == f"pack:{form['pack']}":
                return c
        raise BadChoice("That pack is not offered.")
    if form.get("amount") == "custom":
        if offer.custom is None:
            raise BadChoice("A custom amount is not offered.")
        paid = to_minor(money(form.get("custom", ""), offer.currency), offer.currency)
        low, high = offer.custom
        if not low <= paid <= high:
            raise BadChoice(f"Choose an amount from {format_minor(low, offer.currency)} to "
                            f"{format_minor(high, offer.currency)}.")
        return Choice("amount", format_minor(paid, offer.currency), offer.asset,
                      paid * offer.rate, paid)
    raw = form.get("amount", "")
    for c in offer.fixed:
        if str(c.paid) == raw:
            return c
    raise BadChoice("Choose one of the amounts offered.")


_MONEY = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,12})?")


def money(text: str, currency: str) -> Decimal:
    """An amount of ``currency`` typed into a form: plain ASCII digits with at most the
    currency's decimals (trailing zeros aside), below a trillion; BadChoice otherwise."""
    text = text.strip()
    if not _MONEY.fullmatch(text):
        raise BadChoice("The amount is not a number such as 12.50.")
    amount = Decimal(text)
    e = currency_exponent(currency)
    if amount != amount.quantize(Decimal(1).scaleb(-e)):
        raise BadChoice(f"The amount has more than {e} decimals.")
    return amount


def recharge_of(form: Mapping[str, str], offer: Offer, choice: Choice
                ) -> dict[str, str] | None:
    """The automatic recharge a top-up form asks for (``recharge=on``, ``threshold``):
    the chosen amount whenever the balance falls under the threshold. The threshold is
    above 0 and at most the amount, so one recharge always lifts the balance back over
    it: one crossing, one charge. The metadata to put on the session; None if not
    asked."""
    if form.get("recharge") != "on":
        return None
    if choice.item != "amount" or choice.paid is None:
        raise BadChoice("Automatic recharge takes an amount, not a pack.")
    threshold = to_minor(money(form.get("threshold", ""), offer.currency), offer.currency)
    if not 0 < threshold <= choice.paid:
        raise BadChoice(f"Choose a recharge threshold above 0 and at most the amount "
                        f"({choice.label}).")
    return {"recharge_threshold": str(threshold * offer.rate),
            "recharge_amount": str(choice.paid)}


def session_params(paywall_id: str, user_id: str, choice: Choice, currency: str, *,
                   success_url: str, cancel_url: str, save_card: bool,
                   recharge: Mapping[str, str] | None = None,
                   customer: str | None = None) -> dict[str, Any]:
    """Parameters of the Checkout Session (mode ``payment``) that sells ``choice``.

    The metadata names paywall, user and item (and, for a pack, its asset and credits;
    for a card saved for automatic recharge, the threshold and amount chosen), on the
    session and on its PaymentIntent, so refunds and disputes find the deposit and a
    reconciliation can redo it. A card saved for automatic recharge goes to ``customer``
    (the user's Stripe Customer from an earlier one), else to a new Customer."""
    meta = {"paywall": paywall_id, "user": user_id, "item": choice.item}
    if choice.item.startswith("pack:"):
        meta |= {"asset": choice.asset, "credits": str(choice.units)}
    meta |= dict(recharge or {})
    if choice.stripe_price:
        line: dict[str, Any] = {"price": choice.stripe_price, "quantity": 1}
    else:
        line = {"price_data": {"currency": currency, "unit_amount": choice.paid,
                               "product_data": {"name": choice.label}}, "quantity": 1}
    intent: dict[str, Any] = {"metadata": meta}
    params: dict[str, Any] = {
        "mode": "payment", "line_items": [line], "client_reference_id": user_id,
        "metadata": meta, "success_url": success_url, "cancel_url": cancel_url,
        "payment_intent_data": intent,
    }
    if save_card:
        intent["setup_future_usage"] = "off_session"
        if customer:
            params["customer"] = customer
        else:
            params["customer_creation"] = "always"
    return params


@dataclass(frozen=True, slots=True)
class Skip:
    """A session or payment that deposits nothing here, and why (for the log)."""

    reason: str


def payment_of(settings: Settings, paywall_id: str, session: Mapping[str, Any]
               ) -> Payment | Skip:
    """What a Checkout Session deposits once paid: from what was paid (``amount_total``
    in the session's currency) for an amount, the pack's credits for a pack."""
    meta = session.get("metadata") or {}
    if meta.get("paywall") != paywall_id:
        return Skip(f"the session is for paywall {meta.get('paywall')!r}")
    user = meta.get("user")
    if not isinstance(user, str) or not _USER.fullmatch(user):
        return Skip(f"the session names no valid user ({user!r})")
    if session.get("payment_status") not in ("paid", "no_payment_required"):
        return Skip(f"the session is {session.get('payment_status')!r}, not paid")
    paywall = settings.paywalls[paywall_id]
    paid, currency = session.get("amount_total"), str(session.get("currency") or "")
    if not isinstance(paid, int) or paid <= 0:
        return Skip(f"the session's amount_total is {paid!r}")
    intent = session.get("payment_intent")
    intent_id = intent.get("id") if isinstance(intent, Mapping) else intent
    customer = session.get("customer")
    customer_id = customer.get("id") if isinstance(customer, Mapping) else customer
    item = str(meta.get("item") or "")
    if item.startswith("pack:"):
        asset, credits = str(meta.get("asset") or ""), str(meta.get("credits") or "")
        if asset not in paywall.credits.types or not credits.isdigit() or int(credits) <= 0:
            return Skip(f"the pack's metadata names {credits!r} of {asset!r}")
        return Payment(str(session["id"]), user, asset, int(credits), paid, currency,
                       intent_id, customer_id, item)
    if item != "amount":
        return Skip(f"the session sells {item!r}")
    if currency != paywall.payments.currency:
        return Skip(f"the session was paid in {currency!r}, not {paywall.payments.currency!r}")
    rate = units_per_minor(paywall.payments.asset_per_unit, currency,
                           settings.assets[paywall.asset].scale)
    return Payment(str(session["id"]), user, paywall.asset, paid * rate, paid, currency,
                   intent_id, customer_id, item)


def recharge_payment(settings: Settings, paywall_id: str, intent: Mapping[str, Any]
                     ) -> Payment | Skip:
    """What a succeeded automatic-recharge PaymentIntent deposits (keyed by its id)."""
    meta = intent.get("metadata") or {}
    if meta.get("paywall") != paywall_id or meta.get("item") != "recharge":
        return Skip("not an automatic recharge of this paywall")
    user, trigger = meta.get("user"), str(meta.get("trigger") or "")
    if not isinstance(user, str) or not _USER.fullmatch(user) or not trigger.isdigit():
        return Skip(f"the recharge names no valid user or trigger ({user!r}, {trigger!r})")
    paywall = settings.paywalls[paywall_id]
    paid = intent.get("amount_received") or intent.get("amount")
    currency = str(intent.get("currency") or "")
    if intent.get("status") != "succeeded" or not isinstance(paid, int) or paid <= 0:
        return Skip(f"the recharge is {intent.get('status')!r}")
    if currency != paywall.payments.currency:
        return Skip(f"the recharge was paid in {currency!r}")
    rate = units_per_minor(paywall.payments.asset_per_unit, currency,
                           settings.assets[paywall.asset].scale)
    customer = intent.get("customer")
    return Payment(str(intent["id"]), user, paywall.asset, paid * rate, paid, currency,
                   str(intent["id"]), customer if isinstance(customer, str) else None,
                   "recharge", int(trigger))
