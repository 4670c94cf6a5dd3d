"""Payments end to end: the proxy as a real process, a real PostgreSQL, and a local
server speaking Stripe's HTTP API (:mod:`tests.stripe_server`) that the proxy's
official ``stripe`` library talks to and that signs its webhooks as Stripe does.

The top-up page opens a Checkout Session; paying it sends the signed webhook, which
deposits once however often and however concurrently it arrives; refunds and disputes
take back; automatic recharge charges a saved card once per crossing; reconciliation
deposits what a dropped webhook never did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import openai
import orjson
import pytest
import stripe

from tests.conftest import (
    ROOT,
    Proxy,
    by,
    echo_model,
    eventually,
    mint_keys,
    new_user,
    parse_metrics,
    serving_proxy,
)
from tests.forwarder import forwarding
from tests.stripe_server import LocalStripe, serve_local_stripe, sign
from tests.upstream import Upstream, free_port

PAYWALL = "shop"
SECRET = "whsec_test_0123456789abcdef0123456789abcdef"
SCALE = 10 ** 9  # usd's smallest unit
CENT = SCALE // 100
PER_REQUEST = "0.03"  # what one echo completion costs, whatever its tokens


def settings(upstream: Upstream, stripe_url: str, public_url: str) -> str:
    return f"""
[server]
public_url = "{public_url}"
[billing]
hold_ttl_seconds = 3.0
reaper_interval_seconds = 0.5
[database]
connect_timeout = 1.0
command_timeout = 2.0
{echo_model(upstream, PER_REQUEST)}
[paywalls.{PAYWALL}]
name = "Shop"
[paywalls.{PAYWALL}.credits]
types = ["standard"]
[paywalls.{PAYWALL}.payments]
stripe_secret_key = "sk_test_local"
stripe_webhook_secret = "{SECRET}"
stripe_api_base = "{stripe_url}"
amounts = ["5", "10"]
custom_min = "1"
custom_max = "100"
auto_recharge = true
recharge_max_failures = 2
recharge_retry_seconds = 0.3
[paywalls.{PAYWALL}.payments.packs.small]
name = "100 queries"
asset = "standard"
credits = 100
price = "4"
"""


@dataclass
class Shop:
    proxy: Proxy
    stripe: LocalStripe
    key: str
    database_url: str
    config: Path

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.proxy.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def browser(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=30)


@pytest.fixture(scope="module")
def local_stripe() -> Iterator[LocalStripe]:
    with serve_local_stripe() as s:
        yield s


@contextlib.contextmanager
def shop_on(upstream: Upstream, stripe_srv: LocalStripe, database_url: str, workdir: Path,
            key: str, ledger_url: str | None = None) -> Iterator[Shop]:
    """The proxy serving the shop paywall on ``database_url``, the endpoint Stripe sends
    its webhooks to while the block runs (``ledger_url``: the database itself, when
    ``database_url`` reaches it through a forwarder)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    endpoints = list(stripe_srv.endpoints)
    with serving_proxy(settings(upstream, stripe_srv.url, url), database_url, workdir,
                       port=port) as proxy:
        stripe_srv.endpoints[:] = [(f"{url}/webhooks/stripe/{PAYWALL}", SECRET)]
        try:
            yield Shop(proxy, stripe_srv, key, ledger_url or database_url,
                       workdir / "proxy.toml")
        finally:
            stripe_srv.endpoints[:] = endpoints


