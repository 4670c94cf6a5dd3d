"""The operator's console for scripts (``paywall-proxy users``, ``balance``, ``deposit``,
``refund``, ``adjust``, ``ledger export``, ``revenue``), run as an operator would run it,
over a ledger that real chat completions through a proxy process have charged."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from openai import OpenAI

from proxy.ledger import Ledger
from proxy.pricing import to_decimal
from tests.conftest import mint_key, new_user, serving_proxy

SETTINGS = """
[providers.mock]
kind = "mock"
completion_tokens = 7

[models.small]
provider = "mock"
price = { input_per_million = "0.15", output_per_million = "0.60" }

[models.big]
provider = "mock"
price = { per_request = "0.001", input_per_million = "3", output_per_million = "15" }

[paywalls.app]
name = "Console app"
starter_grant = "1"
[paywalls.app.credits]
types = ["standard"]

[paywalls.empty]
name = "No users"
"""

USD = 9  # the scale of usd


@dataclass
class Seeded:
    url: str
    config: Path
    alice: str
    bob: str
    carol: str


def cli(seeded: Seeded, *args: str, user: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PAYWALL_CONFIG")}
    env.update(DATABASE_URL=seeded.url, PAYWALL_CONFIG=str(seeded.config))
    env.pop("USER", None)
    if user is not None:
        env["USER"] = user
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def fetch(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def query(url: str, sql: str, *args: Any) -> list[Any]:
    return asyncio.run(fetch(url, sql, *args))


def balance_of(seeded: Seeded, user: str, asset: str = "usd") -> int:
    rows = query(seeded.url, "SELECT balance FROM accounts WHERE paywall_id = 'app'"
                             " AND user_id = $1 AND asset = $2", user, asset)
    return int(rows[0]["balance"]) if rows else 0


def entries_of(seeded: Seeded, user: str) -> list[Any]:
    return query(seeded.url, "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
                             " WHERE a.paywall_id = 'app' AND a.user_id = $1 ORDER BY e.id",
                 user)


async def mark(url: str, bob: str) -> None:
    """Bob connected, with a limit of his own (what ``users show`` reads back)."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        ledger = Ledger(pool, 60)
        assert await ledger.connect("app", bob, await ledger.connect_version("app", bob))
        await ledger.set_limits("app", bob, {"user_requests_per_minute": 5}, [])
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def seeded(own_database_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Seeded]:
    """Alice, Bob and Carol, charged by chat completions of two models through a proxy
    process (stopped before the tests), and Carol given standard credits."""
    workdir = tmp_path_factory.mktemp("console")
    s = Seeded(own_database_url, workdir / "proxy.toml", new_user("alice"), new_user("bob"),
               new_user("carol"))
    with serving_proxy(SETTINGS, own_database_url, workdir) as proxy, \
            OpenAI(api_key=mint_key(own_database_url), base_url=proxy.base_url,
                   max_retries=0) as client:
        for user, model in [(s.alice, "small")] * 3 + [(s.alice, "big")] + \
                [(s.bob, "big")] * 2 + [(s.carol, "small")]:
            client.chat.completions.create(
                model=model, user=user, messages=[{"role": "user", "content": "Hello there"}])
    asyncio.run(mark(own_database_url, s.bob))
    ok(cli(s, "deposit", "--paywall", "app", "--user", s.carol, "--asset", "standard",
           "--amount", "12", "--reason", "seed"))
    yield s


# ---- users and balances -------------------------------------------------------------

def test_users_list_searches_and_pages(seeded: Seeded) -> None:
    lines = ok(cli(seeded, "users", "list", "--paywall", "app")).splitlines()
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert set(rows) == {seeded.alice, seeded.bob, seeded.carol}
    assert rows[seeded.bob][1] == "connected" and rows[seeded.alice][1] == "-"
    usd = to_decimal(balance_of(seeded, seeded.alice), USD)
    assert f"usd={usd:f}" in rows[seeded.alice][3].split()
    assert "standard=12" in rows[seeded.carol][3].split()

    found = ok(cli(seeded, "users", "list", "--paywall", "app", "--search", "BOB"))
    assert [line.split("\t")[0] for line in found.splitlines()] == [seeded.bob]

    first = cli(seeded, "users", "list", "--paywall", "app", "--limit", "2")
    ids = [line.split("\t")[0] for line in ok(first).splitlines()]
    assert ids == sorted(rows)[:2] and f"--after {ids[-1]}" in first.stderr
    rest = ok(cli(seeded, "users", "list", "--paywall", "app", "--after", ids[-1]))
    assert [line.split("\t")[0] for line in rest.splitlines()] == sorted(rows)[2:]
    assert ok(cli(seeded, "users", "list", "--paywall", "empty")) == ""


