"""What one request's ledger work costs PostgreSQL: the backend CPU time of a hold and
its post, run through the real :class:`proxy.ledger.Ledger` in batches, as in
production (group commit: ``--batch`` requests hold together, then post together, each
batch one pipeline and one commit).

Each schema to measure is a fresh database on the server of ``DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), migrated by :func:`proxy.db.migrate`
from ``migrations/`` — all of them, or only those up to a version (``--upto``) — with
``--users`` users funded by a starter grant. A repetition runs ``--charges`` hold+post
pairs and reads the CPU time of the pool's backends (their pids from
``pg_backend_pid()``) before and after: ``/proc/<pid>/schedstat`` (nanoseconds on the
CPU), or utime+stime from ``/proc/<pid>/stat`` where schedstat is missing. What the
client, autovacuum, the WAL writer and the checkpointer spend is not counted, so
another load on the machine hardly moves the figure; repetitions of the schemas are
interleaved all the same, and the median is printed.

Run from the repository's root, with PostgreSQL on the same machine:

    .venv/bin/python bench/ledger_cost.py                 # all migrations, no caps
    .venv/bin/python bench/ledger_cost.py --caps          # with the four spend caps
    .venv/bin/python bench/ledger_cost.py --upto 13 --upto all --caps   # before/after 0014

``--caps`` gives every hold the four spend caps (the user's and the paywall's, daily and
monthly, as guard.spend_caps builds them), each too high to refuse anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from proxyproc import execute, with_database

from proxy import db
from proxy.ledger import Ledger, SpendCap
from proxy.pricing import Usage

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PAYWALL = "bench"
ASSET = "usd"
HOLD = 1_000
COST = 700  # within the hold: the usual post
NO_LIMIT = 10**15


@contextmanager
def migrations_upto(upto: str) -> Iterator[Path]:
    """The migrations directory, or a copy of it holding those up to ``upto``."""
    if upto == "all":
        yield db.MIGRATIONS_DIR
        return
    with tempfile.TemporaryDirectory(prefix="ledger-cost-") as tmp:
        for m in db.migrations():
            if m.version <= int(upto):
                shutil.copy(db.MIGRATIONS_DIR / m.name, tmp)
        yield Path(tmp)


def cpu_ns(pid: int) -> int:
    """The process's time on the CPU so far, in nanoseconds."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except OSError:
        t = psutil.Process(pid).cpu_times()
        return int((t.user + t.system) * 1e9)


@dataclass
class Schema:
    """One migrated database, its pool, its ledger and its funded users."""

    label: str
    url: str
    pool: db.Database
    ledger: Ledger
    pids: list[int]
    users: list[str]
    done: int = 0  # requests run so far (request ids stay unique)


async def open_schema(server: str, label: str, upto: str, users: int, caps: bool) -> Schema:
    name = f"ledger_cost_{secrets.token_hex(4)}"
    await execute(server, f"CREATE DATABASE {name}")
    url = with_database(server, name)
    with migrations_upto(upto) as directory:
        await db.migrate(url, directory)
    ids = [f"u{i:05d}" for i in range(users)]
    # The proxy's default: holds and charges wait for the WAL flush.
    pool = await db.create_pool(url, 1, 1)
    ledger = Ledger(pool, hold_ttl=60.0)
    for user in ids:
        await ledger.open_user(PAYWALL, user, assets={ASSET}, grants={ASSET: NO_LIMIT // 10})
    # A ledger in use, its statistics known: plans made on empty tables (a sequential
    # scan of holds) would make every request dearer than the one before.
    s = Schema(label, url, pool, ledger, [], ids)
    await run(s, 2 * users, 64, caps)
    await pool.execute("VACUUM ANALYZE")
    await pool.close()
    s.pool = pool = await db.create_pool(url, 1, 1)
    s.ledger = Ledger(pool, hold_ttl=60.0)
    s.pids = [await pool.fetchval("SELECT pg_backend_pid()")]
    return s


def caps_for(user: str, caps: bool) -> list[SpendCap]:
    if not caps:
        return []
    return [SpendCap(user, "day", NO_LIMIT), SpendCap(user, "month", NO_LIMIT),
            SpendCap("", "day", NO_LIMIT), SpendCap("", "month", NO_LIMIT)]


async def request(s: Schema, user: str, caps: bool) -> None:
    s.done += 1
    state = await s.ledger.hold(PAYWALL, user, ASSET, HOLD, request_id=f"r{s.done}",
                                model="bench-model", require_connect=False,
                                caps=caps_for(user, caps))
    if state.hold_id is None:
        raise RuntimeError(f"{s.label}: a hold was refused ({state})")
    posted = await s.ledger.post(state.hold_id, COST, Usage(120, 80), "completed")
    if posted is None or posted.charged != COST:
        raise RuntimeError(f"{s.label}: a post went wrong ({posted})")


async def run(s: Schema, charges: int, batch: int, caps: bool) -> float:
    """Run ``charges`` requests in batches of ``batch``; the backends' CPU microseconds
    per request."""
    before = sum(cpu_ns(p) for p in s.pids)
    for start in range(0, charges, batch):
        group = [s.users[(start + i) % len(s.users)] for i in range(min(batch, charges - start))]
        await asyncio.gather(*(request(s, user, caps) for user in group))
    after = sum(cpu_ns(p) for p in s.pids)
    return (after - before) / 1e3 / charges


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("DATABASE_URL", DEFAULT_URL)
    schemas = [await open_schema(server, f"upto {u}" if u != "all" else "all migrations",
                                 u, args.users, args.caps) for u in args.upto]
    try:
        for s in schemas:  # warm up: plans cached, pages read
            await run(s, args.batch * 4, args.batch, args.caps)
        figures: dict[str, list[float]] = {s.label: [] for s in schemas}
        for rep in range(args.repeat):
            # Interleaved, and each round in another order.
            for s in schemas[rep % len(schemas):] + schemas[:rep % len(schemas)]:
                t0 = time.perf_counter()
                us = await run(s, args.charges, args.batch, args.caps)
                figures[s.label].append(us)
                print(f"  {s.label:>16}  round {rep + 1}: {us:7.1f} µs a hold+post"
                      f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        caps = "the four spend caps" if args.caps else "no caps"
        print(f"PostgreSQL backend CPU per hold+post ({caps}; {args.charges} requests a round"
              f" in batches of {args.batch}, {args.users} users, median of {args.repeat}):")
        for label, values in figures.items():
            print(f"  {label:>16}: {statistics.median(values):7.1f} µs"
                  f"  (min {min(values):.1f}, max {max(values):.1f})")
    finally:
        for s in schemas:
            await s.pool.close()
            await execute(server, f"DROP DATABASE {urlsplit(s.url).path[1:]} WITH (FORCE)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--charges", type=int, default=3_200, help="hold+post pairs a round")
    p.add_argument("--batch", type=int, default=64, help="requests held (and posted) together")
    p.add_argument("--users", type=int, default=1_000, help="funded users, charged in turn")
    p.add_argument("--caps", action="store_true", help="the four spend caps on every hold")
    p.add_argument("--repeat", type=int, default=7, help="rounds per schema")
    p.add_argument("--upto", action="append", metavar="VERSION",
                   help="a schema migrated up to VERSION, or 'all' (repeatable; default all)")
    args = p.parse_args(argv)
    args.upto = args.upto or ["all"]
    for u in args.upto:
        if u != "all" and not u.isdigit():
            p.error(f"--upto takes a migration number or 'all', not {u!r}")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
