"""The metered lifecycle: its rules as tables, and a cancellation at every await.

The cancellation test runs the real app in process (its lifespan, a real PostgreSQL,
the in-process limiter, the built-in mock provider) and pauses the request at the
n-th await of a money or limit operation — admission, hold, opening the user, the
provider call, the relay's writes, posting, voiding, releasing — for n = 1, 2, … until
a request completes without reaching n. At each pause the request is cancelled; once
everything it started has finished, no hold may be pending and no lease live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from proxy import settings as config
from proxy import spool
from proxy.app import create_app, settles_alone
from proxy.batcher import DEFER_SECONDS
from proxy.decide import Action, UserState
from proxy.gateway import charge_for
from proxy.keys import KeyStore
from proxy.lifecycle import Charge, resolution
from proxy.pricing import format_amount
from proxy.relay import Outcome
from tests.conftest import new_user


def state(hold_id: int | None) -> UserState:
    return UserState(exists=True, connected=True, has_account=True, available=10,
                     hold_id=hold_id)


@pytest.mark.parametrize(("held", "action", "charge", "expected"), [
    (None, None, None, ("none", None)),  # nothing was held (admission refused, or free)
    (state(None), Action.TOP_UP, None, ("none", None)),  # the hold was refused
    (state(7), Action.FORWARD, None, ("void", None)),  # cancelled before any answer
    (state(7), Action.FORWARD, Charge(None, "failed"), ("void", None)),  # provider error
    (state(7), Action.FORWARD, Charge(5, "completed"), ("post", 5)),
    (state(7), Action.FORWARD, Charge(0, "completed"), ("post", 0)),  # a free answer
    (state(7), Action.CONNECT, Charge(5, "completed"), ("void", None)),  # never forwarded
    (state(7), None, None, ("void", None)),  # cancelled between the hold and decide
])
def test_resolution(held: UserState | None, action: Action | None, charge: Charge | None,
                    expected: tuple[str, int | None]) -> None:
    assert resolution(held, action, charge) == expected


@pytest.mark.parametrize(("outcome", "sent", "amount"), [
    (Outcome.COMPLETED, 10, 1),
    (Outcome.COMPLETED, 0, 1),  # an empty 2xx answer, delivered
    (Outcome.ABORTED, 10, 1),  # the client left after part of the answer reached it
    (Outcome.ABORTED, 0, None),  # … before any of it
    (Outcome.PARTIAL, 10, None),  # the provider broke off: the client got a cut answer
])
def test_gateway_charge(outcome: Outcome, sent: int, amount: int | None) -> None:
    assert charge_for(outcome, sent) == Charge(amount, outcome.value)


CONFIG = """
[billing]
reaper_interval_seconds = 60
hold_ttl_seconds = 300

[providers.mock]
kind = "mock"
completion_tokens = 3
chunk_delay_ms = 1

[models.m]
provider = "mock"
price = { input_per_million = "1000", output_per_million = "1000" }

[paywalls.app]
starter_grant = "10"

[paywalls.app.limits]
user_concurrency = 5
"""


class Pauser:
    """Stops the request at the ``target``-th call of any wrapped coroutine function
    until released."""

    def __init__(self) -> None:
        self.reset(0)
        self.hit: list[str] = []

    def reset(self, target: int) -> None:
        self.calls = 0
        self.target = target
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def point(self, name: str) -> None:
        self.calls += 1
        if self.calls == self.target:
            self.hit.append(name)
            self.reached.set()
            await self.release.wait()

    def wrap(self, obj: Any, name: str) -> None:
        fn: Callable[..., Awaitable[Any]] = getattr(obj, name)

        async def paused(*args: Any, **kwargs: Any) -> Any:
            await self.point(name)
            return await fn(*args, **kwargs)

        setattr(obj, name, paused)


def chat_scope(key: str) -> dict[str, Any]:
    """The ASGI scope of a chat completion sent with ``key``."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
            "headers": [(b"authorization", f"Bearer {key}".encode()),
                        (b"content-type", b"application/json")]}


