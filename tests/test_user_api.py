"""Hostile inputs to the user API and to completions: each is a 4xx, never a 500.

A real ``paywall-proxy serve`` on a database of this module's own, driven over HTTP.
Every case here was a 500 (or was accepted) once; the ledger is read back to show
that nothing moved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from tests.conftest import Proxy, mint_keys, new_user, serving_proxy

MAX_BIGINT = 2**63 - 1
# usd counts in 1e-9: the most one balance can hold, as a decimal string.
MOST_USD = "9223372036.854775807"

CONFIG = """
[server]
public_url = "https://pay.example.test"
link_secret = "user-api-tests-link-secret"

[providers.mock]
kind = "mock"
completion_tokens = 3

[models.mock-1]
provider = "mock"
price = { input_per_million = "1", output_per_million = "1000" }

[models.dear]
provider = "mock"
price = { input_per_million = "1", output_per_million = "100000000" }

[paywalls.app]
name = "Inputs app"
starter_grant = "0"

[paywalls.conn]
name = "Connect app"
starter_grant = "1"
require_connect = true
"""


@dataclass
class World:
    proxy: Proxy
    keys: dict[str, str]

    def api(self, paywall: str = "app") -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.proxy.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.keys[paywall]}"})


@pytest.fixture(scope="module")
def world(own_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import asyncio

    keys = asyncio.run(mint_keys(own_database_url, ["app", "conn"]))
    with serving_proxy(CONFIG, own_database_url, tmp_path_factory.mktemp("user-api")) as proxy:
        yield World(proxy, keys)


@pytest.fixture
async def api(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with world.api() as client:
        yield client


async def entry_count(pg: asyncpg.Connection, user: str) -> int:
    n: int = await pg.fetchval(
        "SELECT count(*) FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = 'app' AND a.user_id = $1", user)
    return n


def assert_400(resp: httpx.Response, param: str | None = None) -> None:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    error = resp.json()["error"]
    if param is not None:
        assert error["param"] == param, error


# ---- amounts ---------------------------------------------------------------------------

BAD_AMOUNTS: list[tuple[str, Any]] = [
    ("underscores", "1_000"),
    ("arabic-indic", "\u0661\u0660"),
    ("fullwidth", "\uff11"),
    ("leading-space", " 1"),
    ("trailing-newline", "1\n"),
    ("exponent", "1e3"),
    ("plus", "+1"),
    ("hex", "0x10"),
    ("nan", "NaN"),
    ("infinity", "Infinity"),
    ("dot-only", "."),
    ("trailing-dot", "1."),
    ("leading-dot", ".5"),
    ("negative", "-1"),
    ("zero", "0"),
    ("too-fine", "0.0000000001"),
    ("too-big", "9223372036.854775808"),
    ("huge-string", "9" * 5000),
    ("json-too-big", 2**63),
    ("json-u64", 2**64 - 1),
    ("json-float-inf", 1e308),
    ("json-negative", -1),
    ("json-bool", True),
    ("json-null", None),
    ("json-object", {"value": "1"}),
    ("json-list", ["1"]),
]


@pytest.mark.parametrize("route", ["/v1/user/balance/deposit", "/v1/user/charge"])
@pytest.mark.parametrize("amount", [a for _, a in BAD_AMOUNTS],
                         ids=[n for n, _ in BAD_AMOUNTS])
async def test_bad_amounts_are_400(api: httpx.AsyncClient, pg: asyncpg.Connection, route: str,
                                   amount: Any) -> None:
    user = new_user("amount")
    resp = await api.post(route, headers={"Idempotency-Key": user},
                          json={"user": user, "amount": amount})
    assert_400(resp, "amount")
    assert await entry_count(pg, user) == 0


GOOD_AMOUNTS: list[tuple[Any, int]] = [
    ("1", 10**9), ("0.000000001", 1), ("007.50", 7_500_000_000), (2, 2 * 10**9),
    (0.25, 250_000_000), (MOST_USD, MAX_BIGINT),
]


@pytest.mark.parametrize(("amount", "units"), GOOD_AMOUNTS)
async def test_plain_decimals_and_json_numbers_are_amounts(
        api: httpx.AsyncClient, amount: Any, units: int) -> None:
    user = new_user("good")
    resp = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                          json={"user": user, "amount": amount})
    assert resp.status_code == 200, resp.text
    [usd] = (await api.get("/v1/user/balance", params={"user": user})).json()["balances"]
    assert usd["units"] == units


async def test_a_deposit_past_what_a_balance_holds_is_400(api: httpx.AsyncClient,
                                                          pg: asyncpg.Connection) -> None:
    user = new_user("overflow")
    first = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user + "1"},
                           json={"user": user, "amount": MOST_USD})
    assert first.status_code == 200, first.text
    more = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user + "2"},
                          json={"user": user, "amount": "0.000000001"})
    assert_400(more, "amount")
    assert more.json()["error"]["code"] == "balance_overflow"
    # Nothing was kept under the key: once the balance has room, the same request passes.
    charged = await api.post("/v1/user/charge", headers={"Idempotency-Key": user + "3"},
                             json={"user": user, "amount": "1"})
    assert charged.status_code == 200, charged.text
    again = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user + "2"},
                           json={"user": user, "amount": "0.000000001"})
    assert again.status_code == 200, again.text
    assert await entry_count(pg, user) == 3
    assert await pg.fetchval("SELECT balance FROM accounts WHERE paywall_id = 'app'"
                             " AND user_id = $1", user) == MAX_BIGINT - 10**9 + 1


# ---- other fields of a deposit ---------------------------------------------------------

def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


BAD_BODIES: list[tuple[str, dict[str, Any], str | None]] = [
    ("metadata-nul", {"metadata": {"note": "a\u0000b"}}, "metadata"),
    ("metadata-nul-key", {"metadata": {"a\u0000": 1}}, "metadata"),
    ("metadata-deep", {"metadata": nested(300)}, None),
    ("description-nul", {"description": "a\u0000b"}, "description"),
    ("other-field-deep", {"extra": nested(300)}, None),
    ("metadata-list", {"metadata": [1]}, "metadata"),
    ("asset-object", {"asset": {"usd": 1}}, "asset"),
    ("asset-unknown", {"asset": "eur"}, "asset"),
]


@pytest.mark.parametrize(("change", "param"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
async def test_bad_deposit_bodies_are_400(api: httpx.AsyncClient, pg: asyncpg.Connection,
                                          change: dict[str, Any], param: str | None) -> None:
    user = new_user("body")
    resp = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                          json={"user": user, "amount": "1", **change})
    assert_400(resp, param)
    assert await entry_count(pg, user) == 0


# ---- query parameters ------------------------------------------------------------------

BAD_PAGES: list[tuple[str, str]] = [
    ("limit", "²"), ("limit", "\u0661\u0662"), ("limit", "\uff11\uff12"), ("limit", "0"),
    ("limit", "501"),
    ("limit", "-1"), ("limit", " 5"), ("limit", "5 "), ("limit", "+5"), ("limit", "1_0"),
    ("limit", "9" * 5000), ("limit", ""), ("limit", "abc"),
    ("cursor", "²"), ("cursor", "\u0661\u0662"), ("cursor", "0"), ("cursor", "-3"),
    ("cursor", str(2**63)), ("cursor", "9" * 5000), ("cursor", "1.5"), ("cursor", "abc"),
]


@pytest.mark.parametrize(("name", "value"), BAD_PAGES)
async def test_bad_ledger_pages_are_400(api: httpx.AsyncClient, name: str, value: str) -> None:
    resp = await api.get("/v1/user/ledger", params={"user": "pager", name: value})
    assert_400(resp, name)


async def test_good_ledger_pages(api: httpx.AsyncClient) -> None:
    user = new_user("pages")
    for i in range(3):
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": f"{user}{i}"},
                           json={"user": user, "amount": "1"})
        assert r.status_code == 200
    first = (await api.get("/v1/user/ledger", params={"user": user, "limit": "2"})).json()
    assert len(first["data"]) == 2 and first["next_cursor"]
    rest = (await api.get("/v1/user/ledger", params={"user": user, "limit": "007",
                                                      "cursor": first["next_cursor"]})).json()
    assert len(rest["data"]) == 1 and rest["next_cursor"] is None


BAD_DATES: list[tuple[str, str]] = [
    ("from", "0000-01-01"), ("from", "99999-01-01"), ("to", "99999"),
    ("to", "9999-12-31T23:59:59.999999-05:00"), ("from", "0001-01-01T00:00:00+05:00"),
    ("to", "9999-12-31T23:59:59.999999-23:59"), ("from", "\uff12\uff10\uff12\uff16-01-01"),
    ("from", "yesterday"), ("to", ""), ("from", "2026-13-01"),
]


@pytest.mark.parametrize(("name", "value"), BAD_DATES)
async def test_bad_usage_dates_are_400(api: httpx.AsyncClient, name: str, value: str) -> None:
    resp = await api.get("/v1/usage", params={name: value})
    assert_400(resp, name)


@pytest.mark.parametrize("params", [
    {"from": "0001-01-01", "to": "9999-12-31"},
    {"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59.999999+00:00"},
    {"from": "2026-01-01T00:00:00-05:00"},
])
async def test_wide_usage_windows_are_fine(api: httpx.AsyncClient,
                                           params: dict[str, str]) -> None:
    resp = await api.get("/v1/usage", params=params)
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "list"


# ---- completions: the output cap -------------------------------------------------------

@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [2**31, 2**40, 10**18, 2**63, 2**64 - 1])
async def test_output_caps_past_int32_are_400(world: World, pg: asyncpg.Connection,
                                              field: str, value: int) -> None:
    user = new_user("cap")
    async with world.api() as api:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": MOST_USD})
        assert r.status_code == 200, r.text
        resp = await api.post("/v1/chat/completions", json={
            "model": "mock-1", "user": user, field: value,
            "messages": [{"role": "user", "content": "hi"}]})
    assert_400(resp, field)
    assert str(2**31 - 1) in resp.json()["error"]["message"]
    assert await pg.fetchval("SELECT count(*) FROM holds h JOIN accounts a"
                             " ON a.id = h.account_id WHERE a.user_id = $1", user) == 0


async def test_the_largest_output_cap_is_taken(world: World) -> None:
    user = new_user("cap-ok")
    async with world.api() as api:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": MOST_USD})
        assert r.status_code == 200, r.text
        resp = await api.post("/v1/chat/completions", json={
            "model": "mock-1", "user": user, "max_tokens": 2**31 - 1,
            "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text


async def test_a_worst_case_past_what_a_balance_holds_is_400(world: World,
                                                            pg: asyncpg.Connection) -> None:
    """$100 a token for 2^31 - 1 tokens is more units than a bigint: once a 500 from
    the hold's arithmetic in PostgreSQL."""
    user = new_user("dear")
    async with world.api() as api:
        resp = await api.post("/v1/chat/completions", json={
            "model": "dear", "user": user, "max_tokens": 2**31 - 1,
            "messages": [{"role": "user", "content": "hi"}]})
    assert_400(resp, "max_tokens")
    assert await pg.fetchval("SELECT count(*) FROM holds h JOIN accounts a"
                             " ON a.id = h.account_id WHERE a.user_id = $1", user) == 0