@pytest.fixture(scope="module")
def shop(upstream: Upstream, local_stripe: LocalStripe, own_database_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    key = asyncio.run(mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    with shop_on(upstream, local_stripe, own_database_url, tmp_path_factory.mktemp("shop"),
                 key) as s:
        yield s


@pytest.fixture(autouse=True)
def webhooks_flow(local_stripe: LocalStripe) -> Iterator[None]:
    local_stripe.hold_webhooks = False
    yield
    local_stripe.hold_webhooks = False
    local_stripe.held.clear()


# ---- helpers ----------------------------------------------------------------------------

async def topup_token(shop: Shop, user: str) -> str:
    async with shop.api() as api:
        r = await api.get("/v1/user/balance/topup", params={"user": user})
    assert r.status_code == 200, r.text
    return parse_qs(urlsplit(r.json()["topup_link"]).query)["token"][0]


async def open_checkout(shop: Shop, user: str, **form: str) -> str:
    """The Checkout Session the top-up form opens for ``form``; its id."""
    token = await topup_token(shop, user)
    async with shop.browser() as b:
        r = await b.post(f"{shop.proxy.url}/topup/checkout", data={"token": token, **form})
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    assert location.startswith(shop.stripe.url + "/pay/cs_")
    return location.rsplit("/", 1)[1]


async def balances(pg: Any, user: str) -> dict[str, tuple[int, int]]:
    """Asset → (balance, owed)."""
    rows = await pg.fetch("SELECT asset, balance, owed FROM accounts"
                          " WHERE paywall_id = $1 AND user_id = $2", PAYWALL, user)
    return {r["asset"]: (r["balance"], r["owed"]) for r in rows}


async def entries(pg: Any, user: str) -> list[tuple[str, int]]:
    rows = await pg.fetch(
        "SELECT e.kind, e.amount FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY e.id", PAYWALL, user)
    return [(r["kind"], r["amount"]) for r in rows]


async def paid(shop: Shop, user: str, amount: str = "1000") -> str:
    session_id = await open_checkout(shop, user, amount=amount)
    await asyncio.to_thread(shop.stripe.complete, session_id)
    return session_id


def completed_event(shop: Shop, session_id: str) -> dict[str, Any]:
    return next(e for e in shop.stripe.events_of("checkout.session.completed")
                if e["data"]["object"]["id"] == session_id)


# ---- checkout and its webhook -----------------------------------------------------------

async def test_a_paid_checkout_is_deposited_by_its_webhook_and_the_receipt_shows_it(
        shop: Shop, pg: Any) -> None:
    user = new_user("buyer")
    token = await topup_token(shop, user)
    async with shop.browser() as b:
        page = await b.get(f"{shop.proxy.url}/topup", params={"token": token})
        assert page.status_code == 200
        assert re.findall(r'name="amount" value="([^"]+)"', page.text) == ["500", "1000", "custom"]
        assert 'name="pack" value="small"' in page.text and "Save my card" in page.text
    session_id = await open_checkout(shop, user, amount="1000")
    session = shop.stripe.sessions[session_id]
    assert session["metadata"] == {"paywall": PAYWALL, "user": user, "item": "amount"}
    assert session["amount_total"] == 1000 and session["client_reference_id"] == user
    assert await balances(pg, user) == {}  # nothing before it is paid
    async with shop.browser() as b:
        done = await b.post(session["url"])  # the hosted page's Pay button
        assert done.status_code == 303
        receipt = done.headers["location"]
        assert receipt.startswith(f"{shop.proxy.url}/topup/done?session_id={session_id}&")
        delivered = [d for d in shop.stripe.deliveries
                     if d.type == "checkout.session.completed"
                     and orjson.loads(d.body)["data"]["object"]["id"] == session_id]
        assert [d.status for d in delivered] == [200]
        assert orjson.loads(delivered[0].body)["type"] == "checkout.session.completed"
        shown = await b.get(receipt)
        assert shown.status_code == 200 and "Payment received: 10.00 USD" in shown.text
        assert re.search(r"<li>10(\.0+)? usd</li>", shown.text), shown.text
    assert (await balances(pg, user))["usd"] == (10 * SCALE, 0)
    assert await entries(pg, user) == [("deposit", 10 * SCALE)]  # webhook and receipt: once
    row = await pg.fetchrow("SELECT * FROM payments WHERE paywall_id = $1 AND id = $2",
                            PAYWALL, session_id)
    assert (row["paid"], row["currency"], row["item"]) == (1000, "usd", "amount")
    assert row["payment_intent"] == shop.stripe.sessions[session_id]["payment_intent"]

    # The next request of that user is forwarded and charged.
    async with openai.AsyncOpenAI(base_url=shop.proxy.base_url, api_key=shop.key) as client:
        answer = await client.chat.completions.with_raw_response.create(
            model="echo", user=user, messages=[{"role": "user", "content": "hi"}])
    assert answer.headers["x-paywall-cost"]
    assert (await balances(pg, user))["usd"] == (10 * SCALE - 3 * CENT, 0)


async def test_a_custom_amount_and_a_pack_deposit_what_they_sell(shop: Shop, pg: Any) -> None:
    user = new_user("custom")
    session_id = await open_checkout(shop, user, amount="custom", custom="12.34")
    assert shop.stripe.sessions[session_id]["amount_total"] == 1234
    await asyncio.to_thread(shop.stripe.complete, session_id)
    pack = await open_checkout(shop, user, pack="small")
    assert shop.stripe.sessions[pack]["amount_total"] == 400
    await asyncio.to_thread(shop.stripe.complete, pack)
    assert await balances(pg, user) == {"usd": (1234 * CENT, 0), "standard": (100, 0)}


@pytest.mark.parametrize(("form", "message"), [
    ({"amount": "777"}, "Choose one of the amounts offered."),
    ({"amount": "custom", "custom": "100.01"}, "Choose an amount from 1.00 USD to 100.00 USD."),
    ({"pack": "nope"}, "That pack is not offered."),
    ({"amount": "1000", "recharge": "on", "threshold": "20"}, "at most the amount"),
    # Hostile numbers are a 400 with a reason, never a 500.
    ({"amount": "custom", "custom": "1e999999"}, "not a number"),
    ({"amount": "1000", "recharge": "on", "threshold": "sNaN"}, "not a number"),
    ({"amount": "1000", "recharge": "on", "threshold": "1e999999"}, "not a number"),
])
async def test_a_bad_choice_is_shown_on_the_page_and_opens_no_session(
        shop: Shop, form: dict[str, str], message: str) -> None:
    token = await topup_token(shop, new_user("bad"))
    before = len(shop.stripe.sessions)
    async with shop.browser() as b:
        r = await b.post(f"{shop.proxy.url}/topup/checkout", data={"token": token, **form})
    assert r.status_code == 400 and message in r.text
    assert len(shop.stripe.sessions) == before


async def payment_counts(shop: Shop) -> dict[tuple[str, ...], float]:
    async with shop.browser() as b:
        text = (await b.get(f"{shop.proxy.url}/metrics")).text
    return by(parse_metrics(text), "paywall_payments_total", ("event", "outcome"),
              paywall=PAYWALL)


async def test_twenty_concurrent_deliveries_and_five_replays_deposit_once(
        shop: Shop, pg: Any) -> None:
    user = new_user("storm")
    shop.stripe.hold_webhooks = True
    session_id = await open_checkout(shop, user, amount="500")
    await asyncio.to_thread(shop.stripe.complete, session_id)
    event = completed_event(shop, session_id)
    before = await payment_counts(shop)
    statuses = await asyncio.to_thread(shop.stripe.send, event, times=20, concurrently=True)
    for _ in range(5):
        statuses += await asyncio.to_thread(shop.stripe.redeliver, event["id"])
    assert statuses == [200] * 25
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]
    after = await payment_counts(shop)
    kind = "checkout.session.completed"
    assert after.get((kind, "deposited"), 0) - before.get((kind, "deposited"), 0) == 1
    assert after.get((kind, "duplicate"), 0) - before.get((kind, "duplicate"), 0) == 24


async def post_event(shop: Shop, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["stripe-signature"] = signature
    async with shop.browser() as b:
        return await b.post(f"{shop.proxy.url}/webhooks/stripe/{PAYWALL}", content=body,
                            headers=headers)


async def test_unsigned_tampered_wrongly_signed_and_stale_events_are_refused(
        shop: Shop, pg: Any) -> None:
    user = new_user("forger")
    shop.stripe.hold_webhooks = True
    session_id = await open_checkout(shop, user, amount="500")
    await asyncio.to_thread(shop.stripe.complete, session_id)
    body = json.dumps(completed_event(shop, session_id)).encode()
    tampered = body.replace(b'"amount_total": 500', b'"amount_total": 50000')
    assert tampered != body
    now = int(time.time())
    refused = [
        await post_event(shop, body, None),
        await post_event(shop, body, "t=123,v1=nonsense"),
        await post_event(shop, tampered, sign(body, SECRET)),
        await post_event(shop, body, sign(body, "whsec_another_secret")),
        await post_event(shop, body, sign(body, SECRET, now - 301)),
        await post_event(shop, body, sign(body, SECRET, now + 400)),
    ]
    assert [r.status_code for r in refused] == [400] * 6
    assert all(r.json()["error"]["code"] == "invalid_signature" for r in refused)
    assert await balances(pg, user) == {}
    accepted = await post_event(shop, body, sign(body, SECRET))
    assert accepted.status_code == 200 and accepted.json()["outcome"] == "deposited"
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]


async def test_a_delayed_payment_is_deposited_when_it_succeeds_and_never_when_it_fails(
        shop: Shop, pg: Any) -> None:
    user = new_user("sepa")
    good = await open_checkout(shop, user, amount="500")
    await asyncio.to_thread(shop.stripe.complete, good, asynchronous=True)
    assert await balances(pg, user) == {}
    await asyncio.to_thread(shop.stripe.settle_async, good, True)
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]
    bad = await open_checkout(shop, user, amount="1000")
    await asyncio.to_thread(shop.stripe.complete, bad, asynchronous=True)
    await asyncio.to_thread(shop.stripe.settle_async, bad, False)
    failed = [d for d in shop.stripe.deliveries
              if d.type == "checkout.session.async_payment_failed"]
    assert failed and failed[-1].status == 200
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]


