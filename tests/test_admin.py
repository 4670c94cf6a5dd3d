"""The operator's console at /admin, over HTTP: a real ``paywall-proxy serve`` on a
database of this module's own, driven with httpx as a browser would (cookies, forms),
with traffic from the official OpenAI SDK. The ledger is read back after every action.

The last test seeds 10,000 users and 100,000 entries with SQL and times every page.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from tests.conftest import Proxy, mint_keys, new_user, serving_proxy

TOKEN = "admin-test-token-0123456789abcdef"

CONFIG = f"""
[server]
key_cache_seconds = 0.2

[providers.mock]
kind = "mock"
completion_tokens = 3

[models.mock-1]
provider = "mock"
price = {{ input_per_million = "1", output_per_million = "1000" }}

[paywalls.app]
name = "Console app"
starter_grant = "10"

[paywalls.cred]
name = "Credits app"
[paywalls.cred.credits]
types = ["standard"]
[paywalls.cred.credits.plans.pro]
name = "Pro"
credits = {{ standard = 100 }}

[paywalls.big]
name = "Big app"

[admin]
token = "{TOKEN}"
operator = "ops-alice"
"""

HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


def q(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()
    return asyncio.run(run())


def execute(url: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(run())


@dataclass
class World:
    proxy: Proxy
    keys: dict[str, str]
    db: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.proxy.url, timeout=30)

    def sdk(self, paywall: str = "app", key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.proxy.base_url, api_key=key or self.keys[paywall],
                             max_retries=0)

    def sdk_http(self, paywall: str = "app") -> httpx.Client:
        """A client of the user API with the paywall's key."""
        return httpx.Client(base_url=self.proxy.url, timeout=30,
                            headers={"authorization": f"Bearer {self.keys[paywall]}"})

    def entries(self, paywall: str, user: str) -> list[asyncpg.Record]:
        return q(self.db, "SELECT e.*, a.asset FROM entries e JOIN accounts a"
                 " ON a.id = e.account_id WHERE a.paywall_id = $1 AND a.user_id = $2"
                 " ORDER BY e.id", paywall, user)

    def balance(self, paywall: str, user: str, asset: str = "usd") -> int:
        rows = q(self.db, "SELECT balance FROM accounts WHERE paywall_id = $1"
                 " AND user_id = $2 AND asset = $3", paywall, user, asset)
        return int(rows[0]["balance"]) if rows else 0


