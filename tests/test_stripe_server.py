"""The local Stripe (``tests/stripe_server.py``) against the official ``stripe`` library.

Every call goes through a real ``stripe.StripeClient`` over real HTTP (the production
path, ``AIOHTTPClient`` and ``create_async``, where it matters), and every webhook is
received by a real HTTP endpoint and checked with ``stripe.Webhook.construct_event``, as
the production code checks it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import stripe
from stripe._encode import _api_encode

from tests.stripe_server import LocalStripe, decode_form, format_amount, serve_local_stripe, sign
from tests.upstream import free_port, read_body, send_json, serve_asgi

KEY = "sk_test_local_CANARY_0123456789"
WHSEC = "whsec_local_CANARY_secret_abcdef"
SUCCESS = "https://app.example.test/paid?session={CHECKOUT_SESSION_ID}"
CANCEL = "https://app.example.test/cancelled"


@dataclass
class Receiver:
    """A webhook endpoint: records each request (headers, raw body), waits ``delay``,
    awaits ``callback(headers, body)`` when set (its result or error goes to
    ``called_back``), and answers ``status``."""

    status: int = 200
    delay: float = 0.0
    callback: Callable[[dict[str, str], bytes], Awaitable[Any]] | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    called_back: list[Any] = field(default_factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append((headers, body))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.callback is not None:
            try:
                self.called_back.append(await self.callback(headers, body))
            except Exception as exc:
                self.called_back.append(exc)
        await send_json(send, self.status, {"received": True})

    def reset(self) -> None:
        self.status, self.delay, self.callback = 200, 0.0, None
        self.received.clear()
        self.called_back.clear()

    def events(self) -> list[stripe.Event]:
        """Every body received, verified as the production code verifies it."""
        return [stripe.Webhook.construct_event(body, headers["stripe-signature"], WHSEC)
                for headers, body in self.received]


@pytest.fixture(scope="module")
def served() -> Iterator[LocalStripe]:
    with serve_local_stripe(KEY) as server:
        yield server


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Receiver]:
    hook = Receiver()
    with serve_asgi(hook) as port:
        hook.url = f"http://127.0.0.1:{port}/webhooks/stripe"
        yield hook


@pytest.fixture
def local(served: LocalStripe) -> LocalStripe:
    """The module's server, reset, with one price: ``price_pro``, 12.34 USD."""
    served.reset()
    served.add_price("price_pro", 1234, "usd", "Pro credits")
    return served


@pytest.fixture
def client(local: LocalStripe) -> Iterator[stripe.StripeClient]:
    http = stripe.RequestsClient()
    yield stripe.StripeClient(KEY, base_addresses={"api": local.url}, http_client=http)
    http.close()


@pytest.fixture
def receiver(local: LocalStripe, endpoint: Receiver) -> Receiver:
    """The module's webhook endpoint, reset, receiving every event of ``local``."""
    endpoint.reset()
    local.add_endpoint(endpoint.url, WHSEC)
    return endpoint


def checkout(client: stripe.StripeClient, key: str | None = None,
             **extra: Any) -> stripe.checkout.Session:
    """A session for one ``price_pro``, with ``extra`` parameters, sent with the
    idempotency ``key`` when given."""
    params: dict[str, Any] = {
        "mode": "payment", "line_items": [{"price": "price_pro", "quantity": 1}],
        "success_url": SUCCESS, "cancel_url": CANCEL, "client_reference_id": "user-7",
        "metadata": {"paywall": "pw1", "user": "user-7"}, **extra}
    options: stripe.RequestOptions = {"idempotency_key": key} if key else {}
    return client.v1.checkout.sessions.create(params, options)  # type: ignore[arg-type]


SAVE_CARD = {"payment_intent_data": {"setup_future_usage": "off_session",
                                     "metadata": {"topup": "t1"}}}


def test_sign_is_what_the_library_verifies() -> None:
    payload = '{"id": "evt_1", "object": "event", "note": "caf\u00e9"}'.encode()
    header = sign(payload, WHSEC, 1_700_000_000)
    assert header == stripe.WebhookSignature.generate_signature_header(
        payload.decode(), WHSEC, 1_700_000_000)
    fresh = sign(payload, WHSEC)
    assert stripe.Webhook.construct_event(payload, fresh, WHSEC).id == "evt_1"
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, fresh, WHSEC + "x")
    with pytest.raises(stripe.SignatureVerificationError):  # older than the tolerance
        stripe.Webhook.construct_event(payload, header, WHSEC)