def test_users_show(seeded: Seeded) -> None:
    out = ok(cli(seeded, "users", "show", "--paywall", "app", seeded.bob))
    fields = [line.split("\t") for line in out.splitlines()]
    assert ["user", seeded.bob] in fields and ["connected", "yes"] in fields
    assert ["limit", "user_requests_per_minute", "5"] in fields
    usd = next(f for f in fields if f[:2] == ["balance", "usd"])
    assert Decimal(usd[2]) == to_decimal(balance_of(seeded, seeded.bob), USD)
    assert usd[3:] == ["held 0.000000000", "owed 0.000000000", f"available {usd[2]}"]
    assert ["connected", "no"] in [line.split("\t") for line in ok(cli(
        seeded, "users", "show", "--paywall", "app", seeded.alice)).splitlines()]


def test_users_block_and_unblock(seeded: Seeded) -> None:
    def blocked() -> list[str]:
        out = ok(cli(seeded, "users", "show", "--paywall", "app", seeded.alice))
        return [line for line in out.splitlines() if line.startswith("blocked\t")]

    assert blocked() == ["blocked\tno"]
    assert ok(cli(seeded, "users", "block", "--paywall", "app", seeded.alice)).strip() == (
        f"{seeded.alice} blocked")
    assert blocked() == ["blocked\tyes"]
    assert query(seeded.url, "SELECT blocked FROM users WHERE paywall_id = 'app'"
                 " AND user_id = $1", seeded.alice)[0]["blocked"] is True
    ok(cli(seeded, "users", "unblock", "--paywall", "app", seeded.alice))
    assert blocked() == ["blocked\tno"]


def test_balance_per_asset_in_its_units(seeded: Seeded) -> None:
    out = ok(cli(seeded, "balance", "--paywall", "app", seeded.carol))
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    usd = f"{to_decimal(balance_of(seeded, seeded.carol), USD):f}"
    assert rows == {"standard": ["12", "0", "0", "12"],
                    "usd": [usd, "0.000000000", "0.000000000", usd]}
    # 1 usd granted, less what Carol's one call cost: a fraction of a cent, exactly
    assert Decimal(usd) < 1 and len(usd.split(".")[1]) == USD


# ---- moves --------------------------------------------------------------------------

def move(seeded: Seeded, command: str, user: str, amount: str, *extra: str,
         operator: str | None = None) -> subprocess.CompletedProcess[str]:
    return cli(seeded, command, "--paywall", "app", "--user", user, "--amount", amount,
               *extra, user=operator)


@pytest.mark.parametrize(("command", "amount", "kind", "units"), [
    ("deposit", "2.5", "deposit", 2_500_000_000),
    ("refund", "0.000000001", "refund", 1),
    ("adjust", "-0.25", "adjustment", -250_000_000),
    ("adjust", "+0.1", "adjustment", 100_000_000),
])
def test_a_move_is_one_entry_once_per_key(seeded: Seeded, command: str, amount: str,
                                          kind: str, units: int) -> None:
    user = seeded.alice
    before, count = balance_of(seeded, user), len(entries_of(seeded, user))
    key = f"k-{new_user(command)}"
    for _ in range(2):  # the same key again moves nothing more, and answers the same
        out = ok(move(seeded, command, user, amount, "--reason", "goodwill, ticket 42",
                      "--idempotency-key", key, operator="ops-ann"))
        shown = f"{to_decimal(before + units, USD):f} usd"
        assert out.strip().endswith(f"balance {shown}")
    entries = entries_of(seeded, user)
    assert len(entries) == count + 1
    e = entries[-1]
    assert (e["kind"], e["amount"], e["balance_after"], e["idempotency_key"]) == \
        (kind, units, before + units, key)
    assert json.loads(e["metadata"]) == {"reason": "goodwill, ticket 42",
                                         "operator": "ops-ann", "via": "console"}
    assert balance_of(seeded, user) == before + units


