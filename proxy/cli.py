"""The ``paywall-proxy`` command: serve, migrate, keys, payments, events, check-config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import asyncpg
import orjson
import stripe

from proxy import db, observe, server
from proxy import settings as config
from proxy.errors import ConfigError
from proxy.keys import KeyStore
from proxy.ledger import Ledger
from proxy.payments import Payments
from proxy.settings import Settings


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
    return p


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
    if args.command in ("keys", "payments", "events") and \
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
            return _serve(args, settings, url)
    except (OSError, asyncpg.PostgresError) as e:
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
