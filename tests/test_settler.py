"""Settlements the database refused: kept, retried, spooled at shutdown, replayed once.

The end-to-end tests run the proxy as a real process whose PostgreSQL sits behind a
TCP forwarder (:mod:`tests.forwarder`): cutting it drops every connection and
refuses new ones, which is PostgreSQL out of reach for the proxy while the tests
still read the ledger directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy import reaper, spool
from proxy.pricing import Usage, format_amount
from proxy.settler import RETRY_MOST, Owed, backoff
from tests.conftest import (
    Proxy,
    eventually,
    mint_keys,
    new_user,
    parse_metrics,
    start_proxy,
    stop_proxy,
)
from tests.forwarder import Forwarder, forwarding
from tests.upstream import CHUNKS, Upstream

# ---- pure parts ----------------------------------------------------------------------


@pytest.mark.parametrize("owed", [
    Owed(1, 105550, Usage(5, 8), "completed", None, "req_1"),
    Owed(2, 7, Usage(5, 8, cached_tokens=2, reasoning_tokens=3), "partial",
         {"uncharged": 12}, "req_2"),
    Owed(3, None, None, "failed"),
    Owed(4, 0, Usage(0, 0), "aborted", {}, ""),
])
def test_an_owed_settlement_survives_its_spool_line(owed: Owed) -> None:
    assert Owed.from_line(owed.line()) == owed
    assert b"\n" not in owed.line()


@pytest.mark.parametrize(("owed", "checkpoint"), [
    (Owed(1, 105550, Usage(5, 8), "completed"),
     {"prompt_tokens": 5, "completion_tokens": 8, "cost": 105550}),
    # A void owed: a checkpoint of cost 0, which a reaper voids (never an older cost).
    (Owed(2, None, None, "failed"), {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0}),
])
def test_an_owed_hold_is_checkpointed_at_its_final_cost(owed: Owed,
                                                        checkpoint: dict[str, Any]) -> None:
    assert owed.checkpoint() == checkpoint


@pytest.mark.parametrize(("attempt", "seconds"), [
    (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, RETRY_MOST), (50, RETRY_MOST)])
def test_retries_back_off(attempt: int, seconds: float) -> None:
    assert backoff(attempt) == pytest.approx(seconds)


@pytest.mark.parametrize(("now", "failed_at", "ttl", "reap"), [
    (100.0, None, 60.0, True),  # no failure seen
    (100.0, 90.0, 60.0, False),  # the database answered again 10 s ago
    (150.0, 90.0, 60.0, True),  # ...and 60 s later, every live process renewed its holds
    (100.0, 99.9, 0.0, True),
])
def test_a_reaper_waits_a_hold_ttl_after_an_outage(now: float, failed_at: float | None,
                                                   ttl: float, reap: bool) -> None:
    assert reaper.may_reap(now, failed_at, ttl) is reap


@pytest.fixture
def forwarder(own_database_url: str) -> Iterator[Forwarder]:
    with forwarding(own_database_url) as fwd:
        yield fwd


# ---- the proxy behind it -------------------------------------------------------------

PAYWALL = "owed"
# usd units (1e-9): per request 0.0001, 0.15 and 0.60 per million prompt/completion tokens.
PER_REQUEST, INPUT, OUTPUT = 100_000, 150_000_000, 600_000_000
MILLION = 1_000_000
LINGER = 3.0  # seconds each in-flight completion takes upstream


def cost(prompt: int, completion: int) -> int:
    return -(-(PER_REQUEST * MILLION + prompt * INPUT + completion * OUTPUT) // MILLION)


STREAM_CHARGE = cost(5, CHUNKS)  # the upstream's usage for a linger stream: 5 + CHUNKS
COMPLETION_CHARGE = cost(5, 2)  # ...and for a linger completion: 5 + 2


def config(upstream: Upstream) -> str:
    price = '{ per_request = "0.0001", input_per_million = "0.15", output_per_million = "0.60" }'
    return f"""
[upstream]
read_timeout = 30.0
stream_idle_timeout = 30.0