async def test_events_of_another_paywall_are_acknowledged_and_move_nothing(
        shop: Shop, pg: Any) -> None:
    user = new_user("elsewhere")
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": shop.stripe.url})
    session = await asyncio.to_thread(client.v1.checkout.sessions.create, {
        "mode": "payment", "success_url": "https://x.test/ok", "metadata": {
            "paywall": "another-app", "user": user, "item": "amount"},
        "line_items": [{"price_data": {"currency": "usd", "unit_amount": 700,
                                       "product_data": {"name": "x"}}, "quantity": 1}]})
    await asyncio.to_thread(shop.stripe.complete, session.id)
    delivered = [d for d in shop.stripe.deliveries
                 if orjson.loads(d.body)["data"]["object"].get("id") == session.id]
    assert [d.status for d in delivered] == [200]
    assert await balances(pg, user) == {}
    async with shop.browser() as b:
        r = await b.post(f"{shop.proxy.url}/webhooks/stripe/nowhere", content=b"{}")
    assert r.status_code == 404


async def test_the_connect_page_authorizes_and_opens_a_first_top_up(shop: Shop,
                                                                    pg: Any) -> None:
    user = new_user("connect")
    async with shop.api() as api:
        link = (await api.get("/v1/user/connect", params={"user": user})).json()["connect_link"]
    token = parse_qs(urlsplit(link).query)["token"][0]
    async with shop.browser() as b:
        page = await b.get(f"{shop.proxy.url}/connect", params={"token": token})
        assert "Authorize and add 5.00 USD" in page.text
        r = await b.post(f"{shop.proxy.url}/connect", data={"token": token, "amount": "500"})
    assert r.status_code == 303 and r.headers["location"].startswith(shop.stripe.url + "/pay/")
    assert await pg.fetchval("SELECT connected_at IS NOT NULL FROM users WHERE user_id = $1",
                             user)
    session_id = r.headers["location"].rsplit("/", 1)[1]
    assert shop.stripe.sessions[session_id]["metadata"]["user"] == user
    await asyncio.to_thread(shop.stripe.complete, session_id)
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]