async def test_a_chat_body_nested_too_deeply_to_forward_is_400(world: World) -> None:
    async with world.api() as api:
        resp = await api.post("/v1/chat/completions", json={
            "model": "mock-1", "user": new_user("deep"), "tools": [nested(300)],
            "messages": [{"role": "user", "content": "hi"}]})
    assert_400(resp)


@pytest.mark.parametrize("amount", ["\u0661\u0660", "1_0", "\uff11", "1e3", "-1", -1, " 1",
                                    True])
async def test_spend_cap_overrides_take_plain_decimals_only(api: httpx.AsyncClient,
                                                            amount: object) -> None:
    resp = await api.patch("/v1/user/limits", json={"user": new_user("capov"),
                                                     "daily_spend_cap": {"usd": amount}})
    assert_400(resp, "daily_spend_cap")


# ---- connect links ---------------------------------------------------------------------

def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


async def connected(pg: asyncpg.Connection, user: str) -> bool:
    return bool(await pg.fetchval("SELECT connected_at IS NOT NULL FROM users"
                                  " WHERE paywall_id = 'conn' AND user_id = $1", user))


async def test_a_disconnect_retires_the_connect_links_issued_before_it(
        world: World, pg: asyncpg.Connection) -> None:
    """Connect, disconnect, then the first link again: refused, on the page and on
    its form. A link issued after the disconnect, by the user API or in a completion's
    reply, connects."""
    user = new_user("relink")
    page = world.proxy.url + "/connect"
    async with world.api("conn") as api, httpx.AsyncClient(timeout=30) as browser:
        old = token_of((await api.get("/v1/user/connect", params={"user": user})).json()[
            "connect_link"])
        unused = token_of((await api.get("/v1/user/connect", params={"user": user})).json()[
            "connect_link"])
        assert (await browser.get(page, params={"token": old})).status_code == 200
        done = await browser.post(page, data={"token": old})
        assert done.status_code == 200 and "authorized" in done.text
        assert await connected(pg, user)
        r = await api.post("/v1/user/disconnect", json={"user": user})
        assert r.json() == {"user": user, "connected": False}

        for token in (old, unused):
            shown = await browser.get(page, params={"token": token})
            assert shown.status_code == 400 and "invalid or has expired" in shown.text
            submitted = await browser.post(page, data={"token": token})
            assert submitted.status_code == 400, submitted.text
        assert not await connected(pg, user)
        status = (await api.get("/v1/user/connect", params={"user": user})).json()
        assert status["connected"] is False

        fresh = token_of(status["connect_link"])
        assert (await browser.get(page, params={"token": fresh})).status_code == 200
        assert (await browser.post(page, data={"token": fresh})).status_code == 200
        assert await connected(pg, user)

        # Again, with the link a completion answers with.
        await api.post("/v1/user/disconnect", json={"user": user})
        reply = await api.post("/v1/chat/completions", json={
            "model": "mock-1", "user": user, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.headers["x-paywall-action"] == "connect"
        from_chat = token_of(reply.json()["paywall"]["connect_link"])
        assert (await browser.post(page, data={"token": fresh})).status_code == 400
        assert not await connected(pg, user)
        assert (await browser.post(page, data={"token": from_chat})).status_code == 200
        assert await connected(pg, user)
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "100"})
        assert r.status_code == 200, r.text
        forwarded = await api.post("/v1/chat/completions", json={
            "model": "mock-1", "user": user, "messages": [{"role": "user", "content": "hi"}]})
        assert forwarded.status_code == 200 and "x-paywall-action" not in forwarded.headers


TAILS = ["garbage", "!!", "=", "==", ".", ".e30", " ", "\u00e9", "%00"]


@pytest.mark.parametrize("tail", TAILS)
async def test_trailing_garbage_after_a_link_is_refused(world: World, pg: asyncpg.Connection,
                                                        tail: str) -> None:
    user = new_user("tail")
    page = world.proxy.url + "/connect"
    async with world.api("conn") as api, httpx.AsyncClient(timeout=30) as browser:
        link = (await api.get("/v1/user/connect", params={"user": user})).json()[
            "connect_link"]
        token = token_of(link) + tail
        shown = await browser.get(page, params={"token": token})
        assert shown.status_code == 400, (tail, shown.text)
        submitted = await browser.post(page, data={"token": token})
        assert submitted.status_code == 400, tail
        topup = token_of((await api.get("/v1/user/balance/topup",
                                        params={"user": user})).json()["topup_link"])
        assert (await browser.get(world.proxy.url + "/topup",
                                  params={"token": topup + tail})).status_code == 400
        assert (await browser.get(world.proxy.url + "/topup",
                                  params={"token": topup})).status_code == 200
    assert not await connected(pg, user)