[database]
connect_timeout = 1.0
command_timeout = 2.0

[billing]
hold_ttl_seconds = 3.0
reaper_interval_seconds = 0.5
shutdown_settle_seconds = 1.0

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[models.slow]
provider = "up"
upstream = "linger-{LINGER}"
price = {price}

[models.echo]
provider = "up"
upstream = "echo"
price = {price}

[paywalls.{PAYWALL}]
starter_grant = "1"
"""


@contextlib.asynccontextmanager
async def proxy_on(config_path: Path, database_url: str, workdir: Path,
                   args: tuple[str, ...] = ()) -> AsyncIterator[Proxy]:
    proxy = await asyncio.to_thread(start_proxy, config_path, database_url, workdir,
                                    None, args)
    try:
        yield proxy
    finally:
        await asyncio.to_thread(stop_proxy, proxy)



async def holds_of(pg: Any, user: str) -> list[Any]:
    return list(await pg.fetch(
        "SELECT h.* FROM holds h JOIN accounts a ON a.id = h.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY h.id", PAYWALL, user))


async def charges_of(pg: Any, user: str) -> list[Any]:
    return list(await pg.fetch(
        "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 AND e.kind = 'charge' ORDER BY e.id",
        PAYWALL, user))


async def check_books(pg: Any, user: str) -> None:
    """The balance is the fold of the user's entries, ``held`` the pending holds', and
    each posted hold has one entry."""
    acc = await pg.fetchrow("SELECT * FROM accounts WHERE paywall_id = $1 AND user_id = $2",
                            PAYWALL, user)
    entries = await pg.fetch("SELECT e.* FROM entries e WHERE e.account_id = $1", acc["id"])
    holds = await holds_of(pg, user)
    assert acc["balance"] == sum(e["amount"] for e in entries)
    assert acc["held"] == sum(h["amount"] for h in holds if h["status"] == "pending")
    per_hold = [e["hold_id"] for e in entries if e["hold_id"] is not None]
    assert sorted(per_hold) == sorted(h["id"] for h in holds if h["status"] == "posted")


def in_flight(http: httpx.AsyncClient, user: str, streams: int, completions: int
              ) -> asyncio.Future[list[tuple[int, bytes]]]:
    """``streams`` streaming and ``completions`` plain slow completions, sent at once."""
    async def one(stream: bool) -> tuple[int, bytes]:
        body = {"model": "slow", "user": user, "stream": stream,
                "messages": [{"role": "user", "content": "Hello"}]}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            return r.status_code, await r.aread()

    return asyncio.gather(*(one(i < streams) for i in range(streams + completions)))


def all_held(pg: Any, upstream: Upstream, user: str, n: int
             ) -> Callable[[], Awaitable[bool]]:
    """A probe: ``n`` holds of the user's placed, and forwarded (the proxy has their
    replies on the way)."""
    async def probe() -> bool:
        return len(await holds_of(pg, user)) == n and forwarded(upstream, user) == n

    return probe


async def cut_while_in_flight(http: httpx.AsyncClient, pg: Any, upstream: Upstream,
                              forwarder: Forwarder, user: str, streams: int,
                              completions: int) -> tuple[list[tuple[int, bytes]], float]:
    """:func:`in_flight`, PostgreSQL cut once every hold is placed and forwarded; the
    replies, and when the cut was."""
    replying = in_flight(http, user, streams, completions)
    n = streams + completions
    await eventually(all_held(pg, upstream, user, n), f"{n} holds")
    forwarder.cut()
    cut_at = time.monotonic()
    return await replying, cut_at


def forwarded(upstream: Upstream, user: str) -> int:
    """The user's requests the upstream has been sent."""
    return sum(1 for s in list(upstream.seen) if s.body.get("user") == user)


async def owed(http: httpx.AsyncClient) -> float:
    """The proxy's paywall_settlements_owed gauge."""
    samples = parse_metrics((await http.get("/metrics")).text)
    return samples["paywall_settlements_owed", frozenset()]


