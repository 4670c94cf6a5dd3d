"""The operator's console in a real browser: headless Chromium (Debian's, driven by
Playwright with its executable path set; no browser download; skipped without it).

An end user makes chat completions through the proxy with the official OpenAI SDK;
the operator logs in, finds the user, sees their charges with the request ids the SDK
got and the amounts the ledger holds, refunds one through the confirmation step and
sees the balance and the ledger change. A browser context without the session is
refused. Every page is shot at desktop and phone width, and none overflows sideways.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Proxy, mint_key, new_user, serving_proxy
from tests.test_admin import CONFIG, TOKEN, q
from tests.test_browser import CHROMIUM

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
                              "chromium)"),
    pytest.mark.timeout(120),
]

WIDTHS = {"desktop": 1280, "phone": 390}
T = TypeVar("T")


@pytest.fixture(scope="module")
def proxy(own_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with serving_proxy(CONFIG, own_database_url, tmp_path_factory.mktemp("admin-ui")) as p:
        yield p


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield b
        finally:
            b.close()


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread of its own: Playwright's sync API keeps an event loop
    on this one, so what calls asyncio.run (the database reads) cannot run here."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def balance(url: str, user: str) -> int:
    rows = in_thread(q, url, "SELECT balance FROM accounts WHERE paywall_id = 'app'"
                     " AND user_id = $1 AND asset = 'usd'", user)
    return int(rows[0]["balance"])


def shoot(page: Page, name: str, shots: Path) -> None:
    """A screenshot of ``page`` at each width; none may scroll sideways."""
    for label, width in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(shots / f"{name}-{label}.png"), full_page=True)
        scroll, inner = page.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner, f"{name} overflows at {label} width: {scroll} > {inner}"
    page.set_viewport_size({"width": WIDTHS["desktop"], "height": 900})


def test_operator_finds_a_user_and_refunds_a_charge(
        proxy: Proxy, own_database_url: str, browser: Browser, tmp_path: Path) -> None:
    key = in_thread(mint_key, own_database_url)
    user = new_user("shopper")
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
    request_ids = []
    for text in ("Hello", "Tell me more", "Thanks"):
        raw = sdk.chat.completions.with_raw_response.create(
            model="mock-1", user=user, messages=[{"role": "user", "content": text}])
        request_ids.append(raw.headers["x-request-id"])
    charges = {r["request_id"]: r for r in in_thread(
        q, own_database_url, "SELECT e.*, a.asset FROM entries e JOIN accounts a"
        " ON a.id = e.account_id WHERE a.paywall_id = 'app' AND a.user_id = $1"
        " AND e.kind = 'charge'", user)}
    assert set(charges) == set(request_ids)
    shots = tmp_path / "shots"
    shots.mkdir()

    context = browser.new_context(viewport={"width": WIDTHS["desktop"], "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(proxy.url + "/admin")
    expect(page).to_have_url(proxy.url + "/admin/login")
    shoot(page, "login", shots)
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_contain_text("Overview of app")
    expect(page.locator("#requests")).not_to_have_text("0")
    shoot(page, "overview", shots)

    page.click("header >> text=Users")
    page.fill("input[name=q]", user)
    page.click("text=Search")
    shoot(page, "users", shots)
    page.click(f"#users >> text={user}")
    expect(page.locator("h1")).to_contain_text(user)
    shoot(page, "user", shots)

    # Every charge, with the request id the SDK got and the ledger's amount.
    rows = page.locator("#charges tbody tr")
    expect(rows).to_have_count(3)
    for rid, entry in charges.items():
        row = page.locator(f'#charges tr[data-request-id="{rid}"]')
        expect(row.locator("code")).to_have_text(rid)
        expect(row.locator(".amount")).to_have_text(f"{entry['amount'] / 10**9:.9f} usd")
        expect(row).to_contain_text("mock-1")
    before = balance(own_database_url, user)
    expect(page.locator('#balances tr[data-asset="usd"] .balance')).to_have_text(
        f"{before / 10**9:.9f}")

    # Refund the second request, through the confirmation step.
    refunded = charges[request_ids[1]]
    amount = f"{-refunded['amount'] / 10**9:.9f}"
    page.select_option("#move select[name=kind]", "refund")
    page.fill("#move input[name=amount]", amount)
    page.fill("#move input[name=reason]", f"bad answer {request_ids[1]}")
    page.click("#move button[type=submit]")
    expect(page.locator("#summary")).to_contain_text(f"Refund of {amount} usd")
    shoot(page, "confirm", shots)
    page.click("#confirm")
    expect(page.locator("#notice")).to_contain_text("Done: refund")
    after = before - refunded["amount"]
    expect(page.locator('#balances tr[data-asset="usd"] .balance')).to_have_text(
        f"{after / 10**9:.9f}")
    top = page.locator("#ledger tbody tr").first
    expect(top).to_contain_text("refund")
    expect(top).to_contain_text(f"bad answer {request_ids[1]}")
    expect(top).to_contain_text("ops-alice")
    assert balance(own_database_url, user) == after

    page.click("header >> text=Keys")
    expect(page.locator("h1")).to_contain_text("API keys of app")
    shoot(page, "keys", shots)

    # A second browser, without the session: sent to the login form, and its forms refused.
    stranger = browser.new_context().new_page()
    stranger.goto(proxy.url + f"/admin/users/{user}")
    expect(stranger).to_have_url(proxy.url + "/admin/login")
    expect(stranger.locator(f"text={user}")).to_have_count(0)
    answer = stranger.request.post(proxy.url + f"/admin/users/{user}/move", form={
        "kind": "deposit", "amount": "5", "asset": "usd", "reason": "x",
        "key": "k" * 20, "step": "confirm"})
    assert answer.status == 403
    context.close()
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}-{w}.png" for n in ("login", "overview", "users", "user", "confirm", "keys")
        for w in WIDTHS)