def test_decode_form_reads_the_library_encoding() -> None:
    params = {"line_items": [{"price_data": {"currency": "usd", "unit_amount": 5,
                                             "product_data": {"name": "a b&c"}},
                              "quantity": 2}],
              "metadata": {"0": "zero", "paywall": "x"}, "expand": ["payment_intent"],
              "confirm": True}
    raw = urlencode(list(_api_encode(params))).replace("%5B", "[").replace("%5D", "]")
    assert decode_form(raw) == {
        "line_items": [{"price_data": {"currency": "usd", "unit_amount": "5",
                                       "product_data": {"name": "a b&c"}},
                        "quantity": "2"}],
        "metadata": {"0": "zero", "paywall": "x"}, "expand": ["payment_intent"],
        "confirm": "true"}
    assert decode_form("expand[]=a&expand[]=b") == {"expand": ["a", "b"]}
    assert format_amount(1234, "usd") == "12.34 USD"
    assert format_amount(500, "jpy") == "500 JPY"


def test_every_call_wants_the_secret_key(local: LocalStripe) -> None:
    http = stripe.RequestsClient()
    wrong = stripe.StripeClient("sk_test_wrong", base_addresses={"api": local.url},
                                http_client=http)
    try:
        with pytest.raises(stripe.AuthenticationError) as caught:
            wrong.v1.checkout.sessions.list()
    finally:
        http.close()
    assert caught.value.http_status == 401
    with httpx.Client() as raw:
        answer = raw.get(f"{local.url}/v1/events")
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"
    assert local.sessions == {}


async def test_checkout_session_over_the_production_client(local: LocalStripe) -> None:
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(KEY, base_addresses={"api": local.url}, http_client=http)
    try:
        session = await client.v1.checkout.sessions.create_async({
            "mode": "payment", "success_url": SUCCESS, "cancel_url": CANCEL,
            "line_items": [
                {"price": "price_pro", "quantity": 2},
                {"price_data": {"currency": "usd", "unit_amount": 250,
                                "product_data": {"name": "Top-up"}}, "quantity": 3}],
            "client_reference_id": "user-7", "metadata": {"paywall": "pw1"},
            "customer_email": "a@example.test", "customer_creation": "always",
            "payment_intent_data": {"setup_future_usage": "off_session",
                                    "metadata": {"topup": "t1"}},
            "currency": "usd", "expires_at": int(time.time()) + 3600})
        again = await client.v1.checkout.sessions.retrieve_async(session.id)
    finally:
        await http.close_async()
    assert re.fullmatch(r"cs_test_[A-Za-z0-9]+", session.id)
    assert session.object == "checkout.session"
    assert session.url == f"{local.url}/pay/{session.id}"
    assert (session.status, session.payment_status, session.mode) == ("open", "unpaid",
                                                                      "payment")
    assert session.amount_total == session.amount_subtotal == 2 * 1234 + 3 * 250
    assert session.currency == "usd"
    assert session.metadata.to_dict() == {"paywall": "pw1"}
    assert session.client_reference_id == "user-7"
    assert session.payment_intent is None and session.customer is None
    assert session.livemode is False and isinstance(session.created, int)
    assert (session.success_url, session.cancel_url) == (SUCCESS, CANCEL)
    assert "line_items" not in session and "payment_intent_data" not in session
    assert again.to_dict() == session.to_dict()