# ---- refunds and disputes ---------------------------------------------------------------

async def test_refunds_and_disputes_take_back_and_a_won_dispute_gives_back(
        shop: Shop, pg: Any) -> None:
    user = new_user("refund")
    session_id = await paid(shop, user, "1000")
    intent = shop.stripe.sessions[session_id]["payment_intent"]
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": shop.stripe.url})
    await asyncio.to_thread(client.v1.refunds.create,
                            {"payment_intent": intent, "amount": 300})
    assert (await balances(pg, user))["usd"] == (7 * SCALE, 0)
    dispute = await asyncio.to_thread(shop.stripe.dispute, intent, 700)
    assert (await balances(pg, user))["usd"] == (0, 0)
    await asyncio.to_thread(shop.stripe.close_dispute, dispute["id"], True)
    assert (await balances(pg, user))["usd"] == (7 * SCALE, 0)
    got = await pg.fetch(
        "SELECT e.amount, e.metadata FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 AND e.kind = 'adjustment'"
        " ORDER BY e.id", PAYWALL, user)
    deposit = await pg.fetchval("SELECT entry_id FROM payments WHERE id = $1", session_id)
    assert [(r["amount"], orjson.loads(r["metadata"])["reverses"]) for r in got] == [
        (-3 * SCALE, deposit), (-7 * SCALE, deposit), (7 * SCALE, deposit)]
    # Stripe resends: nothing changes twice.
    for kind in ("charge.refunded", "charge.dispute.created", "charge.dispute.closed"):
        for e in shop.stripe.events_of(kind):
            await asyncio.to_thread(shop.stripe.redeliver, e["id"])
    assert (await balances(pg, user))["usd"] == (7 * SCALE, 0)


