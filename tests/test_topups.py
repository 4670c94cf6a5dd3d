"""What a top-up sells and what a paid session deposits, as tables (no I/O)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from proxy import settings as config
from proxy.ledger import Payment
from proxy.pricing import currency_exponent, format_minor, units_per_minor
from proxy.topups import (
    BadChoice,
    Skip,
    choose,
    offer_of,
    payment_of,
    recharge_of,
    session_params,
)

SETTINGS = """
[paywalls.shop]
name = "Shop"
asset = "usd"
[paywalls.shop.credits]
types = ["standard"]
[paywalls.shop.payments]
stripe_secret_key = "sk_test_x"
stripe_webhook_secret = "whsec_x"
amounts = ["5", "10.50"]
custom_min = "1"
custom_max = "200"
[paywalls.shop.payments.packs.small]
name = "100 queries"
asset = "standard"
credits = 100
price = "4.99"
[paywalls.shop.payments.packs.priced]
asset = "standard"
credits = 1000
stripe_price = "price_123"
"""


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> config.Settings:
    path = tmp_path_factory.mktemp("topups") / "s.toml"
    path.write_text(SETTINGS)
    return config.load(path, env={})


@pytest.mark.parametrize(("currency", "exponent"), [
    ("usd", 2), ("eur", 2), ("jpy", 0), ("krw", 0), ("kwd", 3), ("USD", 2)])
def test_currency_exponents_are_stripes(currency: str, exponent: int) -> None:
    assert currency_exponent(currency) == exponent


@pytest.mark.parametrize(("rate", "currency", "scale", "units"), [
    (Decimal(1), "usd", 9, 10_000_000),  # a cent buys 1e7 of usd's 1e-9 units
    (Decimal("0.9"), "usd", 9, 9_000_000),
    (Decimal(1), "jpy", 0, 1),
    (Decimal(100), "usd", 0, 1),
])
def test_a_minor_unit_buys_a_whole_number_of_units(rate: Decimal, currency: str, scale: int,
                                                   units: int) -> None:
    assert units_per_minor(rate, currency, scale) == units


@pytest.mark.parametrize(("rate", "currency", "scale"), [
    (Decimal(1), "usd", 0), (Decimal("0.333"), "usd", 2), (Decimal(0), "usd", 9)])
def test_an_inexact_conversion_is_refused(rate: Decimal, currency: str, scale: int) -> None:
    with pytest.raises(ValueError, match="whole number"):
        units_per_minor(rate, currency, scale)


@pytest.mark.parametrize(("minor", "currency", "text"), [
    (1050, "usd", "10.50 USD"), (500, "jpy", "500 JPY"), (1234, "kwd", "1.234 KWD")])
def test_amounts_are_shown_in_major_units(minor: int, currency: str, text: str) -> None:
    assert format_minor(minor, currency) == text


@pytest.mark.parametrize(("form", "item", "paid", "units"), [
    ({"amount": "500"}, "amount", 500, 500 * 10_000_000),
    ({"amount": "1050"}, "amount", 1050, 1050 * 10_000_000),
    ({"amount": "custom", "custom": "12.34"}, "amount", 1234, 1234 * 10_000_000),
    ({"amount": "custom", "custom": " 1 "}, "amount", 100, 100 * 10_000_000),
    ({"amount": "custom", "custom": "1.000"}, "amount", 100, 100 * 10_000_000),
    ({"pack": "small", "amount": "500"}, "pack:small", 499, 100),
    ({"pack": "priced"}, "pack:priced", None, 1000),
    # A custom amount typed, then a fixed amount's button: the button decides.
    ({"amount": "500", "custom": "77"}, "amount", 500, 500 * 10_000_000),
])
def test_choices(settings: config.Settings, form: dict[str, str], item: str,
                 paid: int | None, units: int) -> None:
    c = choose(offer_of(settings, settings.paywalls["shop"]), form)
    assert (c.item, c.paid, c.units) == (item, paid, units)


@pytest.mark.parametrize(("form", "message"), [
    ({"amount": "499"}, "one of the amounts"),
    ({}, "one of the amounts"),
    ({"amount": "custom", "custom": "0.99"}, "from 1.00 USD to 200.00 USD"),
    ({"amount": "custom", "custom": "200.01"}, "from 1.00 USD"),
    ({"amount": "custom", "custom": "1.001"}, "more than 2 decimals"),
    ({"amount": "custom", "custom": "ten"}, "not a number"),
    ({"amount": "custom", "custom": "NaN"}, "not a number"),
    ({"amount": "custom", "custom": "sNaN"}, "not a number"),
    ({"amount": "custom", "custom": "Infinity"}, "not a number"),
    ({"amount": "custom", "custom": "1e999999"}, "not a number"),
    ({"amount": "custom", "custom": "-5"}, "not a number"),
    ({"amount": "custom", "custom": "\uff15"}, "not a number"),  # a fullwidth 5
    ({"amount": "custom", "custom": "9" * 13}, "not a number"),
    ({"pack": "huge"}, "not offered"),
])
def test_bad_choices_say_what_is_wrong(settings: config.Settings, form: dict[str, str],
                                       message: str) -> None:
    with pytest.raises(BadChoice, match=message):
        choose(offer_of(settings, settings.paywalls["shop"]), form)


def test_a_session_names_paywall_user_and_item_on_itself_and_its_payment(
        settings: config.Settings) -> None:
    c = choose(offer_of(settings, settings.paywalls["shop"]), {"pack": "small"})
    params = session_params("shop", "u1", c, "usd", success_url="s", cancel_url="c",
                            save_card=False)
    meta = {"paywall": "shop", "user": "u1", "item": "pack:small", "asset": "standard",
            "credits": "100"}
    assert params["metadata"] == meta == params["payment_intent_data"]["metadata"]
    assert params["mode"] == "payment" and params["client_reference_id"] == "u1"
    assert params["line_items"] == [{"price_data": {
        "currency": "usd", "unit_amount": 499, "product_data": {"name": "100 queries"}},
        "quantity": 1}]
    assert "customer_creation" not in params
    saved = session_params("shop", "u1", c, "usd", success_url="s", cancel_url="c",
                           save_card=True, recharge={"recharge_threshold": "1"})
    assert saved["payment_intent_data"]["setup_future_usage"] == "off_session"
    assert saved["customer_creation"] == "always"
    assert saved["metadata"]["recharge_threshold"] == "1"
    again = session_params("shop", "u1", c, "usd", success_url="s", cancel_url="c",
                           save_card=True, customer="cus_1")
    assert again["customer"] == "cus_1" and "customer_creation" not in again


def session(**over: Any) -> dict[str, Any]:
    s = {"id": "cs_1", "payment_status": "paid", "amount_total": 1050, "currency": "usd",
         "payment_intent": "pi_1", "customer": None,
         "metadata": {"paywall": "shop", "user": "u1", "item": "amount"}}
    return s | over


@pytest.mark.parametrize(("s", "expected"), [
    (session(), Payment("cs_1", "u1", "usd", 1050 * 10_000_000, 1050, "usd", "pi_1", None,
                        "amount")),
    # What was paid is deposited, whatever the metadata might claim.
    (session(amount_total=700), Payment("cs_1", "u1", "usd", 7_000_000_000, 700, "usd", "pi_1",
                                        None, "amount")),
    (session(metadata={"paywall": "shop", "user": "u1", "item": "pack:small",
                       "asset": "standard", "credits": "100"}, payment_intent={"id": "pi_9"}),
     Payment("cs_1", "u1", "standard", 100, 1050, "usd", "pi_9", None, "pack:small")),
    (session(payment_status="unpaid"), Skip("the session is 'unpaid', not paid")),
    (session(metadata={"paywall": "other", "user": "u1", "item": "amount"}),
     Skip("the session is for paywall 'other'")),
    (session(metadata={"paywall": "shop", "item": "amount"}),
     Skip("the session names no valid user (None)")),
    (session(metadata={"paywall": "shop", "user": "bad user", "item": "amount"}),
     Skip("the session names no valid user ('bad user')")),
    (session(currency="eur"), Skip("the session was paid in 'eur', not 'usd'")),
    (session(amount_total=0), Skip("the session's amount_total is 0")),
    (session(metadata={"paywall": "shop", "user": "u1", "item": "pack:x", "asset": "gold",
                       "credits": "5"}), Skip("the pack's metadata names '5' of 'gold'")),
])
def test_what_a_session_deposits(settings: config.Settings, s: dict[str, Any],
                                 expected: Payment | Skip) -> None:
    assert payment_of(settings, "shop", s) == expected


@pytest.mark.parametrize(("change", "problem"), [
    ('stripe_webhook_secret = ""', "required with stripe_secret_key"),
    ('currency = "US"', "three-letter"),
    ('amounts = ["5.001"]', "at most 2 decimals"),
    ('asset_per_unit = "0.0000000001"', "whole number"),
    ('custom_max = "0.5"', "at least custom_min"),
])
def test_payment_settings_are_checked(tmp_path: Any, change: str, problem: str) -> None:
    key = change.split(" = ")[0]
    lines = [ln for ln in SETTINGS.splitlines() if not ln.startswith(key + " =")]
    at = lines.index("[paywalls.shop.payments]") + 1
    lines.insert(at, change)
    path = tmp_path / "s.toml"
    path.write_text("\n".join(lines))
    with pytest.raises(config.ConfigError, match=problem):
        config.load(path, env={})


@pytest.mark.parametrize(("form", "expected"), [
    ({"amount": "1050"}, None),
    ({"amount": "1050", "recharge": "on", "threshold": "10.50"},
     {"recharge_threshold": str(1050 * 10_000_000), "recharge_amount": "1050"}),
    ({"amount": "1050", "recharge": "on", "threshold": "2"},
     {"recharge_threshold": str(200 * 10_000_000), "recharge_amount": "1050"}),
    ({"amount": "1050", "recharge": "on", "threshold": "10.51"}, "at most the amount"),
    ({"amount": "1050", "recharge": "on", "threshold": "0"}, "above 0"),
    ({"amount": "1050", "recharge": "on", "threshold": "-1"}, "not a number"),
    ({"amount": "1050", "recharge": "on", "threshold": "sNaN"}, "not a number"),
    ({"amount": "1050", "recharge": "on", "threshold": "1e999999"}, "not a number"),
    ({"amount": "1050", "recharge": "on", "threshold": ""}, "not a number"),
    ({"pack": "small", "recharge": "on", "threshold": "1"}, "not a pack"),
])
def test_what_an_automatic_recharge_asks_for(settings: config.Settings, form: dict[str, str],
                                             expected: dict[str, str] | str | None) -> None:
    offer = offer_of(settings, settings.paywalls["shop"])
    if isinstance(expected, str):
        with pytest.raises(BadChoice, match=expected):
            recharge_of(form, offer, choose(offer, form))
    else:
        assert recharge_of(form, offer, choose(offer, form)) == expected
