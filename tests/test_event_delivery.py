"""Webhook delivery under faults, end to end: the proxy as real processes on one database,
receivers over real HTTP that verify every delivery (:mod:`tests.webhook_receiver`).

- A receiver that fails its first attempts still gets every event, and each user's
  events arrive in their order (a later one waits while an earlier one is retried).
- Events committed with the ledger survive a proxy killed with SIGKILL before it could
  deliver them (some not even fanned out yet): the next process on the same database
  delivers them.
- Two replicas deliver at once without sending one event twice, at the same time or one
  after the other (a receiver that holds each request 20 ms would see two sends of one
  event overlap), and each charge of a burst is delivered.
- A burst of 1,000 charges gives 1,000 deliveries, one per request, each charge of the
  ledger told.
- A subscription that never succeeds is given up after the retry window and disabled,
  and the paywall's healthy subscription is told.
- No delivery reaches a loopback address without ``allow_private``, and no redirect is
  followed.

Each test has a database of its own, so no subscription or pending delivery of one is
seen by the proxies of another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from proxy import db
from proxy import settings as config_module
from proxy.errors import DatabaseUnavailable
from proxy.events import Events
from proxy.observe import Metrics
from proxy.tasks import TaskSet
from tests.conftest import (
    Proxy,
    echo_model,
    eventually,
    fresh_database,
    mint_keys,
    new_user,
    parse_metrics,
    start_proxy,
    stop_proxy,
)
from tests.test_events import arrived, ask, whsec
from tests.upstream import Upstream, free_port, serve_asgi
from tests.webhook_receiver import Receiver, serve_receiver

HELLO = [{"role": "user", "content": "hi"}]


# ---- settings, processes, clients -------------------------------------------------------

@dataclass
class Hook:
    name: str
    url: str
    secret: str
    events: Sequence[str] = ("*",)
    allow_private: bool = True


def config(upstream: Upstream, paywall: str, hooks: Sequence[Hook], **events: float) -> str:
    """One paywall (a flat 0.001 a request, 1 to start with: a thousand requests a user)
    whose subscriptions are ``hooks``, each sending an ``X-Sub`` header with its name;
    ``events`` overrides the delivery settings."""
    tuned = {"poll_seconds": 0.1, "first_retry_seconds": 0.2, "max_retry_seconds": 1.0,
             **events}
    subs = "".join(f"""
[paywalls.{paywall}.webhooks.{h.name}]
url = "{h.url}"
events = [{", ".join(f'"{e}"' for e in h.events)}]
secret = "{h.secret}"
allow_private = {str(h.allow_private).lower()}
headers = {{ "X-Sub" = "{h.name}" }}
""" for h in hooks)
    return f"""