async def test_a_dispute_event_arriving_after_the_win_takes_nothing_back(
        shop: Shop, pg: Any) -> None:
    user = new_user("late-dispute")
    session_id = await paid(shop, user, "1000")
    intent = shop.stripe.sessions[session_id]["payment_intent"]
    dispute = await asyncio.to_thread(shop.stripe.dispute, intent)
    await asyncio.to_thread(shop.stripe.close_dispute, dispute["id"], True)
    assert (await balances(pg, user))["usd"] == (10 * SCALE, 0)
    created = next(e for e in shop.stripe.events_of("charge.dispute.created")
                   if e["data"]["object"]["id"] == dispute["id"])
    # Stripe retries a delivery that failed for days: the older event comes last.
    assert await asyncio.to_thread(shop.stripe.redeliver, created["id"]) == [200]
    assert (await balances(pg, user))["usd"] == (10 * SCALE, 0)


async def test_a_refund_of_a_spent_balance_is_owed_and_blocks_until_paid(
        shop: Shop, pg: Any) -> None:
    user = new_user("spent")
    session_id = await paid(shop, user, "500")
    async with openai.AsyncOpenAI(base_url=shop.proxy.base_url, api_key=shop.key) as client:
        for _ in range(100):  # spend 3.00 of the 5.00
            await client.chat.completions.create(
                model="echo", user=user, messages=[{"role": "user", "content": "hi"}])
        intent = shop.stripe.sessions[session_id]["payment_intent"]
        stripe_client = stripe.StripeClient("sk_test_local",
                                            base_addresses={"api": shop.stripe.url})
        await asyncio.to_thread(stripe_client.v1.refunds.create, {"payment_intent": intent})
        assert (await balances(pg, user))["usd"] == (0, 3 * SCALE)
        async with shop.api() as api:
            (usd,) = (await api.get("/v1/user/balance", params={"user": user})).json()[
                "balances"]
        assert (Decimal(usd["balance"]), Decimal(usd["owed"]), Decimal(usd["available"])) \
            == (0, 3, 0)
        token = await topup_token(shop, user)
        async with shop.browser() as b:
            page = await b.get(f"{shop.proxy.url}/topup", params={"token": token})
        assert "<li>0.00 usd <span" in page.text and "owed: 3.00" in page.text
        blocked = await client.chat.completions.with_raw_response.create(
            model="echo", user=user, messages=[{"role": "user", "content": "hi"}])
        assert blocked.headers["x-paywall-action"] == "top_up"
        assert "/topup?token=" in (blocked.parse().choices[0].message.content or "")
        await paid(shop, user, "1000")  # pays what is owed first
        assert (await balances(pg, user))["usd"] == (7 * SCALE, 0)
        forwarded = await client.chat.completions.with_raw_response.create(
            model="echo", user=user, messages=[{"role": "user", "content": "hi"}])
        assert "x-paywall-action" not in forwarded.headers
        assert forwarded.headers["x-paywall-cost"]