def test_a_move_makes_its_key_and_names_its_operator(seeded: Seeded) -> None:
    for operator, named in (("ops-bea", "ops-bea"), (None, "cli")):
        result = move(seeded, "deposit", seeded.bob, "0.5", "--reason", "promo",
                      operator=operator)
        ok(result)
        key = re.search(r"idempotency key (\S+):", result.stderr)
        assert key is not None
        e = entries_of(seeded, seeded.bob)[-1]
        assert e["idempotency_key"] == key.group(1)
        assert json.loads(e["metadata"])["operator"] == named
    ok(move(seeded, "deposit", seeded.bob, "0.5", "--reason", "promo",
            "--operator", "ops-cid", operator="ops-bea"))
    assert json.loads(entries_of(seeded, seeded.bob)[-1]["metadata"])["operator"] == "ops-cid"


def test_a_negative_adjustment_beyond_the_available_is_refused(seeded: Seeded) -> None:
    before, count = balance_of(seeded, seeded.carol), len(entries_of(seeded, seeded.carol))
    result = move(seeded, "adjust", seeded.carol, "-5", "--reason", "chargeback")
    assert result.returncode == 1 and "refused" in result.stderr
    assert f"{to_decimal(before, USD):f} usd available" in result.stderr
    assert "nothing moved" in result.stderr and "Traceback" not in result.stderr
    assert (balance_of(seeded, seeded.carol), len(entries_of(seeded, seeded.carol))) == \
        (before, count)
    credits = move(seeded, "adjust", seeded.carol, "-13", "--asset", "standard",
                   "--reason", "too many")
    assert credits.returncode == 1 and "has 12 standard available" in credits.stderr


def test_new_opens_a_user_with_the_starter_grants(seeded: Seeded) -> None:
    dave = new_user("dave")
    out = ok(move(seeded, "deposit", dave, "3", "--reason", "prepaid", "--new"))
    assert out.strip().endswith("balance 4.000000000 usd")  # 1 usd starter grant first
    assert [(e["kind"], e["amount"]) for e in entries_of(seeded, dave)] == \
        [("grant", 10**USD), ("deposit", 3 * 10**USD)]


def test_a_key_used_for_another_move_is_refused(seeded: Seeded) -> None:
    key = f"k-{new_user('conflict')}"
    ok(move(seeded, "deposit", seeded.bob, "1", "--reason", "r", "--idempotency-key", key))
    again = move(seeded, "deposit", seeded.bob, "2", "--reason", "r",
                 "--idempotency-key", key)
    assert again.returncode == 1 and f"idempotency key '{key}' was used before" in again.stderr