[database]
pool_max = 4
[events]
{chr(10).join(f"{k} = {v}" for k, v in tuned.items())}
{echo_model(upstream, "0.001")}
[paywalls.{paywall}]
name = "Delivery app"
starter_grant = "1"
{subs}"""


@pytest.fixture
def database(pg_server: str) -> Iterator[str]:
    """A migrated database for this test alone."""
    with fresh_database(pg_server) as url:
        yield url


def write_config(workdir: Path, text: str) -> Path:
    path = workdir / "proxy.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def proxies(config_path: Path, database: str, workdir: Path, n: int = 1
            ) -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    try:
        for _ in range(n):
            started.append(start_proxy(config_path, database, workdir))
        yield started
    finally:
        for p in started:
            stop_proxy(p)


def sdk(proxy: Proxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


def api(proxy: Proxy, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proxy.url, timeout=30,
                             headers={"Authorization": f"Bearer {key}"})


async def subscription_ids(client: httpx.AsyncClient) -> dict[str, str]:
    r = await client.get("/v1/webhooks/subscriptions")
    assert r.status_code == 200, r.text
    return {s["name"]: s["id"] for s in r.json()["data"]}


async def delivery_log(client: httpx.AsyncClient, subscription: str, **params: str
                       ) -> list[dict[str, Any]]:
    """Every row of the delivery log of one subscription (so seq is unique), all pages."""
    out: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        q = {**params, "subscription": subscription, "limit": "100"}
        if before is not None:
            q["before"] = str(before)
        r = await client.get("/v1/webhooks/deliveries", params=q)
        assert r.status_code == 200, r.text
        page = r.json()
        out += page["data"]
        if not page["has_more"]:
            return out
        before = page["next_before"]


async def burst(targets: Sequence[tuple[Proxy, str]], key: str, at_once: int, tag: str
                ) -> tuple[list[str], list[str]]:
    """One chat request per (proxy, user) of ``targets``, ``at_once`` in flight, each with
    a request id of its own (``tag-<n>``): those ids, and the ids of the requests whose
    answer never arrived (the connection dropped). Every answer is a charged 200."""
    gate = asyncio.Semaphore(at_once)
    limits = httpx.Limits(max_connections=at_once, max_keepalive_connections=at_once)
    lost: list[str] = []
    async with httpx.AsyncClient(timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def one(n: int, proxy: Proxy, user: str) -> str:
            rid = f"{tag}-{n}"
            async with gate:
                try:
                    r = await client.post(f"{proxy.base_url}/chat/completions", json={
                        "model": "echo", "user": user, "messages": HELLO},
                        headers={"x-request-id": rid})
                except httpx.TransportError:
                    lost.append(rid)
                    return rid
            assert r.status_code == 200, r.text
            assert "x-paywall-action" not in r.headers
            assert r.headers["x-request-id"] == rid
            return rid

        ids = await asyncio.gather(*(one(n, p, u) for n, (p, u) in enumerate(targets)))
    return list(ids), lost


async def ledger_charges(database: str) -> list[str]:
    """The request ids of the ledger's charges, from the database itself."""
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT request_id FROM entries WHERE kind = 'charge'")
    finally:
        await conn.close()
    return sorted(r["request_id"] for r in rows)


def charged_request_ids(receiver: Receiver) -> list[str]:
    return [e["request_id"] for e in receiver.events("charge.created")]


async def until_charged(receiver: Receiver, request_ids: Sequence[str], within: float
                        ) -> None:
    want = set(request_ids)

    async def all_in() -> bool:
        return want <= set(charged_request_ids(receiver))

    await eventually(all_in, f"{len(want)} charge.created deliveries", within=within)


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    started: float
    ended: float | None = None  # when the whole answer was sent


