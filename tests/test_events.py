"""Events end to end: the proxy as a real process writes each event with its change and
delivers it, signed per Standard Webhooks, to a local receiver that verifies it with the
``standardwebhooks`` library (:mod:`tests.webhook_receiver`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook

from proxy.event_types import EVENT_TYPES, matches, valid_pattern
from proxy.events import Sampler, backoff, signature
from tests.conftest import Proxy, echo_model, eventually, mint_keys, new_user, serving_proxy
from tests.upstream import Upstream
from tests.webhook_receiver import Receiver, serve_receiver


def whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


SECRET = whsec()


# ---- pure parts -------------------------------------------------------------------------

PATTERN_CASES = [
    (["*"], "charge.created", True),
    (["charge.created"], "charge.created", True),
    (["charge.*"], "charge.refunded", True),
    (["charge.*"], "chargeback", False),
    (["balance.*"], "balance.deposit.created", True),
    (["user.created"], "user.connected", False),
    (["user_*"], "user_x", False),
    ([], "charge.created", False),
]


@pytest.mark.parametrize(("patterns", "event_type", "expected"), PATTERN_CASES)
def test_patterns_choose_event_types(patterns: list[str], event_type: str,
                                     expected: bool) -> None:
    assert matches(patterns, event_type) is expected


async def test_the_database_chooses_by_the_same_rule(pg: Any) -> None:
    """Fan-out matches in SQL (paywall_wants): the same table as matches()."""
    for patterns, event_type, expected in PATTERN_CASES:
        got = await pg.fetchval("SELECT paywall_wants($1::text[], $2)", patterns, event_type)
        assert got is expected, (patterns, event_type)


@pytest.mark.parametrize(("pattern", "valid"), [
    ("*", True), ("charge.created", True), ("balance.*", True), ("topup.*", True),
    ("nothing.*", False), ("charge.made", False), ("", False), ("charge", False)])
def test_a_pattern_must_choose_something(pattern: str, valid: bool) -> None:
    assert valid_pattern(pattern) is valid


def test_backoff_doubles_with_jitter_up_to_the_most() -> None:
    import random

    rand = random.Random(7)
    for attempts, base in [(1, 5.0), (2, 10.0), (3, 20.0), (10, 300.0), (40, 300.0)]:
        got = [backoff(attempts, 5.0, 300.0, rand) for _ in range(50)]
        assert all(0.75 * base <= g <= 1.25 * base for g in got), (attempts, got)
        assert max(got) - min(got) > 0.1 * base  # jittered


def test_a_signature_verifies_with_each_secret_during_a_rotation() -> None:
    from datetime import UTC, datetime

    old, new = whsec(), whsec()
    now = datetime.now(UTC)
    header = signature([new, old], "evt_1", now, '{"a":1}')
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": header}
    for s in (old, new):
        assert Webhook(s).verify('{"a":1}', headers) == {"a": 1}
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(whsec()).verify('{"a":1}', headers)


def test_a_sampler_writes_once_per_window_and_counts_the_rest() -> None:
    s = Sampler(60.0)
    assert s.admit(("a",), 0.0) == 1
    assert [s.admit(("a",), t) for t in (1.0, 2.0, 59.0)] == [None, None, None]
    assert s.admit(("b",), 3.0) == 1
    assert s.admit(("a",), 61.0) == 4  # itself and the three counted meanwhile


# ---- the proxy and a receiver -----------------------------------------------------------

def settings(upstream: Upstream, receiver: Receiver) -> str:
    hook = f"""url = "{receiver.url}"
events = ["*"]
secret = "{receiver.secret}"
allow_private = true
headers = {{ "X-Tenant" = "t1" }}"""
    return f"""
