"""Payment events end to end: what Stripe does to a user's money reaches the app as
signed webhooks.

The proxy runs as a real process on a real PostgreSQL, paid through the local server
speaking Stripe's HTTP API (:mod:`tests.stripe_server`), and delivers its events to a
local receiver that verifies each with the ``standardwebhooks`` library
(:mod:`tests.webhook_receiver`). A paid Checkout is told as ``balance.deposit.created``
and ``topup.checkout.completed``; a refund and a dispute of that top-up as
``charge.refunded`` naming the deposit it reverses; a delayed payment that fails and a
declined automatic recharge as ``topup.failed``, once each; and the holds of a process
killed mid-request, resolved by another process's reaper, as ``hold.expired`` (with
the ``charge.created`` of a stream posted at its checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import stripe

from tests.conftest import (
    eventually,
    mint_keys,
    new_user,
    serving_proxy,
    start_proxy,
    stop_proxy,
)
from tests.stripe_server import DECLINE_MESSAGE, LocalStripe, serve_local_stripe
from tests.test_events import whsec
from tests.test_payments import (
    PAYWALL,
    SCALE,
    SECRET,
    Shop,
    completed_event,
    open_checkout,
    paid,
    save_card,
    settings,
    spend,
)
from tests.upstream import Upstream, free_port
from tests.webhook_receiver import Receiver, serve_receiver

SETTLE = 0.8  # seconds of delivery rounds (every 0.1 s) after which nothing more may come
SLOW_PRICE = 50_000_000  # usd units: what one request of the slow model costs


def config(upstream: Upstream, stripe_url: str, public_url: str, receiver: Receiver) -> str:
    """The payments tests' shop, with few connections, a short hold TTL, a slow model, and
    every event of the paywall sent to ``receiver``."""
    text = settings(upstream, stripe_url, public_url)
    for old, new in (("[database]\n", "[database]\npool_max = 4\n"),
                     ("hold_ttl_seconds = 3.0", "hold_ttl_seconds = 2.0")):
        assert old in text
        text = text.replace(old, new)
    return text + f"""