def watching(app: Any, hits: list[Hit], delay: float = 0.0) -> Any:
    """``app`` with every HTTP request it is sent recorded, whatever its method or path
    (a redirect followed as a GET never reaches the receiver's POST route), from its
    arrival to the end of its answer, held ``delay`` seconds before ``app`` sees it (a
    receiver that takes its time: two sends of one event at once then overlap)."""
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        hit = Hit(scope["method"], scope["path"],
                  {k.decode().lower(): v.decode() for k, v in scope["headers"]},
                  time.monotonic())
        hits.append(hit)
        await asyncio.sleep(delay)

        async def answer(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                hit.ended = time.monotonic()

        await app(scope, receive, answer)

    return asgi


def most_at_once(hits: Sequence[Hit]) -> dict[str, int]:
    """For each webhook-id, the most requests with it that were open at the same time."""
    spans: dict[str, list[tuple[float, int]]] = {}
    for h in hits:
        ends = h.ended if h.ended is not None else float("inf")
        spans.setdefault(h.headers.get("webhook-id", ""), []).extend(
            [(h.started, 1), (ends, -1)])
    out: dict[str, int] = {}
    for msg_id, marks in spans.items():
        open_, most = 0, 0
        for _, step in sorted(marks, key=lambda m: (m[0], m[1])):  # an end before a start
            open_ += step
            most = max(most, open_)
        out[msg_id] = most
    return out


@contextlib.contextmanager
def watched_receiver(secret: str, delay: float = 0.0
                     ) -> Iterator[tuple[Receiver, list[Hit]]]:
    """A :class:`Receiver` served with every request to its port recorded (and held
    ``delay`` seconds first)."""
    receiver = Receiver(secret, free_port())
    hits: list[Hit] = []
    with serve_asgi(watching(receiver.app(), hits, delay), receiver.port):
        yield receiver, hits


@contextlib.contextmanager
def redirector(location: str) -> Iterator[tuple[str, list[Hit]]]:
    """A server answering every request to ``/<code>`` with that redirect status and
    ``Location: location``; its base URL and what it was sent."""
    hits: list[Hit] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        code = int(scope["path"].strip("/"))
        await send({"type": "http.response.start", "status": code,
                    "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    with serve_asgi(watching(app, hits)) as port:
        yield f"http://127.0.0.1:{port}", hits


async def kill_hard_between_attempts(proxy: Proxy, database: str) -> tuple[int, int]:
    """SIGKILL the proxy at a moment it holds no delivery lease (a delivery leased by a
    killed process is only retried once its lease runs out, a minute later): stop it
    (SIGSTOP), let any statement it sent finish, and kill it if no lease is held, else
    let it run a little and try again. How many events were not yet fanned out, and how
    many deliveries were pending, when it was killed."""
    pid = proxy.process.pid
    conn = await asyncpg.connect(database)
    try:
        for _ in range(40):
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.3)
            leased = await conn.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE lease_until > now()")
            if leased == 0:
                proxy.process.kill()
                proxy.process.wait()
                unfanned = await conn.fetchval("SELECT count(*) FROM events WHERE NOT fanned")
                pending = await conn.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
                return int(unfanned), int(pending)
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError("the proxy always held a delivery lease")


@contextlib.asynccontextmanager
async def polling(probe: Callable[[], Awaitable[None]], every: float = 0.05
                  ) -> AsyncIterator[None]:
    """``probe()`` every ``every`` seconds in the background while the block runs."""
    async def loop() -> None:
        while True:
            await probe()
            await asyncio.sleep(every)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(loop())
        try:
            yield
        finally:
            task.cancel()


# ---- 1. retries keep each user's order --------------------------------------------------

async def test_a_receiver_failing_at_first_gets_every_event_in_each_users_order(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    failures = 6
    (key,) = (await mint_keys(database, ["late"])).values()
    with serve_receiver(whsec()) as receiver:
        receiver.fail_first = failures
        path = write_config(tmp_path, config(upstream, "late", [
            Hook("all", receiver.url, receiver.secret)]))
        with proxies(path, database, tmp_path) as (proxy,):
            async with api(proxy, key) as paywall:
                sub = (await subscription_ids(paywall))["all"]
                refused: dict[str, dict[str, Any]] = {}  # the log while it fails

                async def note_refusals() -> None:
                    for d in await delivery_log(paywall, sub, status="pending"):
                        if d["last_status"] is not None:
                            refused[d["event_id"]] = d

                users = [new_user("ann"), new_user("bob")]
                request_ids: dict[str, list[str]] = {u: [] for u in users}
                async with polling(note_refusals):
                    async with sdk(proxy, key) as client:
                        for _ in range(4):  # ann, bob, ann, bob, ...: their events interleave
                            for u in users:
                                r = await ask(client, u)
                                request_ids[u].append(r.headers["x-request-id"])
                    for u in users:
                        async def four(u: str = u) -> bool:
                            return len(receiver.events("charge.created", u)) == 4

                        await eventually(four, f"4 charges of {u}", within=20)

                async def all_delivered() -> list[dict[str, Any]] | None:
                    log = await delivery_log(paywall, sub)
                    return log if {d["status"] for d in log} == {"delivered"} else None

                log = await eventually(all_delivered, "the log to say delivered")

    assert receiver.fail_first == 0 and receiver.refused == []
    assert receiver.attempts == len(receiver.accepted) + failures
    # Everything was delivered, each event once.
    assert len(log) == 12 and {d["status"] for d in log} == {"delivered"}
    assert {d["event_id"] for d in log} == {e["id"] for e in receiver.events()}
    assert len(receiver.accepted) == len(receiver.events()) == 12
    # Retried: the log showed the receiver's 500 while it failed, and the attempts after.
    assert refused and {(d["last_status"], d["last_error"]) for d in refused.values()} == {
        (500, "HTTP 500")}
    attempts = {d["event_id"]: d["attempts"] for d in log}
    assert all(attempts[e] > 1 for e in refused)
    assert sum(attempts.values()) == receiver.attempts
    # Each user's events arrived in their order: ids and seq ascending.
    seq = {d["event_id"]: d["seq"] for d in log}
    for u in users:
        events = receiver.events(user=u)  # by first arrival
        assert [e["type"] for e in events] == ["user.created", "credits.granted"] + [
            "charge.created"] * 4
        ids = [e["id"] for e in events]
        assert ids == sorted(ids)
        assert [seq[i] for i in ids] == sorted(seq[i] for i in ids)
        assert [e["request_id"] for e in events[2:]] == request_ids[u]
    ann, bob = ([seq[e["id"]] for e in receiver.events(user=u)] for u in users)
    assert min(bob) < max(ann) and min(ann) < max(bob)  # they did interleave


# ---- 2. a hard kill between the commit and the delivery ---------------------------------

@pytest.mark.slow
async def test_events_committed_before_a_hard_kill_are_delivered_by_the_next_process(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    (key,) = (await mint_keys(database, ["killed"])).values()
    with serve_receiver(whsec()) as receiver:
        receiver.down = True
        path = write_config(tmp_path, config(upstream, "killed", [
            Hook("all", receiver.url, receiver.secret)]))
        users = [new_user(f"k{i}") for i in range(3)]
        request_ids: list[str] = []
        first = start_proxy(path, database, tmp_path)
        try:
            async with sdk(first, key) as client, api(first, key) as paywall:
                sub = (await subscription_ids(paywall))["all"]
                for i in range(6):
                    request_ids.append((await ask(client, users[i % 3])).headers[
                        "x-request-id"])

                async def attempted_not_delivered() -> bool:
                    log = await delivery_log(paywall, sub)
                    charges = [d for d in log if d["type"] == "charge.created"]
                    return len(charges) == 6 and {d["status"] for d in log} == {"pending"} \
                        and sum(d["last_status"] == 503 for d in log) == 3

                await eventually(attempted_not_delivered, "the charges pending, undelivered")
                # More, killed right after: likely committed but not even fanned out yet.
                for i in range(3):
                    request_ids.append((await ask(client, users[i])).headers["x-request-id"])
            unfanned, pending = await kill_hard_between_attempts(first, database)
        finally:
            if first.process.poll() is None:
                first.process.kill()
                first.process.wait()
        print(f"killed with {unfanned} events not fanned out and {pending} deliveries pending")
        assert unfanned + pending == 15  # each user's created, granted and 3 charges
        assert first.process.returncode == -signal.SIGKILL
        assert receiver.accepted == [] and receiver.attempts > 0

        receiver.down = False
        with proxies(path, database, tmp_path) as (second,):
            await until_charged(receiver, request_ids, within=20)
            async with api(second, key) as paywall:
                log = await delivery_log(paywall, sub)
    assert sorted(charged_request_ids(receiver)) == sorted(request_ids)
    assert len(log) == 15 and {d["status"] for d in log} == {"delivered"}
    for u in users:
        assert [e["type"] for e in receiver.events(user=u)] == [
            "user.created", "credits.granted"] + ["charge.created"] * 3


# ---- 3. two replicas at once ------------------------------------------------------------

@pytest.mark.slow
async def test_two_replicas_deliver_each_event_once_at_a_time(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    (key,) = (await mint_keys(database, ["twins"])).values()
    users = [new_user(f"r{i}") for i in range(20)]
    with watched_receiver(whsec(), delay=0.02) as (receiver, hits):
        path = write_config(tmp_path, config(upstream, "twins", [
            Hook("all", receiver.url, receiver.secret)]))
        with proxies(path, database, tmp_path, n=2) as pair:
            targets = [(pair[i % 2], users[i % len(users)]) for i in range(200)]
            request_ids, lost = await burst(targets, key, at_once=50, tag="twin")
            await until_charged(receiver, request_ids, within=30)
            await asyncio.sleep(0.5)  # time for a late second delivery to show
            delivered = []
            async with httpx.AsyncClient() as client:
                for p in pair:
                    samples = parse_metrics((await client.get(f"{p.url}/metrics")).text)
                    delivered.append(samples.get(
                        ("paywall_events_delivered_total", frozenset()), 0.0))
            async with api(pair[0], key) as paywall:
                sub = (await subscription_ids(paywall))["all"]
                log = await delivery_log(paywall, sub)

    expected = 200 + 2 * len(users)  # a charge each, and each user's created and granted
    assert await ledger_charges(database) == sorted(request_ids)  # (even an answer lost)
    assert sorted(charged_request_ids(receiver)) == sorted(request_ids)
    assert len(receiver.events()) == expected
    assert len(log) == expected and {d["status"] for d in log} == {"delivered"}
    assert max(receiver.most_in_flight_per_id.values()) <= 1
    assert len(hits) == len(receiver.accepted)
    at_once = {i: n for i, n in most_at_once(hits).items() if n > 1}
    assert at_once == {}  # each held 20 ms: two sends of one event at once would overlap
    copies = Counter(r.event["id"] for r in receiver.accepted)
    duplicates = sum(n - 1 for n in copies.values())
    print(f"two replicas: {len(receiver.accepted)} deliveries of {expected} events,"
          f" {duplicates} duplicates, split {delivered[0]:.0f}/{delivered[1]:.0f},"
          f" answers lost {lost}")
    assert sum(delivered) == len(receiver.accepted)
    assert all(n > 0 for n in delivered)  # both took part
    assert duplicates == 0  # leased: no event sent by both


# ---- 4. a thousand charges --------------------------------------------------------------

@pytest.mark.slow
async def test_a_burst_of_a_thousand_charges_gives_a_thousand_deliveries(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    (key,) = (await mint_keys(database, ["burst"])).values()
    users = [new_user(f"b{i}") for i in range(50)]
    with serve_receiver(whsec()) as receiver:
        path = write_config(tmp_path, config(upstream, "burst", [
            Hook("charges", receiver.url, receiver.secret, events=("charge.created",))]))
        with proxies(path, database, tmp_path) as (proxy,):
            started = time.monotonic()
            request_ids, lost = await burst(
                [(proxy, users[i % 50]) for i in range(1000)], key, at_once=50, tag="burst")
            answered = time.monotonic() - started
            await until_charged(receiver, request_ids, within=40)
            delivered = time.monotonic() - started
            await asyncio.sleep(0.5)
    print(f"1,000 charges: answered in {answered:.1f} s, all delivered in {delivered:.1f} s,"
          f" {len(receiver.accepted)} deliveries, answers lost {lost}")
    assert await ledger_charges(database) == sorted(request_ids)  # (even an answer lost)
    events = receiver.events()
    assert len(events) == 1000 and {e["type"] for e in events} == {"charge.created"}
    assert len({e["id"] for e in events}) == 1000
    assert len(set(request_ids)) == 1000
    assert sorted(e["request_id"] for e in events) == sorted(request_ids)
    assert len(receiver.accepted) == 1000  # none twice
    for u in users[:5]:  # and still in each user's order
        ids = [e["id"] for e in receiver.events(user=u)]
        assert len(ids) == 20 and ids == sorted(ids)


# ---- 5. given up after the retry window -------------------------------------------------

@pytest.mark.slow
async def test_a_receiver_always_down_is_given_up_and_its_subscription_disabled(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    (key,) = (await mint_keys(database, ["window"])).values()
    with serve_receiver(whsec()) as dead, serve_receiver(whsec()) as healthy:
        dead.down = True
        path = write_config(tmp_path, config(upstream, "window", [
            Hook("dead", dead.url, dead.secret), Hook("healthy", healthy.url, healthy.secret)],
            retry_hours=0.0015, first_retry_seconds=0.5, max_retry_seconds=1.0))
        with proxies(path, database, tmp_path) as (proxy,):
            # A subscription is disabled when a delivery is given up and it has had no
            # success for the window (5.4 s) since it was made. A delivery is given up
            # when its next wait (1.25 s at most) would pass the window, so from 4.15 s
            # after its event: with the subscription made 1.5 s before the events, it is
            # then older than the window.
            await asyncio.sleep(1.5)
            user = new_user("w")
            async with sdk(proxy, key) as client:
                await ask(client, user)
            async with api(proxy, key) as paywall:
                subs = await subscription_ids(paywall)

                async def disabled() -> dict[str, Any] | None:
                    listed = (await paywall.get("/v1/webhooks/subscriptions")).json()["data"]
                    card = next(s for s in listed if s["name"] == "dead")
                    return None if card["enabled"] else card

                card = await eventually(disabled, "the dead subscription disabled", within=15)

                async def told_healthy() -> list[dict[str, Any]]:
                    return healthy.events("webhook.subscription.disabled")

                told = await eventually(told_healthy, "webhook.subscription.disabled at the"
                                        " healthy subscription")

                async def given_up() -> list[dict[str, Any]] | None:
                    log = await delivery_log(paywall, subs["dead"])
                    return log if {d["status"] for d in log} == {"failed"} else None

                log = await eventually(given_up, "every delivery to the dead one failed")
                attempts_then = dead.attempts
                # Afterwards, nothing more is sent to it; the healthy one goes on.
                later = new_user("w2")
                async with sdk(proxy, key) as client:
                    await ask(client, later)
                await arrived(healthy, later, "charge.created")
                await asyncio.sleep(0.5)
                log_after = await delivery_log(paywall, subs["dead"])
                listed = (await paywall.get("/v1/webhooks/subscriptions")).json()["data"]

    assert card["disabled_reason"].startswith("no delivery succeeded for 0.0015 h")
    assert "HTTP 503" in card["disabled_reason"]
    assert next(s for s in listed if s["name"] == "healthy")["enabled"] is True
    (event,) = told
    assert event["user"] is None and event["paywall"] == "window"
    assert event["data"]["subscription"] == subs["dead"]
    assert event["data"]["url"] == dead.url and event["data"]["last_error"] == "HTTP 503"
    assert [d["type"] for d in log] == ["charge.created", "credits.granted", "user.created"]
    assert all(d["last_status"] == 503 for d in log)
    assert max(d["attempts"] for d in log) > 1  # retried before being given up
    assert dead.accepted == [] and dead.attempts == sum(d["attempts"] for d in log)
    assert log_after == log and dead.attempts == attempts_then
    assert [e["type"] for e in healthy.events(user=user)] == [
        "user.created", "credits.granted", "charge.created"]


# ---- 6. no SSRF -------------------------------------------------------------------------

async def test_no_delivery_reaches_a_private_address_or_follows_a_redirect(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    (key,) = (await mint_keys(database, ["guarded"])).values()
    with watched_receiver(whsec()) as (private, private_hits), \
            watched_receiver(whsec()) as (good, good_hits), \
            redirector(good.url) as (bouncer, bouncer_hits):
        path = write_config(tmp_path, config(upstream, "guarded", [
            Hook("loopback", private.url, private.secret, allow_private=False),
            Hook("localhost", f"http://localhost:{private.port}/hook", private.secret,
                 allow_private=False),
            Hook("found", f"{bouncer}/302", good.secret),
            Hook("temporary", f"{bouncer}/307", good.secret),
            Hook("good", good.url, good.secret)]))
        with proxies(path, database, tmp_path) as (proxy,):
            user = new_user("s")
            async with sdk(proxy, key) as client:
                await ask(client, user)
            await arrived(good, user, "user.created", "credits.granted", "charge.created")
            async with api(proxy, key) as paywall:
                subs = await subscription_ids(paywall)

                async def tried_twice() -> dict[str, list[dict[str, Any]]] | None:
                    """The logs once each one's first delivery was tried twice (or is
                    no longer pending: it went through)."""
                    logs = {n: await delivery_log(paywall, subs[n])
                            for n in ("loopback", "localhost", "found", "temporary")}
                    first = [d for log in logs.values() for d in log
                             if d["type"] == "user.created"]
                    return logs if len(first) == 4 and all(
                        d["attempts"] >= 2 or d["status"] != "pending" for d in first) \
                        else None

                logs = await eventually(tried_twice, "two attempts at each refused one")

    # Nothing was sent to the private address, by IP or by name.
    assert private_hits == [] and private.attempts == 0
    # (A user's later events wait behind the first: only user.created was attempted.)
    for name, host in (("loopback", "127.0.0.1"), ("localhost", "localhost")):
        tried = [d for d in logs[name] if d["attempts"]]
        assert [d["type"] for d in tried] == ["user.created"]
        for d in tried:
            assert d["status"] == "pending" and d["last_status"] is None
            assert d["last_error"].startswith(host), d
            assert "not a public address" in d["last_error"], d
    # The redirects were answered, and not followed: failed attempts.
    assert {(h.method, h.path) for h in bouncer_hits} == {("POST", "/302"), ("POST", "/307")}
    for name, code in (("found", 302), ("temporary", 307)):
        tried = [d for d in logs[name] if d["attempts"]]
        assert [d["type"] for d in tried] == ["user.created"]
        for d in tried:
            assert d["status"] == "pending"
            assert (d["last_status"], d["last_error"]) == (code, f"HTTP {code}"), d
    # The good receiver got its own subscription's deliveries only.
    assert {h.headers.get("x-sub") for h in good_hits} == {"good"}
    assert {(h.method, h.path) for h in good_hits} == {("POST", "/hook")}
    assert len(good.accepted) == len(good_hits) == 3


# ---- 7. a sent delivery whose outcome the database refuses at first -----------------------

class RefusesOnce:
    """The proxy's pool, except that the first statement containing ``marker`` fails as
    if the database had just gone away."""

    def __init__(self, pool: db.Database, marker: str):
        self.pool = pool
        self.marker = marker
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def _refuse(self, query: str) -> None:
        if self.marker in query and not self.refused:
            self.refused += 1
            raise DatabaseUnavailable()

    async def fetchval(self, query: str, *args: Any) -> Any:
        self._refuse(query)
        return await self.pool.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        self._refuse(query)
        return await self.pool.execute(query, *args)


async def test_a_sent_delivery_whose_outcome_is_refused_once_is_written_not_left_leased(
        upstream: Upstream, database: str, tmp_path: Path) -> None:
    """Sent and received, but the database is unavailable for the write of that outcome:
    the write is tried again, so the delivery is not sent a second time when its lease
    ends, nor does it hold up the user's later events for the rest of the lease."""
    with serve_receiver(whsec()) as receiver:
        settings = config_module.load(
            write_config(tmp_path, config(upstream, "blip", [
                Hook("all", receiver.url, receiver.secret)])), {"DATABASE_URL": database})
        pool = await db.create_pool(database, 1, 4)
        events = Events(settings, RefusesOnce(pool, "SET status = 'delivered'"), Metrics(),
                        TaskSet())
        try:
            await events.sync()
            await events.emit("blip", "u1", "balance.low", {"threshold": 1})
            assert await events.round() == 1
            row = await pool.fetchrow("SELECT status, lease_until, attempts"
                                      " FROM webhook_deliveries")
        finally:
            await events.close()
            await pool.close()
    assert events.pool.refused == 1
    assert (row["status"], row["lease_until"], row["attempts"]) == ("delivered", None, 1)
    assert [e["type"] for e in receiver.events()] == ["balance.low"]
    assert len(receiver.accepted) == 1