async def cancelled_or_done(app: Any, key: str, body: bytes, pauser: Pauser) -> bool:
    """Send one chat completion straight into the ASGI app; cancel it when ``pauser``
    stops it. True when it completed first."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    stays = asyncio.Event()  # the client never leaves on its own

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await stays.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await pauser.point("relay")
        sent.append(message)

    async with asyncio.TaskGroup() as tg:
        request = tg.create_task(app(chat_scope(key), receive, send))
        reached = tg.create_task(pauser.reached.wait())
        await asyncio.wait([request, reached], return_when=asyncio.FIRST_COMPLETED)
        if request.done():
            reached.cancel()
            # A whole answer goes out before its post: one stopped after it goes on.
            pauser.release.set()
            assert sent[0]["status"] == 200
            return True
        request.cancel()
        pauser.release.set()
    return False


async def new_key(url: str) -> str:
    """A new key of the paywall "app"."""
    conn = await asyncpg.connect(url)
    try:
        key, _ = await KeyStore(conn).create("app", "test")
    finally:
        await conn.close()
    return key


@pytest.fixture(params=[False, True], ids=["settled-first", "settled-after"])
def app_settings(own_database_url: str, tmp_path: Path, request: pytest.FixtureRequest
                 ) -> Iterator[config.Settings]:
    """The app's settings, with the answer sent after its post, or before it."""
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG.replace(
        "[billing]\n", f"[billing]\nsettle_after_answer = {str(request.param).lower()}\n"
                       f'spool_dir = "{tmp_path / "spool"}"\n'))
    yield config.load(path, {"DATABASE_URL": own_database_url})


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cancellation_at_every_await_leaves_no_hold_and_no_lease(
        app_settings: config.Settings, own_database_url: str, stream: bool) -> None:
    key = await new_key(own_database_url)
    app = create_app(app_settings)
    starlette = app.app.app.app  # Observe → Cors → HotPath → Starlette
    pauser = Pauser()
    async with starlette.router.lifespan_context(starlette):
        services = starlette.state.services
        for obj, names in ((services.gate, ("admit", "finish")),
                           (services.ledger, ("hold", "open_user", "post", "void")),
                           (services.providers["mock"], ("send",))):
            for name in names:
                pauser.wrap(obj, name)
        past = 0
        target = 0
        while past < 2:  # two targets past the last await, to be sure
            target += 1
            pauser.reset(target)
            user = new_user("cancel")
            body = orjson.dumps({"model": "m", "user": user, "stream": stream,
                                 "messages": [{"role": "user", "content": "hi"}]})
            await cancelled_or_done(app, key, body, pauser)
            await services.tasks.drain()
            # A request may be done while an await of its settlement is still stopped.
            past = 0 if pauser.reached.is_set() else past + 1
            pending = await services.pool.fetchval(
                "SELECT count(*) FROM holds WHERE status = 'pending'")
            assert pending == 0, (target, pauser.hit[-1])
            assert not services.gate._leases, (target, pauser.hit[-1])
            assert not any(services.gate.limiter.leases.values()), (target, pauser.hit[-1])
            assert len(services.live) == 0, (target, pauser.hit[-1])
    # Every kind of await was interrupted at least once.
    expected = {"admit", "hold", "open_user", "send", "post", "finish", "relay"}
    assert expected <= set(pauser.hit), set(pauser.hit)


async def whole_answer(app: Any, key: str, user: str, stream: bool = False,
                       **fields: Any) -> dict[str, Any]:
    """One chat completion (with ``fields`` in its body) straight into the ASGI app: its
    start message (status, headers) and its body (a stream's: its bytes)."""
    body = orjson.dumps({"model": "m", "user": user, "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}],
                         **({"stream_options": {"include_usage": True}} if stream else {}),
                         **fields})
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(chat_scope(key), receive, send)
    content = b"".join(m.get("body", b"") for m in sent[1:])
    return {"status": sent[0]["status"],
            "headers": {k.decode(): v.decode() for k, v in sent[0]["headers"]},
            "body": content if stream else orjson.loads(content)}


async def booked(url: str, user: str) -> tuple[list[asyncpg.Record], list[str]]:
    """The user's charges (amount, balance after, request id), oldest first, and the
    statuses of its holds."""
    conn = await asyncpg.connect(url)
    try:
        charges = await conn.fetch(
            "SELECT e.amount, e.balance_after, e.request_id FROM entries e"
            " JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = 'app' AND a.user_id = $1 AND e.kind = 'charge'"
            " ORDER BY e.id", user)
        holds = await conn.fetch(
            "SELECT h.status FROM holds h JOIN accounts a ON a.id = h.account_id"
            " WHERE a.user_id = $1 ORDER BY h.id", user)
    finally:
        await conn.close()
    return charges, [h["status"] for h in holds]