@pytest.fixture(scope="module")
def world(own_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    keys = asyncio.run(mint_keys(own_database_url, ["app", "cred"]))
    with serving_proxy(CONFIG, own_database_url, tmp_path_factory.mktemp("admin")) as proxy:
        yield World(proxy, keys, own_database_url)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def login(client: httpx.Client) -> str:
    """Log ``client`` in; the CSRF token of its session."""
    form = client.get("/admin/login")
    assert form.status_code == 200
    done = client.post("/admin/login", data={"csrf": csrf_of(form.text), "token": TOKEN})
    assert done.status_code == 303 and done.headers["location"] == "/admin"
    return csrf_of(client.get("/admin").text)


def user_with_requests(world: World, n: int = 2, paywall: str = "app") -> str:
    user = new_user("console")
    for _ in range(n):
        world.sdk(paywall).chat.completions.create(
            model="mock-1", user=user, messages=[{"role": "user", "content": "Hi"}])
    return user


def submit(client: httpx.Client, path: str, fields: dict[str, str]) -> httpx.Response:
    """Post a form, then confirm what its review page shows; the confirmation's answer."""
    review = client.post(path, data=fields)
    assert review.status_code == 200, review.text
    assert 'id="confirm"' in review.text, review.text
    return client.post(path, data={k: html.unescape(v) for k, v in HIDDEN.findall(review.text)})


def move_form(client: httpx.Client, user: str, paywall: str = "app") -> dict[str, str]:
    """The user page's money form, as rendered (with its idempotency key)."""
    page = client.get(f"/admin/users/{user}", params={"paywall": paywall})
    assert page.status_code == 200, page.text
    form = page.text.split('id="move"')[1].split("</form>")[0]
    return {k: html.unescape(v) for k, v in HIDDEN.findall(form)}


# ---- off, login, sessions, CSRF ----------------------------------------------------------

def test_console_is_off_without_a_token(own_database_url: str, tmp_path: Path) -> None:
    with serving_proxy(CONFIG.split("[admin]")[0], own_database_url, tmp_path) as proxy:
        for path in ("/admin", "/admin/login", "/admin/users"):
            assert httpx.get(proxy.url + path).status_code == 404
        assert httpx.post(proxy.url + "/admin/login", data={"token": TOKEN}).status_code == 404


def test_login_needs_the_token_and_sets_a_strict_http_only_cookie(world: World) -> None:
    with world.client() as client:
        form = client.get("/admin/login")
        csrf = csrf_of(form.text)
        wrong = client.post("/admin/login", data={"csrf": csrf, "token": TOKEN + "x"})
        assert wrong.status_code == 403 and "not the admin token" in wrong.text
        assert client.get("/admin").status_code == 303  # still not logged in
        # Without the login form's CSRF token, the right token does not log in either.
        assert client.post("/admin/login", data={"token": TOKEN}).status_code == 403
        assert client.post("/admin/login", data={"csrf": "x" * 64, "token": TOKEN}
                           ).status_code == 403
        form = client.get("/admin/login")
        right = client.post("/admin/login", data={"csrf": csrf_of(form.text), "token": TOKEN})
        assert right.status_code == 303
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Path=/admin" in cookie and "Max-Age=" in cookie
        assert "Secure" not in cookie  # public_url is http here
        page = client.get("/admin")
        assert page.status_code == 200 and "Overview of app" in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        # Logging out ends it.
        assert client.post("/admin/logout", data={"csrf": csrf_of(page.text)}
                           ).status_code == 303
        assert client.get("/admin").status_code == 303


def test_pages_and_posts_need_a_session(world: World) -> None:
    user = user_with_requests(world, 1)
    with world.client() as client:
        for path in ("/admin", "/admin/users", f"/admin/users/{user}", "/admin/keys"):
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/admin/login", path
        before = world.entries("app", user)
        r = client.post(f"/admin/users/{user}/move",
                        data={"kind": "deposit", "amount": "5", "asset": "usd",
                              "reason": "x", "key": "k" * 20, "step": "confirm"})
        assert r.status_code == 403
        assert client.post("/admin/keys", data={"name": "x"}).status_code == 403
        # A forged cookie is no session.
        client.cookies.set("paywall_admin", "abc.9999999999.1.deadbeef", path="/admin")
        assert client.get("/admin").status_code == 303
        assert world.entries("app", user) == before


def test_a_post_without_its_sessions_csrf_token_is_refused(world: World) -> None:
    user = user_with_requests(world, 1)
    with world.client() as alice, world.client() as bob:
        login(alice)
        bob_csrf = login(bob)
        fields = move_form(alice, user)
        fields.update(kind="deposit", amount="5", asset="usd", reason="csrf test",
                      step="confirm")
        before, balance = world.entries("app", user), world.balance("app", user)
        mine = fields["csrf"]
        altered = mine[:-1] + ("1" if mine[-1] == "0" else "0")
        for csrf in (None, "", bob_csrf, altered):
            data = {k: v for k, v in fields.items() if k != "csrf"}
            if csrf is not None:
                data["csrf"] = csrf
            r = alice.post(f"/admin/users/{user}/move", data=data)
            assert r.status_code == 403, csrf
        assert world.entries("app", user) == before
        assert world.balance("app", user) == balance
        # The right one goes through.
        assert alice.post(f"/admin/users/{user}/move", data=fields).status_code == 200
        assert world.balance("app", user) == balance + 5 * 10**9


# ---- money ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "amount", "moved"), [
    ("deposit", "2.5", 2_500_000_000), ("refund", "0.000001", 1000),
    ("adjustment", "-0.25", -250_000_000), ("adjustment", "3", 3 * 10**9)])