[billing]
hold_ttl_seconds = 3.0
reaper_interval_seconds = 0.5
[events]
poll_seconds = 0.1
first_retry_seconds = 0.2
max_retry_seconds = 1.0
sample_seconds = 60
{echo_model(upstream, "0.1")}
[paywalls.evt]
name = "Events app"
starter_grant = "1"
[paywalls.evt.low_balance]
usd = "0.55"
[paywalls.evt.webhooks.all]
{hook}
[paywalls.gated]
require_connect = true
[paywalls.gated.webhooks.all]
{hook}
[paywalls.limited]
starter_grant = "10"
[paywalls.limited.limits]
user_requests_per_minute = 2
[paywalls.limited.webhooks.all]
{hook}
[paywalls.capped]
starter_grant = "10"
[paywalls.capped.limits]
user_daily_spend_cap = {{ usd = "0.2" }}
[paywalls.capped.webhooks.all]
{hook}
"""


@dataclass
class Setup:
    proxy: Proxy
    receiver: Receiver
    keys: dict[str, str]
    config: Path
    database_url: str

    def sdk(self, paywall: str = "evt") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.proxy.base_url, api_key=self.keys[paywall],
                                  max_retries=0)

    def api(self, paywall: str = "evt") -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.proxy.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.keys[paywall]}"})


@pytest.fixture(scope="module")
def setup(upstream: Upstream, own_database_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    keys = asyncio.run(mint_keys(own_database_url, ["evt", "gated", "limited", "capped"]))
    workdir = tmp_path_factory.mktemp("events")
    with serve_receiver(SECRET) as receiver, \
            serving_proxy(settings(upstream, receiver), own_database_url, workdir) as proxy:
        yield Setup(proxy, receiver, keys, workdir / "proxy.toml", own_database_url)


async def ask(client: openai.AsyncOpenAI, user: str) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="echo", user=user, messages=[{"role": "user", "content": "hi"}])


async def arrived(receiver: Receiver, user: str, *types: str, within: float = 15) -> None:
    async def all_in() -> bool:
        got = {e["type"] for e in receiver.events(user=user)}
        return set(types) <= got

    await eventually(all_in, f"{types} for {user}", within=within)


async def test_a_users_money_is_told_in_order_and_each_event_verifies(setup: Setup) -> None:
    user = new_user("told")
    async with setup.sdk() as client:
        first = await ask(client, user)
        await arrived(setup.receiver, user, "user.created", "credits.granted",
                      "charge.created")
        for _ in range(9):  # 1.00 at 0.10 a request: 0.55 is crossed on the fifth
            await ask(client, user)
        blocked = [await ask(client, user) for _ in range(3)]
    assert all(b.headers["x-paywall-action"] == "top_up" for b in blocked)
    await arrived(setup.receiver, user, "balance.low", "balance.depleted", "request.blocked")
    events = setup.receiver.events(user=user)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["user.created", "credits.granted", "charge.created"]
    assert kinds.count("charge.created") == 10
    assert kinds.count("balance.low") == 1 and kinds.count("balance.depleted") == 1
    assert kinds.count("request.blocked") == 1  # sampled: one per window
    charge = events[2]
    assert charge["request_id"] == first.headers["x-request-id"]
    assert charge["paywall"] == "evt" and charge["version"] == 1
    assert charge["data"]["cost"] == 100_000_000 and charge["data"]["model"] == "echo"
    assert charge["data"]["outcome"] == "completed"
    assert (charge["data"]["prompt_tokens"], charge["data"]["completion_tokens"]) == (5, 2)
    low = next(e for e in events if e["type"] == "balance.low")
    assert low["data"]["threshold"] == 550_000_000 and low["data"]["balance"] < 550_000_000
    blocked_event = next(e for e in events if e["type"] == "request.blocked")
    assert blocked_event["data"]["reason"] == "top_up"
    # In order: per user, deliveries follow the events' order; ids sort by time.
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert setup.receiver.refused == []
    received = next(r for r in setup.receiver.accepted if r.event["id"] == charge["id"])
    assert received.headers["webhook-id"] == charge["id"]
    assert received.headers["x-tenant"] == "t1"

    # A deposit is told, and running out again is told again.
    async with setup.api() as api:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "0.1"})
        assert r.status_code == 200, r.text
    async with setup.sdk() as client:
        assert "x-paywall-action" not in (await ask(client, user)).headers
        assert (await ask(client, user)).headers["x-paywall-action"] == "top_up"

    async def depleted_twice() -> bool:
        return [e["type"] for e in setup.receiver.events(user=user)].count(
            "balance.depleted") == 2

    await eventually(depleted_twice, "a second balance.depleted")
    deposit = setup.receiver.events("balance.deposit.created", user)
    assert [e["data"]["amount"] for e in deposit] == [100_000_000]


async def test_connect_disconnect_and_a_connect_block_are_told(setup: Setup) -> None:
    user = new_user("gate")
    async with setup.sdk("gated") as client:
        r = await ask(client, user)
    assert r.headers["x-paywall-action"] == "connect"
    async with setup.api("gated") as api:
        link = (await api.get("/v1/user/connect", params={"user": user})).json()["connect_link"]
        token = parse_qs(urlsplit(link).query)["token"][0]
        async with httpx.AsyncClient() as browser:
            page = await browser.post(f"{setup.proxy.url}/connect", data={"token": token})
            assert page.status_code == 200
        assert (await api.post("/v1/user/disconnect", json={"user": user})).status_code == 200
    await arrived(setup.receiver, user, "request.blocked", "user.connected", "user.disconnected")
    kinds = [e["type"] for e in setup.receiver.events(user=user)]
    assert kinds.index("user.connected") < kinds.index("user.disconnected")
    blocked = setup.receiver.events("request.blocked", user)
    assert blocked[0]["data"]["reason"] == "connect" and blocked[0]["paywall"] == "gated"


async def test_limits_reached_are_counted_and_sampled(setup: Setup) -> None:
    user = new_user("flood")
    async with setup.sdk("limited") as client:
        outcomes = []
        for _ in range(6):
            try:
                await ask(client, user)
                outcomes.append(200)
            except openai.RateLimitError:
                outcomes.append(429)
    assert outcomes == [200, 200, 429, 429, 429, 429]
    await arrived(setup.receiver, user, "limit.reached")
    await asyncio.sleep(0.5)
    reached = setup.receiver.events("limit.reached", user)
    assert len(reached) == 1  # four 429s, one event in the window
    assert reached[0]["data"]["reason"] == "user_requests" and reached[0]["data"]["count"] == 1


async def test_a_spend_cap_is_a_limit_reached_and_a_blocked_request(setup: Setup) -> None:
    user = new_user("capped")
    async with setup.sdk("capped") as client:
        answers = [await ask(client, user) for _ in range(3)]  # 0.20 a day: two go through
    assert [a.headers.get("x-paywall-action") for a in answers] == [None, None, "spend_cap"]
    await arrived(setup.receiver, user, "limit.reached", "request.blocked")
    (reached,) = setup.receiver.events("limit.reached", user)
    assert reached["data"]["reason"] == "user_daily"
    assert (reached["data"]["cap"], reached["data"]["used"]) == (200_000_000, 200_000_000)
    (blocked,) = setup.receiver.events("request.blocked", user)
    assert blocked["data"]["reason"] == "spend_cap"


# ---- subscriptions through the API ------------------------------------------------------

async def test_subscriptions_are_created_listed_rotated_and_deleted(setup: Setup) -> None:
    async with serve_receiver_async(whsec()) as mine, setup.api() as api:
        refused = await api.post("/v1/webhooks/subscriptions",
                                 json={"url": mine.url, "events": ["charge.created"]})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "private_address"
        r = await api.post("/v1/webhooks/subscriptions", json={
            "url": mine.url, "events": ["charge.created"], "allow_private": True})
        assert r.status_code == 201, r.text
        sub = r.json()
        assert sub["secret"].startswith("whsec_") and sub["events"] == ["charge.created"]
        mine.secret = sub["secret"]
        listed = (await api.get("/v1/webhooks/subscriptions")).json()["data"]
        assert sub["id"] in [s["id"] for s in listed]
        assert all("secret" not in s for s in listed)
        settings_one = next(s for s in listed if s["source"] == "settings")
        patched = await api.patch(f"/v1/webhooks/subscriptions/{settings_one['id']}",
                                  json={"enabled": False})
        assert patched.status_code == 409

        user = new_user("sub")
        async with setup.sdk() as client:
            await ask(client, user)

        async def got(n: int) -> bool:
            return len(mine.events("charge.created", user)) >= n

        await eventually(lambda: got(1), "a charge at the new subscription")
        assert mine.events(user=user) == mine.events("charge.created", user)  # only those

        old_secret = mine.secret
        rotated = (await api.post(f"/v1/webhooks/subscriptions/{sub['id']}/rotate",
                                  json={"overlap_seconds": 3600})).json()
        assert rotated["secret"] != old_secret
        async with setup.sdk() as client:
            await ask(client, user)
        await eventually(lambda: got(2), "a charge signed after the rotation")
        last = next(r for r in reversed(mine.accepted) if r.event["user"] == user)
        for s in (old_secret, rotated["secret"]):  # both sign during the overlap
            Webhook(s).verify(last.body, last.headers)

        async def all_delivered() -> list[dict[str, Any]]:
            """The deliveries, once each is marked delivered: a worker marks one after
            the receiver has answered, so the last may still be pending a moment."""
            data: list[dict[str, Any]] = (await api.get(
                "/v1/webhooks/deliveries", params={"subscription": sub["id"]})).json()["data"]
            return data if {d["status"] for d in data} == {"delivered"} else []

        deliveries = await eventually(all_delivered, "both deliveries marked delivered")
        assert {d["status"] for d in deliveries} == {"delivered"}
        replayed = await api.post("/v1/webhooks/deliveries/replay",
                                  json={"event_id": deliveries[0]["event_id"],
                                        "subscription": sub["id"]})
        assert replayed.json()["queued"] == [sub["id"]]

        async def redelivered() -> bool:
            return sum(r.event["id"] == deliveries[0]["event_id"] for r in mine.accepted) == 2

        await eventually(redelivered, "the replayed delivery")
        gone = await api.delete(f"/v1/webhooks/subscriptions/{sub['id']}")
        assert gone.json()["deleted"] is True
        assert (await api.get(f"/v1/webhooks/subscriptions/{sub['id']}")).status_code == 404


def serve_receiver_async(secret: str) -> Any:
    """The receiver as an async context manager (it runs in a thread of its own)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def cm() -> Any:
        with serve_receiver(secret) as r:
            yield r

    return cm()