A = ("--paywall", "app", "--user", "ALICE")  # the moves' options, for Alice
REFUSALS: list[tuple[tuple[str, ...], int, str]] = [
    # an unknown user or paywall, named
    (("users", "show", "--paywall", "app", "nobody"), 1, "no user 'nobody' in paywall 'app'"),
    (("balance", "--paywall", "app", "nobody"), 1, "no user 'nobody' in paywall 'app'"),
    (("ledger", "export", "--paywall", "app", "--format", "csv", "--user", "nobody"), 1,
     "no user 'nobody' in paywall 'app'"),
    (("deposit", "--paywall", "app", "--user", "nobody", "--amount", "1", "--reason", "r"), 1,
     "no user 'nobody' in paywall 'app' (--new opens one)"),
    (("users", "list", "--paywall", "nope"), 2, "unknown paywall 'nope'"),
    (("balance", "--paywall", "nope", "x"), 2, "unknown paywall 'nope'"),
    (("deposit", "--paywall", "nope", "--user", "x", "--amount", "1", "--reason", "r"), 2,
     "unknown paywall 'nope'"),
    (("ledger", "export", "--paywall", "nope", "--format", "csv"), 2, "unknown paywall 'nope'"),
    (("revenue", "--paywall", "nope", "--by", "day"), 2, "unknown paywall 'nope'"),
    # amounts: plain decimals of the asset's units, exact, never zero
    (("deposit", *A, "--amount", "-1", "--reason", "r"), 2, "not a decimal amount: '-1'"),
    (("refund", *A, "--amount", "+1", "--reason", "r"), 2, "not a decimal amount: '+1'"),
    (("deposit", *A, "--amount", "1e3", "--reason", "r"), 2, "not a decimal amount: '1e3'"),
    (("deposit", *A, "--amount", "\u0661", "--reason", "r"), 2, "not a decimal amount"),
    (("deposit", *A, "--amount", "0", "--reason", "r"), 2, "must not be zero"),
    (("adjust", *A, "--amount", "-0.0", "--reason", "r"), 2, "must not be zero"),
    (("adjust", *A, "--amount=--1", "--reason", "r"), 2, "not a signed decimal amount"),
    (("deposit", *A, "--amount", "0.0000000001", "--reason", "r"), 2,
     "finer than the asset's smallest unit (1e-9)"),
    (("deposit", *A, "--amount", "1.5", "--asset", "standard", "--reason", "r"), 2,
     "finer than the asset's smallest unit"),
    (("deposit", *A, "--amount", "99999999999", "--reason", "r"), 2,
     "more than the ledger holds"),
    (("deposit", *A, "--amount", "1", "--asset", "gold", "--reason", "r"), 2,
     "paywall 'app' has no asset 'gold' (its assets: standard, usd)"),
    (("deposit", *A, "--amount", "1", "--asset", "advanced", "--reason", "r"), 2,
     "has no asset 'advanced'"),
    (("deposit", *A, "--amount", "1", "--reason", "  "), 2, "a --reason is required"),
    # options argparse refuses, with the usage
    (("deposit", *A, "--amount", "1"), 2, "the following arguments are required: --reason"),
    (("users", "list", "--paywall", "app", "--limit", "0"), 2, "not a count from 1 to 100000"),
    (("users", "list", "--paywall", "app", "--limit", "many"), 2, "not a count"),
    (("ledger", "export", "--paywall", "app", "--format", "xml"), 2, "invalid choice: 'xml'"),
    (("ledger", "export", "--paywall", "app", "--format", "csv", "--since", "yesterday"), 2,
     "not a date: 'yesterday'"),
    (("revenue", "--paywall", "app", "--by", "week"), 2, "invalid choice: 'week'"),
]


def test_every_bad_input_is_a_plain_refusal(seeded: Seeded) -> None:
    """Each refused with its message and exit status, never a traceback, moving
    nothing (run side by side: each is a process of its own)."""
    count = len(query(seeded.url, "SELECT id FROM entries"))
    commands = [tuple(seeded.alice if a == "ALICE" else a for a in c) for c, _, _ in REFUSALS]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: cli(seeded, *c), commands))
    wrong = [f"{' '.join(c)}: exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}"
             for (c, status, message), r in zip(REFUSALS, results, strict=True)
             if r.returncode != status or message not in r.stderr or r.stdout
             or "Traceback" in r.stderr]
    assert wrong == []
    assert len(query(seeded.url, "SELECT id FROM entries")) == count


# ---- revenue ------------------------------------------------------------------------

def charges(seeded: Seeded) -> list[Any]:
    return query(seeded.url, "SELECT a.user_id, e.model, e.created_at, -e.amount AS amount"
                             " FROM entries e JOIN accounts a ON a.id = e.account_id"
                             " WHERE a.paywall_id = 'app' AND e.kind = 'charge'")


def table(out: str) -> list[list[str]]:
    lines = out.splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]


@pytest.mark.parametrize("by", ["day", "model", "user"])
def test_revenue_matches_the_charges(seeded: Seeded, by: str) -> None:
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in charges(seeded):
        name = {"day": c["created_at"].astimezone(UTC).strftime("%Y-%m-%d"),
                "model": c["model"], "user": c["user_id"]}[by]
        want[name][0] += c["amount"]
        want[name][1] += 1
    out = ok(cli(seeded, "revenue", "--paywall", "app", "--by", by))
    assert out.splitlines()[0].split() == [by, "asset", "amount", "charges"]
    rows = table(out)
    got = {r[0]: [r[1], Decimal(r[2]), int(r[3])] for r in rows if r[0] != "total"}
    assert got == {k: ["usd", to_decimal(n, USD), count] for k, (n, count) in want.items()}
    total = rows[-1]
    assert total[:2] == ["total", "usd"] and len([r for r in rows if r[0] == "total"]) == 1
    assert Decimal(total[2]) == to_decimal(sum(n for n, _ in want.values()), USD)
    assert int(total[3]) == sum(count for _, count in want.values()) == 7
    if by == "model":
        assert set(got) == {"small", "big"} and got["big"][2] == 3
        assert [r[0] for r in rows[:2]] == sorted(got, key=lambda k: -want[k][0])