# ---- automatic recharge -----------------------------------------------------------------

async def save_card(shop: Shop, user: str, threshold: str, amount: str = "1000") -> str:
    session_id = await open_checkout(shop, user, amount=amount, recharge="on",
                                     threshold=threshold)
    intent_data = shop.stripe.sessions[session_id]
    assert intent_data["metadata"]["recharge_threshold"] == str(int(threshold) * SCALE)
    await asyncio.to_thread(shop.stripe.complete, session_id)
    return session_id


async def spend(shop: Shop, user: str, n: int) -> list[str]:
    async with openai.AsyncOpenAI(base_url=shop.proxy.base_url, api_key=shop.key,
                                  max_retries=0) as client:
        async def one() -> str:
            r = await client.chat.completions.with_raw_response.create(
                model="echo", user=user, messages=[{"role": "user", "content": "hi"}])
            return r.headers.get("x-paywall-action", "forward")

        return list(await asyncio.gather(*(one() for _ in range(n))))


def recharges_of(stripe_srv: LocalStripe, user: str) -> list[dict[str, Any]]:
    return [pi for pi in stripe_srv.payment_intents.values()
            if pi["metadata"].get("item") == "recharge" and pi["metadata"].get("user") == user]


async def test_fifty_settlements_crossing_the_threshold_recharge_once(
        shop: Shop, pg: Any) -> None:
    user = new_user("auto")
    await save_card(shop, user, threshold="9")
    row = await pg.fetchrow("SELECT * FROM recharges WHERE paywall_id = $1 AND user_id = $2",
                            PAYWALL, user)
    assert (row["threshold"], row["amount"], row["enabled"]) == (9 * SCALE, 1000, True)
    assert row["payment_method"].startswith("pm_") and row["customer"].startswith("cus_")
    outcomes = await spend(shop, user, 50)  # 10.00 - 50 x 0.03: under 9.00 from the 34th
    assert outcomes == ["forward"] * 50

    async def recharged() -> bool:
        return (await balances(pg, user))["usd"][0] == 20 * SCALE - 150 * CENT

    await eventually(recharged, "the recharge deposited", within=15)
    await asyncio.sleep(1.5)  # three sweeps: nothing more may be charged
    assert len(recharges_of(shop.stripe, user)) == 1
    intent = recharges_of(shop.stripe, user)[0]
    assert (intent["amount"], intent["customer"], intent["payment_method"]) == (
        1000, row["customer"], row["payment_method"])
    assert [k for k, _ in await entries(pg, user)].count("deposit") == 2
    # Its webhook (payment_intent.succeeded) arriving too deposits nothing more.
    for e in shop.stripe.events_of("payment_intent.succeeded"):
        if e["data"]["object"]["id"] == intent["id"]:
            await asyncio.to_thread(shop.stripe.redeliver, e["id"])
    assert (await balances(pg, user))["usd"][0] == 20 * SCALE - 150 * CENT


