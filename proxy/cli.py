"""The ``paywall-proxy`` command: serve, migrate, keys, payments, events, check-config,
and the operator's console for scripts (users, balance, deposit, refund, adjust, ledger
export, revenue) over :mod:`proxy.console`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import logging
import os
import resource
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from proxy import console, db, lazy, observe, server
from proxy import settings as config
from proxy.errors import ConfigError, DatabaseUnavailable
from proxy.keys import KeyStore
from proxy.ledger import BalanceOverflow, IdempotencyConflict, Ledger
from proxy.payments import Payments
from proxy.pricing import format_amount, parse_decimal, shown_amount, units
from proxy.requestid import new_request_id
from proxy.settings import Settings

if TYPE_CHECKING:
    import stripe
else:  # loaded when first used, or at start for a paywall with Stripe keys (proxy.lazy)
    stripe = lazy.module("stripe")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paywall-proxy",
                                description="OpenAI-compatible metering reverse proxy.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help=f"settings file (default: ${config.CONFIG_ENV}, "
                                         "else the built-in demo settings)")
        return sp

    serve = with_config(sub.add_parser("serve", help="run the proxy"))
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.add_argument("--demo", action="store_true",
                       help="mint a key for the first paywall and print a curl and SDK example")

    with_config(sub.add_parser("migrate", help="apply database migrations"))
    with_config(sub.add_parser("check-config", help="check the settings file and exit"))

    keys = sub.add_parser("keys", help="manage paywall API keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = with_config(ksub.add_parser("create", help="mint a key (shown once)"))
    create.add_argument("--paywall", required=True)
    create.add_argument("--name", default="", help="a label to tell keys apart")
    listing = with_config(ksub.add_parser("list", help="list a paywall's keys"))
    listing.add_argument("--paywall", required=True)
    revoke = with_config(ksub.add_parser("revoke", help="revoke a key by its id"))
    revoke.add_argument("--paywall", required=True)
    revoke.add_argument("key_id", type=int)

    payments = sub.add_parser("payments", help="Stripe payments")
    psub = payments.add_subparsers(dest="action", required=True)
    rec = with_config(psub.add_parser(
        "reconcile", help="deposit paid Checkout Sessions whose webhook never arrived, and "
                          "report what Stripe and the ledger disagree on"))
    rec.add_argument("--paywall", required=True)
    rec.add_argument("--since", type=_date, help="only sessions created since (YYYY-MM-DD "
                                                 "or an ISO time; UTC unless it says)")

    events = sub.add_parser("events", help="the events outbox")
    esub = events.add_subparsers(dest="action", required=True)
    tail = with_config(esub.add_parser("tail", help="print a paywall's events as JSON lines"))
    tail.add_argument("--paywall", required=True)
    tail.add_argument("--type", help="only this event type")
    tail.add_argument("--last", type=int, default=20, help="how many past events first")
    tail.add_argument("--follow", action="store_true", help="keep printing new events")
    _console_parsers(sub, with_config)
    return p


def _console_parsers(sub: Any, with_config: Any) -> None:
    """The operator's console, for scripts: the reads and moves of ``/admin``."""
    users = sub.add_parser("users", help="a paywall's end users")
    usub = users.add_subparsers(dest="action", required=True)
    ulist = with_config(usub.add_parser(
        "list", help="users by id, one a line: user, connected, created, balances"))
    ulist.add_argument("--paywall", required=True)
    ulist.add_argument("--search", default="", help="only ids containing this (any case)")
    ulist.add_argument("--limit", type=_count, default=50, help="at most this many (50)")
    ulist.add_argument("--after", default="", help="only ids after this one (the next page)")
    show = with_config(usub.add_parser("show", help="a user: balances, connected, limits"))
    show.add_argument("--paywall", required=True)
    show.add_argument("user")
    for verb, what in (("block", "refuse every request of a user (403 user_blocked)"),
                       ("unblock", "lift a user's block")):
        blocking = with_config(usub.add_parser(verb, help=what))
        blocking.add_argument("--paywall", required=True)
        blocking.add_argument("user")

    balance = with_config(sub.add_parser(
        "balance", help="a user's balances, one asset a line: asset, balance, held, owed, "
                        "available (in the asset's units)"))
    balance.add_argument("--paywall", required=True)
    balance.add_argument("user")

    for name, what in (("deposit", "credit AMOUNT to a user"),
                       ("refund", "give AMOUNT back to a user"),
                       ("adjust", "correct a user's balance by a signed AMOUNT")):
        move = with_config(sub.add_parser(name, help=what + ", with a reason, once per key"))
        move.add_argument("--paywall", required=True)
        move.add_argument("--user", required=True)
        move.add_argument("--amount", required=True,
                          help="a decimal in the asset's units" + (
                              ", signed (-1.5 takes 1.5)" if name == "adjust" else ""))
        move.add_argument("--asset", help="default: the paywall's asset")
        move.add_argument("--reason", required=True, help="why (kept in the entry)")
        move.add_argument("--idempotency-key",
                          help="a retry with the same key moves nothing more "
                               "(default: a new one, printed)")
        move.add_argument("--operator", default=os.environ.get("USER") or "cli",
                          help="who did it (default: $USER, else 'cli')")
        move.add_argument("--new", action="store_true",
                          help="open the user (with its starter grants) if never seen")

    ledger = sub.add_parser("ledger", help="a paywall's ledger")
    lsub = ledger.add_subparsers(dest="action", required=True)
    export = with_config(lsub.add_parser(
        "export", help="every entry, oldest first, to stdout (amounts in the asset's "
                       "units, and amount_units in its smallest unit)"))
    export.add_argument("--paywall", required=True)
    export.add_argument("--format", choices=("csv", "jsonl"), required=True)
    export.add_argument("--since", type=_date, help="only entries since (YYYY-MM-DD, UTC)")
    export.add_argument("--user", help="only this user's entries")

    revenue = with_config(sub.add_parser("revenue", help="what was charged, as a table"))
    revenue.add_argument("--paywall", required=True)
    revenue.add_argument("--by", choices=("day", "model", "user"), required=True)
    revenue.add_argument("--since", type=_date, help="only charges since (YYYY-MM-DD, UTC)")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 100_000:
        raise argparse.ArgumentTypeError(f"not a count from 1 to 100000: {text!r}")
    return n


