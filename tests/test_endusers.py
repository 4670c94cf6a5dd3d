"""End users and the owner's balance API, against a real ``paywall-proxy serve``.

The app's sign-in tokens (HS256 with a shared secret, RS256/ES256 from a JWKS that a
local HTTP server publishes) prove who an end user is on ``/api/v1/paywall/{id}/…``;
every way a token can be wrong is a 401 in the ``/api/v1`` error shape. Only the
paywall key (``X-Api-Key``) moves a balance; balances and entries are read straight
from PostgreSQL. The last test is the "your backend as the AI proxy" flow: verify the
browser's Bearer with ``/user``, then debit with the owner key, retrying once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.endusers import REFETCH_SECONDS
from proxy.ledger import Ledger
from tests.conftest import Proxy, mint_keys, new_user, serving_proxy
from tests.upstream import free_port, serve_asgi

HS_SECRET = "hs-app-signing-secret-0123456789abcdef"
OTHER_SECRET = "other-app-signing-secret-fedcba9876543210"
HS_ISS, HS_AUD = "https://auth.hs.test", "hs-app"
RS_ISS, RS_AUD = "https://auth.rs.test", "rs-app"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: Any = "alice", *, iss: str = HS_ISS, aud: str = HS_AUD, exp_in: float = 300,
           **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iss": iss, "aud": aud, "iat": now, "exp": now + exp_in, **extra}


def hs(payload: dict[str, Any], secret: str = HS_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def by_hand(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]
            ) -> str:
    """A JWT built without PyJWT, for the tokens it refuses to make."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def with_payload(token: str, payload: dict[str, Any]) -> str:
    """``token`` with its payload swapped and its signature kept."""
    head, _, sig = token.split(".")
    return f"{head}.{b64url(orjson.dumps(payload))}.{sig}"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg.startswith("RS") \
            else jwt.algorithms.ECAlgorithm
        out: dict[str, Any] = algo.to_jwk(self.private.public_key(), as_dict=True)
        return {**out, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, payload: dict[str, Any], kid: str | None = None,
             alg: str | None = None) -> str:
        return jwt.encode(payload, self.private, algorithm=alg or self.alg,
                          headers={"kid": kid or self.kid})

    def public_pem(self) -> bytes:
        return bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537,
                                                             key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Jwks:
    """The app's sign-in server as far as the proxy sees it: key sets by path, and how
    often each was fetched."""

    sets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fetches: Counter[str] = field(default_factory=Counter)
    fetched_at: dict[str, float] = field(default_factory=dict)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        self.fetches[path] += 1
        self.fetched_at[path] = time.monotonic()
        keys = self.sets.get(path)
        status, body = (404, b"{}") if keys is None else (200, orjson.dumps({"keys": keys}))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@dataclass
class World:
    proxy: Proxy
    jwks: Jwks
    keys: dict[str, str]  # paywall id → its owner key
    rsa: SigningKey
    ec: SigningKey
    stray: SigningKey  # a key the JWKS never lists
    rot_a: SigningKey
    rot_b: SigningKey

    def url(self, paywall: str, route: str) -> str:
        return f"{self.proxy.url}/api/v1/paywall/{paywall}/{route}"


def config(jwks_port: int) -> str:
    jwks = f"http://127.0.0.1:{jwks_port}"
    return f"""
[paywalls.hs]
name = "HS app"
[paywalls.hs.auth]
hs256_secret = "${{EU_HS_SECRET}}"
issuer = "{HS_ISS}"
audience = "{HS_AUD}"
[paywalls.hs.credits]
types = ["standard", "advanced"]
trial = {{ standard = 5 }}
[paywalls.hs.credits.plans.pro]
name = "Pro"
credits = {{ standard = 100, advanced = 10 }}

[paywalls.rs]
[paywalls.rs.auth]
jwks_url = "{jwks}/jwks.json"
issuer = "{RS_ISS}"
audience = "{RS_AUD}"
[paywalls.rs.credits]
types = ["standard"]
trial = {{ standard = 3 }}

[paywalls.rot]
[paywalls.rot.auth]
jwks_url = "{jwks}/rot.json"
audience = "{RS_AUD}"
[paywalls.rot.credits]
types = ["standard"]

[paywalls.other]
[paywalls.other.auth]
hs256_secret = "{OTHER_SECRET}"
[paywalls.other.credits]
types = ["standard"]

[paywalls.nojwks]
[paywalls.nojwks.auth]
jwks_url = "http://127.0.0.1:{free_port()}/jwks.json"
audience = "{HS_AUD}"

[paywalls.nosignin]
name = "No sign-in"
"""