def test_a_move_writes_one_entry_once(world: World, kind: str, amount: str, moved: int
                                      ) -> None:
    user = user_with_requests(world, 2)
    with world.client() as client:
        login(client)
        fields = move_form(client, user)
        fields.update(kind=kind, amount=amount, asset="usd", reason=f"{kind} for the test")
        balance = world.balance("app", user)
        done = submit(client, f"/admin/users/{user}/move", fields)
        assert done.status_code == 200 and 'id="notice"' in done.text, done.text
        after = world.entries("app", user)
        assert world.balance("app", user) == balance + moved
        entry = after[-1]
        assert (entry["kind"], entry["amount"]) == (kind, moved)
        meta = orjson.loads(entry["metadata"])
        assert meta == {"reason": f"{kind} for the test", "operator": "ops-alice",
                        "via": "console"}
        assert entry["request_id"] == done.headers["x-request-id"]
        # The page shows it, in the asset's units, with its reason.
        assert f"{kind} for the test" in done.text
        # Replayed (a double submit, the browser's back and resubmit): nothing more.
        replay = submit(client, f"/admin/users/{user}/move", fields)
        assert replay.status_code == 200
        assert world.entries("app", user) == after
        assert world.balance("app", user) == balance + moved
        # The same key with other values is refused, and moves nothing.
        other = submit(client, f"/admin/users/{user}/move", {**fields, "amount": "7"})
        assert other.status_code == 409 and "already submitted" in other.text
        assert world.entries("app", user) == after


def test_a_negative_adjustment_beyond_the_balance_is_refused(world: World) -> None:
    user = user_with_requests(world, 1)
    with world.client() as client:
        login(client)
        fields = move_form(client, user)
        balance = world.balance("app", user)
        fields.update(kind="adjustment", amount="-50", asset="usd", reason="too much")
        r = submit(client, f"/admin/users/{user}/move", fields)
        available = balance / 10**9
        assert r.status_code == 400
        assert f"Refused: only {available:.9f} usd is available; nothing was moved" in r.text
        assert world.balance("app", user) == balance


@pytest.mark.parametrize(("changes", "message"), [
    ({"amount": "abc"}, "must be a decimal such as 1.50"),
    ({"amount": "-1"}, "must be a decimal such as 1.50"),  # a deposit is not negative
    ({"amount": "1e3"}, "must be a decimal"),
    ({"amount": ""}, "must be a decimal"),
    ({"amount": "0"}, "must not be 0"),
    ({"amount": "0.0000000001"}, "finer than the asset&#39;s smallest unit"),
    ({"amount": "99999999999999"}, "more than the ledger holds"),
    ({"reason": "  "}, "A reason is required"),
    ({"kind": "charge"}, "Choose a deposit, a refund or an adjustment"),
    ({"asset": "gold"}, "Unknown asset"),
    ({"key": "short"}, "no idempotency key"),
])
def test_bad_input_gets_a_message_never_a_500(world: World, changes: dict[str, str],
                                              message: str) -> None:
    user = user_with_requests(world, 1)
    with world.client() as client:
        login(client)
        fields = {**move_form(client, user), "kind": "deposit", "amount": "1", "asset": "usd",
                  "reason": "why", **changes}
        before = world.entries("app", user)
        for step in ("review", "confirm"):
            r = client.post(f"/admin/users/{user}/move", data={**fields, "step": step})
            assert r.status_code == 400, r.text
            assert message in r.text, r.text
        assert world.entries("app", user) == before


def test_overflow_and_unknown_things_are_pages_that_say_so(world: World) -> None:
    user = user_with_requests(world, 1)
    with world.client() as client:
        login(client)
        fields = {**move_form(client, user), "kind": "adjustment", "asset": "usd",
                  "reason": "why"}
        r = submit(client, f"/admin/users/{user}/move",  # past a bigint with the balance
                   {**fields, "amount": "9223372036"})
        assert r.status_code == 400 and "more than a balance can hold" in r.text
        # Unknown users, paywalls and actions are pages that say so.
        assert client.get("/admin/users/nobody-here").status_code == 404
        assert client.get("/admin/users/bad%20id").status_code == 404
        assert client.get("/admin", params={"paywall": "nope"}).status_code == 404
        r = client.post(f"/admin/users/{user}/explode", data={"csrf": fields["csrf"]})
        assert r.status_code == 404