def _date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load(args.config)
    except ConfigError as e:
        print(f"paywall-proxy: bad settings: {e}", file=sys.stderr)
        return 2
    observe.configure_logging(settings.server.log_format, config.secrets_of(settings),
                              settings.server.access_log)
    if args.command == "check-config":
        print(f"{settings.source}: ok ({len(settings.providers)} providers, "
              f"{len(settings.models)} models, {len(settings.paywalls)} paywalls)")
        return 0
    if args.command in ("keys", "payments", "events", *_CONSOLE) and \
            args.paywall not in settings.paywalls:
        known = ", ".join(settings.paywalls) or "none"
        print(f"paywall-proxy: unknown paywall {args.paywall!r} in {settings.source} "
              f"(known: {known})", file=sys.stderr)
        return 2
    if args.command == "payments" and not settings.paywalls[args.paywall].payments \
            .stripe_secret_key:
        print(f"paywall-proxy: paywall {args.paywall!r} has no payments.stripe_secret_key",
              file=sys.stderr)
        return 2
    try:
        with db.database_url(settings.database_url, settings.data_dir) as url:
            asyncio.run(db.migrate(url))
            if args.command == "migrate":
                print("migrations: up to date")
                return 0
            if args.command == "keys":
                return asyncio.run(_keys(args, url))
            if args.command == "payments":
                return asyncio.run(_reconcile(args, settings, url))
            if args.command == "events":
                return asyncio.run(_tail(args, url))
            if args.command in _CONSOLE:
                return asyncio.run(_console(args, settings, url))
            return _serve(args, settings, url)
    except (OSError, asyncpg.PostgresError, DatabaseUnavailable) as e:
        print(f"paywall-proxy: database unavailable: {e}", file=sys.stderr)
        return 1


