"""The operator's console: ``/admin``, server-rendered pages over :mod:`proxy.console`.

Off (no routes: 404) unless ``admin.token`` is set. The operator types the token into
the login form and gets a signed session cookie (:mod:`proxy.admin_session`): HttpOnly,
SameSite=Strict, Secure when ``server.public_url`` is https. Every page needs that
session (else a redirect to the login form); every POST needs the session and its CSRF
token (else 403, and nothing is done).

Actions that change a user (deposit, refund, adjustment, plan grant, connect,
disconnect, limits) and key revocation are two POSTs: the form is checked and shown
back for confirmation, then done. Money forms carry an idempotency key drawn when the
form is rendered, so a double submit or a replayed form moves money once. Bad input is
answered on the page with what is wrong, never a 500.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from proxy import console, guard
from proxy.admin_chart import bars, day_range
from proxy.admin_session import COOKIE, Failures, Session, Sessions
from proxy.errors import ProxyError
from proxy.identity import VALID_USER
from proxy.ledger import BalanceOverflow, IdempotencyConflict, Moved, Once, Opening, Refused, Stored
from proxy.pricing import format_amount, parse_decimal, units
from proxy.services import Services, services_of
from proxy.settings import Settings

TEMPLATES = Path(__file__).with_name("templates") / "admin"
PAGE = 50  # rows per page of users and of a ledger
HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}
_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")
_DIGITS = re.compile(r"[0-9]{1,12}")
ACTIONS = ("move", "grant", "connect", "disconnect", "limits", "block", "unblock")


log = logging.getLogger("proxy.admin")


class BadInput(Exception):
    """What the operator typed is not acceptable; the message says why."""


@dataclass(slots=True)
class Ctx:
    """One console request: the operator's session, the chosen paywall, the form."""

    request: Request
    session: Session
    services: Services
    paywall: str
    form: dict[str, str] = field(default_factory=dict)

    def field(self, name: str) -> str:
        return self.form.get(name, "").strip()


Handler = Callable[[Ctx], Awaitable[Response]]