def test_grant_a_plan_and_connect_disconnect(world: World) -> None:
    user = new_user("cred")
    world.sdk("cred").chat.completions.create(
        model="mock-1", user=user, messages=[{"role": "user", "content": "Hi"}])
    with world.client() as client:
        login(client)
        page = client.get(f"/admin/users/{user}", params={"paywall": "cred"})
        form = page.text.split('id="grant"')[1].split("</form>")[0]
        fields = {k: html.unescape(v) for k, v in HIDDEN.findall(form)}
        done = submit(client, f"/admin/users/{user}/grant",
                      {**fields, "plan": "pro", "reason": "support gift"})
        assert done.status_code == 200 and "Plan Pro granted" in done.text
        submit(client, f"/admin/users/{user}/grant",
               {**fields, "plan": "pro", "reason": "support gift"})  # replayed: once
        grants = [e for e in world.entries("cred", user) if e["kind"] == "grant"]
        assert len(grants) == 1 and grants[0]["amount"] == 100
        assert orjson.loads(grants[0]["metadata"]) == {
            "plan": "pro", "operator": "ops-alice", "reason": "support gift", "via": "console"}
        assert world.balance("cred", user, "standard") == 100

        csrf = csrf_of(page.text)
        connected = q(world.db, "SELECT connected_at FROM users WHERE paywall_id = 'cred'"
                      " AND user_id = $1", user)[0]["connected_at"]
        assert connected is None
        r = submit(client, f"/admin/users/{user}/connect", {"csrf": csrf, "paywall": "cred"})
        assert "Connected." in r.text and "Connected: <b>yes</b>" in r.text
        r = submit(client, f"/admin/users/{user}/disconnect", {"csrf": csrf, "paywall": "cred"})
        assert "Disconnected" in r.text and "Connected: <b>no</b>" in r.text


def test_a_blocked_user_is_refused_at_once_and_unblocked(world: World) -> None:
    user = user_with_requests(world, 1)
    ask = lambda: world.sdk().chat.completions.create(  # noqa: E731
        model="mock-1", user=user, messages=[{"role": "user", "content": "Hi"}])
    with world.client() as client:
        csrf = login(client)
        r = submit(client, f"/admin/users/{user}/block", {"csrf": csrf})
        assert "Blocked." in r.text and "Blocked: <b>yes</b>" in r.text
        with pytest.raises(openai.PermissionDeniedError) as caught:
            ask()  # this process forgot the user's cached overrides: at once
        assert caught.value.code == "user_blocked"
        r = submit(client, f"/admin/users/{user}/unblock", {"csrf": csrf})
        assert "Unblocked." in r.text and "Blocked: <b>no</b>" in r.text
    assert ask().choices[0].message.content


def test_limits_change_takes_effect_at_once(world: World) -> None:
    user = user_with_requests(world, 2)  # no limit yet: two in a row go through
    with world.client() as client:
        csrf = login(client)
        r = client.post(f"/admin/users/{user}/limits",
                        data={"csrf": csrf, "requests_per_minute": "x1"})
        assert r.status_code == 400 and "must be a whole number" in r.text
        r = client.post(f"/admin/users/{user}/limits",
                        data={"csrf": csrf, "daily_spend_cap": "-1"})
        assert r.status_code == 400 and "plain decimal amount" in r.text
        r = submit(client, f"/admin/users/{user}/limits",
                   {"csrf": csrf, "requests_per_minute": "1", "daily_spend_cap": "0.5"})
        assert "Limits changed." in r.text
    stored = q(world.db, "SELECT limits FROM users WHERE paywall_id = 'app' AND user_id = $1",
               user)[0]["limits"]
    assert orjson.loads(stored) == {"requests_per_minute": 1,
                                                  "daily_spend_cap": {"usd": "0.5"}}
    sdk = world.sdk()
    sdk.chat.completions.create(model="mock-1", user=user,
                                messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="mock-1", user=user,
                                    messages=[{"role": "user", "content": "Hi"}])


