"""A local stand-in for Stripe's HTTP API, served over real HTTP, for the tests.

Code that talks to Stripe through the official ``stripe`` library works against it
unchanged: point the client at :attr:`LocalStripe.url` with
``stripe.StripeClient(key, base_addresses={"api": url})``. It speaks the library's wire
format: form-encoded nested parameters in (``metadata[k]=v``, ``line_items[0][quantity]=1``,
``expand[0]=payment_intent``), JSON objects with an ``object`` field out, and errors as
``{"error": {"type", "code", "message", "param", ...}}`` with the status that makes the
library raise the matching exception (400 ``InvalidRequestError`` and
``IdempotencyError``, 401 ``AuthenticationError``, 402 ``CardError``, 404
``InvalidRequestError``). Parameters Stripe does not know for an endpoint are refused
(400 ``parameter_unknown``), as Stripe does, so a misspelt one fails here and not first
in production.

What it serves (every ``/v1`` call wants ``Authorization: Bearer <secret_key>``):

- ``POST /v1/checkout/sessions`` (``mode=payment``), ``GET /v1/checkout/sessions`` (a
  list, newest first), ``GET /v1/checkout/sessions/{id}``, ``GET
  /v1/checkout/sessions/{id}/line_items``, ``POST /v1/checkout/sessions/{id}/expire``.
- The hosted payment page: ``GET /pay/{id}`` (a form with a ``#pay`` button and a
  ``#cancel`` link) and ``POST /pay/{id}`` (pays, then 303 to the ``success_url``).
- ``POST /v1/payment_intents`` (off-session charges of a saved card), ``POST
  /v1/refunds``, ``GET /v1/events`` and retrieval by id of every object it keeps.

``POST`` requests honour ``Idempotency-Key``: the first answer with status 200 or 402 is
kept and replayed (same body and status, header ``Idempotent-Replayed: true``) to a
request with the same key, endpoint and parameters; the same key with other parameters
or another endpoint is a 400 ``idempotency_error``. Validation errors are not kept.

Every event is kept, and POSTed, signed as Stripe signs (:func:`sign`), to every endpoint
of :meth:`LocalStripe.add_endpoint` before the call that caused it returns, whether that
call came over HTTP or from the test thread. Deliveries are recorded and never retried.
State is guarded by a lock and no lock is held while a webhook is delivered, so the
receiver may call this server back while it handles one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import html
import json
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
import stripe
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from stripe.params import EventListParams, PaymentIntentCreateParams, RefundCreateParams
from stripe.params.checkout import SessionCreateParams, SessionExpireParams, SessionListParams

from tests.upstream import free_port, serve_asgi

Obj = dict[str, Any]
Handler = Callable[[Obj, dict[str, str], list[Obj]], Obj]

WEBHOOK_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg",
                          "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})
SESSION_LIFETIME = 24 * 3600
DECLINE_MESSAGE = "Your card was declined."


def _names(params: Any) -> frozenset[str]:
    """The parameter names of one of the library's ``...Params`` TypedDicts, without the
    request options (``api_key``, ``idempotency_key``, ...) that never go on the wire."""
    options = stripe.RequestOptions.__required_keys__ | stripe.RequestOptions.__optional_keys__
    keys: frozenset[str] = params.__required_keys__ | params.__optional_keys__
    return frozenset(keys - options)


SESSION_CREATE = _names(SessionCreateParams)
SESSION_LIST = _names(SessionListParams)
SESSION_EXPIRE = _names(SessionExpireParams)
INTENT_CREATE = _names(PaymentIntentCreateParams)
REFUND_CREATE = _names(RefundCreateParams)
EVENT_LIST = _names(EventListParams)
RETRIEVE = frozenset({"expand"})
PAGE = frozenset({"expand", "limit", "starting_after", "ending_before"})


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload`` as Stripe computes it:
    ``t=<unix time>,v1=<hex HMAC-SHA256 of b"<t>." + payload, keyed by the whole
    endpoint secret>``; ``timestamp`` defaults to now."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def decode_form(raw: str) -> Obj:
    """Stripe's form encoding read back into nested values: ``a[b]=1`` is
    ``{"a": {"b": "1"}}``, ``a[0]=x&a[1]=y`` and ``a[]=x&a[]=y`` are ``{"a": ["x", "y"]}``
    (a ``metadata`` object stays an object whatever its keys). Values stay strings."""
    root: Obj = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        base, bracket, rest = key.partition("[")
        parts = [base, *rest[:-1].split("][")] if bracket and rest.endswith("]") else [key]
        node = root
        for part in parts[:-1]:
            name = part or str(len(node))
            child = node.get(name)
            if not isinstance(child, dict):
                child = node[name] = {}
            node = child
        node[parts[-1] or str(len(node))] = value
    listed = _listify(root, "")
    return listed if isinstance(listed, dict) else {}


def _listify(value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        return value
    out = {k: _listify(v, k) for k, v in value.items()}
    if out and key != "metadata" and all(k.isdigit() for k in out):
        return [out[k] for k in sorted(out, key=int)]
    return out


class LocalStripeError(Exception):
    """A Stripe API error: ``status`` is the HTTP status, ``error`` the body's ``error``
    object. Raised by the test-side methods of :class:`LocalStripe` too."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error: Obj = {"type": type, "code": code, "message": message, "param": param,
                           **extra}


def _missing(param: str) -> LocalStripeError:
    return LocalStripeError(400, f"Missing required param: {param}.", code="parameter_missing",
                            param=param)


def _invalid(param: str, message: str) -> LocalStripeError:
    return LocalStripeError(400, message, code="parameter_invalid", param=param)


def _no_such(kind: str, ident: str, param: str | None, status: int = 400) -> LocalStripeError:
    return LocalStripeError(status, f"No such {kind}: '{ident}'", code="resource_missing",
                            param=param)


def _at(where: str, name: str) -> str:
    return f"{where}[{name}]" if where else name


