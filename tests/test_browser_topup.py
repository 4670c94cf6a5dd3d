"""The top-up flow in a real browser, from the first refused request to the next charged
one.

A user with no balance asks through the official ``openai`` SDK and gets the assistant
reply that carries the top-up link (header ``x-paywall-action: top_up``). Headless
Chromium opens the link: the page shows the balance and the amounts offered. Choosing
"10.00 USD" sends the browser to the hosted Checkout page of a local Stripe server
(:mod:`tests.stripe_server`); paying there delivers the signed
``checkout.session.completed`` webhook to the proxy and returns the browser to the
receipt page, which shows the payment and the new balance. The ledger holds one deposit
of 10 USD, the top-up page shows it too, and the user's next request is forwarded and
charged the model's price. A second Checkout left through its cancel link returns to the
top-up page and deposits nothing.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright with its executable
path set: no browser is downloaded. Without it the test is skipped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import openai
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import mint_keys, new_user
from tests.stripe_server import LocalStripe, serve_local_stripe
from tests.test_payments import CENT, PAYWALL, SCALE, Shop, shop_on
from tests.upstream import Upstream

CHROMIUM = Path("/usr/bin/chromium")
PRICE = 3 * CENT  # what one echo completion costs (tests.test_payments.PER_REQUEST)
T = TypeVar("T")
TOPUP_LINK = re.compile(r"https?://\S+/topup\?token=[^\s\"'<>)\]]+")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
                              "chromium)"),
    pytest.mark.timeout(90),
]


@pytest.fixture(scope="module")
def shop(upstream: Upstream, own_database_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    key = asyncio.run(mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    with serve_local_stripe() as local_stripe, \
            shop_on(upstream, local_stripe, own_database_url,
                    tmp_path_factory.mktemp("shop-browser"), key) as s:
        yield s


# ---- the ledger, read back --------------------------------------------------------------

async def _entries(database_url: str, user: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT e.kind, e.amount FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY e.id", PAYWALL, user)
    finally:
        await conn.close()
    return [(r["kind"], r["amount"]) for r in rows]


async def _usd_balance(database_url: str, user: str) -> int | None:
    conn = await asyncpg.connect(database_url)
    try:
        value: int | None = await conn.fetchval(
            "SELECT balance FROM accounts WHERE paywall_id = $1 AND user_id = $2"
            " AND asset = 'usd'", PAYWALL, user)
    finally:
        await conn.close()
    return value


def off_loop(query: Callable[[str, str], Coroutine[Any, Any, T]], shop: Shop,
             user: str) -> T:
    """``query`` run to its end on a thread of its own: Playwright's sync API keeps an
    event loop running on the test's thread, where ``asyncio.run`` is refused."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(query(shop.database_url, user))).result()


def entries(shop: Shop, user: str) -> list[tuple[str, int]]:
    return off_loop(_entries, shop, user)


def usd_balance(shop: Shop, user: str) -> int | None:
    return off_loop(_usd_balance, shop, user)


# ---- the pieces of the flow -------------------------------------------------------------

def ask(shop: Shop, user: str) -> tuple[dict[str, str], str]:
    """One chat completion through the official SDK: the response headers and the
    assistant's reply."""
    with openai.OpenAI(base_url=shop.proxy.base_url, api_key=shop.key,
                       max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="echo", user=user, messages=[{"role": "user", "content": "hi"}])
        content = raw.parse().choices[0].message.content or ""
        return dict(raw.headers), content


def expect_usd_balance(page: Page, shown: str) -> None:
    """``ul#balances`` lists the user's one account: ``shown`` usd, as people read it."""
    expect(page.locator("ul#balances li")).to_have_text([f"{shown} usd"])


