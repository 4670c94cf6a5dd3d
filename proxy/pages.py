"""The two small pages end users reach through signed links: connect and top up."""

from __future__ import annotations

import html
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy.pricing import format_amount
from proxy.services import services_of

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
    claims = services.signer.verify(token, "connect")
    if claims is None or claims.paywall_id not in services.settings.paywalls:
        return _invalid()
    if claims.version != await services.ledger.connect_version(claims.paywall_id,
                                                               claims.user_id):
        return _invalid()  # the user disconnected since the link was issued
    name = html.escape(services.settings.paywalls[claims.paywall_id].name or claims.paywall_id)
    return _page(f"Authorize {name}", f"""<h1>Authorize {name}</h1>
<p><strong>{name}</strong> asks to charge your account for what you use in it.</p>
<form method="post" action="connect"><input type="hidden" name="token"
value="{html.escape(token)}"><button type="submit">Authorize</button></form>""")


async def connect_submit(request: Request) -> Response:
    services = services_of(request)
    form = await request.form()
    token = form.get("token")
    claims = services.signer.verify(token if isinstance(token, str) else "", "connect")
    if claims is None or claims.paywall_id not in services.settings.paywalls:
        return _invalid()
    if not await services.ledger.connect(claims.paywall_id, claims.user_id, claims.version):
        return _invalid()
    name = html.escape(services.settings.paywalls[claims.paywall_id].name or claims.paywall_id)
    return _page("Connected", f"<h1>Done</h1><p>{name} is authorized. "
                 "You can go back to the app and continue.</p>")


async def topup_page(request: Request) -> Response:
    services = services_of(request)
    claims = services.signer.verify(request.query_params.get("token", ""), "topup")
    if claims is None or claims.paywall_id not in services.settings.paywalls:
        return _invalid()
    paywall = services.settings.paywalls[claims.paywall_id]
    name = html.escape(paywall.name or claims.paywall_id)
    rows = "".join(
        f"<li>{html.escape(format_amount(b.available, services.settings.assets[b.asset].scale))}"
        f" {html.escape(b.asset)}</li>"
        for b in await services.ledger.balances(claims.paywall_id, claims.user_id))
    if paywall.checkout_url:
        sep = "&" if "?" in paywall.checkout_url else "?"
        target = paywall.checkout_url + sep + urlencode(
            {"paywall": claims.paywall_id, "user": claims.user_id})
        if request.query_params.get("go") == "1":
            return RedirectResponse(target, status_code=303)
        action = (f'<p><a class="button" href="{html.escape(target)}">Top up</a></p>')
    else:
        action = "<p>Top-ups are not available yet; please contact the app's support.</p>"
    return _page(f"Top up {name}", f"<h1>Top up your {name} balance</h1>"
                 f"<p>Available now:</p><ul>{rows or '<li>0</li>'}</ul>{action}")


routes = [
    Route("/connect", connect_page, methods=["GET"]),
    Route("/connect", connect_submit, methods=["POST"]),
    Route("/topup", topup_page, methods=["GET"]),
]