def test_keys_create_and_revoke(world: World) -> None:
    user = new_user("keys")
    with world.client() as client:
        csrf = login(client)
        form = client.get("/admin/keys").text.split('id="new-key-form"')[1].split("</form>")[0]
        fields = {**{k: html.unescape(v) for k, v in HIDDEN.findall(form)},
                  "name": "from console"}
        created = client.post("/admin/keys", data=fields)
        assert created.status_code == 200
        again = client.post("/admin/keys", data=fields)  # a reload: no second key
        assert again.status_code == 409 and "no key was created" in again.text
        assert len(q(world.db, "SELECT id FROM api_keys WHERE name = 'from console'")) == 1
        key = html.unescape(re.search(r'id="new-key">([^<]+)<', created.text).group(1))
        assert key.startswith("sk-pw-")
        listed = client.get("/admin/keys")
        assert key not in listed.text  # shown once
        assert key[:12] in listed.text and "from console" in listed.text
        sdk = world.sdk(key=key)
        sdk.chat.completions.create(model="mock-1", user=user,
                                    messages=[{"role": "user", "content": "Hi"}])
        key_id = q(world.db, "SELECT id FROM api_keys WHERE name = 'from console'")[0]["id"]
        r = submit(client, f"/admin/keys/{key_id}/revoke", {"csrf": csrf, "paywall": "app"})
        assert r.status_code == 200 and "revoked" in r.text
        deadline = time.monotonic() + 5
        while True:
            try:
                sdk.chat.completions.create(model="mock-1", user=user,
                                            messages=[{"role": "user", "content": "Hi"}])
            except openai.AuthenticationError:
                break
            assert time.monotonic() < deadline, "a revoked key still works"
            time.sleep(0.1)
        r = client.post(f"/admin/keys/{key_id}/revoke", data={"csrf": csrf})
        assert r.status_code == 404 and "no live key" in r.text


def test_user_page_shows_requests_with_ids_and_costs(world: World) -> None:
    user = new_user("page")
    ids = []
    for _ in range(2):
        raw = world.sdk().chat.completions.with_raw_response.create(
            model="mock-1", user=user, messages=[{"role": "user", "content": "Hi"}])
        ids.append(raw.headers["x-request-id"])
    with world.client() as client:
        login(client)
        page = client.get(f"/admin/users/{user}").text
        charges = page.split('id="charges"')[1].split("</table>")[0]
        charged = [e for e in world.entries("app", user) if e["kind"] == "charge"]
        assert sorted(e["request_id"] for e in charged) == sorted(ids)
        for e in charged:
            row = charges.split(f'data-request-id="{e["request_id"]}"')[1].split("</tr>")[0]
            assert f"{e['amount'] / 10**9:.9f} usd" in row
            assert "mock-1" in row and "completed" in row
        users = client.get("/admin/users", params={"q": user}).text
        assert users.count(f">{user}</code>") == 1
        overview = client.get("/admin").text
        assert "<svg" in overview and "Top users by spend" in overview


# ---- scale: 10,000 users, 100,000 entries -------------------------------------------------

SEED = """
INSERT INTO users (paywall_id, user_id, created_at)
  SELECT 'big', 'u' || lpad(i::text, 5, '0'), now() - interval '40 days'
  FROM generate_series(1, 10000) i;
INSERT INTO accounts (paywall_id, user_id, asset)
  SELECT 'big', user_id, 'usd' FROM users WHERE paywall_id = 'big';
-- Each user: a deposit, then nine charges, spread over the last 30 days.
INSERT INTO entries (account_id, kind, amount, balance_after, request_id, model,
                     prompt_tokens, completion_tokens, outcome, metadata, created_at)
  SELECT a.id, CASE WHEN k = 0 THEN 'deposit' ELSE 'charge' END,
         CASE WHEN k = 0 THEN 1000000000 ELSE -(1000 * (1 + a.id % 7)) END,
         CASE WHEN k = 0 THEN 1000000000 ELSE 1000000000 - k * 1000 * (1 + a.id % 7) END,
         'req_seed_' || a.id || '_' || k, CASE WHEN k > 0 THEN 'mock-' || (k % 3) END,
         CASE WHEN k > 0 THEN 10 + k END, CASE WHEN k > 0 THEN 3 END,
         CASE WHEN k > 0 THEN 'completed' END,
         CASE WHEN k = 0 THEN '{"reason": "seed"}' ELSE '{}' END::jsonb,
         now() - ((a.id * 10 + k) % 30) * interval '1 day' - interval '1 minute'
  FROM accounts a CROSS JOIN generate_series(0, 9) k WHERE a.paywall_id = 'big'
  ORDER BY a.id, k;
UPDATE accounts SET balance = 1000000000 - 9 * 1000 * (1 + id % 7) WHERE paywall_id = 'big';
SELECT paywall_emit('big', 'u' || lpad((1 + i % 10000)::text, 5, '0'), NULL, 'request.blocked',
  jsonb_build_object('reason', (ARRAY['connect', 'top_up', 'spend_cap'])[1 + i % 3]))
  FROM generate_series(1, 3000) i;
"""


