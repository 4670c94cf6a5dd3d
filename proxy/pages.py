"""The small pages end users reach through signed links: connect, top up (with Stripe
Checkout when the paywall takes payments) and the receipt Checkout returns to."""

from __future__ import annotations

import contextlib
import html
import time
from decimal import Decimal
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy.errors import ServiceUnavailable
from proxy.links import LinkClaims
from proxy.payments import CheckoutFailed
from proxy.pricing import currency_exponent, format_minor, shown_amount
from proxy.services import Services, services_of
from proxy.topups import BadChoice, Choice, choose, offer_of, recharge_of

RECEIPT_GRACE_SECONDS = 86400.0  # a top-up link past its expiry still shows its receipt

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}
button,a.button{{font-size:1rem;padding:.6rem 1.2rem;border-radius:.4rem;border:0;
background:#1f6feb;color:#fff;text-decoration:none;cursor:pointer}}</style>
</head><body>{body}</body></html>"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body), status_code=status,
                        headers={"cache-control": "no-store", "referrer-policy": "no-referrer"})


def _invalid() -> HTMLResponse:
    return _page("Link expired", "<h1>This link is invalid or has expired</h1>"
                 "<p>Go back to the app and try again to get a new one.</p>", 400)


async def connect_page(request: Request) -> Response:
    services = services_of(request)
    token = request.query_params.get("token", "")
    claims = _claims_of(services, token, "connect")
    if claims is None:
        return _invalid()
    if claims.version != await services.ledger.connect_version(claims.paywall_id,
                                                               claims.user_id):
        return _invalid()  # the user disconnected since the link was issued
    paywall = services.settings.paywalls[claims.paywall_id]
    name = html.escape(paywall.name or claims.paywall_id)
    first = ""  # with payments, authorizing may come with a first top-up
    if services.payments.configured(claims.paywall_id):
        first = "".join(f' <button type="submit" name="amount" value="{c.paid}">Authorize and '
                        f"add {html.escape(c.label)}</button>"
                        for c in offer_of(services.settings, paywall).fixed)
    return _page(f"Authorize {name}", f"""<h1>Authorize {name}</h1>
<p><strong>{name}</strong> asks to charge your account for what you use in it.</p>
<form method="post" action="connect"><input type="hidden" name="token"
value="{html.escape(token)}"><button type="submit">Authorize</button>{first}</form>""")


async def connect_submit(request: Request) -> Response:
    services = services_of(request)
    form = await request.form()
    token = form.get("token")
    claims = _claims_of(services, token if isinstance(token, str) else "", "connect")
    if claims is None:
        return _invalid()
    if not await services.ledger.connect(claims.paywall_id, claims.user_id, claims.version):
        return _invalid()
    amount = form.get("amount")
    if isinstance(amount, str) and amount and services.payments.configured(claims.paywall_id):
        ttl = services.settings.paywalls[claims.paywall_id].link_ttl_seconds
        topup = services.signer.claims(claims.paywall_id, claims.user_id, "topup", ttl)
        return await _checkout(services, topup, services.signer.token(topup),
                               {"amount": amount})
    name = html.escape(services.settings.paywalls[claims.paywall_id].name or claims.paywall_id)
    return _page("Connected", f"<h1>Done</h1><p>{name} is authorized. "
                 "You can go back to the app and continue.</p>")


async def _balances_html(services: Services, paywall_id: str, user_id: str) -> str:
    rows = []
    for b in await services.ledger.balances(paywall_id, user_id):
        scale = services.settings.assets[b.asset].scale
        owed = (f' <span class="owed">(owed: {html.escape(shown_amount(b.owed, scale))}, '
                "paid first from your next top-up)</span>" if b.owed else "")
        rows.append(f"<li>{html.escape(shown_amount(b.available, scale))} "
                    f"{html.escape(b.asset)}{owed}</li>")
    asset = services.settings.paywalls[paywall_id].asset
    empty = f"<li>0 {html.escape(asset)}</li>"
    return f'<ul id="balances">{"".join(rows) or empty}</ul>'


def _claims_of(services: Services, token: str, action: str = "topup",
               grace: float = 0.0) -> LinkClaims | None:
    claims = services.signer.verify(token, action, time.time() - grace)
    if claims is None or claims.paywall_id not in services.settings.paywalls:
        return None
    return claims


async def topup_page(request: Request) -> Response:
    services = services_of(request)
    token = request.query_params.get("token", "")
    claims = _claims_of(services, token)
    if claims is None:
        return _invalid()
    paywall = services.settings.paywalls[claims.paywall_id]
    if request.query_params.get("go") == "1" and paywall.checkout_url and \
            not services.payments.configured(claims.paywall_id):
        return RedirectResponse(_checkout_url(paywall.checkout_url, claims), status_code=303)
    return await _topup(services, claims, token)


def _checkout_url(url: str, claims: LinkClaims) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + urlencode({"paywall": claims.paywall_id, "user": claims.user_id})


async def _topup(services: Services, claims: LinkClaims, token: str, error: str = "",
                 status: int = 200) -> Response:
    paywall = services.settings.paywalls[claims.paywall_id]
    name = html.escape(paywall.name or claims.paywall_id)
    balances = await _balances_html(services, claims.paywall_id, claims.user_id)
    if services.payments.configured(claims.paywall_id):
        action = await _offer_html(services, claims, token, error)
    elif paywall.checkout_url:
        target = _checkout_url(paywall.checkout_url, claims)
        action = (f'<p><a class="button" href="{html.escape(target)}">Top up</a></p>')
    else:
        action = "<p>Top-ups are not available yet; please contact the app's support.</p>"
    return _page(f"Top up {name}", f"<h1>Top up your {name} balance</h1>"
                 f"<p>Available now:</p>{balances}{action}", status)


async def _offer_html(services: Services, claims: LinkClaims, token: str, error: str) -> str:
    paywall = services.settings.paywalls[claims.paywall_id]
    offer = offer_of(services.settings, paywall)
    t = html.escape(token)
    parts = [f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""]
    parts.append(f'<form method="post" action="topup/checkout"><input type="hidden" '
                 f'name="token" value="{t}"><p>Choose an amount:</p><p class="choices">')
    parts += [f'<button type="submit" name="amount" value="{c.paid}">{html.escape(c.label)}'
              f"</button> " for c in offer.fixed]
    parts += [f'<button type="submit" name="pack" value="{html.escape(c.item[5:])}">'
              f"{html.escape(c.label)}{_pack_price(c, offer.currency)}</button> "
              for c in offer.packs]
    parts.append("</p>")
    if offer.custom:
        low, high = (Decimal(n).scaleb(-currency_exponent(offer.currency)) for n in offer.custom)
        step = Decimal(1).scaleb(-currency_exponent(offer.currency))
        parts.append(f'<p><label>Another amount ({offer.currency.upper()}): <input '
                     f'name="custom" type="number" min="{low}" max="{high}" step="{step}">'
                     f'</label> <button type="submit" name="amount" value="custom">Pay'
                     "</button></p>")
    recharge = await services.payments.recharges.of(claims.paywall_id, claims.user_id)
    if paywall.payments.auto_recharge and offer.fixed:
        parts.append('<p><label><input type="checkbox" name="recharge" value="on"> Save my '
                     "card and recharge this amount automatically when my balance falls under"
                     f'</label> <input name="threshold" type="number" min="0" step="any" '
                     f'value="{offer.fixed[0].label.split()[0]}" aria-label="threshold"> '
                     f"{html.escape(offer.currency.upper())}</p>")
    parts.append("</form>")
    if recharge is not None and recharge["enabled"]:
        scale = services.settings.assets[recharge["asset"]].scale
        state = (f"stopped after {recharge['failures']} failed charges"
                 f" ({html.escape(recharge['last_error'] or '')})"
                 if recharge["failures"] >= paywall.payments.recharge_max_failures else "on")
        parts.append(
            f'<p id="recharge">Automatic recharge is {state}: '
            f"{html.escape(format_minor(recharge['amount'], recharge['currency']))} when under "
            f"{html.escape(shown_amount(recharge['threshold'], scale))} "
            f"{html.escape(recharge['asset'])}.</p><form method=\"post\" "
            f'action="topup/recharge"><input type="hidden" name="token" value="{t}">'
            '<button type="submit" name="recharge" value="off">Turn off automatic recharge'
            "</button></form>")
    return "".join(parts)


def _pack_price(choice: Choice, currency: str) -> str:
    return "" if choice.paid is None else f" for {format_minor(choice.paid, currency)}"


def _return_urls(services: Services, paywall_id: str, token: str) -> tuple[str, str]:
    p = services.settings.paywalls[paywall_id].payments
    base = services.signer.public_url
    q = urlencode({"token": token})
    # Stripe fills in {CHECKOUT_SESSION_ID}; it must stay unescaped.
    success = p.success_url or f"{base}/topup/done?session_id={{CHECKOUT_SESSION_ID}}&{q}"
    return success, p.cancel_url or f"{base}/topup?{q}"


async def checkout_submit(request: Request) -> Response:
    """Open a Checkout Session for what the top-up form chose, and send the user to it."""
    services = services_of(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    token = form.get("token", "")
    claims = _claims_of(services, token)
    if claims is None:
        return _invalid()
    return await _checkout(services, claims, token, form)


async def _checkout(services: Services, claims: LinkClaims, token: str,
                    form: dict[str, str]) -> Response:
    if not services.payments.configured(claims.paywall_id):
        return _invalid()
    paywall = services.settings.paywalls[claims.paywall_id]
    offer = offer_of(services.settings, paywall)
    try:
        choice = choose(offer, form)
        recharge = recharge_of(form, offer, choice) if paywall.payments.auto_recharge else None
    except BadChoice as e:
        return await _topup(services, claims, token, str(e), 400)
    success, cancel = _return_urls(services, claims.paywall_id, token)
    try:
        url = await services.payments.checkout(claims.paywall_id, claims.user_id, choice,
                                               success_url=success, cancel_url=cancel,
                                               recharge=recharge)
    except CheckoutFailed as e:
        return await _topup(services, claims, token, e.message, 502)
    return RedirectResponse(url, status_code=303)


async def recharge_submit(request: Request) -> Response:
    services = services_of(request)
    form = await request.form()
    token = form.get("token")
    claims = _claims_of(services, token if isinstance(token, str) else "")
    if claims is None or not isinstance(token, str):
        return _invalid()
    await services.payments.recharges.stop(claims.paywall_id, claims.user_id)
    return await _topup(services, claims, token)


async def topup_done(request: Request) -> Response:
    """Where Checkout returns after paying: the session is read back from Stripe and,
    once paid, deposited through the same once-only path as the webhook (whichever
    arrives first deposits; the other finds it done)."""
    services = services_of(request)
    token = request.query_params.get("token", "")
    claims = _claims_of(services, token, grace=RECEIPT_GRACE_SECONDS)
    session_id = request.query_params.get("session_id", "")
    if claims is None or not services.payments.configured(claims.paywall_id) or \
            not session_id.startswith("cs_"):
        return _invalid()
    try:
        session = await services.payments.session(claims.paywall_id, session_id)
    except CheckoutFailed:
        return _page("Payment being confirmed", "<h1>Thank you</h1><p>Your payment could not "
                     "be confirmed just now. Your balance is updated as soon as Stripe "
                     "confirms it; you can go back to the app.</p>", 503)
    meta = (session or {}).get("metadata") or {}
    if session is None or meta.get("paywall") != claims.paywall_id or \
            meta.get("user") != claims.user_id:
        return _invalid()
    name = html.escape(services.settings.paywalls[claims.paywall_id].name or claims.paywall_id)
    if session.get("payment_status") != "paid":
        note = ("<p>Your payment is being processed. Your balance is updated as soon as it "
                "clears.</p>")
    else:
        # Deposited even when saving the card failed (ServiceUnavailable): the webhook will.
        with contextlib.suppress(ServiceUnavailable):
            await services.payments.fulfill(claims.paywall_id, session,
                                            f"receipt:{session_id}", "receipt")
        paid = format_minor(int(session.get("amount_total") or 0),
                            str(session.get("currency") or ""))
        note = f'<p id="paid">Payment received: {html.escape(paid)}. Thank you!</p>'
    balances = await _balances_html(services, claims.paywall_id, claims.user_id)
    return _page("Payment received", f"<h1>{name}</h1>{note}<p>Available now:</p>{balances}"
                 "<p>You can go back to the app and continue.</p>")


routes = [
    Route("/connect", connect_page, methods=["GET"]),
    Route("/connect", connect_submit, methods=["POST"]),
    Route("/topup", topup_page, methods=["GET"]),
    Route("/topup/checkout", checkout_submit, methods=["POST"]),
    Route("/topup/recharge", recharge_submit, methods=["POST"]),
    Route("/topup/done", topup_done, methods=["GET"]),
]