def test_revenue_since_tomorrow_is_empty(seeded: Seeded) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    out = ok(cli(seeded, "revenue", "--paywall", "app", "--by", "user", "--since", tomorrow))
    assert out.split() == ["user", "asset", "amount", "charges"]


# ---- the ledger's export ------------------------------------------------------------

def export(seeded: Seeded, fmt: str, *extra: str) -> list[dict[str, Any]]:
    out = ok(cli(seeded, "ledger", "export", "--paywall", "app", "--format", fmt, *extra))
    if fmt == "jsonl":
        return [json.loads(line) for line in out.splitlines()]
    return list(csv.DictReader(io.StringIO(out)))


def test_the_csv_export_of_a_ledger_sums_to_the_balance(seeded: Seeded) -> None:
    rows = export(seeded, "csv")
    header = ok(cli(seeded, "ledger", "export", "--paywall", "app", "--format", "csv",
                    "--since", "2999-01-01"))
    from proxy.console import EXPORT_FIELDS

    assert header.strip().split(",") == [*EXPORT_FIELDS, "amount_units", "balance_after_units"]
    accounts = query(seeded.url, "SELECT user_id, asset, balance, (SELECT count(*) FROM"
                                 " entries WHERE account_id = a.id) AS n FROM accounts a"
                                 " WHERE paywall_id = 'app'")
    assert len(rows) == sum(a["n"] for a in accounts)
    sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    raw: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        sums[r["user"], r["asset"]] += Decimal(r["amount"])
        raw[r["user"], r["asset"]] += int(r["amount_units"])
        assert Decimal(r["amount"]) == to_decimal(int(r["amount_units"]), USD if r["asset"]
                                                  == "usd" else 0)
    for a in accounts:
        scale = USD if a["asset"] == "usd" else 0
        assert sums[a["user_id"], a["asset"]] == to_decimal(a["balance"], scale), a
        assert raw[a["user_id"], a["asset"]] == a["balance"], a
    ids = [int(r["id"]) for r in rows]
    assert ids == sorted(ids)
    kinds = {r["kind"] for r in rows}
    assert {"grant", "charge", "deposit"} <= kinds
    charge = next(r for r in rows if r["kind"] == "charge")
    assert charge["model"] in ("small", "big") and int(charge["prompt_tokens"]) > 0
    assert datetime.fromisoformat(charge["created_at"]).tzinfo is not None


def test_the_jsonl_export_has_the_same_rows(seeded: Seeded) -> None:
    as_csv, as_jsonl = export(seeded, "csv"), export(seeded, "jsonl")
    assert len(as_csv) == len(as_jsonl) > 0

    def text(value: Any) -> str:
        if isinstance(value, dict):
            return json.dumps(value, separators=(",", ":"))
        return "" if value is None else str(value)

    for c, j in zip(as_csv, as_jsonl, strict=True):
        assert set(c) == set(j)
        assert json.loads(c.pop("metadata")) == j["metadata"]
        assert c == {k: text(v) for k, v in j.items() if k != "metadata"}
        assert isinstance(j["amount"], str) and isinstance(j["amount_units"], int)


def test_the_export_of_one_user_since_a_day(seeded: Seeded) -> None:
    mine = export(seeded, "jsonl", "--user", seeded.bob)
    assert mine and {r["user"] for r in mine} == {seeded.bob}
    assert [r["id"] for r in mine] == [r["id"] for r in export(seeded, "jsonl")
                                       if r["user"] == seeded.bob]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert len(export(seeded, "jsonl", "--since", today)) > 0
    assert export(seeded, "jsonl", "--since", "2999-01-01") == []