def _str(params: Obj, name: str, where: str = "") -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid(_at(where, name), f"Invalid string: {_at(where, name)}")
    return value


def _int(params: Obj, name: str, where: str = "", *, minimum: int | None = None) -> int | None:
    value = _str(params, name, where)
    if value is None:
        return None
    if not value.lstrip("-").isdigit():
        raise _invalid(_at(where, name), f"Invalid integer: {value}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise _invalid(_at(where, name), f"This value must be greater than or equal to "
                                         f"{minimum}.")
    return number


def _bool(params: Obj, name: str, where: str = "") -> bool:
    value = _str(params, name, where)
    if value not in (None, "true", "false"):
        raise _invalid(_at(where, name), f"Invalid boolean: {value}")
    return value == "true"


def _dict(params: Obj, name: str, where: str = "") -> Obj:
    value = params.get(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise _invalid(_at(where, name), f"Invalid object: {_at(where, name)}")
    return value


def _metadata(params: Obj, where: str = "") -> dict[str, str]:
    metadata = _dict(params, "metadata", where)
    if not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(_at(where, "metadata"), "Metadata values must be strings.")
    return {k: v for k, v in metadata.items() if v != ""}


def _one_of(params: Obj, name: str, choices: tuple[str, ...], where: str = "") -> str | None:
    value = _str(params, name, where)
    if value is not None and value not in choices:
        raise _invalid(_at(where, name), f"Invalid {_at(where, name)}: must be one of "
                                         f"{', '.join(choices)}")
    return value


def _new_id(prefix: str, length: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def _type_matches(pattern: str, type_: str) -> bool:
    if pattern.endswith("*"):
        return type_.startswith(pattern[:-1])
    return type_ == pattern


def format_amount(amount: int, currency: str) -> str:
    """``amount`` (in the currency's smallest unit) as the hosted page shows it:
    ``12.34 USD``, ``500 JPY``."""
    if currency.lower() in ZERO_DECIMAL:
        return f"{amount} {currency.upper()}"
    return f"{amount // 100}.{amount % 100:02d} {currency.upper()}"


def _page_html(title: str, body: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver an event to an endpoint: ``status`` is the endpoint's HTTP
    status, None when it could not be reached in time (``error`` says why); ``body`` and
    ``signature`` are exactly the bytes and the ``Stripe-Signature`` header sent."""

    event_id: str | None
    type: str | None
    url: str
    status: int | None
    body: bytes
    signature: str
    error: str | None = None


@dataclass(frozen=True)
class _Kept:
    route: str
    params: Obj
    status: int
    body: bytes


class LocalStripe:
    """Stripe's API for one test account (``livemode`` false), as an ASGI app.

    The object stores are plain dicts by id, readable from the test thread:
    ``sessions``, ``payment_intents`` (every PaymentIntent created without a decline:
    checkout payments and API-created ones answered 200; ``len()`` counts the charges
    that went through, replays of an idempotent request add none),
    ``failed_payment_intents`` (declined at creation), ``charges``, ``customers``,
    ``payment_methods``, ``refunds``, ``disputes``, ``prices``. ``events`` is every
    event in order, ``deliveries`` every webhook attempt in order.

    Knobs: ``hold_webhooks`` (events go to ``held`` instead of the endpoints, until
    :meth:`release_held`), ``extra_events`` (also emit the side events Stripe sends:
    ``charge.succeeded`` for every successful charge, ``payment_intent.succeeded`` for
    checkout payments, ``refund.created``), ``webhook_timeout`` (seconds per delivery),
    ``clock`` (the time objects and events are ``created`` at and ``expires_at`` is
    checked against; signatures always use the real time). :meth:`reset` forgets all
    of it, so one server can serve a whole module.
    """

    def __init__(self, secret_key: str = "sk_test_local", port: int = 0) -> None:
        self.secret_key = secret_key
        self.port = port
        self._lock = threading.RLock()
        self._http = httpx.Client(trust_env=False)
        self._fresh()
        api = self._api
        self.app = Starlette(routes=[
            Route("/v1/checkout/sessions", api(self._create_session, SESSION_CREATE),
                  methods=["POST"]),
            Route("/v1/checkout/sessions", api(self._list_sessions, SESSION_LIST),
                  methods=["GET"]),
            Route("/v1/checkout/sessions/{id}",
                  api(self._retriever("checkout.session"), RETRIEVE), methods=["GET"]),
            Route("/v1/checkout/sessions/{id}/line_items", api(self._list_line_items, PAGE),
                  methods=["GET"]),
            Route("/v1/checkout/sessions/{id}/expire", api(self._expire_api, SESSION_EXPIRE),
                  methods=["POST"]),
            Route("/v1/payment_intents", api(self._create_intent, INTENT_CREATE),
                  methods=["POST"]),
            Route("/v1/refunds", api(self._create_refund, REFUND_CREATE), methods=["POST"]),
            Route("/v1/events", api(self._list_events, EVENT_LIST), methods=["GET"]),
            *[Route(f"/v1/{collection}/{{id}}", api(self._retriever(name), RETRIEVE),
                    methods=["GET"])
              for collection, name in [
                  ("payment_intents", "payment_intent"), ("charges", "charge"),
                  ("customers", "customer"), ("payment_methods", "payment_method"),
                  ("refunds", "refund"), ("disputes", "dispute"), ("prices", "price"),
                  ("products", "product"), ("events", "event")]],
            Route("/v1/{rest:path}", api(self._unknown, None),
                  methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
            Route("/pay/{id}", self._pay_page, methods=["GET"]),
            Route("/pay/{id}", self._pay, methods=["POST"]),
        ])

    def _fresh(self) -> None:
        self.clock: Callable[[], float] = time.time
        self.hold_webhooks = False
        self.extra_events = False
        # Generous: on a busy machine the proxy may take seconds to answer a webhook
        # (a timed-out delivery is retried by Stripe, not here).
        self.webhook_timeout = 30.0
        self.sessions: dict[str, Obj] = {}
        self.payment_intents: dict[str, Obj] = {}
        self.failed_payment_intents: dict[str, Obj] = {}
        self.charges: dict[str, Obj] = {}
        self.customers: dict[str, Obj] = {}
        self.payment_methods: dict[str, Obj] = {}
        self.refunds: dict[str, Obj] = {}
        self.disputes: dict[str, Obj] = {}
        self.prices: dict[str, Obj] = {}
        self.events: list[Obj] = []
        self.held: list[Obj] = []
        self.deliveries: list[Delivery] = []
        self.endpoints: list[tuple[str, str]] = []
        self.declined: set[str] = set()
        self._by_id: dict[str, Obj] = {}
        self._line_items: dict[str, list[Obj]] = {}
        self._intent_data: dict[str, Obj] = {}
        self._awaiting: set[str] = set()
        self._kept: dict[str, _Kept] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    @property
    def url(self) -> str:
        """Where it is served: what ``base_addresses={"api": url}`` takes."""
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Forget every object, event, delivery, held event, endpoint, declined card and
        kept idempotent answer, and put the knobs back to their defaults: as if freshly
        served (the URL and the secret key stay)."""
        with self._lock:
            self._fresh()

    def close(self) -> None:
        """Close the HTTP client webhooks are delivered with."""
        self._http.close()

    # Test controls -----------------------------------------------------------------------

    def add_price(self, id: str, unit_amount: int, currency: str, product_name: str) -> Obj:
        """A one-time Price ``id`` (with a Product named ``product_name``) that
        checkout line items can name with ``price``."""
        with self._lock:
            product = self._register(None, {
                "id": _new_id("prod_", 14), "object": "product", "name": product_name,
                "active": True, "created": self._now(), "livemode": False, "metadata": {}})
            price = self._register(self.prices, {
                "id": id, "object": "price", "active": True, "currency": currency.lower(),
                "unit_amount": unit_amount, "product": product["id"], "type": "one_time",
                "created": self._now(), "livemode": False, "metadata": {}})
            return copy.deepcopy(price)

    def add_customer(self, email: str | None = None, *, payment_method: bool = True) -> Obj:
        """A Customer, with a saved card (its ``invoice_settings.default_payment_method``)
        unless ``payment_method`` is false."""
        with self._lock:
            customer = self._new_customer(email)
            if payment_method:
                method = self._new_payment_method(customer["id"])
                customer["invoice_settings"]["default_payment_method"] = method["id"]
            return copy.deepcopy(customer)

    def decline(self, payment_method_id: str) -> None:
        """Charges of this PaymentMethod are declined from now on (``card_declined``)."""
        with self._lock:
            self.declined.add(payment_method_id)

    def add_endpoint(self, url: str, secret: str) -> None:
        """Deliver every event from now on to ``url``, signed with ``secret``."""
        with self._lock:
            self.endpoints.append((url, secret))

    def complete(self, session_id: str, *, asynchronous: bool = False) -> Obj:
        """Pay the Checkout Session as the hosted page's Pay button does, and answer
        the session. With ``asynchronous`` the payment is a delayed one: the session
        completes ``unpaid`` until :meth:`settle_async`. Raises
        :class:`LocalStripeError` when the session is unknown or not open."""
        events: list[Obj] = []
        with self._lock:
            session = copy.deepcopy(self._complete(session_id, asynchronous, events))
        self._dispatch(events)
        return session

    def settle_async(self, session_id: str, succeeded: bool) -> Obj:
        """Settle the delayed payment of a session completed with ``asynchronous``:
        paid (``checkout.session.async_payment_succeeded``) or left unpaid
        (``checkout.session.async_payment_failed``). Answers the session."""
        events: list[Obj] = []
        with self._lock:
            if session_id not in self._awaiting:
                raise LocalStripeError(400, f"Checkout Session {session_id} has no payment "
                                            "awaiting settlement.")
            self._awaiting.discard(session_id)
            session = self.sessions[session_id]
            intent = self.payment_intents[session["payment_intent"]]
            charge = self.charges[intent["latest_charge"]]
            if succeeded:
                intent.update(status="succeeded", amount_received=intent["amount"])
                charge.update(status="succeeded", paid=True)
                session["payment_status"] = "paid"
                if self.extra_events:
                    self._event(events, "charge.succeeded", charge)
                    self._event(events, "payment_intent.succeeded", intent)
                self._event(events, "checkout.session.async_payment_succeeded", session)
            else:
                intent.update(status="requires_payment_method",
                              last_payment_error=self._decline_error(intent["payment_method"]))
                charge.update(status="failed", paid=False, failure_code="payment_failed",
                              failure_message="The payment failed.")
                self._event(events, "checkout.session.async_payment_failed", session)
            answer = copy.deepcopy(session)
        self._dispatch(events)
        return answer

    def expire(self, session_id: str) -> Obj:
        """Expire an open Checkout Session (``checkout.session.expired``)."""
        events: list[Obj] = []
        with self._lock:
            session = copy.deepcopy(self._expire(session_id, events))
        self._dispatch(events)
        return session

    def dispute(self, charge_or_payment_intent_id: str, amount: int | None = None) -> Obj:
        """Open a fraud Dispute on a successful charge (named by itself or by its
        PaymentIntent) for ``amount`` (default: the whole charge); emits
        ``charge.dispute.created``. Answers the Dispute."""
        events: list[Obj] = []
        with self._lock:
            charge = self._charge_of(charge_or_payment_intent_id)
            if charge["disputed"]:
                raise LocalStripeError(400, f"Charge {charge['id']} is already disputed.")
            amount = charge["amount"] if amount is None else amount
            if not 0 < amount <= charge["amount"]:
                raise _invalid("amount", f"Dispute amount {amount} is not in "
                                         f"1..{charge['amount']}.")
            now = self._now()
            dispute = self._register(self.disputes, {
                "id": _new_id("dp_"), "object": "dispute", "amount": amount,
                "currency": charge["currency"], "charge": charge["id"],
                "payment_intent": charge["payment_intent"], "status": "needs_response",
                "reason": "fraudulent", "created": now, "livemode": False, "metadata": {},
                "is_charge_refundable": False,
                "evidence_details": {"due_by": now + 7 * 24 * 3600, "has_evidence": False,
                                     "past_due": False, "submission_count": 0}})
            charge["disputed"] = True
            self._event(events, "charge.dispute.created", dispute)
            answer = copy.deepcopy(dispute)
        self._dispatch(events)
        return answer

    def close_dispute(self, dispute_id: str, won: bool) -> Obj:
        """Close an open Dispute as ``won`` or ``lost``; emits ``charge.dispute.closed``.
        Answers the Dispute."""
        events: list[Obj] = []
        with self._lock:
            dispute = self.disputes.get(dispute_id)
            if dispute is None:
                raise _no_such("dispute", dispute_id, None, 404)
            if dispute["status"] in ("won", "lost"):
                raise LocalStripeError(400, f"Dispute {dispute_id} is already closed.")
            dispute["status"] = "won" if won else "lost"
            self._event(events, "charge.dispute.closed", dispute)
            answer = copy.deepcopy(dispute)
        self._dispatch(events)
        return answer

    def events_of(self, type: str) -> list[Obj]:
        """The events of ``type`` emitted so far, oldest first (copies)."""
        with self._lock:
            return [copy.deepcopy(e) for e in self.events if e["type"] == type]

    def send(self, event: Obj, *, times: int = 1, concurrently: bool = False
             ) -> list[int | None]:
        """POST ``event`` to every endpoint ``times`` times, each signed afresh (now), all
        at once when ``concurrently`` (released together from a barrier), whatever
        ``hold_webhooks`` says. Answers the statuses (None: not reached), endpoint by
        endpoint within each round. Every attempt is recorded in ``deliveries``."""
        with self._lock:
            jobs = [point for _ in range(times) for point in self.endpoints]
        if not concurrently or len(jobs) < 2:
            return [self._deliver(event, url, secret) for url, secret in jobs]
        barrier = threading.Barrier(len(jobs))

        def attempt(job: tuple[str, str]) -> int | None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(5)
            return self._deliver(event, *job)

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            return list(pool.map(attempt, jobs))

    def redeliver(self, event_id: str) -> list[int | None]:
        """Send a stored event again to every endpoint (see :meth:`send`)."""
        with self._lock:
            event = self._by_id.get(event_id)
        if event is None or event.get("object") != "event":
            raise KeyError(event_id)
        return self.send(event)

    def release_held(self) -> list[int | None]:
        """Send the held events, oldest first, and forget them; answers the statuses."""
        with self._lock:
            held, self.held = self.held, []
        return [status for event in held for status in self.send(event)]

    # HTTP plumbing -----------------------------------------------------------------------

    def _api(self, handler: Handler, allowed: frozenset[str] | None
             ) -> Callable[[Request], Any]:
        """An endpoint running ``handler(params, path_params, events)`` under the lock:
        authentication, unknown parameters, ``expand``, idempotency and errors handled
        here, the events it emitted delivered (off the event loop) before it answers."""

        async def endpoint(request: Request) -> Response:
            headers = {"Request-Id": _new_id("req_", 14)}
            if request.headers.get("authorization") != f"Bearer {self.secret_key}":
                return self._unauthenticated(request, headers)
            post = request.method == "POST"
            raw = (await request.body()).decode() if post else request.url.query
            params = decode_form(raw)
            key = request.headers.get("idempotency-key") if post else None
            route = f"{request.method} {request.url.path}"
            events: list[Obj] = []
            with self._lock:
                kept = self._kept.get(key) if key else None
                if kept is None:
                    status, body = self._run(handler, allowed, params,
                                             dict(request.path_params), events)
                    if key and status in (200, 402):
                        self._kept[key] = _Kept(route, params, status, body)
                elif kept.route != route:
                    status, body = 400, self._idempotency_error(
                        f"Keys for idempotent requests can only be used for the same endpoint "
                        f"they were first used for ('{kept.route}' vs '{route}').")
                elif kept.params != params:
                    status, body = 400, self._idempotency_error(
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.")
                else:
                    status, body = kept.status, kept.body
                    headers["Idempotent-Replayed"] = "true"
            if key:
                headers["Idempotency-Key"] = key
            if events:
                await run_in_threadpool(self._dispatch, events)
            return Response(body, status, headers=headers, media_type="application/json")

        return endpoint

    def _run(self, handler: Handler, allowed: frozenset[str] | None, params: Obj,
             path: dict[str, str], events: list[Obj]) -> tuple[int, bytes]:
        try:
            if allowed is not None:
                for name in params:
                    if name not in allowed:
                        raise LocalStripeError(400, f"Received unknown parameter: {name}",
                                               code="parameter_unknown", param=name)
            expand = params.get("expand") or []
            if isinstance(expand, str):
                expand = [expand]
            answer = copy.deepcopy(handler(params, path, events))
            for item in expand:
                self._expand(answer, str(item).split("."), str(item))
            return 200, json.dumps(answer).encode()
        except LocalStripeError as exc:
            return exc.status, json.dumps({"error": exc.error}).encode()

    def _unauthenticated(self, request: Request, headers: dict[str, str]) -> Response:
        given = request.headers.get("authorization", "")
        if not given:
            message = ("You did not provide an API key. You need to provide your API key in "
                       "the Authorization header, using Bearer auth.")
        else:
            key = given.removeprefix("Bearer ")
            message = f"Invalid API Key provided: {key[:8]}{'*' * 8}{key[-4:]}"
        body = json.dumps({"error": {"type": "authentication_error", "code": None,
                                     "message": message, "param": None}}).encode()
        return Response(body, 401, media_type="application/json",
                        headers={**headers, "WWW-Authenticate": 'Bearer realm="Stripe"'})

    @staticmethod
    def _idempotency_error(message: str) -> bytes:
        return json.dumps({"error": {"type": "idempotency_error", "code": None,
                                     "message": message, "param": None}}).encode()

    def _expand(self, obj: Obj, parts: list[str], path: str) -> None:
        if not parts:
            return
        if obj.get("object") == "list" and parts[0] == "data":
            for item in obj["data"]:
                self._expand(item, parts[1:], path)
            return
        head = parts[0]
        if head == "line_items" and obj.get("object") == "checkout.session":
            obj["line_items"] = self._page(self._line_items[obj["id"]], {},
                                           f"/v1/checkout/sessions/{obj['id']}/line_items")
        if head not in obj:
            raise LocalStripeError(400, f"This property cannot be expanded ({path}).",
                                   param="expand")
        value = obj[head]
        if isinstance(value, str):
            target = self._by_id.get(value)
            if target is None:
                raise LocalStripeError(400, f"This property cannot be expanded ({path}).",
                                       param="expand")
            value = obj[head] = copy.deepcopy(target)
        if isinstance(value, dict):
            self._expand(value, parts[1:], path)

    def _page(self, items: list[Obj], params: Obj, url: str) -> Obj:
        """A list object of ``items`` (newest first) as Stripe pages it: ``limit``
        (1..100, default 10) after ``starting_after`` or before ``ending_before``."""
        limit = _int(params, "limit")
        limit = 10 if limit is None else limit
        if not 1 <= limit <= 100:
            raise _invalid("limit", "This value must be between 1 and 100.")
        ids = [item["id"] for item in items]
        after, before = _str(params, "starting_after"), _str(params, "ending_before")
        for name, cursor in (("starting_after", after), ("ending_before", before)):
            if cursor is not None and cursor not in ids:
                raise _no_such("object", cursor, name)
        if after is not None:
            start = ids.index(after) + 1
            page, more = items[start:start + limit], start + limit < len(items)
        elif before is not None:
            end = ids.index(before)
            start = max(0, end - limit)
            page, more = items[start:end], start > 0
        else:
            page, more = items[:limit], len(items) > limit
        return {"object": "list", "data": copy.deepcopy(page), "has_more": more, "url": url}

    @staticmethod
    def _newest_first(items: list[Obj]) -> list[Obj]:
        ordered = sorted(enumerate(items), key=lambda p: (p[1]["created"], p[0]), reverse=True)
        return [item for _, item in ordered]

    @staticmethod
    def _created_filter(params: Obj) -> Callable[[Obj], bool]:
        created = params.get("created")
        if created is None or created == "":
            return lambda obj: True
        if isinstance(created, str):
            exact = _int(params, "created")
            return lambda obj: obj["created"] == exact
        if not isinstance(created, dict):
            raise _invalid("created", "Invalid created filter.")
        bounds = {op: _int(created, op, "created") for op in ("gt", "gte", "lt", "lte")}

        def keep(obj: Obj) -> bool:
            at = obj["created"]
            return all(bound is None or {"gt": at > bound, "gte": at >= bound,
                                         "lt": at < bound, "lte": at <= bound}[op]
                       for op, bound in bounds.items())

        return keep

    # API handlers (called with the lock held) --------------------------------------------

    def _unknown(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        raise LocalStripeError(404, f"Unrecognized request URL: /v1/{path['rest']}. Please "
                                    "see https://stripe.com/docs or we can help at "
                                    "https://support.stripe.com/.")

    def _retriever(self, name: str) -> Handler:
        def retrieve(params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
            obj = self._by_id.get(path["id"])
            if obj is None or obj.get("object") != name:
                raise _no_such(name, path["id"], "id", 404)
            return obj

        return retrieve

    def _create_session(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        mode = _str(params, "mode")
        if mode is None:
            raise _missing("mode")
        if mode != "payment":
            raise _invalid("mode", f"Only mode=payment is served here, not mode={mode}.")
        raw_items = params.get("line_items")
        if not raw_items:
            raise _missing("line_items")
        if not isinstance(raw_items, list):
            raise _invalid("line_items", "Invalid array: line_items")
        items = [self._line_item(raw, f"line_items[{i}]") for i, raw in enumerate(raw_items)]
        currencies = {item["currency"] for item in items}
        if len(currencies) > 1:
            raise _invalid("line_items", "All line items must be in the same currency.")
        currency = currencies.pop()
        asked = _str(params, "currency")
        if asked is not None and asked.lower() != currency:
            raise _invalid("currency", f"currency {asked} does not match the line items' "
                                       f"currency {currency}.")
        customer = _str(params, "customer")
        if customer is not None and customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        email = _str(params, "customer_email")
        if customer is not None and email is not None:
            raise LocalStripeError(400, "You may only specify one of these parameters: "
                                        "customer, customer_email.", param="customer_email")
        creation = _one_of(params, "customer_creation", ("always", "if_required"))
        if customer is not None and creation is not None:
            raise LocalStripeError(400, "customer_creation can only be used when customer "
                                        "is not set.", param="customer_creation")
        intent_data = _dict(params, "payment_intent_data")
        where = "payment_intent_data"
        intent_data = {
            "setup_future_usage": _one_of(intent_data, "setup_future_usage",
                                          ("on_session", "off_session"), where),
            "metadata": _metadata(intent_data, where),
            "description": _str(intent_data, "description", where)}
        now = self._now()
        expires_at = _int(params, "expires_at")
        if expires_at is None:
            expires_at = now + SESSION_LIFETIME
        elif not now + 1800 - 60 <= expires_at <= now + SESSION_LIFETIME + 60:
            raise _invalid("expires_at", "expires_at must be between 30 minutes and 24 hours "
                                         "from now.")
        session_id = _new_id("cs_test_", 58)
        total = sum(item["amount_total"] for item in items)
        session = self._register(self.sessions, {
            "id": session_id, "object": "checkout.session", "amount_subtotal": total,
            "amount_total": total, "cancel_url": _str(params, "cancel_url"),
            "client_reference_id": _str(params, "client_reference_id"), "created": now,
            "currency": currency, "customer": customer, "customer_creation": creation,
            "customer_details": None, "customer_email": email, "expires_at": expires_at,
            "livemode": False, "metadata": _metadata(params), "mode": mode,
            "payment_intent": None, "payment_method_types": ["card"],
            "payment_status": "unpaid", "status": "open",
            "success_url": _str(params, "success_url"), "ui_mode": "hosted",
            "url": f"{self.url}/pay/{session_id}"})
        self._line_items[session_id] = items
        self._intent_data[session_id] = intent_data
        return session

    def _line_item(self, raw: Any, where: str) -> Obj:
        if not isinstance(raw, dict):
            raise _invalid(where, f"Invalid object: {where}")
        price_id = _str(raw, "price", where)
        data = raw.get("price_data")
        if (price_id is None) == (data is None):
            raise _invalid(where, f"You must specify either `price` or `price_data` in {where}.")
        if price_id is not None:
            price = self.prices.get(price_id)
            if price is None:
                raise _no_such("price", price_id, f"{where}[price]")
        else:
            at = f"{where}[price_data]"
            data = _dict(raw, "price_data", where)
            currency = _str(data, "currency", at)
            unit_amount = _int(data, "unit_amount", at, minimum=0)
            if currency is None:
                raise _missing(f"{at}[currency]")
            if unit_amount is None:
                raise _missing(f"{at}[unit_amount]")
            product_id = _str(data, "product", at)
            if product_id is None:
                name = _str(_dict(data, "product_data", at), "name", f"{at}[product_data]")
                if name is None:
                    raise _missing(f"{at}[product_data][name]")
                product_id = self._register(None, {
                    "id": _new_id("prod_", 14), "object": "product", "name": name,
                    "active": True, "created": self._now(), "livemode": False,
                    "metadata": {}})["id"]
            elif self._by_id.get(product_id, {}).get("object") != "product":
                raise _no_such("product", product_id, f"{at}[product]")
            price = {"id": _new_id("price_"), "object": "price", "active": False,
                     "currency": currency.lower(), "unit_amount": unit_amount,
                     "product": product_id, "type": "one_time", "created": self._now(),
                     "livemode": False, "metadata": {}}
        quantity = _int(raw, "quantity", where, minimum=1)
        quantity = 1 if quantity is None else quantity
        amount = price["unit_amount"] * quantity
        return {"id": _new_id("li_"), "object": "item", "amount_subtotal": amount,
                "amount_total": amount, "currency": price["currency"],
                "description": self._by_id[price["product"]]["name"],
                "price": copy.deepcopy(price), "quantity": quantity}

    def _list_sessions(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        status = _one_of(params, "status", ("open", "complete", "expired"))
        customer, intent = _str(params, "customer"), _str(params, "payment_intent")
        created = self._created_filter(params)
        chosen = [s for s in self._newest_first(list(self.sessions.values()))
                  if created(s) and status in (None, s["status"])
                  and customer in (None, s["customer"])
                  and intent in (None, s["payment_intent"])]
        return self._page(chosen, params, "/v1/checkout/sessions")

    def _list_line_items(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        if path["id"] not in self.sessions:
            raise _no_such("checkout.session", path["id"], "id", 404)
        return self._page(self._line_items[path["id"]], params,
                          f"/v1/checkout/sessions/{path['id']}/line_items")

    def _expire_api(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        return self._expire(path["id"], events)

    def _list_events(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        one = _str(params, "type")
        many = params.get("types") or []
        if not isinstance(many, list):
            raise _invalid("types", "Invalid array: types")
        if one is not None and many:
            raise LocalStripeError(400, "You may only specify one of these parameters: "
                                        "type, types.", param="types")
        patterns = [one] if one is not None else [str(t) for t in many]
        created = self._created_filter(params)
        chosen = [e for e in self._newest_first(self.events) if created(e)
                  and (not patterns or any(_type_matches(p, e["type"]) for p in patterns))]
        return self._page(chosen, params, "/v1/events")

    def _create_intent(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        amount = _int(params, "amount", minimum=1)
        if amount is None:
            raise _missing("amount")
        currency = _str(params, "currency")
        if currency is None:
            raise _missing("currency")
        customer_id = _str(params, "customer")
        if customer_id is not None and customer_id not in self.customers:
            raise _no_such("customer", customer_id, "customer")
        method_id = _str(params, "payment_method")
        if method_id is None and customer_id is not None:
            method_id = self._saved_method(customer_id)
        method = self.payment_methods.get(method_id) if method_id else None
        if method is not None and method["customer"] not in (None, customer_id):
            raise LocalStripeError(400, f"The provided PaymentMethod {method_id} belongs to "
                                        "another Customer.", param="payment_method")
        off_session = _str(params, "off_session")
        if off_session not in (None, "true", "false", "one_off", "recurring"):
            raise _invalid("off_session", f"Invalid off_session: {off_session}")
        confirm = _bool(params, "confirm")
        intent: Obj = {
            "id": _new_id("pi_"), "object": "payment_intent", "amount": amount,
            "amount_received": 0, "capture_method": "automatic", "created": self._now(),
            "currency": currency.lower(), "customer": customer_id,
            "description": _str(params, "description"), "last_payment_error": None,
            "latest_charge": None, "livemode": False, "metadata": _metadata(params),
            "payment_method": method_id if method is not None else None,
            "payment_method_types": ["card"],
            "setup_future_usage": _one_of(params, "setup_future_usage",
                                          ("on_session", "off_session")),
            "status": "requires_confirmation" if method is not None
            else "requires_payment_method"}
        intent["client_secret"] = f"{intent['id']}_secret_{_new_id('', 24)}"
        if not confirm:
            return self._register(self.payment_intents, intent)
        if method is None or method_id in self.declined:
            error = self._decline_error(method_id)
            intent.update(status="requires_payment_method", payment_method=None,
                          last_payment_error=error)
            self._register(self.failed_payment_intents, intent)
            self._event(events, "payment_intent.payment_failed", intent)
            raise LocalStripeError(402, DECLINE_MESSAGE, type="card_error", code="card_declined",
                                   decline_code="generic_decline",
                                   doc_url="https://stripe.com/docs/error-codes/card-declined",
                                   payment_intent=copy.deepcopy(intent),
                                   payment_method=copy.deepcopy(error["payment_method"]))
        intent.update(status="succeeded", amount_received=amount)
        self._register(self.payment_intents, intent)
        charge = self._new_charge(intent, succeeded=True)
        if self.extra_events:
            self._event(events, "charge.succeeded", charge)
        self._event(events, "payment_intent.succeeded", intent)
        return intent

    def _create_refund(self, params: Obj, path: dict[str, str], events: list[Obj]) -> Obj:
        charge_id, intent_id = _str(params, "charge"), _str(params, "payment_intent")
        if charge_id is None and intent_id is None:
            raise LocalStripeError(400, "One of the following params should be provided for "
                                        "this request: payment_intent or charge.",
                                   code="parameter_missing", param="charge")
        if intent_id is not None:
            intent = self.payment_intents.get(intent_id) or self.failed_payment_intents.get(
                intent_id)
            if intent is None:
                raise _no_such("payment_intent", intent_id, "payment_intent")
            if intent["latest_charge"] is None:
                raise LocalStripeError(400, f"PaymentIntent {intent_id} does not have a "
                                            "successful charge to refund.",
                                       code="charge_not_refundable", param="payment_intent")
            if charge_id not in (None, intent["latest_charge"]):
                raise _invalid("charge", f"Charge {charge_id} is not the charge of "
                                         f"PaymentIntent {intent_id}.")
            charge_id = intent["latest_charge"]
        assert charge_id is not None
        charge = self.charges.get(charge_id)
        if charge is None:
            raise _no_such("charge", charge_id, "charge")
        if charge["status"] != "succeeded":
            raise LocalStripeError(400, f"Charge {charge_id} has not succeeded.",
                                   code="charge_not_refundable", param="charge")
        left = charge["amount"] - charge["amount_refunded"]
        if left == 0:
            raise LocalStripeError(400, f"Charge {charge_id} has already been refunded.",
                                   code="charge_already_refunded", param="charge")
        amount = _int(params, "amount", minimum=1)
        amount = left if amount is None else amount
        if amount > left:
            raise LocalStripeError(400, f"Refund amount ({amount}) is greater than unrefunded "
                                        f"amount on charge ({left})",
                                   code="amount_too_large", param="amount")
        refund = self._register(self.refunds, {
            "id": _new_id("re_"), "object": "refund", "amount": amount,
            "charge": charge_id, "created": self._now(), "currency": charge["currency"],
            "metadata": _metadata(params), "payment_intent": charge["payment_intent"],
            "reason": _one_of(params, "reason",
                              ("duplicate", "fraudulent", "requested_by_customer")),
            "status": "succeeded"})
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        if self.extra_events:
            self._event(events, "refund.created", refund)
        self._event(events, "charge.refunded", charge)
        return refund

    # State (called with the lock held) ---------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _register(self, store: dict[str, Obj] | None, obj: Obj) -> Obj:
        if store is not None:
            store[obj["id"]] = obj
        self._by_id[obj["id"]] = obj
        return obj

    def _event(self, events: list[Obj], type: str, obj: Obj) -> Obj:
        event: Obj = {"id": _new_id("evt_"), "object": "event", "api_version": stripe.api_version,
                 "created": self._now(), "data": {"object": copy.deepcopy(obj)},
                 "livemode": False, "pending_webhooks": len(self.endpoints),
                 "request": {"id": None, "idempotency_key": None}, "type": type}
        self.events.append(event)
        self._by_id[event["id"]] = event
        events.append(event)
        return event

    def _new_customer(self, email: str | None) -> Obj:
        return self._register(self.customers, {
            "id": _new_id("cus_", 14), "object": "customer", "created": self._now(),
            "email": email, "invoice_settings": {"default_payment_method": None},
            "livemode": False, "metadata": {}})

    def _new_payment_method(self, customer_id: str | None) -> Obj:
        return self._register(self.payment_methods, {
            "id": _new_id("pm_"), "object": "payment_method", "type": "card",
            "card": {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2040,
                     "country": "US", "funding": "credit"},
            "created": self._now(), "customer": customer_id, "livemode": False,
            "metadata": {}})

    def _saved_method(self, customer_id: str) -> str | None:
        default = self.customers[customer_id]["invoice_settings"]["default_payment_method"]
        if default is not None:
            return str(default)
        attached = [m["id"] for m in self.payment_methods.values()
                    if m["customer"] == customer_id]
        return attached[-1] if attached else None

    def _decline_error(self, method_id: str | None) -> Obj:
        method = self.payment_methods.get(method_id) if method_id else None
        return {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
                "message": DECLINE_MESSAGE, "param": None,
                "payment_method": copy.deepcopy(method)}

    def _new_charge(self, intent: Obj, *, succeeded: bool) -> Obj:
        charge = self._register(self.charges, {
            "id": _new_id("ch_"), "object": "charge", "amount": intent["amount"],
            "amount_captured": intent["amount"], "amount_refunded": 0,
            "balance_transaction": None, "captured": True, "created": self._now(),
            "currency": intent["currency"], "customer": intent["customer"],
            "description": intent["description"], "disputed": False, "failure_code": None,
            "failure_message": None, "livemode": False,
            "metadata": copy.deepcopy(intent["metadata"]), "paid": succeeded,
            "payment_intent": intent["id"], "payment_method": intent["payment_method"],
            "refunded": False, "status": "succeeded" if succeeded else "pending"})
        intent["latest_charge"] = charge["id"]
        return charge

    def _charge_of(self, ident: str) -> Obj:
        obj = self._by_id.get(ident)
        if obj is not None and obj.get("object") == "payment_intent":
            obj = self.charges.get(obj["latest_charge"] or "")
        if obj is None or obj.get("object") != "charge" or obj["status"] != "succeeded":
            raise LocalStripeError(400, f"{ident} names no successful charge.")
        return obj

    def _complete(self, session_id: str, asynchronous: bool, events: list[Obj]) -> Obj:
        session = self.sessions.get(session_id)
        if session is None:
            raise _no_such("checkout.session", session_id, None, 404)
        if session["status"] != "open":
            raise LocalStripeError(400, f"This Checkout Session is {session['status']}: it "
                                        "can no longer be paid.")
        data = self._intent_data[session_id]
        customer_id = session["customer"]
        if customer_id is None and (session["customer_creation"] == "always"
                                    or data["setup_future_usage"]):
            customer_id = self._new_customer(session["customer_email"])["id"]
        method = self._new_payment_method(customer_id)
        intent = self._register(self.payment_intents, {
            "id": _new_id("pi_"), "object": "payment_intent", "amount": session["amount_total"],
            "amount_received": 0 if asynchronous else session["amount_total"],
            "capture_method": "automatic", "created": self._now(),
            "currency": session["currency"], "customer": customer_id,
            "description": data["description"], "last_payment_error": None,
            "latest_charge": None, "livemode": False,
            "metadata": copy.deepcopy(data["metadata"]), "payment_method": method["id"],
            "payment_method_types": ["card"], "setup_future_usage": data["setup_future_usage"],
            "status": "processing" if asynchronous else "succeeded"})
        intent["client_secret"] = f"{intent['id']}_secret_{_new_id('', 24)}"
        charge = self._new_charge(intent, succeeded=not asynchronous)
        email = session["customer_email"]
        if email is None and customer_id is not None:
            email = self.customers[customer_id]["email"]
        session.update(status="complete", payment_status="unpaid" if asynchronous else "paid",
                       payment_intent=intent["id"], customer=customer_id, url=None,
                       customer_details={"email": email, "name": None})
        if asynchronous:
            self._awaiting.add(session_id)
        elif self.extra_events:
            self._event(events, "charge.succeeded", charge)
            self._event(events, "payment_intent.succeeded", intent)
        self._event(events, "checkout.session.completed", session)
        return session

    def _expire(self, session_id: str, events: list[Obj]) -> Obj:
        session = self.sessions.get(session_id)
        if session is None:
            raise _no_such("checkout.session", session_id, "session", 404)
        if session["status"] != "open":
            raise LocalStripeError(400, f"Only Checkout Sessions with a status of `open` can "
                                        f"be expired; this one is {session['status']}.",
                                   param="session")
        session.update(status="expired", url=None)
        self._event(events, "checkout.session.expired", session)
        return session

    # Webhooks ----------------------------------------------------------------------------

    def _dispatch(self, events: list[Obj]) -> None:
        """Deliver ``events`` to every endpoint, in order (or hold them). Never called
        with the lock held: the receiver may call the API back meanwhile."""
        if not events:
            return
        with self._lock:
            if self.hold_webhooks:
                self.held.extend(events)
                return
            endpoints = list(self.endpoints)
        for event in events:
            for url, secret in endpoints:
                self._deliver(event, url, secret)

    def _deliver(self, event: Obj, url: str, secret: str) -> int | None:
        body = json.dumps(event, indent=2, ensure_ascii=False).encode()
        signature = sign(body, secret)
        status: int | None = None
        error: str | None = None
        try:
            response = self._http.post(url, content=body, timeout=self.webhook_timeout,
                                       headers={"Content-Type": "application/json; charset=utf-8",
                                                "Stripe-Signature": signature,
                                                "User-Agent": WEBHOOK_USER_AGENT,
                                                "Accept": "*/*; q=0.5, application/xml"})
            status = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.deliveries.append(Delivery(event.get("id"), event.get("type"), url, status,
                                            body, signature, error))
        return status

    # Hosted checkout ---------------------------------------------------------------------

    async def _pay_page(self, request: Request) -> HTMLResponse:
        session_id = request.path_params["id"]
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                return HTMLResponse(_page_html("No such Checkout Session", ""), 404)
            items = "".join(
                f"<li>{html.escape(item['description'])} x {item['quantity']}: "
                f"{format_amount(item['amount_total'], item['currency'])}</li>"
                for item in self._line_items[session_id])
            amount = format_amount(session["amount_total"], session["currency"])
            status, cancel_url = session["status"], session["cancel_url"]
        body = f'<p id="amount">{amount}</p><ul>{items}</ul>'
        if status == "open":
            body += (f'<form method="post" action="/pay/{html.escape(session_id)}">'
                     '<button type="submit" id="pay">Pay</button></form>')
        else:
            body += f'<p id="status">This Checkout Session is {status}.</p>'
        if cancel_url is not None:
            body += f'<a id="cancel" href="{html.escape(cancel_url)}">Cancel</a>'
        return HTMLResponse(_page_html(f"Pay {amount}", body))

    async def _pay(self, request: Request) -> Response:
        await request.body()
        session_id = request.path_params["id"]
        events: list[Obj] = []
        with self._lock:
            try:
                session = self._complete(session_id, False, events)
            except LocalStripeError as exc:
                return HTMLResponse(_page_html("Payment refused",
                                               f"<p>{html.escape(str(exc))}</p>"), exc.status)
            success_url = session["success_url"]
        await run_in_threadpool(self._dispatch, events)
        if success_url is None:
            return HTMLResponse(_page_html("Payment complete", ""))
        return RedirectResponse(success_url.replace("{CHECKOUT_SESSION_ID}", session_id), 303)


@contextlib.contextmanager
def serve_local_stripe(secret_key: str = "sk_test_local") -> Iterator[LocalStripe]:
    """Run a :class:`LocalStripe` accepting ``secret_key`` on a free loopback port, in a
    thread of its own, until the block ends."""
    local = LocalStripe(secret_key, free_port())
    try:
        with serve_asgi(local, local.port):
            yield local
    finally:
        local.close()