@pytest.fixture(scope="module")
def world(own_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    keys = dict(rsa=rsa_key("rsa-1"), ec=ec_key("ec-1"), stray=rsa_key("stray"),
                rot_a=rsa_key("rot-a"), rot_b=rsa_key("rot-b"))
    jwks = Jwks({"/jwks.json": [keys["rsa"].jwk(), keys["ec"].jwk()],
                 "/rot.json": [keys["rot_a"].jwk()]})
    with serve_asgi(jwks) as port, serving_proxy(
            config(port), own_database_url, tmp_path_factory.mktemp("endusers"),
            {"EU_HS_SECRET": HS_SECRET}) as proxy:
        owner = asyncio.run(mint_keys(own_database_url, ["hs", "other"]))
        yield World(proxy, jwks, owner, **keys)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def balance(pg: asyncpg.Connection, paywall: str, user: str, asset: str = "standard"
                  ) -> tuple[int, int] | None:
    row = await pg.fetchrow("SELECT balance, held FROM accounts WHERE paywall_id = $1"
                            " AND user_id = $2 AND asset = $3", paywall, user, asset)
    return None if row is None else (row["balance"], row["held"])


async def entries(pg: asyncpg.Connection, paywall: str, user: str) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT a.asset, e.kind, e.amount, e.balance_after, e.request_id, e.idempotency_key,"
        " e.metadata FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.paywall_id = $1 AND a.user_id = $2 ORDER BY e.id", paywall, user)
    return [{**dict(r), "metadata": orjson.loads(r["metadata"])} for r in rows]


def assert_refused(resp: httpx.Response, code: str = "invalid_token") -> None:
    assert resp.status_code == 401, resp.text
    body = resp.json()
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    assert set(body) <= {"error", "code", "param", "details"}, body


# ---- tokens that pass ----------------------------------------------------------------