class Console:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.sessions = Sessions(settings.admin.token, settings.admin.session_hours)
        self.failures = Failures()
        # The new-key forms already used, in this process: a reload or a double submit
        # creates no second key (one posted to another replica can; it is revocable).
        self.keys_made: set[str] = set()
        self.secure = settings.server.public_url.startswith("https://")
        self.templates = Jinja2Templates(directory=str(TEMPLATES))

    @property
    def routes(self) -> list[Route]:
        get, post = self._get, self._post
        return [
            Route("/admin/login", self.login_page, methods=["GET"]),
            Route("/admin/login", self.login_submit, methods=["POST"]),
            Route("/admin/logout", post(self.logout), methods=["POST"]),
            Route("/admin", get(self.overview), methods=["GET"]),
            Route("/admin/users", get(self.users), methods=["GET"]),
            Route("/admin/users/{user}", get(self.user), methods=["GET"]),
            Route("/admin/users/{user}/{action}", post(self.act), methods=["POST"]),
            Route("/admin/keys", get(self.keys), methods=["GET"]),
            Route("/admin/keys", post(self.create_key), methods=["POST"]),
            Route("/admin/keys/{key_id}/revoke", post(self.revoke_key), methods=["POST"]),
        ]

    # ---- sessions, the guard, rendering --------------------------------------------------

    def _get(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if session is None or not session.operator:
                return self._headers(RedirectResponse("/admin/login", 303))
            return await self._run(handler, request, session, {})
        return endpoint

    def _post(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            form = await _form(request)
            if session is None or not session.operator:
                return self._refuse(request, "You are not logged in (or the session ended).")
            if not self.sessions.csrf_ok(session, form.get("csrf", "")):
                return self._refuse(request, "This form did not come from your session of "
                                    "the console; reload the page and try again.")
            return await self._run(handler, request, session, form)
        return endpoint

    async def _run(self, handler: Handler, request: Request, session: Session,
                   form: dict[str, str]) -> Response:
        started = time.perf_counter()
        services = services_of(request)
        paywalls = self.settings.paywalls
        chosen = form.get("paywall") or request.query_params.get("paywall") or ""
        if chosen and chosen not in paywalls:
            response = self._render(request, session, "", "error.html",
                                    {"message": f"There is no paywall {chosen!r}."}, 404)
        elif not paywalls:
            response = self._render(request, session, "", "error.html",
                                    {"message": "No paywall is configured yet."}, 404)
        else:
            response = await handler(Ctx(request, session, services,
                                         chosen or next(iter(paywalls)), form))
        response.headers["server-timing"] = (
            f"app;dur={(time.perf_counter() - started) * 1000:.1f}")
        return response

    def _session(self, request: Request) -> Session | None:
        return self.sessions.read(request.cookies.get(COOKIE), time.time())

    def _headers(self, response: Response) -> Response:
        response.headers.update(HEADERS)
        return response

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, self.sessions.cookie(session),
                            max_age=max(session.expires - int(time.time()), 0), path="/admin",
                            httponly=True, samesite="strict", secure=self.secure)

    def _refuse(self, request: Request, message: str) -> Response:
        return self._headers(self.templates.TemplateResponse(
            request, "refused.html", {"message": message}, status_code=403))

    def _render(self, request: Request, session: Session, paywall: str, name: str,
                context: dict[str, Any], status: int = 200) -> Response:
        base = {"csrf": self.sessions.csrf(session), "paywalls": list(self.settings.paywalls),
                "paywall": paywall, "operator": self.settings.admin.operator}
        return self._headers(self.templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status))

    def page(self, ctx: Ctx, name: str, context: dict[str, Any], status: int = 200
             ) -> Response:
        return self._render(ctx.request, ctx.session, ctx.paywall, name, context, status)

    # ---- login ---------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None and session.operator:
            return self._headers(RedirectResponse("/admin", 303))
        return self._login_form(request, session, "", 200)

    def _login_form(self, request: Request, session: Session | None, error: str,
                    status: int) -> Response:
        if session is None or session.operator:
            session = self.sessions.new(time.time(), operator=False)
        response = self._headers(self.templates.TemplateResponse(
            request, "login.html", {"csrf": self.sessions.csrf(session), "error": error},
            status_code=status))
        self._set_cookie(response, session)
        return response

    async def login_submit(self, request: Request) -> Response:
        session = self._session(request)
        form = await _form(request)
        if session is None or not self.sessions.csrf_ok(session, form.get("csrf", "")):
            return self._login_form(request, None, "The login form expired; try again.", 403)
        client = request.client.host if request.client else ""
        if self.failures.refused(client, time.monotonic()):
            log.warning("admin login refused: too many failed attempts from %s", client)
            return self._login_form(request, session, "Too many failed attempts; wait a "
                                    "minute and try again.", 429)
        if not self.sessions.check_token(form.get("token", "")):
            self.failures.failed(client, time.monotonic())
            log.warning("admin login failed from %s", client)
            return self._login_form(request, session, "That is not the admin token.", 403)
        self.failures.succeeded(client)
        response = self._headers(RedirectResponse("/admin", 303))
        self._set_cookie(response, self.sessions.new(time.time(), operator=True))
        return response

    async def logout(self, ctx: Ctx) -> Response:
        response = self._headers(RedirectResponse("/admin/login", 303))
        response.delete_cookie(COOKIE, path="/admin", httponly=True, samesite="strict",
                               secure=self.secure)
        return response

    # ---- pages -----------------------------------------------------------------------------

    async def overview(self, ctx: Ctx) -> Response:
        days = _choice(ctx.request.query_params.get("days", "30"), {"7", "30", "90"}, "30")
        o = await console.overview(ctx.services.pool, ctx.paywall, int(days))
        money = self._money
        span = day_range(datetime.now(UTC).date(), o.days)
        charts = []
        for asset in sorted({a for _, a, _ in o.charged} | {a for _, a, _ in o.deposited}
                            | {self.settings.paywalls[ctx.paywall].asset}):
            charged = _by_day(o.charged, asset)
            deposited = _by_day(o.deposited, asset)
            svg = bars(span, [("charged", charged), ("deposited", deposited)],
                       f"{asset}: charged and deposited per day", functools.partial(money, asset))
            charts.append({"asset": asset, "svg": Markup(svg),  # bars() escapes its text
                "charged": money(asset, sum(charged.values())),
                "deposited": money(asset, sum(deposited.values()))})
        return self.page(ctx, "overview.html", {
            "nav": "overview", "o": o, "days": days, "charts": charts,
            "blocked": {r: o.blocked.get(r, 0) for r in ("connect", "top_up", "spend_cap")},
            "top_models": [(n or "(none)", a, money(a, s), r) for n, a, s, r in o.top_models],
            "top_users": [(n, a, money(a, s), r) for n, a, s, r in o.top_users]})

    async def users(self, ctx: Ctx) -> Response:
        q = ctx.request.query_params.get("q", "").strip()[:128]
        after = ctx.request.query_params.get("after", "")[:128]
        rows = await console.users(ctx.services.pool, ctx.paywall, q, after=after,
                                   limit=PAGE + 1)
        return self.page(ctx, "users.html", {
            "nav": "users", "q": q, "after": after,
            "rows": [{"id": r.user_id, "connected": r.connected, "created": r.created_at,
                      "balances": [(a, self._money(a, n)) for a, n in sorted(r.balances.items())]}
                     for r in rows[:PAGE]],
            "next": rows[PAGE - 1].user_id if len(rows) > PAGE else ""})

    async def user(self, ctx: Ctx, notice: str = "", error: str = "", status: int = 200
                   ) -> Response:
        user_id = ctx.request.path_params["user"]
        detail = await console.user(ctx.services.ledger, ctx.paywall, user_id) \
            if VALID_USER.fullmatch(user_id) else None
        if detail is None:
            return self.page(ctx, "error.html", {"nav": "users",
                             "message": f"There is no user {user_id!r} in {ctx.paywall}."}, 404)
        raw = ctx.request.query_params.get("before", "")
        before = int(raw) if _DIGITS.fullmatch(raw) else None
        entries = await console.entries(ctx.services.ledger, ctx.paywall, user_id,
                                        before=before, limit=PAGE + 1)
        charges = await console.charges(ctx.services.ledger, ctx.paywall, user_id)
        paywall = self.settings.paywalls[ctx.paywall]
        assets = sorted({paywall.asset, *paywall.credits.types,
                         *(b.asset for b in detail.balances)})
        limits = guard.effective(paywall.limits, detail.limits).as_overridable()
        return self.page(ctx, "user.html", {
            "nav": "users", "u": detail, "notice": notice, "error": error,
            "balances": [{"asset": b.asset, "balance": self._money(b.asset, b.balance),
                          "held": self._money(b.asset, b.held),
                          "owed": self._money(b.asset, b.owed),
                          "available": self._money(b.asset, b.available)}
                         for b in detail.balances],
            "entries": [self._entry(e) for e in entries[:PAGE]],
            "older": entries[PAGE - 1].id if len(entries) > PAGE else None,
            "charges": [self._entry(e) for e in charges],
            "assets": assets, "main_asset": paywall.asset, "kinds": console.KINDS,
            "plans": {k: p.name or k for k, p in paywall.credits.plans.items()},
            "limits": limits, "int_limits": guard.INT_OVERRIDES,
            "key": secrets.token_urlsafe(18)}, status)

    async def keys(self, ctx: Ctx, created: str = "", notice: str = "", error: str = "",
                   status: int = 200) -> Response:
        records = await ctx.services.keys.list(ctx.paywall)
        return self.page(ctx, "keys.html", {"nav": "keys", "records": records,
                                            "created": created, "notice": notice,
                                            "error": error,
                                            "form_id": secrets.token_urlsafe(18)}, status)

    # ---- actions ---------------------------------------------------------------------------

    async def create_key(self, ctx: Ctx) -> Response:
        name = ctx.field("name")
        if len(name) > 100:
            return await self.keys(ctx, error="A key's name is at most 100 characters.",
                                   status=400)
        form_id = ctx.field("form")
        if not _KEY.fullmatch(form_id) or form_id in self.keys_made:
            return await self.keys(ctx, error="This form was already used (or is not this "
                                   "page's): no key was created. Use the fresh form below.",
                                   status=409)
        self.keys_made.add(form_id)
        key, _ = await ctx.services.keys.create(ctx.paywall, name)
        return await self.keys(ctx, created=key)

    async def revoke_key(self, ctx: Ctx) -> Response:
        raw = ctx.request.path_params["key_id"]
        records = {str(r.id): r for r in await ctx.services.keys.list(ctx.paywall)}
        record = records.get(raw)
        if record is None or record.revoked_at is not None:
            return await self.keys(ctx, error=f"There is no live key {raw} in {ctx.paywall}.",
                                   status=404)
        if ctx.field("step") != "confirm":
            return self._confirm(ctx, f"/admin/keys/{record.id}/revoke",
                                 f"Revoke the key {record.prefix}… ({record.name or 'no name'})"
                                 " of " + ctx.paywall + "? Apps using it are refused at once.",
                                 f"/admin/keys?{urlencode({'paywall': ctx.paywall})}")
        await ctx.services.keys.revoke(ctx.paywall, record.id)
        return await self.keys(ctx, notice=f"Key {record.prefix}… revoked.")

    async def act(self, ctx: Ctx) -> Response:
        action = ctx.request.path_params["action"]
        user_id = ctx.request.path_params["user"]
        if action not in ACTIONS or not VALID_USER.fullmatch(user_id) or \
                await ctx.services.ledger.user(ctx.paywall, user_id) is None:
            return self.page(ctx, "error.html", {"message": "No such user or action."}, 404)
        try:
            summary, do = self._plan(ctx, action, user_id)
            if ctx.field("step") != "confirm":
                path = f"/admin/users/{quote(user_id, safe='')}"
                return self._confirm(ctx, f"{path}/{action}", summary,
                                     f"{path}?"
                                     f"{urlencode({'paywall': ctx.paywall})}")
            notice = await do()
        except BadInput as e:
            return await self.user(ctx, error=str(e), status=400)
        except IdempotencyConflict:
            return await self.user(ctx, error="This form was already submitted with other "
                                   "values; nothing more was done. Use the fresh form below.",
                                   status=409)
        return await self.user(ctx, notice=notice)

    def _confirm(self, ctx: Ctx, action: str, summary: str, back: str) -> Response:
        hidden = {k: v for k, v in ctx.form.items() if k not in ("csrf", "step")}
        return self.page(ctx, "confirm.html", {"action": action, "summary": summary,
                                               "hidden": hidden, "back": back})

    def _plan(self, ctx: Ctx, action: str, user_id: str
              ) -> tuple[str, Callable[[], Awaitable[str]]]:
        """What ``action`` would do, in words, and how to do it; BadInput if the form is
        not acceptable."""
        services, paywall_id = ctx.services, ctx.paywall
        ledger, operator = services.ledger, self.settings.admin.operator
        request_id: str = ctx.request.state.request_id
        if action == "connect":
            async def connect() -> str:
                version = await ledger.connect_version(paywall_id, user_id)
                done = await ledger.connect(paywall_id, user_id, version)
                return "Connected." if done else "Not connected: try again."
            return f"Mark {user_id} as connected (authorized to be charged).", connect
        if action == "disconnect":
            async def disconnect() -> str:
                await ledger.disconnect(paywall_id, user_id)
                return "Disconnected: the user is asked to connect again."
            return (f"Disconnect {user_id}: their authorization and every connect link "
                    "issued so far are withdrawn.", disconnect)
        if action in ("block", "unblock"):
            async def block() -> str:
                await console.block(ledger, paywall_id, user_id, action == "block")
                services.overrides.forget(paywall_id, user_id)
                return "Blocked." if action == "block" else "Unblocked."
            return ((f"Block {user_id}: every request of theirs is refused (403) until "
                     "the block is lifted." if action == "block" else
                     f"Lift the block on {user_id}."), block)
        if action == "limits":
            return self._limits_plan(ctx, user_id)
        key = ctx.field("key")
        if not _KEY.fullmatch(key):
            raise BadInput("The form has no idempotency key; reload the page.")
        reason = ctx.field("reason")
        if not reason:
            raise BadInput("A reason is required.")
        if len(reason) > 500:
            raise BadInput("The reason is at most 500 characters.")
        if action == "grant":
            return self._grant_plan(ctx, user_id, key, reason)
        kind = ctx.field("kind")
        if kind not in console.KINDS:
            raise BadInput("Choose a deposit, a refund or an adjustment.")
        asset = ctx.field("asset")
        if asset not in self.settings.assets:
            raise BadInput(f"Unknown asset {asset!r}.")
        amount = self._amount(asset, ctx.field("amount"), signed=kind == "adjustment")

        async def move() -> str:
            try:
                result = await console.move(
                    ledger, paywall_id, user_id, asset, amount, kind, reason=reason,
                    operator=operator, key=f"console:{key}", grants=services.grants[paywall_id],
                    request_id=request_id)
            except BalanceOverflow:
                raise BadInput("That is more than a balance can hold.") from None
            if not result.ok:
                available = next((b.available for b in await ledger.balances(
                    paywall_id, user_id) if b.asset == asset), 0)
                raise BadInput(f"Refused: only {self._money(asset, available)} {asset} is "
                               "available; nothing was moved.")
            assert result.balance is not None
            return (f"Done: {kind} of {self._money(asset, amount)} {asset}; the balance is "
                    f"now {self._money(asset, result.balance)} {asset}.")
        return (f"{kind.capitalize()} of {self._money(asset, amount)} {asset} for {user_id}, "
                f"reason: “{reason}”.", move)

    def _grant_plan(self, ctx: Ctx, user_id: str, key: str, reason: str
                    ) -> tuple[str, Callable[[], Awaitable[str]]]:
        paywall_id = ctx.paywall
        plans = self.settings.paywalls[paywall_id].credits.plans
        plan_id = ctx.field("plan")
        if plan_id not in plans:
            raise BadInput(f"Unknown plan {plan_id!r}.")
        plan = plans[plan_id]
        amounts = {a: units(Decimal(n), self.settings.assets[a].scale)
                   for a, n in plan.credits.items()}
        request_id: str = ctx.request.state.request_id
        credits = ", ".join(f"{n} {a}" for a, n in sorted(plan.credits.items()))

        async def grant() -> str:
            await ctx.services.ledger.grant(
                paywall_id, user_id, amounts,
                opening=Opening(frozenset(amounts), ctx.services.grants[paywall_id]),
                request_id=request_id,
                metadata={"plan": plan_id, "operator": self.settings.admin.operator,
                          "reason": reason, "via": "console"},
                once=Once(f"console:{key}", {"op": "grant", "user": user_id, "plan": plan_id,
                                            "reason": reason}),
                answer=_stored)
            return f"Plan {plan.name or plan_id} granted: {credits}."
        return f"Grant the plan {plan.name or plan_id} ({credits}) to {user_id}.", grant

    def _limits_plan(self, ctx: Ctx, user_id: str
                     ) -> tuple[str, Callable[[], Awaitable[str]]]:
        """Every int limit field: a whole number, or empty for the paywall's own. The
        caps, in the paywall's asset: an amount, or empty for the paywall's own."""
        paywall_id = ctx.paywall
        asset = self.settings.paywalls[paywall_id].asset
        body: dict[str, Any] = {}
        for name in guard.INT_OVERRIDES:
            raw = ctx.field(name)
            if raw and not _DIGITS.fullmatch(raw):
                raise BadInput(f"{name.replace('_', ' ')} must be a whole number, or empty "
                               "for the paywall's own.")
            body[name] = int(raw) if raw else None
        for name in guard.CAP_OVERRIDES:
            raw = ctx.field(name)
            body[name] = {asset: raw} if raw else None
        try:
            changed = guard.parse_overrides(body, self.settings.assets, {})
        except ProxyError as e:
            raise BadInput(e.message) from None
        removed = [k for k, v in body.items() if v is None]
        words = ", ".join(f"{k.replace('_', ' ')} {v.get(asset) if isinstance(v, dict) else v}"
                          for k, v in changed.items()) or "none"

        async def apply() -> str:
            await ctx.services.ledger.set_limits(paywall_id, user_id, changed, removed)
            ctx.services.overrides.forget(paywall_id, user_id)
            return "Limits changed."
        return (f"Set the limits of {user_id}: overrides {words}; the rest as the paywall's.",
                apply)

    # ---- formatting ------------------------------------------------------------------------

    def _money(self, asset: str, amount: int) -> str:
        scale = self.settings.assets[asset].scale if asset in self.settings.assets else 0
        return format_amount(amount, scale)

    def _amount(self, asset: str, raw: str, *, signed: bool) -> int:
        negative = signed and raw.startswith("-")
        parsed = parse_decimal(raw[1:] if negative else raw)
        if parsed is None:
            raise BadInput(f"The amount must be a decimal such as 1.50"
                           f"{' (or -1.50 to take)' if signed else ''}, in {asset}.")
        try:
            amount = units(-parsed if negative else parsed, self.settings.assets[asset].scale)
        except ValueError as e:
            raise BadInput(f"The amount: {e}.") from None
        if amount == 0:
            raise BadInput("The amount must not be 0.")
        return amount

    def _entry(self, e: Any) -> dict[str, Any]:
        return {"id": e.id, "created": e.created_at, "kind": e.kind, "asset": e.asset,
                "amount": self._money(e.asset, e.amount),
                "balance_after": self._money(e.asset, e.balance_after),
                "request_id": e.request_id or "", "model": e.model or "",
                "tokens": "" if e.prompt_tokens is None and e.completion_tokens is None
                else f"{e.prompt_tokens or 0} + {e.completion_tokens or 0}",
                "outcome": e.outcome or "", "reason": str(e.metadata.get("reason") or ""),
                # Only the console's and the CLI's own entries name an operator: any API
                # caller may put "operator" in its metadata.
                "operator": str(e.metadata.get("operator") or "")
                if e.metadata.get("via") == "console" else ""}


def _stored(result: Moved | Refused) -> Stored:
    return Stored(200, b"{}")


def _by_day(rows: list[tuple[datetime, str, int]], asset: str) -> dict[date, int]:
    out: dict[date, int] = {}
    for day, a, n in rows:
        if a == asset:
            d = day.astimezone(UTC).date() if day.tzinfo else day.date()
            out[d] = out.get(d, 0) + n
    return out


def _choice(value: str, allowed: set[str], default: str) -> str:
    return value if value in allowed else default


async def _form(request: Request) -> dict[str, str]:
    """The posted form's text fields (files are ignored); empty when it is not a form."""
    try:
        form = await request.form(max_files=0, max_fields=100, max_part_size=16 * 1024)
    except Exception:  # not a form, or too much of one: as if nothing were sent
        return {}
    return {k: v for k, v in form.items() if isinstance(v, str)}