def test_a_top_up_in_the_browser_pays_through_checkout_and_the_next_request_is_charged(
        shop: Shop, tmp_path: Path) -> None:
    user = new_user("browser-buyer")
    local_stripe: LocalStripe = shop.stripe

    # No balance: the SDK gets the ordinary assistant reply, with the top-up link.
    headers, reply = ask(shop, user)
    assert headers.get("x-paywall-action") == "top_up", headers
    found = TOPUP_LINK.search(reply)
    assert found, reply
    link = found.group(0)
    assert link.startswith(f"{shop.proxy.url}/topup?token="), link
    token = parse_qs(urlsplit(link).query)["token"][0]
    assert entries(shop, user) == []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            navigations: list[tuple[int, str]] = []
            page.on("response", lambda r: navigations.append((r.status, r.url))
                    if r.request.is_navigation_request() else None)

            # The top-up page: the balance, and the amounts offered.
            opened = page.goto(link)
            assert opened is not None and opened.status == 200
            expect(page.locator("ul#balances")).to_be_visible()
            expect_usd_balance(page, "0.00")
            choices = page.locator("button[name=amount]")
            expect(choices).to_have_count(3)
            assert [choices.nth(i).get_attribute("value") for i in range(3)] == [
                "500", "1000", "custom"]
            expect(page.locator("button[name=amount][value='500']")).to_have_text("5.00 USD")
            expect(page.locator("button[name=amount][value='1000']")).to_have_text(
                "10.00 USD")
            page.screenshot(path=str(tmp_path / "topup.png"), full_page=True)

            # Choosing 10.00 USD: a 303 to the hosted Checkout page, which shows it.
            navigations.clear()
            with page.expect_navigation(url=re.compile(r"/pay/cs_")):
                page.get_by_role("button", name="10.00 USD", exact=True).click()
            assert page.url.startswith(f"{local_stripe.url}/pay/cs_"), page.url
            assert navigations[0][0] == 303, navigations
            assert navigations[0][1] == f"{shop.proxy.url}/topup/checkout", navigations
            session_id = page.url.rsplit("/", 1)[1]
            session = local_stripe.sessions[session_id]
            assert session["metadata"] == {"paywall": PAYWALL, "user": user,
                                           "item": "amount"}
            assert session["amount_total"] == 1000 and session["currency"] == "usd"
            assert session["cancel_url"] == link
            expect(page.locator("#amount")).to_have_text("10.00 USD")
            assert entries(shop, user) == []  # nothing before it is paid

            # Paying: the webhook is delivered first, then the receipt page.
            navigations.clear()
            with page.expect_navigation(url=re.compile(r"/topup/done\?")):
                page.click("#pay")
            receipt = urlsplit(page.url)
            assert f"{receipt.scheme}://{receipt.netloc}" == shop.proxy.url, page.url
            assert receipt.path == "/topup/done"
            query = parse_qs(receipt.query)
            assert query["session_id"] == [session_id] and query["token"] == [token]
            assert navigations[0] == (303, f"{local_stripe.url}/pay/{session_id}"), \
                navigations
            expect(page.locator("#paid")).to_have_text(
                re.compile(r"^Payment received: 10\.00 USD\b"))
            expect_usd_balance(page, "10.00")
            page.screenshot(path=str(tmp_path / "receipt.png"), full_page=True)

            # Delivered and answered 200; deposited once, whatever the receipt did.
            delivered = [d for d in local_stripe.deliveries
                         if d.type == "checkout.session.completed"
                         and session_id.encode() in d.body]
            assert [d.status for d in delivered] == [200], delivered
            assert len([e for e in local_stripe.events_of("checkout.session.completed")
                        if e["data"]["object"]["id"] == session_id]) == 1
            assert entries(shop, user) == [("deposit", 10 * SCALE)]
            assert usd_balance(shop, user) == 10 * SCALE

            # The next request is forwarded and charged the model's price.
            headers, reply = ask(shop, user)
            assert "x-paywall-action" not in headers, (headers, reply)
            assert headers.get("x-paywall-cost"), headers
            assert not TOPUP_LINK.search(reply), reply
            assert usd_balance(shop, user) == 10 * SCALE - PRICE
            assert entries(shop, user) == [("deposit", 10 * SCALE), ("charge", -PRICE)]

            # The top-up page, reloaded, shows the new balance.
            page.goto(link)
            expect_usd_balance(page, "9.97")

            # A second Checkout, left through its cancel link: back on the top-up page,
            # nothing deposited.
            sessions_before = set(local_stripe.sessions)
            with page.expect_navigation(url=re.compile(r"/pay/cs_")):
                page.get_by_role("button", name="5.00 USD", exact=True).click()
            second = page.url.rsplit("/", 1)[1]
            assert second != session_id and second not in sessions_before
            expect(page.locator("#amount")).to_have_text("5.00 USD")
            with page.expect_navigation(url=re.compile(r"/topup\?token=")):
                page.click("#cancel")
            assert page.url == link, page.url
            expect(page.locator("button[name=amount]")).to_have_count(3)
            expect_usd_balance(page, "9.97")
            assert local_stripe.sessions[second]["status"] == "open"
            assert not [e for e in local_stripe.events_of("checkout.session.completed")
                        if e["data"]["object"]["id"] == second]
        finally:
            browser.close()

    # The books at the end: the one deposit and the one charge, whatever the cancelled
    # Checkout did.
    assert entries(shop, user) == [("deposit", 10 * SCALE), ("charge", -PRICE)]
    assert usd_balance(shop, user) == 10 * SCALE - PRICE
