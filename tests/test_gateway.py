"""The API gateway (``/api/v1/api-gateway/{provider}``) end to end: a real ``paywall-proxy
serve``, a real PostgreSQL, and a local HTTP API standing in for the provider.

The local API records every request it receives (method, path, query, headers, the
raw body) and, by the first path segment after ``/v1/``, answers: ``stream`` with SSE
chunks spaced out, ``endless`` with chunks until the client side goes away, ``quiet``
with headers and then nothing, ``late`` with nothing for a while, ``fail`` with a 500
that repeats the credential it was sent, ``slow`` with a JSON answer ``SLOW_ANSWER``
seconds late, ``weird`` with a header value that is not UTF-8, ``cors`` with CORS
headers of its own, ``redirect`` with a 302 to the URL in ``to``, ``cut`` (and ``stall``)
with the ``status`` in the query, a ``Content-Length`` of 100 and 12 bytes, then, 0.1 s
later, a closed connection (silence until the client side goes away), anything else
with a JSON summary. Balances, holds and entries are read straight from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import httpx
import jwt
import orjson
import pytest

from tests.conftest import Proxy, credits_paywall, mint_keys, new_user, serving_proxy
from tests.upstream import free_port, read_body, send_json, serve_asgi

SECRET = "gw-provider-CANARY-secret-5f2b9c7d1e"
JWT_SECRET = "gateway-app-signing-secret-0123456789"
ORIGIN = "https://app.example.test"
OTHER_ORIGIN = "https://limited.example.test"
STREAM_CHUNKS = 6
STREAM_DELAY = 0.15
SLOW_ANSWER = 1.5  # more than [upstream] stream_idle_timeout, less than read_timeout
WEIRD = b"caf\xe9\xff"  # not UTF-8


class UpstreamCut(Exception):
    """Raised inside the local API mid-body: its server then drops the connection."""


@dataclass
class Hit:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class Api:
    """The provider behind the gateway (see the module docstring)."""

    hits: list[Hit] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    sent: dict[str, bytes] = field(default_factory=dict)  # stream id → bytes sent
    closed_at: dict[str, float] = field(default_factory=dict)  # id → client side gone

    def by_tag(self, tag: str) -> list[Hit]:
        return [h for h in self.hits if f"tag={tag}" in h.query]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = await read_body(receive)
        hit = Hit(scope["method"], scope["path"], scope["query_string"].decode(),
                  [(k.decode().lower(), v.decode()) for k, v in scope["headers"]], raw)
        self.hits.append(hit)
        query = {k: v[0] for k, v in parse_qs(hit.query).items()}
        tag = query.get("tag", "")
        self.counts[tag] += 1
        kind = scope["path"].removeprefix("/v1/").split("/")[0]
        if kind in ("stream", "endless", "quiet"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"),
                                    (b"cache-control", b"no-cache")]})
        if kind == "stream":
            out = b""
            for i in range(STREAM_CHUNKS):
                if i:
                    await asyncio.sleep(STREAM_DELAY)
                chunk = b"data: " + orjson.dumps({"i": i, "text": f"part {i}"}) + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                out += chunk
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            self.sent[tag] = out + b"data: [DONE]\n\n"
        elif kind == "endless":
            for i in range(300):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps({"i": i}) + b"\n\n"})
                if await self._gone(receive, 0.1, tag):
                    return
            await send({"type": "http.response.body", "body": b""})
        elif kind == "quiet":
            if not await self._gone(receive, 5, tag):
                await send({"type": "http.response.body", "body": b"data: late\n\n"})
        elif kind == "late":
            if not await self._gone(receive, 3, tag):
                await send_json(send, 200, {"late": True})
        elif kind == "slow":
            if not await self._gone(receive, SLOW_ANSWER, tag):
                await send_json(send, 200, {"slow": True})
        elif kind == "weird":
            await send_json(send, 200, {"weird": True}, [(b"x-weird", WEIRD)])
        elif kind == "cors":
            await send_json(send, 200, {"cors": True}, [
                (b"access-control-allow-origin", b"*"), (b"vary", b"Accept-Encoding"),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-expose-headers", b"x-upstream-secret")])
        elif kind == "redirect":
            await send({"type": "http.response.start", "status": 302,
                        "headers": [(b"location", query["to"].encode()),
                                    (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        elif kind in ("cut", "stall"):
            await send({"type": "http.response.start", "status": int(query["status"]),
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", b"100")]})
            await send({"type": "http.response.body", "body": b'{"error": "x', "more_body": True})
            # The 12 bytes travel on before the connection breaks (or falls silent).
            await self._gone(receive, 5 if kind == "stall" else 0.1, tag)
            raise UpstreamCut(kind)
        elif kind == "echo":  # a 2xx answer repeating what the provider was sent
            given = dict(hit.headers)
            await send_json(send, 200, {"auth": given.get("authorization", ""),
                                        "key": given.get("x-provider-key", ""),
                                        "agent": given.get("user-agent", "")})
        elif kind == "fail":
            auth = dict(hit.headers).get("authorization", "")
            await send_json(send, 500, {"error": {"message": f"upstream broke; you sent {auth}",
                                                  "key": auth.removeprefix("Bearer ")}})
        else:
            await send_json(send, 200, {
                "method": hit.method, "path": hit.path, "query": hit.query,
                "content_type": dict(hit.headers).get("content-type"),
                "sha256": hashlib.sha256(raw).hexdigest(), "length": len(raw)},
                [(b"x-upstream", b"yes"), (b"x-request-id", b"upstream-own-id"),
                 (b"set-cookie", b"provider=session")])

    async def _gone(self, receive: Any, seconds: float, tag: str) -> bool:
        """Wait up to ``seconds`` for the client side to go away; note when it did."""
        try:
            async with asyncio.timeout(seconds):
                while (await receive())["type"] != "http.disconnect":
                    pass
        except TimeoutError:
            return False
        self.closed_at[tag] = time.monotonic()
        return True


CLUB = credits_paywall("club", "Members only", JWT_SECRET, trial=10).replace(
    'name = "Members only"', 'name = "Members only"\nrequire_connect = true')


def config(api_url: str) -> str:
    return f"""