def test_pages_render_under_a_second_with_10k_users_and_100k_entries(world: World) -> None:
    started = time.monotonic()
    execute(world.db, SEED)
    seeded = time.monotonic() - started
    counts = q(world.db, "SELECT (SELECT count(*) FROM users WHERE paywall_id = 'big') AS u,"
               " (SELECT count(*) FROM entries e JOIN accounts a ON a.id = e.account_id"
               "  WHERE a.paywall_id = 'big') AS e")[0]
    assert (counts["u"], counts["e"]) == (10_000, 100_000)
    execute(world.db, "ANALYZE")
    pages = {
        "overview": ("/admin", {}),
        "overview 90 days": ("/admin", {"days": "90"}),
        "users": ("/admin/users", {}),
        "users, next page": ("/admin/users", {"after": "u05000"}),
        "users, search": ("/admin/users", {"q": "99"}),
        "users, search none": ("/admin/users", {"q": "zzz"}),
        "user": ("/admin/users/u04242", {}),
        "user, older entries": ("/admin/users/u04242", {"before": "1"}),
        "keys": ("/admin/keys", {}),
    }
    times: dict[str, float] = {}
    with world.client() as client:
        login(client)
        for name, (path, params) in pages.items():
            best = float("inf")
            for _ in range(3):
                r = client.get(path, params={"paywall": "big", **params})
                assert r.status_code == 200, (name, r.text)
                best = min(best, float(r.headers["server-timing"].split("dur=")[1]))
            times[name] = best
        overview = client.get("/admin", params={"paywall": "big"}).text
        assert 'id="active-users">10000<' in overview
        assert 'id="requests">90000<' in overview
        assert 'id="blocked-top_up">1000<' in overview
        assert client.get("/admin/users", params={"paywall": "big"}).text.count(
            'href="/admin/users/u0') == 50
    report = ", ".join(f"{k} {v:.0f} ms" for k, v in times.items())
    print(f"\nseeded in {seeded:.1f} s; server time per page (best of 3): {report}")
    slow = {k: v for k, v in times.items() if v >= 1000}
    assert slow == {}, report


def test_a_cookie_that_is_not_ascii_is_no_session_not_an_error(world: World) -> None:
    with world.client() as client:
        r = client.get("/admin", headers={"cookie": "paywall_admin=a.1.1.\xe9".encode("latin-1")})
        assert r.status_code == 303


def test_only_the_console_names_an_operator(world: World) -> None:
    user = user_with_requests(world, 1)
    with world.sdk_http() as api:
        r = api.post("/v1/user/balance/deposit", headers={"idempotency-key": "k1"},
                     json={"user": user, "amount": "0.5", "metadata": {
                         "operator": "ops-mallory", "reason": "looks official"}})
    assert r.status_code == 200, r.text
    with world.client() as client:
        login(client)
        page = client.get(f"/admin/users/{user}").text
    assert "looks official" in page and "ops-mallory" not in page


def test_failed_logins_are_refused_for_a_while_after_ten(world: World) -> None:
    # Last in the module: its proxy then refuses logins from here for a minute. (The
    # module's own wrong logins before it were each followed by a right one.)
    with world.client() as client:
        statuses = []
        for _ in range(11):
            page = client.get("/admin/login")
            r = client.post("/admin/login", data={"csrf": csrf_of(page.text), "token": "no"})
            statuses.append(r.status_code)
        assert statuses == [403] * 10 + [429]
        page = client.get("/admin/login")
        r = client.post("/admin/login", data={"csrf": csrf_of(page.text), "token": TOKEN})
        assert r.status_code == 429 and "Too many failed attempts" in r.text