async def assert_charged_at_usage(pg: Any, user: str, streams: int, completions: int,
                                  outcome: str = "completed") -> None:
    holds = await holds_of(pg, user)
    assert [h["status"] for h in holds] == ["posted"] * (streams + completions)
    charges = await charges_of(pg, user)
    got = sorted((-e["amount"], e["prompt_tokens"], e["completion_tokens"], e["outcome"])
                 for e in charges)
    assert got == sorted([(STREAM_CHARGE, 5, CHUNKS, outcome)] * streams
                         + [(COMPLETION_CHARGE, 5, 2, outcome)] * completions)
    await check_books(pg, user)


@pytest.mark.slow
async def test_a_database_outage_while_requests_settle_loses_no_charge(
        upstream: Upstream, own_database_url: str, forwarder: Forwarder, pg: Any,
        tmp_path: Path) -> None:
    """PostgreSQL out of reach for 7 s (more than the hold TTL) while 10 completions
    settle: once it is back, each is charged once, at the provider's usage."""
    path = tmp_path / "proxy.toml"
    path.write_text(config(upstream))
    key = (await mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    user = new_user("outage")
    streams, completions = 5, 5
    async with proxy_on(path, forwarder.url(own_database_url), tmp_path) as proxy, \
            httpx.AsyncClient(base_url=proxy.url, timeout=60,
                              headers={"Authorization": f"Bearer {key}"}) as http:
        replies, cut_at = await cut_while_in_flight(http, pg, upstream, forwarder, user,
                                                    streams, completions)
        assert time.monotonic() - cut_at < 7, "the completions settled after the outage"
        assert all(status == 200 for status, _ in replies)
        assert all(body.endswith(b"data: [DONE]\n\n") for _, body in replies[:streams])
        # A stream settles once its last byte is out: its failed write may come a moment
        # after the client saw [DONE].
        async def all_owed() -> bool:
            return await owed(http) == streams + completions

        await eventually(all_owed, "10 settlements owed", within=5)
        await asyncio.sleep(max(0.0, cut_at + 7 - time.monotonic()))
        assert all(h["status"] == "pending" for h in await holds_of(pg, user))
        forwarder.restore()

        async def resolved() -> bool:
            return all(h["status"] != "pending" for h in await holds_of(pg, user))

        await eventually(resolved, "every hold resolved")
        await asyncio.sleep(1.5)  # a reaper round or three: nothing more may happen
        await assert_charged_at_usage(pg, user, streams, completions)
        assert await owed(http) == 0
        assert "Traceback" not in proxy.output()


@pytest.mark.slow
@pytest.mark.parametrize("after", [False, True], ids=["settled-first", "settled-after"])
async def test_settlements_owed_outlive_their_process(
        upstream: Upstream, own_database_url: str, forwarder: Forwarder, pg: Any,
        tmp_path: Path, after: bool) -> None:
    """Answers whose posts the database refuses (sent, with ``settle_after_answer``,
    before their posts were even tried) are in the process's journal; the process killed
    (SIGKILL: no shutdown, what it owed in memory gone with it), a live replica's
    reaper posts them from the journal before any hold expires, each once, at the
    provider's usage, and the journal goes."""
    path = tmp_path / "proxy.toml"
    path.write_text(config(upstream).replace(
        "[billing]\nhold_ttl_seconds = 3.0",
        f"[billing]\nsettle_after_answer = {str(after).lower()}\nhold_ttl_seconds = 15.0"))
    key = (await mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    user = new_user("journaled")
    streams, completions = 2, 2
    spool_dir = tmp_path / ".paywall" / "spool"
    async with proxy_on(path, own_database_url, tmp_path) as live, \
            proxy_on(path, forwarder.url(own_database_url), tmp_path) as doomed, \
            httpx.AsyncClient(base_url=doomed.url, timeout=60,
                              headers={"Authorization": f"Bearer {key}"}) as http:
        replies, cut_at = await cut_while_in_flight(http, pg, upstream, forwarder, user,
                                                    streams, completions)
        assert all(status == 200 for status, _ in replies)
        if after:  # the cost is known before the post: the answer says it
            costs = [orjson.loads(body)["usage"]["cost"] for _, body in replies[streams:]]
            assert costs == [format_amount(COMPLETION_CHARGE, 9)] * completions

        async def all_owed() -> bool:
            return await owed(http) == streams + completions

        await eventually(all_owed, "4 settlements owed", within=5)
        [journal] = spool.files(spool_dir, spool.JOURNALS)
        assert f"-{doomed.process.pid}-" in journal.name
        lines = [orjson.loads(line) for line in journal.read_bytes().split()]
        # Each hold once as owed, and with settle_after_answer once more as answered.
        assert len(lines) == (streams + completions) * (2 if after else 1)
        assert sorted({line["hold_id"]: line["charge"] for line in lines}.values()) == sorted(
            [STREAM_CHARGE] * streams + [COMPLETION_CHARGE] * completions)
        doomed.process.kill()
        await asyncio.to_thread(doomed.process.wait, 10)
        assert all(h["status"] == "pending" for h in await holds_of(pg, user))

        async def posted() -> bool:
            return all(h["status"] == "posted" for h in await holds_of(pg, user))

        await eventually(posted, "the journal posted by the live replica", within=5)
        assert time.monotonic() - cut_at < 15, "posted by a reaper at the hold's expiry"
        await assert_charged_at_usage(pg, user, streams, completions)
        await eventually(lambda: asyncio.to_thread(
            lambda: not spool.files(spool_dir, spool.JOURNALS)), "the journal removed")
        assert "Traceback" not in live.output()


@pytest.mark.slow
async def test_what_is_owed_at_sigterm_is_spooled_and_replayed_once(
        upstream: Upstream, own_database_url: str, forwarder: Forwarder, pg: Any,
        tmp_path: Path) -> None:
    """SIGTERM while PostgreSQL is out of reach: the owed settlements go to the spool;
    the next start posts them; a spool replayed again (a crash before its removal)
    charges nothing more, even with two workers replaying at once."""
    path = tmp_path / "proxy.toml"
    path.write_text(config(upstream))
    key = (await mint_keys(own_database_url, [PAYWALL]))[PAYWALL]
    user = new_user("spooled")
    streams, completions = 2, 2
    spool_dir = tmp_path / ".paywall" / "spool"
    url = forwarder.url(own_database_url)
    async with proxy_on(path, url, tmp_path) as first, \
            httpx.AsyncClient(base_url=first.url, timeout=60,
                              headers={"Authorization": f"Bearer {key}"}) as http:
        replies, _ = await cut_while_in_flight(http, pg, upstream, forwarder, user,
                                               streams, completions)
        assert all(status == 200 for status, _ in replies)
        first.process.terminate()
        code = await asyncio.to_thread(first.process.wait, 15)
        assert code == 0, first.output()
    [spooled] = spool.files(spool_dir)
    lines = [orjson.loads(line) for line in spooled.read_bytes().splitlines()]
    holds = await holds_of(pg, user)
    assert sorted(line["hold_id"] for line in lines) == [h["id"] for h in holds]
    assert all(h["status"] == "pending" for h in holds)
    assert sorted(line["charge"] for line in lines) == sorted(
        [STREAM_CHARGE] * streams + [COMPLETION_CHARGE] * completions)
    kept = tmp_path / "kept.jsonl"
    shutil.copy(spooled, kept)

    forwarder.restore()
    async with proxy_on(path, url, tmp_path):
        # Replayed before the server answered its first request.
        await assert_charged_at_usage(pg, user, streams, completions)
        assert spool.files(spool_dir) == []
    before = [dict(e) for e in await charges_of(pg, user)]

    shutil.copy(kept, spooled)  # as if the last start had died before removing it
    async with proxy_on(path, url, tmp_path, args=("--workers", "2")) as third:
        await eventually(lambda: asyncio.to_thread(lambda: not spool.files(spool_dir)),
                         "the spool replayed again")
        await asyncio.sleep(0.5)
        assert [dict(e) for e in await charges_of(pg, user)] == before
        await assert_charged_at_usage(pg, user, streams, completions)
        assert "resolved already" in third.output()