async def started(own_database_url: str, tmp_path: Path, *, after: bool,
                  grant: str = "10", concurrency: int = 5, output: int = 3,
                  key: str | None = None, synchronous: bool = True) -> tuple[Any, Any, str]:
    """The app with ``billing.settle_after_answer = after`` (and ``synchronous_commit``
    ``synchronous``), the starter grant, the user concurrency and the provider's output
    tokens given, its data in ``tmp_path``; its Starlette app (whose lifespan the test
    runs) and a key (``key``, or a new one)."""
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG.replace("[billing]\n",
                                   f"[billing]\nsettle_after_answer = {str(after).lower()}\n"
                                   f"synchronous_commit = {str(synchronous).lower()}\n"
                                   f'spool_dir = "{tmp_path / "spool"}"\n')
                    .replace('starter_grant = "10"', f'starter_grant = "{grant}"')
                    .replace("user_concurrency = 5", f"user_concurrency = {concurrency}")
                    .replace("completion_tokens = 3", f"completion_tokens = {output}"))
    settings = config.load(path, {"DATABASE_URL": own_database_url})
    if key is None:
        key = await new_key(own_database_url)
    app = create_app(settings)
    return app, app.app.app.app, key  # Observe → Cors → HotPath → Starlette


@pytest.mark.parametrize("after", [True, False])
async def test_a_whole_answer_goes_out_before_its_post_and_shutdown_waits_for_it(
        own_database_url: str, tmp_path: Path, after: bool) -> None:
    """With ``settle_after_answer`` the answer, with its cost and the balance after it,
    is sent while its post is still held up; the post then writes exactly that cost and
    that balance, and the lifespan's end waits for it. Off, nothing is sent before the
    post."""
    app, starlette, key = await started(own_database_url, tmp_path, after=after)
    user = new_user("after")
    posting, go_on = asyncio.Event(), asyncio.Event()
    async with starlette.router.lifespan_context(starlette):
        services = starlette.state.services
        post = services.ledger.post

        async def held_up(*args: Any, **kwargs: Any) -> Any:
            posting.set()
            await go_on.wait()
            return await post(*args, **kwargs)

        services.ledger.post = held_up
        answering = asyncio.ensure_future(whole_answer(app, key, user))  # noqa: TID251
        await asyncio.wait_for(posting.wait(), 10)
        await asyncio.sleep(0.2)  # time enough for an answer that does not wait
        assert answering.done() is after
        if after:
            answer = answering.result()
            asyncio.get_running_loop().call_later(0.3, go_on.set)
        else:
            go_on.set()
            answer = await answering
    # The lifespan is over: every post it started is written.
    assert answer["status"] == 200
    charges, holds = await booked(own_database_url, user)
    assert holds == ["posted"]
    [entry] = charges
    assert entry["request_id"] == answer["headers"]["x-request-id"]
    scale = starlette.state.services.settings.assets["usd"].scale
    assert answer["headers"]["x-paywall-cost"] == format_amount(-entry["amount"], scale)
    assert answer["body"]["usage"]["cost"] == format_amount(-entry["amount"], scale)
    assert answer["headers"]["x-paywall-balance"] == format_amount(entry["balance_after"],
                                                                   scale)
    assert -entry["amount"] > 0


@pytest.mark.parametrize("synchronous", [True, False])
async def test_an_answer_settled_after_it_is_in_the_journal_before_it_goes_out(
        own_database_url: str, tmp_path: Path, synchronous: bool) -> None:
    """Settled after its answer, the charge is written to the journal before the answer
    goes out, and on disk first (the answer waits for the fsync) unless
    ``synchronous_commit`` is off; the post then writes that charge, and the lifespan's
    end removes the journal."""
    app, starlette, key = await started(own_database_url, tmp_path, after=True,
                                        synchronous=synchronous)
    user = new_user("journal")
    syncing, go_on = asyncio.Event(), asyncio.Event()
    async with starlette.router.lifespan_context(starlette):
        journal = starlette.state.services.settlements.journal
        durable = journal.durable

        async def held_up() -> None:
            syncing.set()
            await go_on.wait()
            await durable()

        journal.durable = held_up
        starlette.state.services.ledger.batch.defer_seconds = 30  # no post meanwhile
        answering = asyncio.ensure_future(whole_answer(app, key, user))  # noqa: TID251
        if synchronous:
            await asyncio.wait_for(syncing.wait(), 10)
            await asyncio.sleep(0.2)  # time enough for an answer that does not wait
            assert not answering.done()
            go_on.set()
        answer = await answering
        assert answer["status"] == 200
        assert syncing.is_set() is synchronous
        [path] = spool.files(tmp_path / "spool", spool.JOURNALS)
        [line] = [orjson.loads(raw) for raw in path.read_bytes().splitlines()]
        scale = starlette.state.services.settings.assets["usd"].scale
        assert line["request_id"] == answer["headers"]["x-request-id"]
        assert format_amount(line["charge"], scale) == answer["headers"]["x-paywall-cost"]
        go_on.set()
    assert spool.files(tmp_path / "spool", spool.JOURNALS) == []
    charges, holds = await booked(own_database_url, user)
    assert holds == ["posted"] and [-c["amount"] for c in charges] == [line["charge"]]
    assert charges[0]["request_id"] == line["request_id"]