[models.slow]
provider = "up"
upstream = "linger-6.0"
price = {{ per_request = "0.05" }}
[paywalls.{PAYWALL}.webhooks.all]
url = "{receiver.url}"
events = ["*"]
secret = "{receiver.secret}"
allow_private = true
[events]
poll_seconds = 0.1
first_retry_seconds = 0.2
max_retry_seconds = 1.0
"""


@dataclass
class Setup:
    shop: Shop
    receiver: Receiver
    settings: str


@pytest.fixture(scope="module")
def setup(upstream: Upstream, own_database_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    key = asyncio.run(mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    workdir = tmp_path_factory.mktemp("payment-events")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve_local_stripe() as local, serve_receiver(whsec()) as receiver:
        text = config(upstream, local.url, url, receiver)
        with serving_proxy(text, own_database_url, workdir, port=port) as proxy:
            local.endpoints[:] = [(f"{url}/webhooks/stripe/{PAYWALL}", SECRET)]
            yield Setup(Shop(proxy, local, key, own_database_url, workdir / "proxy.toml"),
                        receiver, text)


async def told(receiver: Receiver, user: str, event_type: str, n: int = 1,
               within: float = 15) -> list[dict[str, Any]]:
    """The ``event_type`` events of ``user`` once ``n`` have arrived and a few more
    delivery rounds brought no other."""
    async def arrived() -> bool:
        return len(receiver.events(event_type, user)) >= n

    await eventually(arrived, f"{n} {event_type} for {user}", within=within)
    await asyncio.sleep(SETTLE)
    return receiver.events(event_type, user)


def stripe_event(local: LocalStripe, event_type: str, object_id: str) -> dict[str, Any]:
    return next(e for e in local.events_of(event_type)
                if e["data"]["object"]["id"] == object_id)


def of(event: dict[str, Any]) -> tuple[str, str, str]:
    return event["paywall"], event["user"], event["type"]


async def test_a_paid_checkout_is_told_as_a_deposit_and_a_completed_top_up(
        setup: Setup, pg: Any) -> None:
    shop, receiver = setup.shop, setup.receiver
    user = new_user("buyer")
    session_id = await open_checkout(shop, user, amount="1000")  # the top-up page's form
    async with shop.browser() as b:
        done = await b.post(shop.stripe.sessions[session_id]["url"])  # the Pay button
        assert done.status_code == 303
        receipt = await b.get(done.headers["location"])  # deposits too, were it first
        assert receipt.status_code == 200 and "Payment received: 10.00 USD" in receipt.text
    (completed,) = await told(receiver, user, "topup.checkout.completed")
    (deposit,) = await told(receiver, user, "balance.deposit.created")
    entry_id = await pg.fetchval("SELECT entry_id FROM payments WHERE paywall_id = $1"
                                 " AND id = $2", PAYWALL, session_id)
    assert of(deposit) == (PAYWALL, user, "balance.deposit.created")
    assert deposit["data"] == {
        "entry_id": entry_id, "kind": "deposit", "asset": "usd", "amount": 10 * SCALE,
        "balance_after": 10 * SCALE,
        "metadata": {"payment": session_id, "item": "amount", "paid": 1000,
                     "currency": "usd"}}
    assert of(completed) == (PAYWALL, user, "topup.checkout.completed")
    assert completed["data"] == {
        "payment": session_id, "item": "amount", "paid": 1000, "currency": "usd",
        "asset": "usd", "amount": 10 * SCALE, "balance_after": 10 * SCALE}
    # Both written by the webhook's deposit, in its transaction: one request id.
    webhook = completed_event(shop, session_id)
    assert deposit["request_id"] == completed["request_id"] == f"stripe:{webhook['id']}"
    kinds = [e["type"] for e in receiver.events(user=user)]
    assert kinds == ["user.created", "balance.deposit.created", "topup.checkout.completed"]
    assert receiver.refused == []


async def test_a_refund_and_a_dispute_of_a_top_up_are_told_as_charge_refunded(
        setup: Setup) -> None:
    shop, receiver = setup.shop, setup.receiver
    user = new_user("refunded")
    session_id = await paid(shop, user, "1000")
    (deposit,) = await told(receiver, user, "balance.deposit.created")
    intent = shop.stripe.sessions[session_id]["payment_intent"]
    charge = shop.stripe.payment_intents[intent]["latest_charge"]
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": shop.stripe.url})
    await asyncio.to_thread(client.v1.refunds.create, {"payment_intent": intent, "amount": 300})
    (refund,) = await told(receiver, user, "charge.refunded")
    dispute = await asyncio.to_thread(shop.stripe.dispute, intent, 700)
    first, second = await told(receiver, user, "charge.refunded", 2)
    assert first == refund
    for event in (first, second):
        assert of(event) == (PAYWALL, user, "charge.refunded")
        assert event["data"]["kind"] == "adjustment" and event["data"]["asset"] == "usd"
        assert event["data"]["metadata"]["reverses"] == deposit["data"]["entry_id"]
        assert event["data"]["metadata"]["payment"] == session_id
    assert (first["data"]["amount"], first["data"]["balance_after"]) == (-3 * SCALE, 7 * SCALE)
    assert first["data"]["metadata"] == {
        "reverses": deposit["data"]["entry_id"], "payment": session_id, "source": charge,
        "reversed": 3 * SCALE, "owed": 0}
    assert first["request_id"] == \
        f"stripe:{stripe_event(shop.stripe, 'charge.refunded', charge)['id']}"
    assert (second["data"]["amount"], second["data"]["balance_after"]) == (-7 * SCALE, 0)
    assert second["data"]["metadata"] == {
        "reverses": deposit["data"]["entry_id"], "payment": session_id,
        "source": dispute["id"], "reversed": 7 * SCALE, "owed": 0}
    assert second["request_id"] == \
        f"stripe:{stripe_event(shop.stripe, 'charge.dispute.created', dispute['id'])['id']}"
    # Won: the money comes back, told as an adjustment, not as a refund.
    await asyncio.to_thread(shop.stripe.close_dispute, dispute["id"], True)
    (back,) = await told(receiver, user, "balance.adjusted")
    assert (back["data"]["amount"], back["data"]["balance_after"]) == (7 * SCALE, 7 * SCALE)
    assert back["data"]["metadata"]["reverses"] == deposit["data"]["entry_id"]
    assert back["data"]["metadata"]["reversed"] == -7 * SCALE
    assert len(receiver.events("charge.refunded", user)) == 2
    assert receiver.refused == []


async def test_a_delayed_payment_that_fails_is_told_once_and_deposits_nothing(
        setup: Setup) -> None:
    shop, receiver = setup.shop, setup.receiver
    user = new_user("sepa-failed")
    session_id = await open_checkout(shop, user, amount="500")
    await asyncio.to_thread(shop.stripe.complete, session_id, asynchronous=True)
    await asyncio.to_thread(shop.stripe.settle_async, session_id, False)
    (failed,) = await told(receiver, user, "topup.failed")
    assert of(failed) == (PAYWALL, user, "topup.failed")
    assert failed["data"] == {"payment": session_id, "item": "amount", "paid": 500,
                              "currency": "usd", "reason": "the delayed payment failed"}
    webhook = stripe_event(shop.stripe, "checkout.session.async_payment_failed", session_id)
    assert failed["request_id"] == f"stripe:{webhook['id']}"
    assert receiver.events("balance.deposit.created", user) == []
    assert receiver.events("topup.checkout.completed", user) == []
    assert receiver.refused == []


async def test_a_failed_delayed_payment_delivered_again_is_not_told_again(
        setup: Setup) -> None:
    shop, receiver = setup.shop, setup.receiver
    user = new_user("sepa-again")
    session_id = await open_checkout(shop, user, amount="500")
    await asyncio.to_thread(shop.stripe.complete, session_id, asynchronous=True)
    await asyncio.to_thread(shop.stripe.settle_async, session_id, False)
    await told(receiver, user, "topup.failed")
    webhook = stripe_event(shop.stripe, "checkout.session.async_payment_failed", session_id)
    # Stripe delivers at least once: a retry of the same event.
    assert await asyncio.to_thread(shop.stripe.redeliver, webhook["id"]) == [200]
    await asyncio.sleep(SETTLE)
    assert len(receiver.events("topup.failed", user)) == 1
    assert receiver.refused == []


async def test_each_declined_automatic_recharge_is_told_once(setup: Setup, pg: Any) -> None:
    shop, receiver = setup.shop, setup.receiver
    user = new_user("declined")
    await save_card(shop, user, threshold="5", amount="500")
    method = await pg.fetchval("SELECT payment_method FROM recharges WHERE paywall_id = $1"
                               " AND user_id = $2", PAYWALL, user)
    shop.stripe.decline(method)
    assert await spend(shop, user, 1) == ["forward"]  # 4.97 left: under the threshold
    # Declined at Stripe (its payment_intent.payment_failed webhook and the API's 402 both
    # tell it), retried once, then given up (recharge_max_failures = 2).
    first, second = await told(receiver, user, "topup.failed", 2)
    await asyncio.sleep(1.0)  # more sweeps: no third try, nothing told again
    assert receiver.events("topup.failed", user) == [first, second]
    tried = [pi for pi in shop.stripe.failed_payment_intents.values()
             if pi["metadata"].get("user") == user]
    assert len(tried) == 2
    for n, event in enumerate((first, second), 1):
        assert of(event) == (PAYWALL, user, "topup.failed")
        assert event["data"] == {"item": "recharge", "trigger": n, "failures": n,
                                 "paid": 500, "currency": "usd", "reason": DECLINE_MESSAGE}
    # The card-saving top-up was told, the recharges that failed deposited nothing.
    assert len(receiver.events("topup.checkout.completed", user)) == 1
    assert len(receiver.events("balance.deposit.created", user)) == 1
    assert receiver.refused == []


async def slow_request(http: httpx.AsyncClient, user: str, stream: bool) -> bytes:
    """A request of the slow model, read until the server goes away under it."""
    got = b""
    body = {"model": "slow", "user": user, "stream": stream,
            "messages": [{"role": "user", "content": "Hello"}]}
    with contextlib.suppress(httpx.HTTPError):
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for chunk in r.aiter_raw():
                got += chunk
    return got


async def holds_of(pg: Any, user: str) -> list[Any]:
    return list(await pg.fetch(
        "SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY h.id", PAYWALL, user))


@pytest.mark.slow
async def test_the_holds_of_a_killed_process_are_told_expired_by_another_reaper(
        setup: Setup, pg: Any, tmp_path: Path) -> None:
    """SIGKILL in the middle of a slow completion and a slow stream: the shop's own
    process reaps both holds once they expire. The completion had no checkpoint (voided:
    ``hold.expired``, not posted); the stream had one (posted at it: ``charge.created``
    with outcome ``reaped``, and ``hold.expired``, posted)."""
    shop, receiver = setup.shop, setup.receiver
    user = new_user("killed")
    async with shop.api() as api:
        r = await api.post("/v1/user/balance/deposit", headers={"Idempotency-Key": user},
                           json={"user": user, "amount": "1"})
        assert r.status_code == 200, r.text
    path = tmp_path / "victim.toml"
    path.write_text(setup.settings)
    victim = await asyncio.to_thread(start_proxy, path, shop.database_url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=victim.url, timeout=30, headers={
                "Authorization": f"Bearer {shop.key}"}) as http, asyncio.TaskGroup() as tg:
            streamed = tg.create_task(slow_request(http, user, stream=True))
            tg.create_task(slow_request(http, user, stream=False))

            async def live() -> bool:
                holds = await holds_of(pg, user)
                return len(holds) == 2 and all(h["status"] == "pending" for h in holds) \
                    and any(h["checkpoint"] is not None for h in holds)

            await eventually(live, "two live holds, one with a checkpoint", within=15)
            victim.process.kill()  # SIGKILL: nothing is settled on the way out
            await asyncio.to_thread(victim.process.wait)
        assert b"data: " in streamed.result()
    finally:
        await asyncio.to_thread(stop_proxy, victim)
    left = await holds_of(pg, user)
    assert [h["status"] for h in left] == ["pending", "pending"]
    (checkpointed,) = [h for h in left if h["checkpoint"] is not None]
    (bare,) = [h for h in left if h["checkpoint"] is None]
    cost = orjson.loads(checkpointed["checkpoint"])["cost"]
    assert cost == SLOW_PRICE

    expired = await told(receiver, user, "hold.expired", 2)
    by_hold = {e["data"]["hold_id"]: e for e in expired}
    assert sorted(by_hold) == sorted(h["id"] for h in left)
    for hold in left:
        assert of(by_hold[hold["id"]]) == (PAYWALL, user, "hold.expired")
        assert by_hold[hold["id"]]["request_id"] == hold["request_id"]
    assert by_hold[checkpointed["id"]]["data"] == {
        "hold_id": checkpointed["id"], "posted": True, "cost": cost, "asset": "usd"}
    assert by_hold[bare["id"]]["data"] == {
        "hold_id": bare["id"], "posted": False, "cost": 0, "asset": "usd",
        "held": bare["amount"]}
    (charge,) = receiver.events("charge.created", user)
    assert of(charge) == (PAYWALL, user, "charge.created")
    assert charge["request_id"] == checkpointed["request_id"]
    data = charge["data"]
    assert (data["hold_id"], data["outcome"], data["cost"], data["model"]) == (
        checkpointed["id"], "reaped", cost, "slow")
    assert data["balance_after"] == SCALE - cost
    assert [h["status"] for h in await holds_of(pg, user)] == [
        "posted" if h["id"] == checkpointed["id"] else "expired" for h in left]
    assert receiver.refused == []