async def _keys(args: argparse.Namespace, url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        store = KeyStore(conn)
        if args.action == "create":
            key, record = await store.create(args.paywall, args.name)
            print(key)
            print(f"# key id {record.id} for paywall {record.paywall_id}: store it now, "
                  "it is not shown again", file=sys.stderr)
        elif args.action == "list":
            for r in await store.list(args.paywall):
                state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "active"
                print(f"{r.id}\t{r.prefix}…\t{r.created_at:%Y-%m-%d %H:%M}\t{state}\t{r.name}")
        elif not await store.revoke(args.paywall, args.key_id):
            print(f"paywall-proxy: no active key {args.key_id} for paywall {args.paywall}",
                  file=sys.stderr)
            return 1
        else:
            print(f"revoked key {args.key_id}")
        return 0
    finally:
        await conn.close()


async def _tail(args: argparse.Namespace, url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        # By id, the primary key: ids sort by creation time, then seq.
        rows = await conn.fetch(
            "SELECT * FROM (SELECT * FROM events WHERE paywall_id = $1"
            " AND ($2::text IS NULL OR type = $2) ORDER BY id DESC LIMIT $3) e ORDER BY id",
            args.paywall, args.type, max(args.last, 0))
        last = ""
        while True:
            for r in rows:
                last = max(last, r["id"])
                print(orjson.dumps({
                    "id": r["id"], "type": r["type"], "version": r["version"],
                    "created_at": r["created_at"].isoformat(), "paywall": r["paywall_id"],
                    "user": r["user_id"], "request_id": r["request_id"],
                    "data": orjson.loads(r["data"])}).decode(), flush=True)
            if not args.follow:
                return 0
            await asyncio.sleep(1.0)
            rows = await conn.fetch(
                "SELECT * FROM events WHERE paywall_id = $1 AND id > $2"
                " AND ($3::text IS NULL OR type = $3) ORDER BY id LIMIT 1000",
                args.paywall, last, args.type)
    finally:
        await conn.close()


async def _reconcile(args: argparse.Namespace, settings: Settings, url: str) -> int:
    from proxy.app import starter_grants  # the app's module, only for this command

    pool = await db.create_pool(url, 1, 2, True)
    grants = {pid: starter_grants(p, settings) for pid, p in settings.paywalls.items()}
    payments = Payments(settings, Ledger(pool, settings.billing.hold_ttl_seconds),
                        observe.Metrics(), grants)
    try:
        found = await payments.reconcile(args.paywall, args.since)
    except stripe.StripeError as e:
        print(f"paywall-proxy: Stripe: {e}", file=sys.stderr)
        return 1
    finally:
        await payments.close()
        await pool.close()
    for session in found.deposited:
        print(f"deposited\t{session}")
    for session in found.reversed:
        print(f"refunded\t{session}")
    for line in found.mismatches:
        print(f"mismatch\t{line}")
    print(f"# {len(found.deposited)} deposited now, {len(found.already)} already deposited, "
          f"{len(found.reversed)} refunds applied, {len(found.skipped)} skipped, "
          f"{len(found.mismatches)} mismatches", file=sys.stderr)
    return 1 if found.mismatches else 0


# ---- the operator's console, for scripts ----------------------------------------------

_CONSOLE = ("users", "balance", "deposit", "refund", "adjust", "ledger", "revenue")
_KINDS: dict[str, console.Kind] = {"deposit": "deposit", "refund": "refund",
                                   "adjust": "adjustment"}


class _Refused(Exception):
    """A console command refused: its message for stderr, and the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


async def _console(args: argparse.Namespace, settings: Settings, url: str) -> int:
    pool = await db.create_pool(url, 1, 2, True)
    ledger = Ledger(pool, settings.billing.hold_ttl_seconds)
    try:
        if args.command == "users" and args.action == "list":
            _users(settings, await console.users(pool, args.paywall, args.search,
                                                 after=args.after, limit=args.limit), args)
        elif args.command == "users" and args.action in ("block", "unblock"):
            await _known(ledger, args.paywall, args.user)
            await console.block(ledger, args.paywall, args.user, args.action == "block")
            print(f"{args.user} {args.action}ed")
        elif args.command in ("users", "balance"):
            _user(settings, await _known(ledger, args.paywall, args.user),
                  args.command == "balance")
        elif args.command in _KINDS:
            await _move(args, settings, ledger)
        elif args.command == "ledger":
            if args.user is not None:
                await _known(ledger, args.paywall, args.user)
            await _export(args, settings, pool)
        else:
            _revenue(settings, args.by,
                     await console.revenue(pool, args.paywall, args.by, args.since))
        return 0
    except _Refused as e:
        print(f"paywall-proxy: {e}", file=sys.stderr)
        return e.status
    except BrokenPipeError:  # the reader (head, a pager) has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        await pool.close()


async def _known(ledger: Ledger, paywall: str, user: str) -> console.UserDetail:
    detail = await console.user(ledger, paywall, user)
    if detail is None:
        raise _Refused(f"no user {user!r} in paywall {paywall!r}")
    return detail


def _scale(settings: Settings, asset: str) -> int:
    """The asset's scale; 0 (amounts in its smallest unit) for one the settings dropped."""
    known = settings.assets.get(asset)
    return known.scale if known else 0


def _users(settings: Settings, rows: list[console.UserRow], args: argparse.Namespace) -> None:
    for r in rows:
        balances = " ".join(f"{a}={format_amount(n, _scale(settings, a))}"
                            for a, n in sorted(r.balances.items()))
        print(f"{r.user_id}\t{'connected' if r.connected else '-'}\t"
              f"{r.created_at:%Y-%m-%d %H:%M}\t{balances}")
    if len(rows) == args.limit:
        print(f"# more may follow: --after {rows[-1].user_id}", file=sys.stderr)


def _user(settings: Settings, d: console.UserDetail, balances_only: bool) -> None:
    """``users show`` (or ``balance``: its balance lines alone, as bare columns)."""
    def amount(n: int, asset: str) -> str:
        return format_amount(n, _scale(settings, asset))

    if balances_only:
        for b in d.balances:
            print("\t".join([b.asset, *(amount(n, b.asset)
                                        for n in (b.balance, b.held, b.owed, b.available))]))
        return
    print(f"user\t{d.user_id}")
    print(f"connected\t{'yes' if d.connected else 'no'}")
    print(f"blocked\t{'yes' if d.blocked else 'no'}")
    print(f"created\t{d.created_at.isoformat()}")
    for b in d.balances:
        print(f"balance\t{b.asset}\t{amount(b.balance, b.asset)}\theld "
              f"{amount(b.held, b.asset)}\towed {amount(b.owed, b.asset)}\tavailable "
              f"{amount(b.available, b.asset)}")
    for name, value in sorted(d.limits.items()):
        print(f"limit\t{name}\t{value}")


async def _move(args: argparse.Namespace, settings: Settings, ledger: Ledger) -> None:
    from proxy.app import starter_grants  # the app's module, only for these commands

    paywall = settings.paywalls[args.paywall]
    asset = args.asset or paywall.asset
    assets = {paywall.asset, *paywall.credits.types}
    if asset not in assets:
        raise _Refused(f"paywall {args.paywall!r} has no asset {asset!r} "
                       f"(its assets: {', '.join(sorted(assets))})", 2)
    amount = _amount(args.amount, settings.assets[asset].scale, signed=args.command == "adjust")
    reason = args.reason.strip()
    if not reason:
        raise _Refused("a --reason is required", 2)
    if not args.new and await ledger.user(args.paywall, args.user) is None:
        raise _Refused(f"no user {args.user!r} in paywall {args.paywall!r} "
                       "(--new opens one)")
    key = args.idempotency_key or f"cli-{secrets.token_hex(16)}"
    if not args.idempotency_key:
        print(f"# idempotency key {key}: give it again to retry this move safely",
              file=sys.stderr)
    try:
        result = await console.move(
            ledger, args.paywall, args.user, asset, amount, _KINDS[args.command],
            reason=reason, operator=args.operator, key=key,
            grants=starter_grants(paywall, settings), request_id=new_request_id())
    except IdempotencyConflict:
        raise _Refused(f"idempotency key {key!r} was used before for another move") from None
    except BalanceOverflow:
        raise _Refused(f"{args.amount} {asset} would take the balance past what the ledger "
                       "holds") from None
    scale = settings.assets[asset].scale
    if not result.ok or result.balance is None:
        have = next((b.available for b in await ledger.balances(args.paywall, args.user)
                     if b.asset == asset), 0)
        raise _Refused(f"refused: {args.user} has {format_amount(have, scale)} {asset} "
                       f"available, less than the {format_amount(-amount, scale)} this "
                       "takes; nothing moved")
    print(f"{args.command} {format_amount(amount, scale)} {asset} for {args.user}: "
          f"balance {format_amount(result.balance, scale)} {asset}")


def _amount(text: str, scale: int, *, signed: bool) -> int:
    """``text``, a plain decimal of the asset's units (signed if ``signed``), in its
    smallest unit; never zero."""
    sign = -1 if signed and text.startswith("-") else 1
    digits = text[1:] if signed and text[:1] in ("+", "-") else text
    value = parse_decimal(digits)
    if value is None:
        raise _Refused(f"--amount: not a{' signed' if signed else ''} decimal amount: "
                       f"{text!r}", 2)
    try:
        n = units(sign * value, scale)
    except ValueError as e:
        raise _Refused(f"--amount: {e}", 2) from None
    if n == 0:
        raise _Refused("--amount: must not be zero", 2)
    return n


def _exported(row: dict[str, Any], scale: int) -> dict[str, Any]:
    """An export row in the asset's units (exact decimal strings), its smallest-unit
    integers beside them."""
    return {**row, "created_at": row["created_at"].isoformat(),
            "amount": format_amount(row["amount"], scale),
            "balance_after": format_amount(row["balance_after"], scale),
            "amount_units": row["amount"], "balance_after_units": row["balance_after"]}


_EXPORT_FIELDS = (*console.EXPORT_FIELDS, "amount_units", "balance_after_units")


async def _export(args: argparse.Namespace, settings: Settings, pool: Any) -> None:
    out = sys.stdout
    writer = csv.DictWriter(out, _EXPORT_FIELDS, lineterminator="\n")
    if args.format == "csv":
        writer.writeheader()
    async for row in console.export(pool, args.paywall, user_id=args.user, since=args.since):
        line = _exported(row, _scale(settings, row["asset"]))
        if args.format == "jsonl":
            out.write(orjson.dumps(line).decode() + "\n")
        else:
            writer.writerow({**line, "metadata": orjson.dumps(line["metadata"]).decode()})
    out.flush()


def _revenue(settings: Settings, by: str, rows: list[tuple[str, str, int, int]]) -> None:
    totals: dict[str, tuple[int, int]] = {}
    table = [(by, "asset", "amount", "charges")]
    for name, asset, amount, n in rows:
        table.append((name or "(none)", asset, shown_amount(amount, _scale(settings, asset)),
                      str(n)))
        total, count = totals.get(asset, (0, 0))
        totals[asset] = (total + amount, count + n)
    table += [("total", a, shown_amount(t, _scale(settings, a)), str(n))
              for a, (t, n) in sorted(totals.items())]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  "
              f"{r[3]:>{widths[3]}}")


def _serve(args: argparse.Namespace, settings: Settings, url: str) -> int:
    import uvicorn

    host = args.host or settings.server.host
    port = args.port or settings.server.port
    workers = args.workers or settings.server.workers
    if workers > 1 and not settings.redis_url:
        logging.getLogger("proxy").warning(
            "%d workers without REDIS_URL: rate, token and concurrency limits are kept "
            "per worker, so each applies %d times over", workers, workers)
    if args.demo:
        if not settings.paywalls:
            print("paywall-proxy: --demo needs a paywall in the settings", file=sys.stderr)
            return 2
        paywall = next(iter(settings.paywalls))
        key = asyncio.run(_mint(url, paywall))
        print(_demo_text(host, port, key, next(iter(settings.models), "MODEL")), flush=True)
    # Workers are separate processes: they find the settings and the database here.
    os.environ[config.CONFIG_ENV] = settings.source
    os.environ["DATABASE_URL"] = url
    os.environ[config.WORKERS_ENV] = str(workers)
    if not settings.server.link_secret:  # one secret for all of this serve's workers
        os.environ[config.LINK_SECRET_ENV] = secrets.token_hex(32)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so
    # the embedded PostgreSQL is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _raise_open_files_limit()
    limits = server.ConnectionLimits(settings.server.max_head_bytes,
                                     settings.server.head_timeout_seconds,
                                     settings.server.body_timeout_seconds)
    with _metrics_dir(workers):
        uvicorn.run("proxy.app:app_from_env", factory=True, host=host, port=port,
                    workers=workers, loop="uvloop", http=server.protocol(limits), lifespan="on",
                    access_log=False, server_header=False, proxy_headers=False,
                    log_level="info", log_config=None)
    return 0


def _raise_open_files_limit() -> None:
    """Each open stream holds two sockets (client and provider): lift the soft limit on
    open files to the hard one, as servers do, instead of failing near 500 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            logging.getLogger("proxy").warning(
                "open files limited to %d: each stream needs two", soft)


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """Several workers write their metrics to files in one directory, which /metrics
    in any of them sums (prometheus-client's multiprocess mode); a fresh one per start
    unless the operator chose one."""
    if workers <= 1 or os.environ.get(observe.MULTIPROC_ENV):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="paywall-metrics-") as path:
        os.environ[observe.MULTIPROC_ENV] = path
        try:
            yield
        finally:
            del os.environ[observe.MULTIPROC_ENV]


async def _mint(url: str, paywall: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        key, _ = await KeyStore(conn).create(paywall, "demo")
        return key
    finally:
        await conn.close()


def _demo_text(host: str, port: int, key: str, model: str) -> str:
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    body = (f'{{"model": "{model}", "user": "user_123", '
            '"messages": [{"role": "user", "content": "Hello!"}]}')
    return f"""
A new paywall key for this demo: {key}

Try it with curl:
  curl {base}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{body}'

Or with the OpenAI SDK for Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  reply = client.chat.completions.create(
      model="{model}", user="user_123", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)
"""


if __name__ == "__main__":
    sys.exit(main())