async def test_a_journal_that_cannot_be_written_settles_first_and_says_so_once(
        own_database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool directory that cannot be made (a file in its place, a full or read-only
    disk): each answer settled after it is settled before it instead, and charged; the
    log says so once, with the traceback, not once an answer."""
    (tmp_path / "spool").write_text("not a directory")
    app, starlette, key = await started(own_database_url, tmp_path, after=True)
    user = new_user("no-journal")
    with caplog.at_level("ERROR"):
        async with starlette.router.lifespan_context(starlette):
            answers = [await whole_answer(app, key, user) for _ in range(5)]
    assert [a["status"] for a in answers] == [200] * 5
    charges, holds = await booked(own_database_url, user)
    assert holds == ["posted"] * 5
    assert sorted(c["request_id"] for c in charges) == sorted(
        a["headers"]["x-request-id"] for a in answers)
    told = [r for r in caplog.records if "journal could not be written" in r.getMessage()]
    assert len(told) == 1 and told[0].exc_info is not None, [r.getMessage() for r in told]
    assert answers[0]["headers"]["x-request-id"] in told[0].getMessage()


@pytest.mark.parametrize("stream", [False, True])
async def test_answers_settled_after_them_commit_once_each_and_free_their_lease(
        own_database_url: str, tmp_path: Path, stream: bool) -> None:
    """One user's requests one after another, each settled after its answer, with one
    request in flight allowed: none is refused for the last one's lease (it ends with
    the answer, not with the post), and each post rides the next request's hold, so a
    request costs one batch, one commit."""
    app, starlette, key = await started(own_database_url, tmp_path, after=True,
                                        concurrency=1)
    user = new_user("closed-loop")
    async with starlette.router.lifespan_context(starlette):
        batch = starlette.state.services.ledger.batch
        batch.defer_seconds = 30  # only the next request's hold sends a post
        first = await whole_answer(app, key, user, stream)
        assert first["status"] == 200, first
        before = batch.batches
        answers = []
        for _ in range(5):
            # The next request comes in over the network: after the callbacks ready.
            await asyncio.sleep(0.001)
            answers.append(await whole_answer(app, key, user, stream))
        assert [a["status"] for a in answers] == [200] * 5, answers
        assert batch.batches - before == 5  # each the last one's post and its own hold
        stopping = time.monotonic()
    # Shutdown sends the last post at once, not after its 30 s.
    assert time.monotonic() - stopping < 10
    charges, holds = await booked(own_database_url, user)
    assert holds == ["posted"] * 6  # the last post, deferred, was sent at shutdown
    assert {c["request_id"] for c in charges} == {
        a["headers"]["x-request-id"] for a in [first, *answers]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("after", [True, False])
async def test_a_request_settled_after_its_answer_is_counted_in_the_metrics_as_any(
        own_database_url: str, tmp_path: Path, after: bool, stream: bool) -> None:
    """The request's record (the access line, the metrics) is written when the answer
    has gone: settled after it, the record must already hold what the settlement
    counts (its tokens, its outcome, its cost), as it does settled before."""
    app, starlette, key = await started(own_database_url, tmp_path, after=after)
    user = new_user("counted")
    async with starlette.router.lifespan_context(starlette):
        services = starlette.state.services
        services.ledger.batch.defer_seconds = 30  # the post is surely not sent yet
        answer = await whole_answer(app, key, user, stream)
        assert answer["status"] == 200
        if stream:  # the usage the proxy adds to the last chunk
            last = [line for line in answer["body"].split(b"\n")
                    if line.startswith(b"data: {")][-1]
            usage = orjson.loads(last[len(b"data: "):])["usage"]
        else:
            usage = answer["body"]["usage"]
        sample = services.metrics.registry.get_sample_value
        assert sample("paywall_settlements_total",
                      {"paywall": "app", "outcome": "completed"}) == 1
        assert sample("paywall_tokens_total", {"direction": "prompt", "model": "m",
                                               "paywall": "app"}) == usage["prompt_tokens"]
        assert sample("paywall_tokens_total", {"direction": "completion", "model": "m",
                                               "paywall": "app"}) == usage["completion_tokens"]
        assert sample("paywall_charged_total", {"asset": "usd", "paywall": "app"}) == float(
            usage["cost"])
        scale = services.settings.assets["usd"].scale
    # And the ledger has what was counted, once the lifespan has sent the post.
    charges, holds = await booked(own_database_url, user)
    assert holds == ["posted"]
    assert format_amount(-charges[0]["amount"], scale) == usage["cost"]


@pytest.mark.parametrize("limiter", ["fails", "is slow"])
async def test_a_post_after_the_answer_waits_for_no_limiter(
        own_database_url: str, tmp_path: Path, limiter: str) -> None:
    """Settled after its answer, the post does not wait for the limiter's release of
    the request's leases: a limiter that fails (a bug, not an outage) or takes seconds
    neither loses the charge nor holds it up."""
    app, starlette, key = await started(own_database_url, tmp_path, after=True)
    user = new_user("limiter")
    async with starlette.router.lifespan_context(starlette):
        services = starlette.state.services
        finish = services.gate.limiter.finish

        async def finishing(*args: Any, **kwargs: Any) -> None:
            if limiter == "fails":
                raise RuntimeError("the limiter failed")
            await asyncio.sleep(3)
            await finish(*args, **kwargs)

        services.gate.limiter.finish = finishing
        answer = await whole_answer(app, key, user)
        assert answer["status"] == 200
        for _ in range(100):  # well within the limiter's 3 s
            if (await booked(own_database_url, user))[1] == ["posted"]:
                break
            await asyncio.sleep(0.01)
        assert (await booked(own_database_url, user))[1] == ["posted"]
        assert len(services.live) == 0


async def test_the_next_request_is_not_refused_for_the_last_ones_hold(
        own_database_url: str, tmp_path: Path) -> None:
    """A balance that covers one request's worst case but not two: one request after
    another, each settled after its answer, all are served, whatever the limiter's
    pace. The last one's post is queued before the next one's hold can be."""
    app, starlette, key = await started(own_database_url, tmp_path, after=True, grant="6",
                                        concurrency=100)
    user = new_user("one-at-a-time")
    async with starlette.router.lifespan_context(starlette):
        services = starlette.state.services
        finish = services.gate.limiter.finish

        async def slow(*args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(0.004)
            await finish(*args, **kwargs)

        services.gate.limiter.finish = slow
        actions = []
        for _ in range(12):
            answer = await whole_answer(app, key, user)
            actions.append((answer["status"], answer["headers"].get("x-paywall-action")))
    assert actions == [(200, None)] * 12, actions


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_settled_after_it_is_sent_when_the_limiter_fails_beyond_the_hold(
        own_database_url: str, tmp_path: Path, stream: bool) -> None:
    """A charge beyond the hold is posted before the answer goes, then the leases are
    freed: a limiter that fails there (a bug) must not keep the answer from the client
    (settled before its answer, such a request is answered 500, as always)."""
    app, starlette, key = await started(own_database_url, tmp_path, after=True, output=50)
    user = new_user("beyond")
    async with starlette.router.lifespan_context(starlette):
        services = starlette.state.services

        async def failing(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("the limiter failed")

        services.gate.limiter.finish = failing
        answer = await asyncio.wait_for(
            whole_answer(app, key, user, stream, max_tokens=1), 10)
        assert answer["status"] == 200
        charges, holds = await booked(own_database_url, user)
        assert holds == ["posted"] and -charges[0]["amount"] > 0
        if not stream:  # the ledger's post, beyond the hold, in the headers
            scale = services.settings.assets["usd"].scale
            assert answer["headers"]["x-paywall-cost"] == format_amount(
                -charges[0]["amount"], scale)


def test_only_a_process_that_serves_every_request_lets_posts_wait(tmp_path: Path) -> None:
    """With several workers or replicas the next request may reach another process,
    whose hold a waiting post would leave the last worst case held: posts after their
    answers go at once there."""
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG)
    alone = config.load(path, {"DATABASE_URL": "postgresql://x/y"})
    assert settles_alone(alone, {})
    assert settles_alone(alone, {config.WORKERS_ENV: "1"})
    assert not settles_alone(alone, {config.WORKERS_ENV: "2"})
    shared = config.load(path, {"DATABASE_URL": "postgresql://x/y",
                                "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert not settles_alone(shared, {})


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_serve_of_several_workers_sends_posts_after_answers_at_once(
        own_database_url: str, tmp_path: Path, workers: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.WORKERS_ENV, workers)
    _, starlette, _ = await started(own_database_url, tmp_path, after=True)
    async with starlette.router.lifespan_context(starlette):
        deferred = starlette.state.services.ledger.batch.defer_seconds
    assert deferred == (DEFER_SECONDS if workers == "1" else 0)