def test_checkout_refusals(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        checkout(client, line_items=[{"price": "price_nope", "quantity": 1}])
    assert caught.value.http_status == 400
    assert caught.value.code == "resource_missing"
    assert caught.value.param == "line_items[0][price]"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        checkout(client, mode="subscription")
    assert caught.value.param == "mode"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        checkout(client, succes_url="https://typo.example.test")
    assert caught.value.code == "parameter_unknown"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        checkout(client, line_items=[])
    assert caught.value.code == "parameter_missing"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.checkout.sessions.retrieve("cs_test_unknown")
    assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")


def test_idempotency_key_replays_or_refuses(client: stripe.StripeClient,
                                            local: LocalStripe) -> None:
    first = checkout(client, key="k-1")
    again = checkout(client, key="k-1")
    assert again.id == first.id
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(local.sessions) == 1
    with pytest.raises(stripe.IdempotencyError):
        checkout(client, client_reference_id="user-8", key="k-1")
    with pytest.raises(stripe.IdempotencyError):
        client.v1.payment_intents.create({"amount": 100, "currency": "usd"},
                                         {"idempotency_key": "k-1"})
    assert len(local.sessions) == 1
    assert checkout(client, key="k-2").id != first.id


def test_session_list_pages_newest_first(client: stripe.StripeClient,
                                         local: LocalStripe) -> None:
    local.clock = lambda: 1_000.0
    old = checkout(client)
    local.clock = lambda: 2_000.0
    ids = [checkout(client).id for _ in range(4)]
    local.complete(ids[0])
    page = client.v1.checkout.sessions.list({"limit": 2})
    assert [s.id for s in page.data] == [ids[3], ids[2]] and page.has_more
    assert page.url == "/v1/checkout/sessions"
    assert [s.id for s in page.auto_paging_iter()] == [*reversed(ids), old.id]
    newer = client.v1.checkout.sessions.list({"created": {"gte": 1_500}, "limit": 100})
    assert {s.id for s in newer.data} == set(ids)
    older = client.v1.checkout.sessions.list({"created": {"lt": 2_000}})
    assert [s.id for s in older.data] == [old.id]
    assert client.v1.checkout.sessions.list({"created": {"gt": 2_000}}).data == []
    assert [s.id for s in client.v1.checkout.sessions.list({"created": {"lte": 1_000}}).data
            ] == [old.id]
    done = client.v1.checkout.sessions.list({"status": "complete"})
    assert [s.id for s in done.data] == [ids[0]]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.list({"limit": 101})


def test_hosted_checkout_pays_and_redirects(client: stripe.StripeClient, local: LocalStripe,
                                            receiver: Receiver) -> None:
    session = checkout(client, **SAVE_CARD)
    with httpx.Client() as browser:
        page = browser.get(session.url)
        assert page.status_code == 200
        assert "12.34 USD" in page.text and "Pro credits" in page.text
        assert re.search(rf'<form method="post" action="/pay/{session.id}">', page.text)
        assert re.search(r'<button type="submit" id="pay">Pay</button>', page.text)
        assert f'<a id="cancel" href="{CANCEL}">' in page.text
        paid = browser.post(session.url)
        assert paid.status_code == 303
        assert paid.headers["location"] == SUCCESS.replace("{CHECKOUT_SESSION_ID}", session.id)
        assert len(receiver.received) == 1  # delivered before the redirect
        assert browser.post(session.url).status_code == 400
        assert 'id="pay"' not in browser.get(session.url).text
    done = client.v1.checkout.sessions.retrieve(session.id)
    assert (done.status, done.payment_status) == ("complete", "paid")
    customer = local.customers[done.customer]
    intent = local.payment_intents[done.payment_intent]
    method = local.payment_methods[intent["payment_method"]]
    charge = local.charges[intent["latest_charge"]]
    assert customer["id"].startswith("cus_") and method["customer"] == customer["id"]
    assert intent["status"] == "succeeded" and intent["amount"] == 1234
    assert (intent["currency"], intent["customer"]) == ("usd", customer["id"])
    assert intent["metadata"] == {"topup": "t1"}
    assert intent["setup_future_usage"] == "off_session"
    assert charge["amount"] == 1234 and charge["amount_refunded"] == 0
    assert (charge["paid"], charge["refunded"], charge["status"]) == (True, False, "succeeded")
    assert (charge["customer"], charge["payment_intent"]) == (customer["id"], intent["id"])
    [event] = receiver.events()
    assert event.type == "checkout.session.completed"
    assert event.data.object.id == session.id
    assert event.data.object.payment_intent == intent["id"]
    assert event.data.object.metadata.to_dict() == {"paywall": "pw1", "user": "user-7"}
    assert len(local.deliveries) == 1 and local.deliveries[0].status == 200


def test_a_guest_payment_makes_no_customer(client: stripe.StripeClient,
                                           local: LocalStripe) -> None:
    guest = local.complete(checkout(client).id)
    assert guest["customer"] is None
    assert local.payment_methods[local.payment_intents[guest["payment_intent"]]
                                 ["payment_method"]]["customer"] is None
    made = local.complete(checkout(client, customer_creation="always",
                                   customer_email="b@example.test").id)
    assert local.customers[made["customer"]]["email"] == "b@example.test"


def test_expand_replaces_ids_with_objects(client: stripe.StripeClient,
                                          local: LocalStripe) -> None:
    session = checkout(client)
    local.complete(session.id)
    plain = client.v1.checkout.sessions.retrieve(session.id)
    assert isinstance(plain.payment_intent, str)
    full = client.v1.checkout.sessions.retrieve(
        session.id, {"expand": ["payment_intent.latest_charge", "line_items"]})
    assert full.payment_intent.id == plain.payment_intent
    assert full.payment_intent.object == "payment_intent"
    assert full.payment_intent.latest_charge.object == "charge"
    assert full.line_items.data[0].quantity == 1
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.retrieve(session.id, {"expand": ["nothing"]})


def test_delayed_payment_settles_later(client: stripe.StripeClient, local: LocalStripe,
                                       receiver: Receiver) -> None:
    good, bad = checkout(client), checkout(client)
    assert local.complete(good.id, asynchronous=True)["payment_status"] == "unpaid"
    local.complete(bad.id, asynchronous=True)
    assert local.settle_async(good.id, True)["payment_status"] == "paid"
    assert local.settle_async(bad.id, False)["payment_status"] == "unpaid"
    assert [(e.type, e.data.object.id, e.data.object.payment_status)
            for e in receiver.events()] == [
        ("checkout.session.completed", good.id, "unpaid"),
        ("checkout.session.completed", bad.id, "unpaid"),
        ("checkout.session.async_payment_succeeded", good.id, "paid"),
        ("checkout.session.async_payment_failed", bad.id, "unpaid")]
    with pytest.raises(stripe.InvalidRequestError):  # its charge failed: nothing to refund
        client.v1.refunds.create({"payment_intent": local.sessions[bad.id]["payment_intent"]})


def test_off_session_charge(client: stripe.StripeClient, local: LocalStripe,
                            receiver: Receiver) -> None:
    session = local.complete(checkout(client, **SAVE_CARD).id)
    method = local.payment_intents[session["payment_intent"]]["payment_method"]
    intent = client.v1.payment_intents.create({
        "amount": 500, "currency": "usd", "customer": session["customer"],
        "payment_method": method, "off_session": True, "confirm": True,
        "metadata": {"topup": "auto-1"}, "description": "Automatic top-up"})
    assert intent.status == "succeeded" and intent.amount == 500
    assert local.charges[intent.latest_charge]["amount"] == 500
    assert local.charges[intent.latest_charge]["metadata"] == {"topup": "auto-1"}
    assert len(local.payment_intents) == 2
    event = receiver.events()[-1]
    assert event.type == "payment_intent.succeeded"
    assert event.data.object.id == intent.id
    assert event.data.object.metadata.to_dict() == {"topup": "auto-1"}
    assert client.v1.payment_intents.retrieve(intent.id).to_dict() == intent.to_dict()
    unconfirmed = client.v1.payment_intents.create({
        "amount": 700, "currency": "usd", "customer": session["customer"],
        "payment_method": method})
    assert unconfirmed.status == "requires_confirmation"
    assert len(receiver.received) == 2


def test_declined_charge(client: stripe.StripeClient, local: LocalStripe,
                         receiver: Receiver) -> None:
    customer = local.add_customer("c@example.test")
    method = customer["invoice_settings"]["default_payment_method"]
    local.decline(method)
    params = {"amount": 500, "currency": "usd", "customer": customer["id"],
              "payment_method": method, "off_session": True, "confirm": True}
    with pytest.raises(stripe.CardError) as caught:
        client.v1.payment_intents.create(params, {"idempotency_key": "charge-1"})  # type: ignore[arg-type]
    assert caught.value.http_status == 402 and caught.value.code == "card_declined"
    assert caught.value.error is not None
    assert caught.value.error.decline_code == "generic_decline"
    assert caught.value.error.payment_intent.status == "requires_payment_method"
    with pytest.raises(stripe.CardError) as replayed:  # the same answer, nothing new
        client.v1.payment_intents.create(params, {"idempotency_key": "charge-1"})  # type: ignore[arg-type]
    assert replayed.value.json_body == caught.value.json_body
    assert local.payment_intents == {} and len(local.failed_payment_intents) == 1
    [event] = receiver.events()
    assert event.type == "payment_intent.payment_failed"
    assert event.data.object.id == caught.value.error.payment_intent.id
    no_card = local.add_customer(payment_method=False)
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create({"amount": 500, "currency": "usd",
                                          "customer": no_card["id"], "confirm": True})
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.payment_intents.create({"amount": 500, "currency": "usd",
                                          "customer": "cus_nope", "confirm": True})
    assert unknown.value.code == "resource_missing"
    assert local.payment_intents == {}


def test_refunds_add_up(client: stripe.StripeClient, local: LocalStripe,
                        receiver: Receiver) -> None:
    session = local.complete(checkout(client).id)
    intent = local.payment_intents[session["payment_intent"]]
    part = client.v1.refunds.create({"payment_intent": intent["id"], "amount": 234})
    assert part.object == "refund" and part.amount == 234 and part.id.startswith("re_")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.refunds.create({"charge": intent["latest_charge"], "amount": 1001})
    assert caught.value.param == "amount"
    rest = client.v1.refunds.create({"charge": intent["latest_charge"]})
    assert rest.amount == 1000
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create({"charge": intent["latest_charge"]})
    refunded = [e.data.object for e in receiver.events() if e.type == "charge.refunded"]
    assert [(c.amount_refunded, c.refunded) for c in refunded] == [(234, False), (1234, True)]
    assert refunded[0].id == intent["latest_charge"]
    kept = local.events_of("charge.refunded")  # snapshots, not the live charge
    assert [e["data"]["object"]["amount_refunded"] for e in kept] == [234, 1234]


def test_disputes(client: stripe.StripeClient, local: LocalStripe,
                  receiver: Receiver) -> None:
    session = local.complete(checkout(client).id)
    opened = local.dispute(session["payment_intent"], amount=1000)
    assert opened["id"].startswith("dp_") and opened["object"] == "dispute"
    assert (opened["amount"], opened["currency"], opened["status"], opened["reason"]) == (
        1000, "usd", "needs_response", "fraudulent")
    assert opened["payment_intent"] == session["payment_intent"]
    assert local.dispute(checkout_and_pay(client, local), amount=None)["amount"] == 1234
    closed = local.close_dispute(opened["id"], won=False)
    assert closed["status"] == "lost"
    types = [(e.type, e.data.object.id) for e in receiver.events()]
    assert ("charge.dispute.created", opened["id"]) in types
    assert types[-1] == ("charge.dispute.closed", opened["id"])
    assert receiver.events()[-1].data.object.status == "lost"
    assert client.v1.disputes.retrieve(opened["id"]).status == "lost"


def checkout_and_pay(client: stripe.StripeClient, local: LocalStripe) -> str:
    """A paid session's charge id."""
    session = local.complete(checkout(client).id)
    return str(local.payment_intents[session["payment_intent"]]["latest_charge"])


def test_events_are_kept_and_served(client: stripe.StripeClient, local: LocalStripe) -> None:
    first = local.complete(checkout(client).id)
    local.dispute(first["payment_intent"])
    local.complete(checkout(client).id)
    [created] = local.events_of("charge.dispute.created")
    event = client.v1.events.retrieve(created["id"])
    assert event.object == "event" and event.api_version == stripe.api_version
    assert event.request.id is None and event.livemode is False
    listed = client.v1.events.list({"type": "checkout.session.completed"})
    assert [e.data.object.id for e in listed.data] == [
        e["data"]["object"]["id"] for e in reversed(local.events_of(
            "checkout.session.completed"))]
    assert [e.type for e in client.v1.events.list({"type": "charge.dispute.*"}).data] == [
        "charge.dispute.created"]
    assert len(client.v1.events.list().data) == 3


def test_webhooks_are_signed_as_stripe_signs(client: stripe.StripeClient, local: LocalStripe,
                                             receiver: Receiver) -> None:
    session = local.complete(checkout(client, metadata={"note": "caf\u00e9 \u2615"}).id)
    [(headers, body)] = receiver.received
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", headers["stripe-signature"])
    event = stripe.Webhook.construct_event(body, headers["stripe-signature"], WHSEC)
    assert event.data.object.metadata.note == "caf\u00e9 \u2615"
    assert event.pending_webhooks == 1 and event.data.object.id == session["id"]
    [delivery] = local.deliveries
    assert (delivery.event_id, delivery.type, delivery.url, delivery.status) == (
        event.id, "checkout.session.completed", receiver.url, 200)
    assert (delivery.body, delivery.signature) == (body, headers["stripe-signature"])
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_other")


def test_failed_deliveries_are_recorded_not_retried(client: stripe.StripeClient,
                                                    local: LocalStripe,
                                                    receiver: Receiver) -> None:
    receiver.status = 500
    local.add_endpoint(f"http://127.0.0.1:{free_port()}/gone", WHSEC)
    local.complete(checkout(client).id)
    assert [d.status for d in local.deliveries] == [500, None]
    assert local.deliveries[1].error is not None
    receiver.status = 200
    event_id = local.deliveries[0].event_id
    assert event_id is not None
    assert local.redeliver(event_id) == [200, None]
    assert len(receiver.received) == 2
    first, second = receiver.events()
    assert first.id == second.id == event_id


def test_held_webhooks_wait(client: stripe.StripeClient, local: LocalStripe,
                            receiver: Receiver) -> None:
    local.hold_webhooks = True
    session = local.complete(checkout(client).id)
    assert receiver.received == [] and local.deliveries == []
    assert [e["type"] for e in local.held] == ["checkout.session.completed"]
    local.hold_webhooks = False
    assert local.release_held() == [200]
    assert local.held == []
    assert receiver.events()[0].data.object.id == session["id"]


def test_send_many_times_at_once(local: LocalStripe, receiver: Receiver) -> None:
    receiver.delay = 0.3
    event = {"id": "evt_made_up", "object": "event", "type": "checkout.session.completed",
             "data": {"object": {"id": "cs_test_x", "object": "checkout.session"}}}
    started = time.monotonic()
    assert local.send(event, times=5, concurrently=True) == [200] * 5
    assert time.monotonic() - started < 5 * 0.3
    assert [e.id for e in receiver.events()] == ["evt_made_up"] * 5
    receiver.delay = 0.0
    assert local.send(event, times=2) == [200, 200]
    assert len(local.deliveries) == 7


@pytest.mark.parametrize("via", ["python", "hosted page", "api"])
def test_the_receiver_may_call_back(client: stripe.StripeClient, local: LocalStripe,
                                    receiver: Receiver, via: str) -> None:
    """While the webhook is being delivered, the receiver's own call to the API (the
    production client, in the receiver's event loop) is answered."""
    async def retrieve(headers: dict[str, str], body: bytes) -> str:
        event = stripe.Webhook.construct_event(body, headers["stripe-signature"], WHSEC)
        http = stripe.AIOHTTPClient()
        api = stripe.StripeClient(KEY, base_addresses={"api": local.url}, http_client=http)
        try:
            kept = await api.v1.events.retrieve_async(event.id)
            session = await api.v1.checkout.sessions.retrieve_async(
                first.id, {"expand": ["payment_intent"]})
        finally:
            await http.close_async()
        return f"{kept.type}/{session.payment_intent.status}"

    first = checkout(client, **SAVE_CARD)
    if via == "api":
        local.complete(first.id)
    receiver.callback = retrieve
    local.webhook_timeout = 2.0
    if via == "python":
        local.complete(first.id)
        expected = "checkout.session.completed"
    elif via == "hosted page":
        with httpx.Client() as browser:
            assert browser.post(first.url).status_code == 303
        expected = "checkout.session.completed"
    else:
        paid = local.sessions[first.id]
        client.v1.payment_intents.create({
            "amount": 100, "currency": "usd", "customer": paid["customer"],
            "confirm": True, "off_session": True})
        expected = "payment_intent.succeeded"
    assert receiver.called_back == [f"{expected}/succeeded"]
    assert local.deliveries[-1].status == 200


def test_state_is_safe_across_threads(client: stripe.StripeClient, local: LocalStripe,
                                      receiver: Receiver) -> None:
    ids = [checkout(client).id for _ in range(8)]
    errors: list[BaseException] = []

    def pay(session_id: str) -> None:
        try:
            local.complete(session_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pay, args=(i,)) for i in ids + ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(errors) == len(ids)  # each session is paid once, the second try refused
    assert len(local.payment_intents) == len(ids)
    assert sorted(e.data.object.id for e in receiver.events()) == sorted(ids)


def test_expired_sessions_cannot_be_paid(client: stripe.StripeClient, local: LocalStripe,
                                         receiver: Receiver) -> None:
    session = checkout(client)
    expired = client.v1.checkout.sessions.expire(session.id)
    assert expired.status == "expired" and expired.url is None
    with httpx.Client() as browser:
        assert browser.post(session.url).status_code == 400
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.expire(session.id)
    assert [e.type for e in receiver.events()] == ["checkout.session.expired"]


def test_reset_forgets_everything(client: stripe.StripeClient, local: LocalStripe,
                                  receiver: Receiver) -> None:
    session = local.complete(checkout(client, key="k-reset").id)
    local.hold_webhooks = True
    local.reset()
    assert (local.sessions, local.events, local.deliveries, local.endpoints) == ({}, [], [],
                                                                                 [])
    assert local.hold_webhooks is False
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.retrieve(session["id"])
    local.add_price("price_pro", 1234, "usd", "Pro credits")
    assert checkout(client, key="k-reset").id != session["id"]  # the kept answer is gone