async def test_a_declined_recharge_is_retried_at_most_n_times_then_the_link_is_shown(
        shop: Shop, pg: Any) -> None:
    user = new_user("declined")
    await save_card(shop, user, threshold="5", amount="500")
    method = (await pg.fetchrow("SELECT payment_method FROM recharges WHERE user_id = $1",
                                user))["payment_method"]
    shop.stripe.decline(method)
    await spend(shop, user, 1)  # 4.97 left: under the threshold

    async def failed_twice() -> bool:
        row = await pg.fetchrow("SELECT * FROM recharges WHERE user_id = $1", user)
        return bool(row["failures"] == 2)

    await eventually(failed_twice, "two failed recharges", within=15)
    await asyncio.sleep(2.0)  # several sweeps: no third try
    tried = [pi for pi in shop.stripe.failed_payment_intents.values()
             if pi["metadata"].get("user") == user]
    assert len(tried) == 2 and recharges_of(shop.stripe, user) == []
    token = await topup_token(shop, user)
    async with shop.browser() as b:
        page = await b.get(f"{shop.proxy.url}/topup", params={"token": token})
    assert "stopped after 2 failed charges" in page.text
    outcomes = await spend(shop, user, 166)  # 4.97 / 0.03: 165 more, then the top-up link
    assert outcomes.count("forward") == 165 and outcomes.count("top_up") == 1


async def test_a_recharge_stripe_refuses_for_good_counts_as_a_failure(
        shop: Shop, pg: Any) -> None:
    user = new_user("gone-customer")
    await save_card(shop, user, threshold="9")
    await pg.execute("UPDATE recharges SET customer = 'cus_deleted' WHERE user_id = $1", user)
    await spend(shop, user, 40)  # 10.00 - 1.20: under 9.00

    async def failed_twice() -> Any:
        row = await pg.fetchrow("SELECT * FROM recharges WHERE user_id = $1", user)
        return row if row["failures"] == 2 else None

    row = await eventually(failed_twice, "two failures recorded", within=15)
    assert row["pending_since"] is None and "cus_deleted" in row["last_error"]
    assert recharges_of(shop.stripe, user) == []


async def test_automatic_recharge_can_be_turned_off(shop: Shop, pg: Any) -> None:
    user = new_user("off")
    await save_card(shop, user, threshold="9")
    token = await topup_token(shop, user)
    async with shop.browser() as b:
        page = await b.post(f"{shop.proxy.url}/topup/recharge",
                            data={"token": token, "recharge": "off"})
    assert page.status_code == 200 and 'id="recharge"' not in page.text
    await spend(shop, user, 40)
    await asyncio.sleep(1.5)
    assert recharges_of(shop.stripe, user) == []
    # Turned on again: the card is saved to the same Stripe Customer.
    first = await pg.fetchrow("SELECT * FROM recharges WHERE user_id = $1", user)
    again = await save_card(shop, user, threshold="2")
    assert shop.stripe.sessions[again]["customer"] == first["customer"]
    row = await pg.fetchrow("SELECT * FROM recharges WHERE user_id = $1", user)
    assert (row["enabled"], row["threshold"], row["customer"]) == (True, 2 * SCALE,
                                                                   first["customer"])


# ---- reconciliation ---------------------------------------------------------------------

def reconcile(shop: Shop, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PAYWALL_CONFIG", "REDIS_URL")}
    env["DATABASE_URL"] = shop.database_url
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "payments", "reconcile", "--paywall", PAYWALL,
         "--config", str(shop.config), *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60, check=False)


async def test_reconcile_deposits_a_session_whose_webhook_was_dropped_once(
        shop: Shop, pg: Any) -> None:
    user = new_user("dropped")
    shop.stripe.hold_webhooks = True
    session_id = await open_checkout(shop, user, amount="500")
    await asyncio.to_thread(shop.stripe.complete, session_id)
    shop.stripe.held.clear()  # the webhook never arrives
    assert await balances(pg, user) == {}
    first = await asyncio.to_thread(reconcile, shop)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"deposited\t{session_id}" in first.stdout.splitlines()
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]
    second = await asyncio.to_thread(reconcile, shop, "--since",
                                     time.strftime("%Y-%m-%d", time.gmtime()))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "deposited\t" not in second.stdout and "# 0 deposited now" in second.stderr
    assert await entries(pg, user) == [("deposit", 5 * SCALE)]