def test_every_event_type_is_documented() -> None:
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    assert [t for t in EVENT_TYPES if f"`{t}`" not in readme] == []


def test_events_tail_prints_a_paywalls_events_as_json_lines(setup: Setup) -> None:
    import orjson

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("PAYWALL_CONFIG", "REDIS_URL")}
    env["DATABASE_URL"] = setup.database_url
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "events", "tail", "--paywall", "evt", "--type",
         "charge.created", "--last", "3", "--config", str(setup.config)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    lines = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3 and {e["type"] for e in lines} == {"charge.created"}
    assert [e["id"] for e in lines] == sorted(e["id"] for e in lines)
    delivered = {e["id"] for e in setup.receiver.events("charge.created")}
    assert {e["id"] for e in lines} <= delivered


async def test_the_delivery_log_pages_through_every_delivery_once(setup: Setup) -> None:
    user = new_user("pages")
    async with setup.api("capped") as api, setup.sdk("capped") as client:
        made = []
        for _ in range(2):  # two more subscriptions: each event has three deliveries
            r = await api.post("/v1/webhooks/subscriptions", json={
                "url": setup.receiver.url, "events": ["charge.created"], "allow_private": True})
            assert r.status_code == 201
            made.append(r.json()["id"])
        for _ in range(2):
            await ask(client, user)

        async def all_delivered() -> list[Any]:
            data = (await api.get("/v1/webhooks/deliveries", params={
                "type": "charge.created", "limit": "100"})).json()["data"]
            mine = [d for d in data if d["user"] == user]
            return mine if len(mine) == 6 else []  # (the new ones' secrets are not the
            # receiver's: delivered or retrying, each is in the log)

        everything = await eventually(all_delivered, "six deliveries")
        seen: list[tuple[str, str]] = []
        before = None
        while True:
            page = (await api.get("/v1/webhooks/deliveries", params={
                "type": "charge.created", "limit": "1",
                **({"before": before} if before else {})})).json()
            seen += [(d["event_id"], d["subscription"]) for d in page["data"]]
            if not page["has_more"]:
                break
            before = page["next_before"]
        pairs = {(d["event_id"], d["subscription"]) for d in everything}
        assert pairs <= set(seen) and len(seen) == len(set(seen))
        bad = await api.get("/v1/webhooks/deliveries", params={"before": "12"})
        assert bad.status_code == 400
        for sub in made:
            assert (await api.delete(f"/v1/webhooks/subscriptions/{sub}")).status_code == 200