async def test_hs256_user_is_opened_with_trial_credits_once(
        world: World, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("hs")
    token = hs(claims(user, email=f"{user}@example.test"))
    first = await http.get(world.url("hs", "user"), headers=bearer(token))
    assert first.status_code == 200, first.text
    assert first.json() == {"user": {"id": user, "email": f"{user}@example.test"},
                            "paid": False,
                            "balances": [{"type": "standard", "count": 5},
                                         {"type": "advanced", "count": 0}]}
    again = await http.get(world.url("hs", "user"), headers=bearer(token))
    assert again.json() == first.json()
    assert [(e["asset"], e["kind"], e["amount"]) for e in await entries(pg, "hs", user)] == [
        ("standard", "grant", 5)]


async def test_rs256_and_es256_tokens_from_the_jwks(world: World,
                                                    http: httpx.AsyncClient) -> None:
    for key in (world.rsa, world.ec):
        user = new_user(key.kid)
        resp = await http.get(world.url("rs", "user"),
                              headers=bearer(key.sign(claims(user, iss=RS_ISS, aud=RS_AUD))))
        assert resp.status_code == 200, (key.kid, resp.text)
        assert resp.json()["user"] == {"id": user, "email": None}
        assert resp.json()["balances"] == [{"type": "standard", "count": 3}]
    # Both keys came from one fetch, kept for the next tokens.
    assert world.jwks.fetches["/jwks.json"] == 1


# ---- tokens that fail ----------------------------------------------------------------

def _refused_cases() -> list[tuple[str, str, Callable[[World], str]]]:
    def none_alg(payload: dict[str, Any]) -> str:
        return by_hand({"alg": "none", "typ": "JWT"}, payload, lambda _: b"")

    def rs_claims(sub: str = "mallory", **kw: Any) -> dict[str, Any]:
        return claims(sub, iss=RS_ISS, aud=RS_AUD, **kw)

    def confused(w: World) -> str:
        # HS256 keyed with the RSA public key's PEM: valid if the verifier let the token
        # pick the algorithm and used the published key as an HMAC secret.
        pem = w.rsa.public_pem()
        return by_hand({"alg": "HS256", "typ": "JWT", "kid": w.rsa.kid}, rs_claims(),
                       lambda data: hmac.new(pem, data, hashlib.sha256).digest())

    return [
        ("hs-expired", "hs", lambda w: hs(claims(exp_in=-3600))),
        ("hs-wrong-audience", "hs", lambda w: hs(claims(aud="someone-else"))),
        ("hs-wrong-issuer", "hs", lambda w: hs(claims(iss="https://evil.test"))),
        ("hs-alg-none", "hs", lambda w: none_alg(claims())),
        ("hs-other-secret", "hs", lambda w: hs(claims(), OTHER_SECRET)),
        ("hs-tampered", "hs", lambda w: with_payload(hs(claims("mallory")),
                                                     claims("victim"))),
        ("hs-rs256-token", "hs", lambda w: w.rsa.sign(claims())),
        ("hs-not-yet-valid", "hs", lambda w: hs(claims(nbf=int(time.time()) + 3600))),
        ("hs-no-exp", "hs", lambda w: hs({k: v for k, v in claims().items() if k != "exp"})),
        ("hs-no-sub", "hs", lambda w: hs({k: v for k, v in claims().items() if k != "sub"})),
        ("hs-sub-not-a-string", "hs", lambda w: hs(claims(["a", "b"]))),
        ("hs-sub-a-number", "hs", lambda w: hs(claims(424242))),  # RFC 7519: a string
        ("hs-malformed", "hs", lambda w: "not-a-jwt"),
        ("hs-malformed-segments", "hs", lambda w: "a.b.c"),
        ("hs-garbage-base64", "hs", lambda w: "eyJhbGciOiJIUzI1NiJ9.%%%.abc"),
        ("rs-expired", "rs", lambda w: w.rsa.sign(rs_claims(exp_in=-3600))),
        ("rs-wrong-audience", "rs", lambda w: w.rsa.sign(claims(iss=RS_ISS, aud=HS_AUD))),
        ("rs-wrong-issuer", "rs", lambda w: w.rsa.sign(claims(iss=HS_ISS, aud=RS_AUD))),
        ("rs-alg-none", "rs", lambda w: none_alg(rs_claims())),
        ("rs-alg-none-with-kid", "rs",
         lambda w: by_hand({"alg": "none", "kid": w.rsa.kid}, rs_claims(), lambda _: b"")),
        ("rs-unknown-kid", "rs", lambda w: w.stray.sign(rs_claims())),
        ("rs-known-kid-other-key", "rs", lambda w: w.stray.sign(rs_claims(), kid=w.rsa.kid)),
        ("rs-key-confusion-hs256", "rs", confused),
        ("rs-es256-token-on-rsa-kid", "rs", lambda w: w.ec.sign(rs_claims(), kid=w.rsa.kid)),
        ("rs-hs256-token", "rs", lambda w: hs(rs_claims())),
        ("rs-tampered", "rs", lambda w: with_payload(w.rsa.sign(rs_claims("mallory")),
                                                     rs_claims("victim"))),
    ]


REFUSED = _refused_cases()


@pytest.mark.parametrize(("paywall", "make"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
async def test_refused_token_is_401(world: World, http: httpx.AsyncClient,
                                    pg: asyncpg.Connection, paywall: str,
                                    make: Callable[[World], str]) -> None:
    token = make(world)
    for route in ("user", "balances"):
        assert_refused(await http.get(world.url(paywall, route), headers=bearer(token)))
    # Nobody was opened on the strength of a refused token.
    assert await pg.fetchval("SELECT count(*) FROM users WHERE paywall_id = $1 AND user_id"
                             " IN ('victim', 'mallory', 'alice')", paywall) == 0


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic YWxpY2U6cHc=",
                                    "Token abc"])
async def test_missing_token_is_401(world: World, http: httpx.AsyncClient,
                                    header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    assert_refused(await http.get(world.url("hs", "user"), headers=headers), "missing_token")


async def test_paywall_without_signin_or_keys(world: World, http: httpx.AsyncClient) -> None:
    token = hs(claims())
    assert_refused(await http.get(world.url("nosignin", "user"), headers=bearer(token)),
                   "auth_not_configured")
    missing = await http.get(world.url("nope", "user"), headers=bearer(token))
    assert missing.status_code == 404
    assert missing.json()["code"] == "paywall_not_found"
    # Keys that cannot be fetched are the sign-in server's fault, not the token's: 503
    # (not a 401 that would sign the user out), the first time and while throttled.
    for _ in range(2):
        down = await http.get(world.url("nojwks", "user"),
                              headers=bearer(world.rsa.sign(claims())))
        assert down.status_code == 503, down.text
        assert down.json()["code"] == "jwks_unavailable"


async def test_user_ids_the_ledger_cannot_hold_are_refused_cleanly(
        world: World, http: httpx.AsyncClient) -> None:
    # Ids are 1-128 of letters, digits and ._:@|- (the users table's rule): anything else
    # is a clear 4xx, never a 500 from the database.
    for sub in ("has space", "x" * 129, "brace{id}"):
        resp = await http.get(world.url("hs", "user"), headers=bearer(hs(claims(sub))))
        assert_refused(resp)
        owner = await http.post(world.url("hs", "balances"),
                                headers={"X-Api-Key": world.keys["hs"]},
                                json={"user_id": sub, "type": "standard", "amount": 1,
                                      "op": "credit"})
        assert owner.status_code == 400, owner.text
        assert owner.json()["code"] == "invalid_user"


async def test_a_new_kid_is_fetched_after_rotation(world: World,
                                                   http: httpx.AsyncClient) -> None:
    def token(key: SigningKey) -> dict[str, str]:
        return bearer(key.sign(claims(new_user(key.kid), iss="", aud=RS_AUD)))

    url = world.url("rot", "user")
    assert (await http.get(url, headers=token(world.rot_a))).status_code == 200
    assert world.jwks.fetches["/rot.json"] == 1
    fetched = world.jwks.fetched_at["/rot.json"]
    world.jwks.sets["/rot.json"] = [world.rot_a.jwk(), world.rot_b.jwk()]
    # Within the refetch throttle an unknown kid is refused without asking again.
    assert_refused(await http.get(url, headers=token(world.rot_b)))
    assert world.jwks.fetches["/rot.json"] == 1
    await asyncio.sleep(max(0.0, fetched + REFETCH_SECONDS + 0.3 - time.monotonic()))
    rotated = await http.get(url, headers=token(world.rot_b))
    assert rotated.status_code == 200, rotated.text
    assert world.jwks.fetches["/rot.json"] == 2
    assert (await http.get(url, headers=token(world.rot_a))).status_code == 200
    assert world.jwks.fetches["/rot.json"] == 2


# ---- the owner's balance API ---------------------------------------------------------

async def open_user(world: World, http: httpx.AsyncClient, user: str) -> str:
    """Open ``user`` on the hs paywall (5 trial credits); return their token."""
    token = hs(claims(user))
    resp = await http.get(world.url("hs", "user"), headers=bearer(token))
    assert resp.status_code == 200, resp.text
    return token


def move(user: str, amount: Any = 1, op: Any = "debit", kind: Any = "standard"
         ) -> dict[str, Any]:
    return {"user_id": user, "type": kind, "amount": amount, "op": op}


async def test_end_user_token_cannot_move_a_balance(
        world: World, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    user = new_user("thief")
    token = await open_user(world, http, user)
    grant = {"user_id": user, "plan": "pro"}
    for route, body in (("balances", move(user, 1000, "credit")), ("grants", grant)):
        refused = await http.post(world.url("hs", route), headers=bearer(token), json=body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "apikey_required"
        foreign = await http.post(world.url("hs", route), json=body,
                                  headers={"X-Api-Key": world.keys["other"], **bearer(token)})
        assert foreign.status_code == 403, foreign.text
        assert foreign.json()["code"] == "forbidden"
        bare = await http.post(world.url("hs", route), json=body)
        assert bare.status_code == 401
        assert bare.json()["code"] == "apikey_required"
        wrong = await http.post(world.url("hs", route), json=body,
                                headers={"X-Api-Key": "sk-not-a-real-key-000000000000"})
        assert wrong.status_code == 401
    # The other paywall's key cannot move this user on its own paywall either.
    cross = await http.post(world.url("other", "balances"), json=move(user, 5, "credit"),
                            headers={"X-Api-Key": world.keys["hs"]})
    assert cross.status_code == 403
    assert await balance(pg, "hs", user) == (5, 0)
    assert await balance(pg, "hs", user, "advanced") == (0, 0)
    assert [e["kind"] for e in await entries(pg, "hs", user)] == ["grant"]
    assert await pg.fetchval("SELECT count(*) FROM users WHERE paywall_id = 'other'"
                             " AND user_id = $1", user) == 0
    me = await http.get(world.url("hs", "user"), headers=bearer(token))
    assert me.json()["paid"] is False


async def test_owner_credits_and_debits(world: World, http: httpx.AsyncClient,
                                        pg: asyncpg.Connection) -> None:
    user = new_user("owner")
    await open_user(world, http, user)
    key = {"X-Api-Key": world.keys["hs"]}
    credit = await http.post(world.url("hs", "balances"), headers=key,
                             json=move(user, 10, "credit"))
    assert credit.status_code == 200, credit.text
    body = credit.json()
    assert body["count"] == 15 and body["op"] == "credit" and body["type"] == "standard"
    assert body["balances"] == [{"type": "standard", "count": 15},
                                {"type": "advanced", "count": 0}]
    assert body["request_id"] == credit.headers["x-request-id"]
    debit = await http.post(world.url("hs", "balances"), headers=key, json=move(user, 3))
    assert debit.status_code == 200, debit.text
    assert debit.json()["count"] == 12
    ledger = await entries(pg, "hs", user)
    assert [(e["kind"], e["amount"], e["balance_after"]) for e in ledger] == [
        ("grant", 5, 5), ("deposit", 10, 15), ("charge", -3, 12)]
    assert ledger[2]["request_id"] == debit.json()["request_id"]
    assert await balance(pg, "hs", user) == (12, 0)

    short = await http.post(world.url("hs", "balances"), headers=key, json=move(user, 13))
    assert short.status_code == 402, short.text
    assert short.json()["code"] == "insufficient"
    assert short.json()["details"] == {
        "balances": [{"type": "standard", "count": 12}, {"type": "advanced", "count": 0}],
        "queryType": "standard", "currentBalance": {"type": "standard", "count": 12}}
    exact = await http.post(world.url("hs", "balances"), headers=key, json=move(user, 12))
    assert exact.status_code == 200 and exact.json()["count"] == 0
    assert await balance(pg, "hs", user) == (0, 0)
    assert len(await entries(pg, "hs", user)) == 4


BAD_MOVES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-type", {"type": "premium"}, "unknown_type"),
    ("no-type", {"type": None}, "unknown_type"),
    ("zero", {"amount": 0}, "invalid_amount"),
    ("negative", {"amount": -5}, "invalid_amount"),
    ("fraction", {"amount": 1.5}, "invalid_amount"),
    ("string", {"amount": "2"}, "invalid_amount"),
    ("bool", {"amount": True}, "invalid_amount"),
    ("huge", {"amount": 2**53}, "invalid_amount"),
    ("bad-op", {"op": "steal"}, "invalid_op"),
    ("no-op", {"op": None}, "invalid_op"),
    ("no-user", {"user_id": None}, "invalid_user"),
    ("empty-user", {"user_id": ""}, "invalid_user"),
]


@pytest.mark.parametrize(("change", "code"), [c[1:] for c in BAD_MOVES],
                         ids=[c[0] for c in BAD_MOVES])
async def test_bad_balance_requests_are_400(world: World, http: httpx.AsyncClient,
                                            pg: asyncpg.Connection, change: dict[str, Any],
                                            code: str) -> None:
    user = new_user("bad")
    await open_user(world, http, user)
    body = {**move(user, 1, "credit"), **change}
    resp = await http.post(world.url("hs", "balances"), json=body,
                           headers={"X-Api-Key": world.keys["hs"]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == code
    assert await balance(pg, "hs", user) == (5, 0)


async def test_unreadable_bodies_are_400(world: World, http: httpx.AsyncClient) -> None:
    for content in (b"{not json", b"[1, 2]", b""):
        resp = await http.post(world.url("hs", "balances"), content=content,
                               headers={"X-Api-Key": world.keys["hs"],
                                        "Content-Type": "application/json"})
        assert resp.status_code == 400, (content, resp.text)
        assert set(resp.json()) >= {"error", "code"}


async def test_idempotency_key_moves_once(world: World, http: httpx.AsyncClient,
                                          pg: asyncpg.Connection) -> None:
    user = new_user("idem")
    await open_user(world, http, user)
    url = world.url("hs", "balances")
    headers = {"X-Api-Key": world.keys["hs"], "Idempotency-Key": f"debit-{user}"}
    first = await http.post(url, headers=headers, json=move(user, 2))
    again = await http.post(url, headers=headers, json=move(user, 2))
    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    other = await http.post(url, headers=headers, json=move(user, 3))
    assert other.status_code == 409, other.text
    assert other.json()["code"] == "idempotency_conflict"
    # Concurrent retries of one key: one movement, one answer.
    burst = {**headers, "Idempotency-Key": f"credit-{user}"}
    answers = await asyncio.gather(*[http.post(url, headers=burst,
                                               json=move(user, 7, "credit"))
                                     for _ in range(8)])
    assert {(a.status_code, a.content) for a in answers} == {(200, answers[0].content)}
    ledger = await entries(pg, "hs", user)
    assert [(e["kind"], e["amount"], e["idempotency_key"]) for e in ledger] == [
        ("grant", 5, None), ("charge", -2, f"debit-{user}"), ("deposit", 7, f"credit-{user}")]
    assert await balance(pg, "hs", user) == (10, 0)
    too_long = await http.post(url, headers={**headers, "Idempotency-Key": "k" * 256},
                               json=move(user, 1))
    assert too_long.status_code == 400


async def test_credits_past_what_a_balance_holds_are_400(
        world: World, http: httpx.AsyncClient, pg: asyncpg.Connection) -> None:
    """A balance is a bigint: a credit or a plan that would pass it is refused with 400
    (it was a 500 from the database), and nothing moves."""
    user = new_user("full")
    await open_user(world, http, user)
    room = 2**63 - 1 - 5 - 40  # 5 trial credits; 40 more fit
    async with pg.transaction():
        await Ledger.move(pg, "hs", user, "standard", room, "adjustment", request_id=None,
                          idempotency_key=None, metadata={"test": "nearly full"})
    key = {"X-Api-Key": world.keys["hs"]}
    for headers in (key, {**key, "Idempotency-Key": f"full-{user}"}):
        over = await http.post(world.url("hs", "balances"), headers=headers,
                               json=move(user, 41, "credit"))
        assert over.status_code == 400, over.text
        assert (over.json()["code"], over.json()["param"]) == ("balance_overflow", "amount")
        plan = await http.post(world.url("hs", "grants"), headers=headers,
                               json={"user_id": user, "plan": "pro"})
        assert plan.status_code == 400, plan.text
        assert (plan.json()["code"], plan.json()["param"]) == ("balance_overflow", "plan")
    fits = await http.post(world.url("hs", "balances"), headers=key,
                           json=move(user, 40, "credit"))
    assert fits.status_code == 200, fits.text
    assert fits.json()["count"] == 2**63 - 1
    assert await balance(pg, "hs", user) == (2**63 - 1, 0)
    assert [e["kind"] for e in await entries(pg, "hs", user)] == [
        "grant", "adjustment", "deposit"]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("route", ["balances", "grants"])
async def test_bodies_that_cannot_be_kept_are_400(world: World, http: httpx.AsyncClient,
                                                  pg: asyncpg.Connection, route: str) -> None:
    """With an Idempotency-Key the body is hashed and kept: one nested past what can be
    encoded, or holding NUL, is a 400 (it was a 500)."""
    user = new_user("deep")
    await open_user(world, http, user)
    body = move(user, 1, "credit") if route == "balances" else {"user_id": user,
                                                                "plan": "pro"}
    for extra in ({"note": nested(300)}, {"note": "a\u0000b"}):
        resp = await http.post(world.url("hs", route), json={**body, **extra},
                               headers={"X-Api-Key": world.keys["hs"],
                                        "Idempotency-Key": f"deep-{user}"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["code"] == "invalid_value"
    assert await balance(pg, "hs", user) == (5, 0)


async def test_granting_a_plan_makes_the_user_paid(world: World, http: httpx.AsyncClient,
                                                   pg: asyncpg.Connection) -> None:
    user = new_user("plan")
    token = await open_user(world, http, user)
    url = world.url("hs", "grants")
    headers = {"X-Api-Key": world.keys["hs"], "Idempotency-Key": f"grant-{user}"}
    unknown = await http.post(url, headers=headers, json={"user_id": user, "plan": "gold"})
    assert unknown.status_code == 400 and unknown.json()["code"] == "unknown_plan"
    granted = await http.post(url, headers=headers, json={"user_id": user, "plan": "pro"})
    assert granted.status_code == 200, granted.text
    assert granted.json()["credits"] == {"standard": 100, "advanced": 10}
    replay = await http.post(url, headers=headers, json={"user_id": user, "plan": "pro"})
    assert replay.content == granted.content
    me = (await http.get(world.url("hs", "user"), headers=bearer(token))).json()
    assert me["paid"] is True
    assert me["balances"] == [{"type": "standard", "count": 105},
                              {"type": "advanced", "count": 10}]
    plan_grants = [e for e in await entries(pg, "hs", user) if e["metadata"].get("plan")]
    assert sorted((e["asset"], e["amount"]) for e in plan_grants) == [
        ("advanced", 10), ("standard", 100)]


async def test_get_balances_with_token_or_key(world: World, http: httpx.AsyncClient) -> None:
    user = new_user("bal")
    token = await open_user(world, http, user)
    tokenization = {"enabled": True, "types": ["standard", "advanced"],
                    "trial": {"standard": 5},
                    "plans": [{"id": "pro", "name": "Pro",
                               "credits": {"standard": 100, "advanced": 10}}]}
    expected = {"balances": [{"type": "standard", "count": 5},
                             {"type": "advanced", "count": 0}],
                "tokenization": tokenization}
    url = world.url("hs", "balances")
    by_token = await http.get(url, headers=bearer(token))
    assert by_token.status_code == 200, by_token.text
    assert by_token.json() == expected
    by_key = await http.get(url, params={"user_id": user},
                            headers={"X-Api-Key": world.keys["hs"]})
    assert by_key.status_code == 200, by_key.text
    assert by_key.json() == expected
    nobody = await http.get(url, headers={"X-Api-Key": world.keys["hs"]})
    assert nobody.status_code == 400 and nobody.json()["code"] == "invalid_user"
    foreign = await http.get(url, params={"user_id": user},
                             headers={"X-Api-Key": world.keys["other"]})
    assert foreign.status_code == 403


# ---- an app's backend as the AI proxy (backend-as-ai-proxy) -------------------------

@dataclass
class Backend:
    """The app's own backend: it verifies the browser's Bearer with /user, calls its AI
    provider itself, then debits one credit with the owner key."""

    world: World
    http: httpx.AsyncClient
    database_url: str
    ai_calls: int = 0
    lose_first_debit_reply: bool = False

    async def chat(self, authorization: str | None, prompt: str, call_id: str
                   ) -> tuple[int, dict[str, Any]]:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token:
            return 401, {"error": "no_token"}
        who = await self.http.get(self.world.url("hs", "user"), headers=bearer(token))
        if who.status_code != 200:
            return 401, {"error": "invalid_token"}
        user = who.json()["user"]
        self.ai_calls += 1
        answer = f"echo: {prompt}"
        debit = {"user_id": user["id"], "type": "standard", "amount": 1, "op": "debit"}
        headers = {"X-Api-Key": self.world.keys["hs"], "Idempotency-Key": call_id}
        url = self.world.url("hs", "balances")
        if self.lose_first_debit_reply:
            # The debit reaches the proxy, its answer does not reach us in time.
            with contextlib.suppress(httpx.ReadTimeout):
                await self.http.post(url, headers=headers, json=debit,
                                     timeout=httpx.Timeout(5, read=0.0005))
            await self.landed(call_id)
        resp = await self.http.post(url, headers=headers, json=debit)
        if resp.status_code == 402 and resp.json()["code"] == "insufficient":
            return 402, {"error": "out_of_credits"}
        assert resp.status_code == 200, resp.text
        return 200, {"answer": answer, "user": user["id"],
                     "request_id": resp.json()["request_id"]}

    async def landed(self, key: str) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            deadline = time.monotonic() + 5
            while not await conn.fetchval("SELECT count(*) FROM entries"
                                          " WHERE idempotency_key = $1", key):
                assert time.monotonic() < deadline, "the first debit never landed"
                await asyncio.sleep(0.02)
        finally:
            await conn.close()


async def test_backend_verifies_then_debits_once(world: World, http: httpx.AsyncClient,
                                                 pg: asyncpg.Connection,
                                                 own_database_url: str) -> None:
    user = new_user("backend")
    token = await open_user(world, http, user)
    backend = Backend(world, http, own_database_url)

    assert await backend.chat(None, "hi", "call-0") == (401, {"error": "no_token"})
    forged = with_payload(token, claims("someone-else"))
    assert await backend.chat(f"Bearer {forged}", "hi", "call-0") == (
        401, {"error": "invalid_token"})
    assert backend.ai_calls == 0
    assert await balance(pg, "hs", user) == (5, 0)

    status, reply = await backend.chat(f"Bearer {token}", "hello", f"call-1-{user}")
    assert (status, reply["user"], reply["answer"]) == (200, user, "echo: hello")
    assert await balance(pg, "hs", user) == (4, 0)

    backend.lose_first_debit_reply = True
    status, reply = await backend.chat(f"Bearer {token}", "again", f"call-2-{user}")
    assert status == 200
    charges = [e for e in await entries(pg, "hs", user) if e["kind"] == "charge"]
    assert [(e["amount"], e["idempotency_key"]) for e in charges] == [
        (-1, f"call-1-{user}"), (-1, f"call-2-{user}")]
    assert charges[1]["request_id"] == reply["request_id"]  # the retry replayed the first
    assert await balance(pg, "hs", user) == (3, 0)

    backend.lose_first_debit_reply = False
    for i in range(3):
        assert (await backend.chat(f"Bearer {token}", "more", f"call-3{i}-{user}"))[0] == 200
    assert await backend.chat(f"Bearer {token}", "more", f"call-4-{user}") == (
        402, {"error": "out_of_credits"})
    assert await balance(pg, "hs", user) == (0, 0)


async def test_sign_in_provider_style_subjects_are_users(
        world: World, http: httpx.AsyncClient) -> None:
    # "auth0|…" and "google-oauth2|…" subjects are ordinary end users.
    sub = new_user("auth0|u")
    resp = await http.get(world.url("hs", "user"), headers=bearer(hs(claims(sub))))
    assert resp.status_code == 200, resp.text
    assert resp.json()["user"]["id"] == sub