async def test_reconcile_applies_a_refund_whose_webhooks_were_dropped(
        shop: Shop, pg: Any) -> None:
    user = new_user("dropped-refund")
    shop.stripe.hold_webhooks = True
    session_id = await open_checkout(shop, user, amount="1000")
    await asyncio.to_thread(shop.stripe.complete, session_id)
    intent = shop.stripe.sessions[session_id]["payment_intent"]
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": shop.stripe.url})
    await asyncio.to_thread(client.v1.refunds.create, {"payment_intent": intent, "amount": 250})
    shop.stripe.held.clear()  # neither the deposit's nor the refund's event arrives
    first = await asyncio.to_thread(reconcile, shop)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"deposited\t{session_id}" in first.stdout.splitlines()
    assert f"refunded\t{session_id}" in first.stdout.splitlines()
    assert await entries(pg, user) == [("deposit", 10 * SCALE), ("adjustment", -25 * SCALE // 10)]
    second = await asyncio.to_thread(reconcile, shop)
    assert second.returncode == 0 and f"\t{session_id}" not in second.stdout
    assert await entries(pg, user) == [("deposit", 10 * SCALE), ("adjustment", -25 * SCALE // 10)]


# ---- a webhook while PostgreSQL is out of reach -----------------------------------------

@pytest.mark.slow
async def test_a_webhook_during_a_database_outage_is_deposited_once_on_retry(
        upstream: Upstream, local_stripe: LocalStripe, own_database_url: str,
        tmp_path: Path) -> None:
    user = new_user("outage")
    key = (await mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    with forwarding(own_database_url) as fwd, \
            shop_on(upstream, local_stripe, fwd.url(own_database_url), tmp_path, key,
                    ledger_url=own_database_url) as shop:
        local_stripe.hold_webhooks = True
        session_id = await open_checkout(shop, user, amount="500")
        await asyncio.to_thread(local_stripe.complete, session_id)
        event = completed_event(shop, session_id)
        fwd.cut()
        assert await asyncio.to_thread(local_stripe.send, event) == [503]
        fwd.restore()

        async def retried() -> bool:  # Stripe retries until it is answered 2xx
            return await asyncio.to_thread(local_stripe.redeliver, event["id"]) == [200]

        await eventually(retried, "the retry acknowledged", within=20, every=0.5)
        assert await asyncio.to_thread(local_stripe.redeliver, event["id"]) == [200]
    conn = await asyncpg.connect(own_database_url)
    try:
        assert await entries(conn, user) == [("deposit", 5 * SCALE)]
    finally:
        await conn.close()


async def test_a_refund_that_overtakes_its_deposit_event_deposits_then_takes_back(
        shop: Shop, pg: Any) -> None:
    user = new_user("overtaken")
    shop.stripe.hold_webhooks = True
    session_id = await open_checkout(shop, user, amount="1000")
    await asyncio.to_thread(shop.stripe.complete, session_id)
    intent = shop.stripe.sessions[session_id]["payment_intent"]
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": shop.stripe.url})
    await asyncio.to_thread(client.v1.refunds.create, {"payment_intent": intent, "amount": 400})
    held = list(shop.stripe.held)
    assert [e["type"] for e in held] == ["checkout.session.completed", "charge.refunded"]
    assert await asyncio.to_thread(shop.stripe.send, held[1]) == [200]  # the refund first
    assert await entries(pg, user) == [("deposit", 10 * SCALE), ("adjustment", -4 * SCALE)]
    assert await asyncio.to_thread(shop.stripe.send, held[0]) == [200]  # then its deposit
    assert await entries(pg, user) == [("deposit", 10 * SCALE), ("adjustment", -4 * SCALE)]