[server]
max_body_bytes = 1048576

[upstream]
read_timeout = 3
stream_idle_timeout = 1

{credits_paywall("gw", "Gateway app", JWT_SECRET, ("standard", "advanced"), origin=ORIGIN)}
{credits_paywall("limited", "Limited app", JWT_SECRET, trial=100, origin=OTHER_ORIGIN,
                 limits={"user_requests_per_minute": 3})}
{credits_paywall("solo", "One call at a time", JWT_SECRET, trial=10,
                 limits={"user_concurrency": 1})}
{CLUB}
[api_providers.chat]
url = "{api_url}/v1"
method = "POST"
headers = {{ Authorization = "Bearer ${{GW_PROVIDER_SECRET}}", "X-Provider-Key" = "${{GW_PROVIDER_SECRET}}", "User-Agent" = "provider-agent/1" }}
body = {{ model = "default-model", max_tokens = 500, temperature = 0.5 }}
query_type = "standard"

[api_providers.free]
url = "{api_url}/v1/free"
query_type = "free"

[api_providers.search]
url = "{api_url}/v1/search"
method = "GET"
query_type = "standard"

[api_providers.dead]
url = "http://127.0.0.1:{free_port()}/v1"

[api_providers.pro]
url = "{api_url}/v1/pro"
query_type = "advanced"
"""  # noqa: E501


@dataclass
class Gateway:
    proxy: Proxy
    api: Api
    keys: dict[str, str]

    def url(self, provider: str, path: str = "") -> str:
        return f"{self.proxy.url}/api/v1/api-gateway/{provider}" + (f"/{path}" if path else "")


@pytest.fixture(scope="module")
def gateway(own_database_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    api = Api()
    with serve_asgi(api) as port, serving_proxy(
            config(f"http://127.0.0.1:{port}"), own_database_url,
            tmp_path_factory.mktemp("gateway"), {"GW_PROVIDER_SECRET": SECRET}) as proxy:
        yield Gateway(proxy, api, asyncio.run(mint_keys(own_database_url, ["gw"])))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        yield client


def signed_in(user: str, **headers: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": user, "iat": now, "exp": now + 600}, JWT_SECRET,
                       algorithm="HS256")
    return {"Authorization": f"Bearer {token}", **headers}


async def give(http: httpx.AsyncClient, gw: Gateway, user: str, count: int,
               kind: str = "standard") -> None:
    resp = await http.post(f"{gw.proxy.url}/api/v1/paywall/gw/balances",
                           headers={"X-Api-Key": gw.keys["gw"]},
                           json={"user_id": user, "type": kind, "amount": count, "op": "credit"})
    assert resp.status_code == 200, resp.text


async def account(pg: asyncpg.Connection, user: str, paywall: str = "gw",
                  asset: str = "standard") -> dict[str, Any]:
    """The user's balance, held amount, charge entries and holds of one asset, read in
    one snapshot."""
    async with pg.transaction(isolation="repeatable_read", readonly=True):
        return await _account(pg, user, paywall, asset)


async def _account(pg: asyncpg.Connection, user: str, paywall: str, asset: str
                   ) -> dict[str, Any]:
    row = await pg.fetchrow("SELECT id, balance, held FROM accounts WHERE paywall_id = $1"
                            " AND user_id = $2 AND asset = $3", paywall, user, asset)
    if row is None:
        return {"balance": None, "held": None, "charges": [], "holds": Counter()}
    charges = await pg.fetch("SELECT amount, outcome, request_id, model FROM entries"
                             " WHERE account_id = $1 AND kind = 'charge' ORDER BY id",
                             row["id"])
    holds = await pg.fetch("SELECT status FROM holds WHERE account_id = $1", row["id"])
    return {"balance": row["balance"], "held": row["held"],
            "charges": [dict(c) for c in charges],
            "holds": Counter(h["status"] for h in holds)}


async def settled(pg: asyncpg.Connection, user: str, holds: int, paywall: str = "gw"
                  ) -> dict[str, Any]:
    """The account once ``holds`` holds exist and none is pending (settling follows the
    response, so it may land a moment after the client saw the end)."""
    deadline = time.monotonic() + 5
    while True:
        state = await account(pg, user, paywall)
        if sum(state["holds"].values()) >= holds and not state["holds"]["pending"]:
            return state
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.02)


async def closed_within(api: Api, tag: str, since: float, seconds: float = 1.0) -> float:
    """How long after ``since`` the upstream saw the client side of ``tag`` go away."""
    deadline = since + seconds + 2
    while tag not in api.closed_at:
        assert time.monotonic() < deadline, f"the upstream never saw {tag} go away"
        await asyncio.sleep(0.01)
    return api.closed_at[tag] - since


# ---- credits under concurrency -------------------------------------------------------

async def test_200_concurrent_calls_for_20_credits(gateway: Gateway, http: httpx.AsyncClient,
                                                   pg: asyncpg.Connection) -> None:
    user = new_user("burst")
    await give(http, gateway, user, 20)
    tag = f"burst-{user}"

    async def call() -> httpx.Response:
        return await http.post(gateway.url("chat", "count"), params={"paywall_id": "gw",
                                                                     "tag": tag},
                               headers=signed_in(user), json={"q": 1})

    answers = await asyncio.gather(*[call() for _ in range(200)])
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 20, 402: 180}, statuses
    assert gateway.api.counts[tag] == 20
    for refused in (a for a in answers if a.status_code == 402):
        body = refused.json()
        assert body["code"] == "not_enough_queries", body
        assert isinstance(body["error"], str)
        assert body["details"]["queryType"] == "standard"
        assert body["details"]["currentBalance"] == {"type": "standard", "count": 0}
        assert body["details"]["balances"] == [{"type": "standard", "count": 0},
                                               {"type": "advanced", "count": 0}]
    for ok in (a for a in answers if a.status_code == 200):
        assert ok.headers["x-query-type"] == "standard"
    state = await settled(pg, user, 20)
    assert (state["balance"], state["held"]) == (0, 0)
    assert [(c["amount"], c["outcome"], c["model"]) for c in state["charges"]] == [
        (-1, "completed", "api:chat")] * 20
    assert state["holds"] == {"posted": 20}
    ids = {c["request_id"] for c in state["charges"]}
    assert ids == {a.headers["x-request-id"] for a in answers if a.status_code == 200}


# ---- streams and aborts --------------------------------------------------------------

async def test_stream_arrives_chunk_by_chunk_and_unchanged(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("stream")
    await give(http, gateway, user, 1)
    tag = f"stream-{user}"
    arrivals: list[tuple[float, bytes]] = []
    async with http.stream("POST", gateway.url("chat", "stream"),
                           params={"paywall_id": "gw", "tag": tag}, headers=signed_in(user),
                           json={"stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-query-type"] == "standard"
        assert resp.headers["content-type"] == "text/event-stream"
        async for chunk in resp.aiter_raw():
            arrivals.append((time.monotonic(), chunk))
    received = b"".join(c for _, c in arrivals)
    assert received == gateway.api.sent[tag]
    # Chunks came as the upstream sent them, STREAM_DELAY apart, not all at the end.
    with_data = [t for t, c in arrivals if b'"i":' in c]
    assert len(with_data) >= STREAM_CHUNKS - 1, arrivals
    spread = with_data[-1] - with_data[0]
    assert spread >= (STREAM_CHUNKS - 1) * STREAM_DELAY * 0.8, spread
    state = await settled(pg, user, 1)
    assert [(c["amount"], c["outcome"]) for c in state["charges"]] == [(-1, "completed")]
    assert state["balance"] == 0


async def test_abort_mid_stream_cancels_upstream_and_charges(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("abort")
    await give(http, gateway, user, 3)
    tag = f"abort-{user}"
    async with http.stream("POST", gateway.url("chat", "endless"),
                           params={"paywall_id": "gw", "tag": tag},
                           headers=signed_in(user), json={}) as resp:
        got = b""
        async for chunk in resp.aiter_raw():
            got += chunk
            if got.count(b"\n\n") >= 2:
                break
        left = time.monotonic()
    assert got.startswith(b'data: {"i":0}')
    assert await closed_within(gateway.api, tag, left) < 1.0
    state = await settled(pg, user, 1)
    assert [(c["amount"], c["outcome"]) for c in state["charges"]] == [(-1, "aborted")]
    assert (state["balance"], state["held"]) == (2, 0)


async def test_abort_before_the_first_byte_costs_nothing(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("early")
    await give(http, gateway, user, 3)
    # Headers came, no body yet.
    quiet = f"quiet-{user}"
    async with http.stream("POST", gateway.url("chat", "quiet"),
                           params={"paywall_id": "gw", "tag": quiet},
                           headers=signed_in(user), json={}) as resp:
        assert resp.status_code == 200
        await asyncio.sleep(0.2)
        left = time.monotonic()
    assert await closed_within(gateway.api, quiet, left) < 1.0
    # Not even the headers came: the client gives up while the provider thinks.
    late = f"late-{user}"
    with pytest.raises(httpx.ReadTimeout):
        await http.post(gateway.url("chat", "late"), params={"paywall_id": "gw", "tag": late},
                        headers=signed_in(user), json={}, timeout=httpx.Timeout(5, read=0.3))
    left = time.monotonic()
    assert await closed_within(gateway.api, late, left) < 1.0
    state = await settled(pg, user, 2)
    assert state["charges"] == []
    assert state["holds"] == {"voided": 2}
    assert (state["balance"], state["held"]) == (3, 0)


async def test_upstream_error_is_relayed_and_costs_nothing(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("fail")
    await give(http, gateway, user, 2)
    resp = await http.post(gateway.url("chat", "fail"), params={"paywall_id": "gw"},
                           headers=signed_in(user), json={"q": 1})
    assert resp.status_code == 500
    assert resp.json()["error"]["message"].startswith("upstream broke; you sent ")
    assert SECRET not in resp.text  # the provider repeated its key; it is scrubbed
    assert gateway.api.hits[-1].header("authorization") == [f"Bearer {SECRET}"]
    state = await settled(pg, user, 1)
    assert state["charges"] == [] and state["holds"] == {"voided": 1}
    assert (state["balance"], state["held"]) == (2, 0)


async def test_unreachable_provider_is_502_and_costs_nothing(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("dead")
    await give(http, gateway, user, 2)
    resp = await http.post(gateway.url("dead", "x"), params={"paywall_id": "gw"},
                           headers=signed_in(user), json={})
    assert resp.status_code == 502, resp.text
    assert resp.json()["code"] == "upstream_unavailable"
    state = await settled(pg, user, 1)
    assert state["charges"] == [] and state["holds"] == {"voided": 1}
    assert (state["balance"], state["held"]) == (2, 0)


# ---- what travels upstream -----------------------------------------------------------

async def test_request_is_forwarded_with_provider_headers_and_defaults(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("fwd")
    await give(http, gateway, user, 5)
    tag = f"fwd-{user}"
    resp = await http.post(
        gateway.url("chat", "chat/completions"),
        params=[("paywall_id", "gw"), ("tag", tag), ("foo", "1"), ("foo", "2")],
        headers=signed_in(user, **{"User-Agent": "browser/1.0", "Cookie": "session=abc",
                                   "X-Api-Key": "sk-client-should-not-travel",
                                   "Accept-Language": "fr"}),
        json={"model": "client-model", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    [hit] = gateway.api.by_tag(tag)
    assert hit.path == "/v1/chat/completions"
    assert parse_qs(hit.query) == {"tag": [tag], "foo": ["1", "2"]}
    assert orjson.loads(hit.body) == {
        "model": "client-model", "max_tokens": 500, "temperature": 0.5,
        "messages": [{"role": "user", "content": "hi"}]}
    # The provider's headers, from ${GW_PROVIDER_SECRET}, over the client's; never the
    # client's own credentials or cookies.
    assert hit.header("authorization") == [f"Bearer {SECRET}"]
    assert hit.header("x-provider-key") == [SECRET]
    assert hit.header("user-agent") == ["provider-agent/1"]
    assert hit.header("accept-language") == ["fr"]
    assert hit.header("cookie") == [] and hit.header("x-api-key") == []
    # Nothing of the provider's secret reaches the client; the upstream's cookie neither.
    assert SECRET not in resp.text
    assert all(SECRET not in v for v in resp.headers.values())
    assert "set-cookie" not in resp.headers
    assert resp.headers["x-upstream"] == "yes"
    # One X-Request-Id (the proxy's, not the upstream's own) and one Date.
    assert resp.headers.get_list("x-request-id") == [hit.header("x-request-id")[0]]
    assert len(resp.headers.get_list("date")) == 1


async def test_paywall_from_header_and_no_authorization_upstream(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("free")
    await give(http, gateway, user, 1)
    tag = f"free-{user}"
    for _ in range(2):
        resp = await http.post(gateway.url("free", "a/b"), params={"tag": tag},
                               headers=signed_in(user, **{"X-Paywall-Id": "gw"}), json={})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-query-type"] == "free"
    hits = gateway.api.by_tag(tag)
    assert [h.path for h in hits] == ["/v1/free/a/b"] * 2
    assert all(h.header("authorization") == [] for h in hits)
    assert all(h.header("x-paywall-id") == [] for h in hits)
    # A free call holds and charges nothing.
    state = await account(pg, user)
    assert state["charges"] == [] and not state["holds"]
    assert (state["balance"], state["held"]) == (1, 0)
    broke = await http.post(gateway.url("free"), headers=signed_in(new_user("broke")),
                            params={"paywall_id": "gw"}, json={})
    assert broke.status_code == 200, broke.text


async def test_bodies_arrive_intact(gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("bodies")
    await give(http, gateway, user, 3)
    boundary = "gw-test-boundary-7d3f"
    blob = os.urandom(48_000)
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                 f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; "
                 f"name=\"file\"; filename=\"a.bin\"\r\nContent-Type: "
                 f"application/octet-stream\r\n\r\n").encode() + blob + \
        f"\r\n--{boundary}--\r\n".encode()
    bodies = [
        ("multipart/form-data; boundary=" + boundary, multipart),
        ("application/octet-stream", blob),
        ("application/json", orjson.dumps({"model": "m", "max_tokens": 1, "temperature": 0})),
    ]
    for ctype, content in bodies:
        tag = f"body-{time.monotonic_ns()}"
        resp = await http.post(gateway.url("chat", "files"),
                               params={"paywall_id": "gw", "tag": tag},
                               headers=signed_in(user, **{"Content-Type": ctype}),
                               content=content)
        assert resp.status_code == 200, resp.text
        [hit] = gateway.api.by_tag(tag)
        assert hit.header("content-type") == [ctype]
        assert hit.body == content, ctype
        assert resp.json()["sha256"] == hashlib.sha256(content).hexdigest()


async def test_get_provider(gateway: Gateway, http: httpx.AsyncClient,
                            pg: asyncpg.Connection) -> None:
    user = new_user("get")
    await give(http, gateway, user, 1)
    tag = f"get-{user}"
    resp = await http.get(gateway.url("search"), params={"paywall_id": "gw", "tag": tag,
                                                          "q": "cats"},
                          headers=signed_in(user))
    assert resp.status_code == 200, resp.text
    [hit] = gateway.api.by_tag(tag)
    assert (hit.method, hit.path, hit.body) == ("GET", "/v1/search", b"")
    assert parse_qs(hit.query) == {"tag": [tag], "q": ["cats"]}
    state = await settled(pg, user, 1)
    assert state["balance"] == 0


# ---- refusals ------------------------------------------------------------------------

async def test_refusals(gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("refused")
    await give(http, gateway, user, 5)
    before = len(gateway.api.hits)
    cases: list[tuple[str, str, dict[str, Any], dict[str, str], int, str]] = [
        ("POST", gateway.url("nope"), {"paywall_id": "gw"}, signed_in(user), 404,
         "provider_not_found"),
        ("POST", gateway.url("chat"), {}, signed_in(user), 400, "paywall_required"),
        ("POST", gateway.url("chat"), {"paywall_id": "ghost"}, signed_in(user), 404,
         "paywall_not_found"),
        ("GET", gateway.url("chat"), {"paywall_id": "gw"}, signed_in(user), 405,
         "method_not_allowed"),
        ("POST", gateway.url("search"), {"paywall_id": "gw"}, signed_in(user), 405,
         "method_not_allowed"),
        ("POST", gateway.url("chat"), {"paywall_id": "gw"}, {}, 401, "missing_token"),
        ("POST", gateway.url("chat"), {"paywall_id": "gw"},
         {"Authorization": "Bearer not-a-token"}, 401, "invalid_token"),
        ("POST", gateway.url("chat"), {"paywall_id": "gw"},
         {"X-Api-Key": gateway.keys["gw"]}, 401, "missing_token"),
        ("POST", gateway.url("pro"), {"paywall_id": "limited"}, signed_in(user), 403,
         "provider_disabled"),
    ]
    for method, url, params, headers, status, code in cases:
        resp = await http.request(method, url, params=params, headers=headers, json={})
        assert (resp.status_code, resp.json().get("code")) == (status, code), (url, resp.text)
        if status == 405:
            assert resp.headers["allow"] in ("POST", "GET")
    assert len(gateway.api.hits) == before


async def test_user_rate_limit_applies(gateway: Gateway, http: httpx.AsyncClient,
                                       pg: asyncpg.Connection) -> None:
    user = new_user("rate")
    tag = f"rate-{user}"
    answers = [await http.post(gateway.url("chat", "x"),
                               params={"paywall_id": "limited", "tag": tag},
                               headers=signed_in(user), json={}) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert gateway.api.counts[tag] == 3
    limited = answers[-1]
    assert limited.json()["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) > 0
    state = await settled(pg, user, 3, "limited")
    assert state["holds"] == {"posted": 3}
    assert (state["balance"], state["held"]) == (97, 0)  # 100 trial credits, 3 calls


# ---- CORS ----------------------------------------------------------------------------

async def test_cors(gateway: Gateway, http: httpx.AsyncClient) -> None:
    def preflight(origin: str, params: dict[str, str]) -> Any:
        return http.options(gateway.url("chat", "x"), params=params, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})

    ok = await preflight(ORIGIN, {"paywall_id": "gw"})
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"]
    for origin, params in (("https://evil.example.test", {"paywall_id": "gw"}),
                           (OTHER_ORIGIN, {"paywall_id": "gw"}),
                           ("https://evil.example.test", {})):
        refused = await preflight(origin, params)
        assert "access-control-allow-origin" not in refused.headers, (origin, params)
        assert refused.status_code == 403
    # No paywall in the preflight (it would come as X-Paywall-Id): any listed origin.
    assert (await preflight(OTHER_ORIGIN, {})).status_code == 204

    broke = new_user("cors")  # no credits: a 402
    for origin, allowed in ((ORIGIN, True), ("https://evil.example.test", False),
                            (OTHER_ORIGIN, False)):
        resp = await http.post(gateway.url("chat", "x"), params={"paywall_id": "gw"},
                               headers=signed_in(broke, Origin=origin), json={})
        assert resp.status_code == 402
        assert resp.json()["code"] == "not_enough_queries"
        assert resp.headers.get("access-control-allow-origin") == (origin if allowed
                                                                    else None)
        if allowed:
            assert "x-query-type" not in resp.headers  # refused before the provider
            assert "x-request-id" in resp.headers["access-control-expose-headers"]
    header_named = await http.post(gateway.url("chat", "x"), json={}, headers=signed_in(
        broke, Origin=ORIGIN, **{"X-Paywall-Id": "gw"}))
    assert header_named.status_code == 402
    assert header_named.headers["access-control-allow-origin"] == ORIGIN
    me = await http.get(f"{gateway.proxy.url}/api/v1/paywall/gw/balances",
                        headers=signed_in(broke, Origin=ORIGIN))
    assert me.status_code == 200
    assert me.headers["access-control-allow-origin"] == ORIGIN


# ---- what the provider may not do ----------------------------------------------------

async def test_path_stays_under_the_provider_url(gateway: Gateway, http: httpx.AsyncClient,
                                                 pg: asyncpg.Connection) -> None:
    user = new_user("path")
    await give(http, gateway, user, 2)
    before = len(gateway.api.hits)
    # Sent as the raw request target: a client would resolve the dot segments itself.
    for path in ("%2e%2e/count", "%2E%2E/%2e%2e/count", "../count", "a/../../count", "a/..",
                 "./count", "a%3Fb=1", "a%23b", "a%5C..%5Ccount"):
        target = f"/api/v1/api-gateway/chat/{path}?paywall_id=gw".encode()
        resp = await http.post(gateway.proxy.url, extensions={"target": target},
                               headers=signed_in(user), json={})
        assert (resp.status_code, resp.json().get("code")) == (400, "invalid_path"), \
            (path, resp.text)
    assert gateway.api.hits[before:] == []
    state = await account(pg, user)
    assert not state["holds"] and state["charges"] == []  # refused before any hold
    tag = f"path-{user}"
    resp = await http.post(gateway.url("chat", "nested/a.b/c..d"),
                           params={"paywall_id": "gw", "tag": tag}, headers=signed_in(user),
                           json={})
    assert resp.status_code == 200, resp.text
    assert [h.path for h in gateway.api.by_tag(tag)] == ["/v1/nested/a.b/c..d"]
    state = await settled(pg, user, 1)
    assert state["holds"] == {"posted": 1} and state["balance"] == 1


@pytest.mark.parametrize(("kind", "status", "code"), [
    ("cut", 502, "upstream_unavailable"),  # Content-Length 100, 12 bytes, closed
    ("stall", 504, "upstream_timeout"),  # … then silence past stream_idle_timeout
])
async def test_broken_error_body_frees_the_hold_and_the_slot(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection, kind: str,
        status: int, code: str) -> None:
    user = new_user(kind)  # on "solo": one call in flight at a time, 10 trial credits
    resp = await http.post(gateway.url("chat", kind),
                           params={"paywall_id": "solo", "status": "500"},
                           headers=signed_in(user), json={})
    assert (resp.status_code, resp.json().get("code")) == (status, code), resp.text
    state = await settled(pg, user, 1, "solo")
    assert state["holds"] == {"voided": 1} and state["charges"] == []
    # The broken call's concurrency slot is free: the next call goes through at once.
    after = await http.post(gateway.url("chat", "count"), params={"paywall_id": "solo"},
                            headers=signed_in(user), json={})
    assert after.status_code == 200, after.text
    state = await settled(pg, user, 2, "solo")
    assert state["holds"] == {"voided": 1, "posted": 1}
    assert (state["balance"], state["held"]) == (9, 0)


async def test_header_not_utf8_is_relayed_and_charged_once(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("weird")
    await give(http, gateway, user, 2)
    resp = await http.post(gateway.url("chat", "weird"), params={"paywall_id": "gw"},
                           headers=signed_in(user), json={})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"weird": True}
    assert [v for k, v in resp.headers.raw if k.lower() == b"x-weird"] == [WEIRD]
    state = await settled(pg, user, 1)
    assert state["holds"] == {"posted": 1}
    assert [(c["amount"], c["outcome"]) for c in state["charges"]] == [(-1, "completed")]
    assert (state["balance"], state["held"]) == (1, 0)


async def test_upstream_cors_headers_never_reach_the_client(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("ucors")
    await give(http, gateway, user, 2)
    for origin, allowed in ((ORIGIN, True), ("https://evil.example.test", False)):
        resp = await http.post(gateway.url("chat", "cors"), params={"paywall_id": "gw"},
                               headers=signed_in(user, Origin=origin), json={})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"cors": True}  # the upstream's answer, with its headers
        assert resp.headers.get_list("access-control-allow-origin") == (
            [origin] if allowed else []), origin
        assert resp.headers.get_list("vary") == ["Origin"]
        assert "access-control-allow-credentials" not in resp.headers
        assert all("x-upstream-secret" not in v
                   for v in resp.headers.get_list("access-control-expose-headers"))


async def test_cors_reads_the_paywall_the_route_reads(gateway: Gateway,
                                                      http: httpx.AsyncClient) -> None:
    broke = new_user("twice")  # no "gw" credits; "limited" would give 100 trial credits
    for origin, allowed in ((OTHER_ORIGIN, False), (ORIGIN, True)):
        resp = await http.post(gateway.url("chat", "x"),
                               params=[("paywall_id", "limited"), ("paywall_id", "gw")],
                               headers=signed_in(broke, Origin=origin), json={})
        assert resp.status_code == 402, resp.text  # the route read "gw"
        assert resp.headers.get_list("access-control-allow-origin") == (
            [origin] if allowed else []), origin


async def test_redirect_is_relayed_not_followed(gateway: Gateway, http: httpx.AsyncClient,
                                                pg: asyncpg.Connection) -> None:
    seen: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    user = new_user("redirect")
    await give(http, gateway, user, 2)
    server = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    to = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/elsewhere"
    async with server:
        resp = await http.post(gateway.url("chat", "redirect"),
                               params={"paywall_id": "gw", "to": to},
                               headers=signed_in(user), json={}, follow_redirects=False)
    assert resp.status_code == 302, resp.text
    assert resp.headers["location"] == to
    assert seen == []  # nothing went there, so neither did the provider's headers
    state = await settled(pg, user, 1)
    assert state["holds"] == {"voided": 1} and state["charges"] == []


async def test_truncated_answer_cuts_the_client_connection(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("trunc")
    await give(http, gateway, user, 2)
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", gateway.url("chat", "cut"),
                               params={"paywall_id": "gw", "status": "200"},
                               headers=signed_in(user), json={}) as resp:
            assert resp.status_code == 200
            async for chunk in resp.aiter_raw():
                got += chunk
    assert got == b'{"error": "x'  # what came, and no clean end after it
    state = await settled(pg, user, 1)
    assert state["holds"] == {"voided": 1} and state["charges"] == []
    assert (state["balance"], state["held"]) == (2, 0)


async def test_read_timeout_bounds_the_first_byte(gateway: Gateway, http: httpx.AsyncClient,
                                                  pg: asyncpg.Connection) -> None:
    # read_timeout = 3, stream_idle_timeout = 1; the answer starts after SLOW_ANSWER.
    user = new_user("slow")
    await give(http, gateway, user, 1)
    started = time.monotonic()
    resp = await http.post(gateway.url("chat", "slow"), params={"paywall_id": "gw"},
                           headers=signed_in(user), json={})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"slow": True}
    assert time.monotonic() - started >= SLOW_ANSWER
    state = await settled(pg, user, 1)
    assert state["holds"] == {"posted": 1} and state["balance"] == 0


# ---- the paywall's rules, as for chat ------------------------------------------------

async def test_require_connect_applies_to_gateway_calls(
        gateway: Gateway, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("club")  # 10 trial credits, never connected
    before = len(gateway.api.hits)
    resp = await http.post(gateway.url("chat", "count"), params={"paywall_id": "club"},
                           headers=signed_in(user), json={})
    assert (resp.status_code, resp.json()["code"]) == (402, "connect_required"), resp.text
    link = resp.json()["details"]["connectLink"]
    assert "/connect?token=" in link and link in resp.json()["error"]
    assert gateway.api.hits[before:] == []  # the provider was never called
    state = await account(pg, user, "club")
    assert state["charges"] == [] and state["balance"] == 10 and not state["holds"]


async def test_a_blank_repeated_paywall_id_switches_nothing(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("blank")
    await give(http, gateway, user, 2)
    # The route once read "" and fell back to the header's paywall, CORS read "gw".
    resp = await http.post(gateway.url("chat", "count"),
                           params=[("paywall_id", "gw"), ("paywall_id", "")],
                           headers=signed_in(user, Origin=OTHER_ORIGIN,
                                             **{"X-Paywall-Id": "limited"}), json={})
    assert (resp.status_code, resp.json()["code"]) == (400, "paywall_required"), resp.text
    assert "access-control-allow-origin" not in resp.headers


async def test_path_parameter_dot_segments_are_refused(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("dotsemi")
    before = len(gateway.api.hits)
    for path in ("..;/count", "a/..;x/..;/count", ".;/count", "%2e%2e;/count"):
        target = f"/api/v1/api-gateway/chat/{path}?paywall_id=gw".encode()
        resp = await http.post(gateway.proxy.url, extensions={"target": target},
                               headers=signed_in(user), json={})
        assert (resp.status_code, resp.json().get("code")) == (400, "invalid_path"), \
            (path, resp.text)
    assert gateway.api.hits[before:] == []


async def test_provider_secrets_are_scrubbed_from_2xx_bodies_and_only_they(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    user = new_user("echo")
    await give(http, gateway, user, 2)
    resp = await http.post(gateway.url("chat", "echo"), params={"paywall_id": "gw"},
                           headers=signed_in(user), json={})
    assert resp.status_code == 200, resp.text
    assert SECRET not in resp.text
    assert resp.json() == {"auth": "[redacted]", "key": "[redacted]",
                           "agent": "provider-agent/1"}  # not a secret: kept
