"""What operators see, checked from the outside: the proxy's log and its /metrics.

1. The redactor and the JSON formatter, as tables.
2. A proxy whose settings hold a canary secret in every place one can go (provider keys,
   a bring-your-own key, provider and gateway headers, the sign-in secret, the link
   secret, the metrics token, the database and Redis passwords) answers every route of
   the app (a test checks that none is left out) on its success and error paths. Its
   whole output must be JSON lines with none of the canaries in them, no client may see
   a configured secret, and each request must have exactly one ``proxy.access`` line,
   found by the response's ``X-Request-Id``, that says what happened.
3. /metrics after a known mix of requests counts exactly that mix, and its token and
   charge totals are the ledger's; /readyz follows PostgreSQL and Redis; with two
   workers every scrape sums both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jwt
import openai
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.routing import Match

from proxy import settings as config_module
from proxy.app import create_app
from proxy.observe import _KEY_PATTERNS, AccessWriter, JsonFormatter, Redactor, TextFormatter
from tests.conftest import (
    PROVIDER_KEY,
    Proxy,
    RedisServer,
    Samples,
    by,
    mint_keys,
    parse_metrics,
    serving_proxy,
)
from tests.upstream import CHUNK_DELAY, CHUNKS, WORDS, Upstream, free_port

# --- 1. the redactor and the formatter -------------------------------------------------

R = "[redacted]"
REDACTOR_CASES = [
    ("a configured secret, anywhere", ["s3cr3t-value"],
     "dsn=postgresql://u:s3cr3t-value@db/x", f"dsn=postgresql://u:{R}@db/x"),
    ("every occurrence", ["s3cr3t-value"], "s3cr3t-value and s3cr3t-value",
     f"{R} and {R}"),
    ("the longest secret first", ["abcdef", "abcdefgh"], "x abcdefgh y", f"x {R} y"),
    ("short strings are not taken for secrets", ["pass"], "password: pass",
     "password: pass"),
    ("a bearer credential", [], "Authorization: Bearer eyJhbGciOi.e30.sig-_1",
     f"Authorization: Bearer {R}"),
    ("bearer in any case, in quotes", [], "{'authorization': 'bearer tok-123'}",
     f"{{'authorization': 'bearer {R}'}}"),
    ("a paywall key", [], "key sk-pw-AbCdEf0123456789AbCdEf0123456789 refused",
     f"key {R} refused"),
    ("an OpenAI-style key", [], "upstream said sk-proj-abc_DEF-123456.",
     f"upstream said {R}."),
    ("a bare prefix is kept", [], "keys start with sk-pw- then 32 characters",
     "keys start with sk-pw- then 32 characters"),
    ("words with sk- inside are kept", [], "disk-cache-enabled, task-runner-thing",
     "disk-cache-enabled, task-runner-thing"),
    ("nothing to redact", ["s3cr3t-value"], "GET /v1/models 200", "GET /v1/models 200"),
]


@pytest.mark.parametrize(("secrets", "text", "expected"), [c[1:] for c in REDACTOR_CASES],
                         ids=[c[0] for c in REDACTOR_CASES])
def test_redactor(secrets: list[str], text: str, expected: str) -> None:
    assert Redactor(secrets)(text) == expected


def _patterns_only(text: str) -> str:
    return _KEY_PATTERNS.sub(lambda m: (m.group(1) or "") + R, text)


# The redactor skips the patterns when an ASCII text holds neither "sk-" nor "bearer" in
# any case: it must redact exactly what the patterns alone would, in every text, whatever
# its alphabet (a long s, "\u017f", matches "s" in a pattern that ignores case).
@given(st.lists(st.sampled_from(["sk-", "SK-", "Sk-", "\u017fk-", "s\u212a-", "bearer ",
                                 "BeArEr\t", "b\u0117arer ", "abcdefgh12", "-", " ", "\u00e9",
                                 "disk-", "x"]), max_size=8).map("".join))
def test_the_redactor_redacts_what_its_patterns_find(text: str) -> None:
    assert Redactor([])(text) == _patterns_only(text)


@pytest.mark.parametrize("text", ["SK-abcdefghijkl", "\u017fk-abcdefghijkl", "BEARER tok",
                                  "s\u212a-abcdefghijkl"])
def test_the_redactor_redacts_keys_in_any_case(text: str) -> None:
    assert Redactor([])(text) == _patterns_only(text) != text


def log_record(msg: str, *args: Any, exc_info: Any = None, **fields: Any) -> logging.LogRecord:
    record = logging.LogRecord("proxy.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    if fields:
        record.fields = fields
    return record


def test_json_formatter_redacts_a_traceback() -> None:
    secret = "CANARY-in-traceback-5521"

    def connect() -> None:
        raise RuntimeError(f"login failed for postgres:{secret}@db, "
                           "header 'Bearer tok-abcdef123', key sk-pw-AbCdEf0123456789")

    try:
        connect()
    except RuntimeError:
        record = log_record("could not connect to %s", f"db?password={secret}",
                            exc_info=sys.exc_info())
    line = JsonFormatter(Redactor([secret])).format(record)
    out = orjson.loads(line)
    assert out["level"] == "error" and out["logger"] == "proxy.test"
    assert out["msg"] == f"could not connect to db?password={R}"
    assert "Traceback (most recent call last)" in out["exc"]
    assert "in connect" in out["exc"]
    assert out["exc"].rstrip().endswith(
        f"RuntimeError: login failed for postgres:{R}@db, header 'Bearer {R}', key {R}")
    for leak in (secret, "tok-abcdef123", "sk-pw-AbCdEf"):
        assert leak not in line


def test_json_formatter_keeps_lines_valid_whatever_the_secrets_hold() -> None:
    """Secrets with quotes or backslashes, and bearer tokens inside JSON-quoted text."""
    quoted, backslashed = 'pa"ss"word-1', "back\\slash-22"
    record = log_record('upstream sent {"authorization": "Bearer tok-9876"} with %s and %s',
                        quoted, backslashed,
                        headers={"authorization": "Bearer tok-5432", "x-key": quoted},
                        tries=[backslashed, 3], status=401, cost=None)
    line = JsonFormatter(Redactor([quoted, backslashed])).format(record)
    out = orjson.loads(line)
    assert out["msg"] == f'upstream sent {{"authorization": "Bearer {R}"}} with {R} and {R}'
    assert out["headers"] == {"authorization": f"Bearer {R}", "x-key": R}
    assert out["tries"] == [R, 3]
    assert (out["status"], out["cost"]) == (401, None)
    for leak in ("tok-9876", "tok-5432", "pa\\\"ss", "back\\\\slash", "slash-22", "ss\\\""):
        assert leak not in line


def test_text_formatter_redacts_fields() -> None:
    record = log_record("request", user="u1", key="sk-pw-AbCdEf0123456789", token="t0p-s3cret")
    text = TextFormatter(Redactor(["t0p-s3cret"])).format(record)
    assert text.endswith(f"request user=u1 key={R} token={R}")


# --- 2. every route, with a canary in every secret ----------------------------------

PROVIDER_SECRET = "CANARY-provider-key-7Hq2Zx9Lm4"  # not sk-shaped: only the list catches it
HEADER_SECRET = "CANARY-header-token-Pw83Ks02Qa"
GATEWAY_SECRET = "CANARY-gateway-key-Lw38Fy91"
JWT_SECRET = "CANARY-jwt-secret-Qe72Dn46Vk"  # short: PyJWT warns, and that reaches the log
LINK_SECRET = "CANARY-link-secret-Yt61Bv57Nc"
METRICS_TOKEN = "CANARY-metrics-token-Rd40Gm18Uf"
DB_PASSWORD = "CANARY-dbpass-Ej29Wo73"
REDIS_PASSWORD = "CANARY-redispass-Hu36Ja50"
BYOK_SECRET = "sk-byok-CANARY-obs-Kf55Tr08Xz"
# Configuration secrets: they reach neither the log nor any client.
SECRETS = [PROVIDER_KEY, PROVIDER_SECRET, HEADER_SECRET, GATEWAY_SECRET, JWT_SECRET,
           LINK_SECRET, METRICS_TOKEN, DB_PASSWORD, REDIS_PASSWORD, BYOK_SECRET]
# What clients send: it reaches no log.
QUERY_CANARY = "CANARY-query-Vb14Hn66"
BEARER_CANARY = "CANARY-bearer-Zq90Lp35"
PROMPT_CANARY = "CANARY-prompt-Mx27Cs81"  # prompts never belong in a log either
BAD_TOKEN = "CANARY-link-token-Ga47Ws12"
CANARIES = [*SECRETS, QUERY_CANARY, BEARER_CANARY, PROMPT_CANARY, BAD_TOKEN]

PUBLIC_URL = "https://pay.example.test/obs"
CHECKOUT_URL = "https://shop.example.test/buy"
ORIGIN = "https://app.example.test"
PRICE = '{ input_per_million = "0.15", output_per_million = "0.60" }'
USD = 10**9
SECRET_ENV = {"OBS_PROVIDER_KEY": PROVIDER_SECRET, "OBS_LINK_SECRET": LINK_SECRET,
              "OBS_JWT_SECRET": JWT_SECRET, "OBS_GATEWAY_KEY": GATEWAY_SECRET}


def cost_units(prompt: int, completion: int) -> int:
    """usd units of PRICE: 0.15 and 0.60 per million tokens are 150 and 600 units each."""
    return prompt * 150 + completion * 600


def canary_config(upstream: Upstream) -> str:
    gateway = f'url = "{upstream.url}/chat/completions"\n' \
              'headers = { Authorization = "Bearer ${OBS_GATEWAY_KEY}" }\n'
    return f"""
[server]
max_body_bytes = 65536
public_url = "{PUBLIC_URL}"
link_secret = "${{OBS_LINK_SECRET}}"
metrics_token = "{METRICS_TOKEN}"
log_format = "json"

[database]
pool_min = 1
pool_max = 4

[upstream]
read_timeout = 5.0
stream_idle_timeout = 5.0
stream_max_seconds = 30.0

[providers.up]
kind = "openai"
base_url = "{upstream.url}"
api_key = "${{OBS_PROVIDER_KEY}}"
headers = {{ "X-Upstream-Token" = "{HEADER_SECRET}" }}

[providers.byok]
kind = "openai"
base_url = "{upstream.url}"

[providers.azure]
kind = "openai"
base_url = "{upstream.url}"
api_key = "{PROVIDER_KEY}"
auth_header = "api-key"

[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"

[models.priced]
provider = "up"
upstream = "echo"
price = {PRICE}

[models.priced-chunks]
provider = "up"
upstream = "chunks"
price = {PRICE}

[models.endless]
provider = "up"

[models.reject]
provider = "up"

[models.crash]
provider = "up"

[models.dead]
provider = "dead"

[models.byok-echo]
provider = "byok"
upstream = "echo"

[models.byok-reject]
provider = "byok"
upstream = "reject"

[models.azure-echo]
provider = "azure"
upstream = "echo"

[api_providers.gw]
{gateway}body = {{ model = "echo" }}

[api_providers.gw-reject]
{gateway}body = {{ model = "reject" }}

[api_providers.gw-dead]
url = "http://127.0.0.1:{free_port()}/v1"

[paywalls.app]
name = "Observed app"
starter_grant = "1"
checkout_url = "{CHECKOUT_URL}"
provider_keys = {{ byok = "{BYOK_SECRET}" }}
allowed_origins = ["{ORIGIN}"]

[paywalls.app.limits]  # checked in a Redis that is down: a warning per request
user_requests_per_minute = 1000

[paywalls.app.auth]
hs256_secret = "${{OBS_JWT_SECRET}}"

[paywalls.app.credits]
types = ["standard"]
trial = {{ standard = 3 }}

[paywalls.app.credits.plans.pro]
credits = {{ standard = 10 }}

[paywalls.broke]
starter_grant = "0"

[paywalls.broke.auth]
hs256_secret = "${{OBS_JWT_SECRET}}"

[paywalls.broke.credits]
types = ["standard"]

[paywalls.gated]
require_connect = true
starter_grant = "1"
"""


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username or 'postgres'}:{password}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Sent:
    status: int
    headers: Mapping[str, str]
    method: str
    path: str
    body: bytes

    @classmethod
    def of(cls, r: Any) -> Sent:
        """From an httpx response (the SDK's included); a stream's body is not kept."""
        try:
            body = bytes(r.content)
        except Exception:  # a streamed body, read as a stream
            body = b""
        return cls(r.status_code, r.headers, r.request.method, r.request.url.path, body)

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]


@dataclass
class Ctx:
    """What the cases share: the proxy, a key per paywall, links and tokens handed out."""

    proxy: Proxy
    keys: dict[str, str]
    http: httpx.Client
    links: dict[str, str] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)

    def auth(self, paywall: str = "app") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[paywall]}"}

    def signed_in(self, user: str = "obs-user-1") -> dict[str, str]:
        """An end user's sign-in token, as the app's own sign-in would issue it."""
        now = int(time.time())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            token = jwt.encode({"sub": user, "iat": now, "exp": now + 600}, JWT_SECRET,
                               algorithm="HS256")
        self.tokens.append(token)
        return {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, paywall: str | None = "app",
             headers: dict[str, str] | None = None, **kw: Any) -> Sent:
        h = {**(self.auth(paywall) if paywall else {}), **(headers or {})}
        return Sent.of(self.http.request(method, path, headers=h, **kw))

    @contextlib.contextmanager
    def sdk(self, paywall: str = "app", key: str | None = None,
            base_url: str | None = None) -> Iterator[OpenAI]:
        with OpenAI(api_key=key or self.keys[paywall], base_url=base_url or self.proxy.base_url,
                    max_retries=0, timeout=20) as c:
            yield c


USER = "obs-user-1"
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": f"Hello {PROMPT_CANARY}"}]
CHAT = "/v1/chat/completions"
GATEWAY = "/api/v1/api-gateway/{provider_id}"


def sdk_chat(model: str, paywall: str = "app", *, stream: bool = False,
             path_user: bool = False) -> Callable[[Ctx], Sent]:
    def send(c: Ctx) -> Sent:
        base = f"{c.proxy.base_url}/{USER}" if path_user else None
        with c.sdk(paywall, base_url=base) as sdk:
            kw: dict[str, Any] = {} if path_user else {"user": USER}
            raw = sdk.chat.completions.with_raw_response.create(
                model=model, messages=HELLO, stream=stream, **kw)
            parsed = raw.parse()
            if isinstance(parsed, ChatCompletion):
                text = parsed.choices[0].message.content or ""
            else:
                text = "".join(ch.choices[0].delta.content or "" for ch in parsed if ch.choices)
            assert text
            return Sent.of(raw.http_response)
    return send


def sdk_error(error: type[openai.APIStatusError], model: str, *,
              key: Callable[[Ctx], str] | None = None) -> Callable[[Ctx], Sent]:
    def send(c: Ctx) -> Sent:
        with c.sdk(key=key(c) if key else None) as sdk, pytest.raises(error) as raised:
            sdk.chat.completions.create(model=model, user=USER, messages=HELLO)
        return Sent.of(raised.value.response)
    return send


def wrong_key(c: Ctx) -> str:
    """The real key's prefix with another tail: what a typo or a revoked key looks like."""
    key = c.keys["app"]
    return key[:12] + ("A" if key[12] != "A" else "B") * (len(key) - 12)


def chat_stream_abort(c: Ctx) -> Sent:
    with c.http.stream("POST", CHAT, headers=c.auth(), json={
            "model": "endless", "user": USER, "messages": HELLO, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # the first event, then the client goes away
        return Sent.of(r)


def connect_reply(c: Ctx) -> Sent:
    with c.sdk("gated") as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="priced", user=USER, messages=HELLO)
    assert raw.headers["x-paywall-action"] == "connect"
    c.links["connect"] = orjson.loads(raw.content)["paywall"]["connect_link"]
    return Sent.of(raw.http_response)


def link_from(path: str, field_name: str, paywall: str) -> Callable[[Ctx], Sent]:
    def send(c: Ctx) -> Sent:
        sent = c.call("GET", path, paywall, params={"user": USER})
        c.links[f"{paywall}:{field_name}"] = orjson.loads(sent.body)[field_name]
        return sent
    return send


def token_of(link: str) -> str:
    return link.split("token=", 1)[1]


def page(method: str, which: str, *, good: bool, go: bool = False) -> Callable[[Ctx], Sent]:
    def send(c: Ctx) -> Sent:
        link = c.links["connect" if which == "/connect" else "app:topup_link"]
        assert link.startswith(PUBLIC_URL + ("/connect" if which == "/connect" else "/topup")
                               + "?token=")
        token = token_of(link) if good else BAD_TOKEN
        if method == "POST":
            return Sent.of(c.http.post(which, data={"token": token}))
        params = {"token": token, **({"go": "1"} if go else {})}
        return Sent.of(c.http.get(which, params=params))
    return send


def deposit(key: str | None, amount: str) -> Callable[[Ctx], Sent]:
    def send(c: Ctx) -> Sent:
        headers = {"Idempotency-Key": key} if key else {}
        return c.call("POST", "/v1/user/balance/deposit", headers=headers,
                      json={"user": USER, "amount": amount})
    return send


def too_large(c: Ctx) -> Sent:
    body = {"model": "priced", "user": USER,
            "messages": [{"role": "user", "content": PROMPT_CANARY * 4000}]}
    return c.call("POST", CHAT, json=body)


def api(method: str, path: str, *, who: str = "user", key: Callable[[Ctx], str] | None = None,
        **kw: Any) -> Callable[[Ctx], Sent]:
    """An /api/v1 call as the signed-in end user (``who="user"``), the owner (the paywall
    key in X-Api-Key), someone with a bad token, or nobody."""
    def send(c: Ctx) -> Sent:
        headers: dict[str, str] = {}
        if who == "user":
            headers = c.signed_in()
        elif who == "owner":
            headers = {"X-Api-Key": key(c) if key else c.keys["app"]}
        elif who == "bad":
            headers = {"Authorization": f"Bearer {BEARER_CANARY}"}
        return c.call(method, path, None, {**headers, **kw.pop("headers", {})}, **kw)
    return send


def gateway(provider: str = "gw", paywall: str = "app", path: str = "",
            method: str = "POST", **query: str) -> Callable[[Ctx], Sent]:
    url = f"/api/v1/api-gateway/{provider}" + (f"/{path}" if path else "")
    return api(method, url, params={"paywall_id": paywall, **query} if paywall else query,
               json={"user": USER, "messages": HELLO} if method == "POST" else None)


UNCHECKED = "*"


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Ctx], Sent]
    status: int
    outcome: str | None  # None: not access-logged (probes and scrapes)
    route: str = CHAT
    error: str | None = None  # None: no error field; UNCHECKED: not checked
    fields: dict[str, Any] = field(default_factory=dict)
    tokens: tuple[int, int] | None = None  # (prompt, completion) of a forwarded request
    priced: bool = False


FORWARD = {"paywall": "app", "user": USER, "provider": "up", "settlement": "completed"}
FAILED = {"paywall": "app", "user": USER, "settlement": "failed"}
GW = {"paywall": "app", "user": USER, "model": "gw", "provider": "gw"}
GW_OK = {**GW, "settlement": "completed", "cost": "1", "asset": "standard"}
BALANCES, USER_ROUTE = "/api/v1/paywall/{paywall_id}/balances", "/api/v1/paywall/{paywall_id}/user"
GRANTS = "/api/v1/paywall/{paywall_id}/grants"
CASES = [
    # chat completions: forwarded
    Case("chat", sdk_chat("priced"), 200, "forward",
         fields={**FORWARD, "model": "priced"}, tokens=(5, 2), priced=True),
    Case("chat-stream", sdk_chat("priced-chunks", stream=True), 200, "forward",
         fields={**FORWARD, "model": "priced-chunks"}, tokens=(5, CHUNKS), priced=True),
    # One route label for the chat endpoint, whichever way the user id arrives.
    Case("chat-user-in-path", sdk_chat("priced", path_user=True), 200, "forward", route=CHAT,
         fields={**FORWARD, "model": "priced"}, tokens=(5, 2), priced=True),
    Case("chat-byok", sdk_chat("byok-echo"), 200, "forward",
         fields={**FORWARD, "model": "byok-echo", "provider": "byok"}, tokens=(5, 2)),
    Case("chat-api-key-header", sdk_chat("azure-echo"), 200, "forward",
         fields={**FORWARD, "model": "azure-echo", "provider": "azure"}, tokens=(5, 2)),
    Case("chat-query-canary",
         lambda c: c.call("POST", f"{CHAT}?api_key={QUERY_CANARY}",
                          json={"model": "priced", "user": USER, "messages": HELLO}),
         200, "forward", fields={**FORWARD, "model": "priced"}, tokens=(5, 2), priced=True),
    Case("chat-stream-aborted", chat_stream_abort, 200, "forward",
         fields={**FORWARD, "model": "endless", "settlement": "aborted"}),
    # chat completions: answered by the paywall
    Case("chat-top-up", sdk_chat("priced", "broke"), 200, "top_up",
         fields={"paywall": "broke", "user": USER, "model": "priced"}),
    Case("chat-top-up-stream", sdk_chat("priced", "broke", stream=True), 200, "top_up",
         fields={"paywall": "broke", "user": USER}),
    Case("chat-connect", connect_reply, 200, "connect", fields={"paywall": "gated"}),
    # chat completions: refused
    Case("chat-no-key", lambda c: c.call("POST", CHAT, paywall=None, json={}), 401,
         "rejected", error="invalid_api_key"),
    Case("chat-wrong-key", sdk_error(openai.AuthenticationError, "priced", key=wrong_key),
         401, "rejected", error="invalid_api_key"),
    Case("chat-bearer-canary",
         lambda c: c.call("POST", CHAT, paywall=None,
                          headers={"Authorization": f"Bearer {BEARER_CANARY}"}, json={}),
         401, "rejected", error="invalid_api_key"),
    Case("chat-bad-json",
         lambda c: c.call("POST", CHAT, content=b'{"model": "priced", "user": ',
                          headers={"content-type": "application/json"}),
         400, "rejected", error="invalid_request_error", fields={"paywall": "app"}),
    Case("chat-too-large", too_large, 413, "rejected", error="request_too_large"),
    Case("chat-no-user",
         lambda c: c.call("POST", CHAT, json={"model": "priced", "messages": HELLO}),
         400, "rejected", error="missing_user"),
    Case("chat-unknown-model", sdk_error(openai.NotFoundError, "no-such-model"), 404,
         "rejected", error="model_not_found", fields={"paywall": "app", "user": USER}),
    Case("chat-wrong-method", lambda c: c.call("GET", CHAT), 405, "rejected",
         error=UNCHECKED),
    # chat completions: the provider fails
    Case("chat-upstream-401", sdk_error(openai.AuthenticationError, "reject"), 401, "forward",
         error="upstream_401", fields={**FAILED, "model": "reject", "provider": "up"}),
    Case("chat-byok-upstream-401", sdk_error(openai.AuthenticationError, "byok-reject"), 401,
         "forward", error="upstream_401", fields={**FAILED, "provider": "byok"}),
    Case("chat-upstream-500", sdk_error(openai.InternalServerError, "crash"), 500, "forward",
         error="upstream_500", fields={**FAILED, "model": "crash"}),
    Case("chat-upstream-down", sdk_error(openai.InternalServerError, "dead"), 502, "forward",
         error="upstream_unavailable", fields={**FAILED, "model": "dead", "provider": "dead"}),
    # models
    Case("models", lambda c: c.call("GET", "/v1/models"), 200, "ok", route="/v1/models"),
    Case("models-bearer-canary",
         lambda c: c.call("GET", "/v1/models", paywall=None,
                          headers={"Authorization": f"Bearer {BEARER_CANARY}"}),
         401, "rejected", route="/v1/models", error="invalid_api_key"),
    Case("model", lambda c: c.call("GET", "/v1/models/priced"), 200, "ok",
         route="/v1/models/{model:path}"),
    Case("model-unknown", lambda c: c.call("GET", "/v1/models/nope"), 404, "rejected",
         route="/v1/models/{model:path}", error="model_not_found"),
    Case("models-user-path", lambda c: c.call("GET", f"/v1/{USER}/models"), 200, "ok",
         route="/v1/models"),
    Case("model-user-path", lambda c: c.call("GET", f"/v1/{USER}/models/priced"), 200, "ok",
         route="/v1/models/{model:path}"),
    # the other wire formats: each route, refused before anything is held
    *(case for path in ("/v1/responses", "/v1/embeddings", "/v1/messages") for case in (
        Case(f"{path}-no-user",
             lambda c, path=path: c.call("POST", path, json={
                 "model": "priced", "input": "hi", "max_tokens": 5, "messages": HELLO}),
             400, "rejected", route=path, error="missing_user",
             fields={"paywall": "app"}),
        Case(f"{path}-user-path-unknown-model",
             lambda c, path=path: c.call("POST", path.replace("/v1/", f"/v1/{USER}/"), json={
                 "model": "nope", "input": "hi", "max_tokens": 5, "messages": HELLO}),
             404, "rejected", route=path, error="model_not_found",
             fields={"paywall": "app", "user": USER}))),
    Case("messages-sdk-base-url-unknown-model",
         lambda c: c.call("POST", f"/v1/{USER}/v1/messages", json={
             "model": "nope", "max_tokens": 5, "messages": HELLO}),
         404, "rejected", route="/v1/messages", error="model_not_found",
         fields={"paywall": "app", "user": USER}),
    # A model that exists but is not served at this endpoint: one code for every route.
    Case("messages-openai-model",
         lambda c: c.call("POST", f"/v1/{USER}/messages", json={
             "model": "priced", "max_tokens": 5, "messages": HELLO}),
         400, "rejected", route="/v1/messages", error="model_not_supported",
         fields={"paywall": "app", "user": USER}),
    Case("models-anthropic-sdk-user-path",
         lambda c: c.call("GET", f"/v1/{USER}/v1/models",
                          headers={"anthropic-version": "2023-06-01"}),
         200, "ok", route="/v1/models"),
    Case("model-anthropic-sdk-user-path",
         lambda c: c.call("GET", f"/v1/{USER}/v1/models/nope",
                          headers={"anthropic-version": "2023-06-01"}),
         404, "rejected", route="/v1/models/{model:path}", error="model_not_found"),
    Case("v1-unknown-route", lambda c: c.call("POST", "/v1/audio/speech", json={}), 404,
         "rejected", route="other", error=UNCHECKED),
    # the user API
    Case("balance", lambda c: c.call("GET", "/v1/user/balance", params={"user": USER}), 200,
         "ok", route="/v1/user/balance"),
    Case("balance-query-canary",
         lambda c: c.call("GET", "/v1/user/balance",
                          params={"user": USER, "api_key": QUERY_CANARY}),
         200, "ok", route="/v1/user/balance"),
    Case("balance-no-user", lambda c: c.call("GET", "/v1/user/balance"), 400, "rejected",
         route="/v1/user/balance", error="missing_user"),
    Case("balance-no-key", lambda c: c.call("GET", "/v1/user/balance", paywall=None,
                                            params={"user": USER}),
         401, "rejected", route="/v1/user/balance", error="invalid_api_key"),
    Case("connect-status", link_from("/v1/user/connect", "connect_link", "gated"), 200, "ok",
         route="/v1/user/connect"),
    Case("disconnect", lambda c: c.call("POST", "/v1/user/disconnect", json={"user": USER}),
         200, "ok", route="/v1/user/disconnect"),
    Case("disconnect-bad-json",
         lambda c: c.call("POST", "/v1/user/disconnect", content=b"{nope"), 400, "rejected",
         route="/v1/user/disconnect", error="invalid_request_error"),
    Case("topup-link", link_from("/v1/user/balance/topup", "topup_link", "app"), 200, "ok",
         route="/v1/user/balance/topup"),
    Case("deposit", deposit("obs-dep-1", "0.5"), 200, "ok", route="/v1/user/balance/deposit"),
    Case("deposit-replayed", deposit("obs-dep-1", "0.5"), 200, "ok",
         route="/v1/user/balance/deposit"),
    Case("deposit-conflict", deposit("obs-dep-1", "0.6"), 409, "rejected",
         route="/v1/user/balance/deposit", error="idempotency_conflict"),
    Case("deposit-no-idempotency-key", deposit(None, "0.5"), 400, "rejected",
         route="/v1/user/balance/deposit", error="idempotency_key_required"),
    Case("charge",
         lambda c: c.call("POST", "/v1/user/charge", headers={"Idempotency-Key": "obs-ch-1"},
                          json={"user": USER, "amount": "0.01"}),
         200, "ok", route="/v1/user/charge"),
    Case("charge-over-balance",
         lambda c: c.call("POST", "/v1/user/charge", headers={"Idempotency-Key": "obs-ch-2"},
                          json={"user": USER, "amount": "1000"}),
         402, "rejected", route="/v1/user/charge", error=UNCHECKED),
    Case("ledger", lambda c: c.call("GET", "/v1/user/ledger", params={"user": USER,
                                                                     "limit": "2"}),
         200, "ok", route="/v1/user/ledger"),
    Case("ledger-bad-limit",
         lambda c: c.call("GET", "/v1/user/ledger", params={"user": USER, "limit": "0"}),
         400, "rejected", route="/v1/user/ledger", error="invalid_request_error"),
    Case("usage", lambda c: c.call("GET", "/v1/usage", params={"user": USER}), 200, "ok",
         route="/v1/usage"),
    Case("usage-bad-date",
         lambda c: c.call("GET", "/v1/usage", params={"user": USER, "from": "someday"}),
         400, "rejected", route="/v1/usage", error="invalid_request_error"),
    Case("limits", lambda c: c.call("GET", "/v1/user/limits", params={"user": USER}), 200,
         "ok", route="/v1/user/limits"),
    Case("limits-patch",
         lambda c: c.call("PATCH", "/v1/user/limits",
                          json={"user": USER, "requests_per_minute": 1000}),
         200, "ok", route="/v1/user/limits"),
    Case("limits-patch-bad",
         lambda c: c.call("PATCH", "/v1/user/limits",
                          json={"user": USER, "requests_per_minute": "lots"}),
         400, "rejected", route="/v1/user/limits", error="invalid_request_error"),
    # the pages behind the links
    Case("connect-page", page("GET", "/connect", good=True), 200, "ok", route="/connect"),
    Case("connect-page-bad-token", page("GET", "/connect", good=False), 400, "rejected",
         route="/connect"),
    Case("connect-submit-bad-token", page("POST", "/connect", good=False), 400, "rejected",
         route="/connect"),
    Case("connect-submit", page("POST", "/connect", good=True), 200, "ok", route="/connect"),
    Case("topup-page", page("GET", "/topup", good=True), 200, "ok", route="/topup"),
    Case("topup-page-go", page("GET", "/topup", good=True, go=True), 303, "ok",
         route="/topup"),
    Case("topup-page-bad-token", page("GET", "/topup", good=False), 400, "rejected",
         route="/topup"),
    # The webhook API, with the paywall key.
    Case("webhooks-create-bad-url",
         lambda c: c.call("POST", "/v1/webhooks/subscriptions", json={"url": "ftp://x"}),
         400, "rejected", route="/v1/webhooks/subscriptions", error=UNCHECKED),
    Case("webhooks-list", lambda c: c.call("GET", "/v1/webhooks/subscriptions"), 200, "ok",
         route="/v1/webhooks/subscriptions"),
    *[Case(f"webhooks-{method.lower()}-unknown",
           lambda c, m=method: c.call(m, "/v1/webhooks/subscriptions/whsub_nope",
                                      **({"json": {}} if m == "PATCH" else {})),
           404, "rejected", route="/v1/webhooks/subscriptions/{id}", error="not_found")
      for method in ("GET", "PATCH", "DELETE")],
    Case("webhooks-rotate-unknown",
         lambda c: c.call("POST", "/v1/webhooks/subscriptions/whsub_nope/rotate"), 404,
         "rejected", route="/v1/webhooks/subscriptions/{id}/rotate", error="not_found"),
    Case("webhooks-deliveries", lambda c: c.call("GET", "/v1/webhooks/deliveries"), 200, "ok",
         route="/v1/webhooks/deliveries"),
    Case("webhooks-replay-unknown",
         lambda c: c.call("POST", "/v1/webhooks/deliveries/replay",
                          json={"event_id": "evt_nope"}), 404, "rejected",
         route="/v1/webhooks/deliveries/replay", error="not_found"),
    # Payment routes, on paywalls without Stripe: refused, and logged like the pages.
    Case("topup-checkout-no-stripe", page("POST", "/topup/checkout", good=True), 400,
         "rejected", route="/topup/checkout"),
    Case("topup-recharge-bad-token", page("POST", "/topup/recharge", good=False), 400,
         "rejected", route="/topup/recharge"),
    Case("topup-done-bad-token", page("GET", "/topup/done", good=False), 400, "rejected",
         route="/topup/done"),
    Case("stripe-webhook-no-stripe",
         lambda c: c.call("POST", "/webhooks/stripe/app", None, content=b"{}"), 404,
         "rejected", route="/webhooks/stripe/{paywall}", error="not_found"),
    # /api/v1: end users with the app's sign-in token, the owner with the paywall key
    Case("api-user", api("GET", "/api/v1/paywall/app/user"), 200, "ok", route=USER_ROUTE,
         fields={"paywall": "app", "user": USER}),
    Case("api-user-bearer-canary", api("GET", "/api/v1/paywall/app/user", who="bad"), 401,
         "rejected", route=USER_ROUTE, error="invalid_token"),
    Case("api-user-no-token", api("GET", "/api/v1/paywall/app/user", who="nobody"), 401,
         "rejected", route=USER_ROUTE, error="missing_token"),
    Case("api-user-unknown-paywall", api("GET", "/api/v1/paywall/nope/user"), 404,
         "rejected", route=USER_ROUTE, error="paywall_not_found"),
    Case("api-balances", api("GET", "/api/v1/paywall/app/balances"), 200, "ok",
         route=BALANCES, fields={"paywall": "app", "user": USER}),
    Case("api-balances-owner",
         api("GET", "/api/v1/paywall/app/balances", who="owner", params={"user_id": USER}),
         200, "ok", route=BALANCES, fields={"paywall": "app", "user": USER}),
    Case("api-balances-wrong-key",
         api("GET", "/api/v1/paywall/app/balances", who="owner", key=wrong_key,
             params={"user_id": USER}),
         401, "rejected", route=BALANCES, error="invalid_api_key"),
    Case("api-credit",
         api("POST", "/api/v1/paywall/app/balances", who="owner",
             headers={"Idempotency-Key": "obs-api-1"},
             json={"user_id": USER, "type": "standard", "amount": 5, "op": "credit"}),
         200, "ok", route=BALANCES, fields={"paywall": "app", "user": USER}),
    Case("api-debit-over-balance",
         api("POST", "/api/v1/paywall/app/balances", who="owner",
             json={"user_id": USER, "type": "standard", "amount": 1000, "op": "debit"}),
         402, "rejected", route=BALANCES, error=UNCHECKED),
    Case("api-credit-as-end-user",
         api("POST", "/api/v1/paywall/app/balances",
             json={"user_id": USER, "type": "standard", "amount": 5, "op": "credit"}),
         403, "rejected", route=BALANCES, error="apikey_required"),
    Case("api-grant",
         api("POST", "/api/v1/paywall/app/grants", who="owner",
             json={"user_id": USER, "plan": "pro"}),
         200, "ok", route=GRANTS, fields={"paywall": "app", "user": USER}),
    Case("api-grant-unknown-plan",
         api("POST", "/api/v1/paywall/app/grants", who="owner",
             json={"user_id": USER, "plan": "gold"}),
         400, "rejected", route=GRANTS, error="unknown_plan"),
    Case("cors-preflight",
         api("OPTIONS", "/api/v1/paywall/app/user", who="nobody",
             headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}),
         204, "ok", route="other"),
    Case("cors-preflight-refused",
         api("OPTIONS", "/api/v1/paywall/app/user", who="nobody",
             headers={"Origin": "https://elsewhere.example.test",
                      "Access-Control-Request-Method": "GET"}),
         403, "rejected", route="other"),
    # /api/v1/api-gateway: one credit per call, the provider's key held here
    Case("gateway", gateway(), 200, "forward", route=GATEWAY, fields=GW_OK),
    # One route label for the gateway endpoint, with or without a path after it.
    Case("gateway-path-query-canary", gateway(path="more", api_key=QUERY_CANARY), 200,
         "forward", route=GATEWAY, fields=GW_OK),
    Case("gateway-upstream-401", gateway("gw-reject"), 401, "forward", route=GATEWAY,
         error="upstream_401", fields={**GW, "model": "gw-reject", "provider": "gw-reject",
                                       "settlement": "failed"}),
    Case("gateway-upstream-down", gateway("gw-dead"), 502, "forward", route=GATEWAY,
         error="upstream_unavailable", fields={"model": "gw-dead", "settlement": "failed"}),
    Case("gateway-no-credits", gateway(paywall="broke"), 402, "not_enough_queries",
         route=GATEWAY, error="not_enough_queries", fields={"paywall": "broke", "user": USER}),
    Case("gateway-unknown-provider", gateway("nope"), 404, "rejected", route=GATEWAY,
         error="provider_not_found"),
    Case("gateway-no-paywall", gateway(paywall=""), 400, "rejected", route=GATEWAY,
         error="paywall_required"),
    Case("gateway-wrong-method", gateway(method="GET"), 405, "rejected", route=GATEWAY,
         error="method_not_allowed"),
    Case("gateway-bearer-canary",
         lambda c: api("POST", "/api/v1/api-gateway/gw", who="bad",
                       params={"paywall_id": "app"}, json={})(c),
         401, "rejected", route=GATEWAY, error="invalid_token"),
    Case("not-found", lambda c: c.call("GET", "/v1/nothing-here"), 404, "rejected",
         route="other"),
    # probes and scrapes: answered, never access-logged
    Case("healthz", lambda c: c.call("GET", "/healthz", paywall=None), 200, None),
    Case("readyz-redis-down", lambda c: c.call("GET", "/readyz", paywall=None), 503, None),
    Case("metrics-no-token", lambda c: c.call("GET", "/metrics", paywall=None), 401, None),
    Case("metrics-bearer-canary",
         lambda c: c.call("GET", "/metrics", paywall=None,
                          headers={"Authorization": f"Bearer {BEARER_CANARY}"}), 401, None),
    Case("metrics-paywall-key", lambda c: c.call("GET", "/metrics"), 401, None),
    Case("metrics", lambda c: c.call("GET", "/metrics", paywall=None,
                                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"}),
         200, None),
]
LOGGED = [c for c in CASES if c.outcome is not None]

# Bugs outside this file's reach, by (test, case): strict, so a fix makes them fail
# until the mark goes.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def cases(test: str, which: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(
        strict=True, reason=KNOWN_BUGS[test, c.name])] if (test, c.name) in KNOWN_BUGS
        else []) for c in which]


@dataclass
class Observed:
    config: Path
    sent: dict[str, Sent]
    output: str
    lines: list[Any]  # each output line parsed, or the raw text when it is not JSON
    access: dict[str, list[dict[str, Any]]]  # request id → its access lines
    sensitive: list[str]  # the keys, link tokens and sign-in tokens of this run


def invalid_http(proxy: Proxy) -> bytes:
    """A request the HTTP parser refuses (the server answers 400 and logs a warning)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions?api_key=" + QUERY_CANARY.encode()
                     + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + BEARER_CANARY.encode() + b"\r\nContent-Length: many\r\n\r\n")
        return sock.recv(4096)


def read_log(proxy: Proxy) -> tuple[str, list[Any], dict[str, list[dict[str, Any]]]]:
    output = proxy.output()
    lines: list[Any] = []
    access: dict[str, list[dict[str, Any]]] = {}
    for line in output.splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            lines.append(line)
            continue
        lines.append(obj)
        if isinstance(obj, dict) and obj.get("logger") == "proxy.access":
            access.setdefault(str(obj.get("request_id")), []).append(obj)
    return output, lines, access


@pytest.fixture(scope="module")
def observed(upstream: Upstream, own_database_url: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("observe")
    keys = asyncio.run(mint_keys(own_database_url, ["app", "broke", "gated"]))
    dead_redis = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    with serving_proxy(canary_config(upstream), with_password(own_database_url, DB_PASSWORD),
                       workdir, {**SECRET_ENV, "REDIS_URL": dead_redis}) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=20) as http:
            ctx = Ctx(proxy, keys, http)
            sent = {case.name: case.send(ctx) for case in CASES}
        assert invalid_http(proxy).startswith(b"HTTP/1.1 400 ")
        deadline = time.monotonic() + 10
        while True:  # a stream's line is written once the proxy has noticed it ended
            output, lines, access = read_log(proxy)
            if all(sent[c.name].request_id in access for c in LOGGED):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        yield Observed(workdir / "proxy.toml", sent, output, lines, access, [
            *keys.values(), wrong_key(ctx), *ctx.tokens,
            *(token_of(v) for v in ctx.links.values())])


def test_the_canaries_were_in_use(observed: Observed, upstream: Upstream) -> None:
    """The test proves nothing unless the secrets really were used: the providers saw
    their keys and header, the BYOK key and the gateway's key, and the answers came."""
    sent = [s for s in list(upstream.seen) if s.body.get("user") == USER]
    auths = {s.headers.get("authorization") for s in sent}
    assert {f"Bearer {PROVIDER_SECRET}", f"Bearer {BYOK_SECRET}",
            f"Bearer {GATEWAY_SECRET}"} <= auths
    assert PROVIDER_KEY in {s.headers.get("api-key") for s in sent}
    assert all(s.headers.get("x-upstream-token") == HEADER_SECRET
               for s in sent if s.headers.get("authorization") == f"Bearer {PROVIDER_SECRET}")
    assert any(PROMPT_CANARY in orjson.dumps(s.body).decode() for s in sent)
    assert any(QUERY_CANARY in s.query for s in sent)  # the gateway passes the query on
    for case in CASES:
        assert observed.sent[case.name].status == case.status, case.name


def test_every_route_is_exercised(observed: Observed) -> None:
    """Each route of the app (each path and method) got at least one of the requests."""
    settings = config_module.load(observed.config, {**os.environ, **SECRET_ENV})
    app: Any = create_app(settings)
    while not isinstance(app, Starlette):  # through the middleware to the router
        app = app.app
    sent = list(observed.sent.values())
    missed = []
    routes: list[Any] = app.routes
    assert len(routes) > 20
    for route in routes:
        if not any(route.matches({"type": "http", "path": s.path, "method": s.method,
                                  "root_path": ""})[0] is Match.FULL for s in sent):
            missed.append(f"{sorted(route.methods or [])} {route.path}")
    assert not missed, f"routes no case exercises: {missed}"


def test_no_secret_reaches_the_log(observed: Observed) -> None:
    text = observed.output
    assert observed.access, "the log holds no access lines at all"
    # Besides the access lines, warnings with a cause were written: Redis is down, and
    # the HTTP parser refused a request.
    warnings = [line.get("msg", "") for line in observed.lines
                if isinstance(line, dict) and line.get("level") == "warning"]
    assert sum(m.startswith("rate limiter unavailable (Error") for m in warnings) >= 5
    assert warnings.count("Invalid HTTP request received.") == 1
    assert any(isinstance(line, dict) and line.get("logger") == "py.warnings"
               and "InsecureKeyLengthWarning" in line["msg"] for line in observed.lines)
    for secret in [*CANARIES, *observed.sensitive]:
        assert secret not in text, f"{secret!r} is in the log"
    assert "CANARY" not in text
    assert "sk-pw-" not in text and "sk-byok" not in text and "sk-operator" not in text
    assert not re.search(r"(?i)bearer\s+(?!\[redacted\])[^\s\"'\\]", text)


@pytest.mark.parametrize("case", cases("client", CASES))
def test_no_secret_reaches_a_client(observed: Observed, case: Case) -> None:
    sent = observed.sent[case.name]
    answer = sent.body.decode(errors="replace") + repr(dict(sent.headers))
    for secret in SECRETS:
        assert secret not in answer


def test_every_line_is_a_json_object(observed: Observed) -> None:
    assert len(observed.lines) > len(LOGGED)
    for line in observed.lines:
        assert isinstance(line, dict), f"not a JSON object: {line!r}"
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line


def test_one_access_line_per_request_and_none_for_probes(observed: Observed) -> None:
    expected = {observed.sent[c.name].request_id for c in LOGGED}
    assert len(expected) == len(LOGGED)  # every response had an id of its own
    assert set(observed.access) == expected
    counts = Counter(len(v) for v in observed.access.values())
    assert counts == {1: len(LOGGED)}
    for case in CASES:
        if case.outcome is None:
            assert observed.sent[case.name].request_id not in observed.access, case.name


@pytest.mark.parametrize("case", cases("access", LOGGED))
def test_access_line(observed: Observed, case: Case) -> None:
    sent = observed.sent[case.name]
    [line] = observed.access[sent.request_id]
    assert (line["level"], line["msg"]) == ("info", "request")
    assert line["method"] == sent.method
    assert (line["status"], line["outcome"], line["route"]) == (
        case.status, case.outcome, case.route)
    if case.error != UNCHECKED:
        assert line.get("error") == case.error
    for k, v in case.fields.items():
        assert line.get(k) == v, (k, line)
    assert line["duration_ms"] >= 0
    if case.outcome != "forward":
        for k in ("settlement", "hold_id", "upstream_ms", "cost", "prompt_tokens"):
            assert k not in line, (k, line)
        return
    assert line["model"] and line["provider"]
    up, total = line["upstream_ms"], line["duration_ms"]
    assert 0 <= up <= total
    assert line["overhead_ms"] == pytest.approx(total - up, abs=0.002)
    if "ttft_ms" in line:
        assert 0 <= line["ttft_ms"] <= up
    if line["settlement"] == "failed":
        assert "cost" not in line and "prompt_tokens" not in line
    else:
        assert isinstance(line["hold_id"], int)
        assert line["ttft_ms"] >= 0
    if case.tokens is not None:  # the chat models: unpriced ones are forwarded at no cost
        assert (line["prompt_tokens"], line["completion_tokens"]) == case.tokens
        assert line["asset"] == "usd"
        assert Decimal(line["cost"]) * USD == (cost_units(*case.tokens) if case.priced else 0)
    if "x-paywall-cost" in sent.headers:
        assert line["cost"] == sent.headers["x-paywall-cost"]
    if case.name == "chat-stream":
        assert up >= (CHUNKS - 1) * CHUNK_DELAY * 1000 * 0.9  # the stream's whole length
    if case.name == "chat-stream-aborted":
        assert line["prompt_tokens"] > 0 and line["completion_tokens"] >= 1


def test_metrics_token(observed: Observed) -> None:
    assert observed.sent["metrics-no-token"].status == 401
    assert observed.sent["metrics-bearer-canary"].status == 401
    assert observed.sent["metrics-paywall-key"].status == 401
    metrics = observed.sent["metrics"]
    assert metrics.status == 200
    parsed = parse_metrics(metrics.body.decode())
    assert total(parsed, "paywall_requests_total", route=CHAT) > 0


# --- 3. /metrics, /readyz --------------------------------------------------------------

N_PLAIN, N_STREAMS, N_TOP_UP = 6, 3, 4


def metrics_config(upstream: Upstream, pool_min: int = 2) -> str:
    return f"""
[database]
pool_min = {pool_min}
pool_max = 4

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[models.m-echo]
provider = "up"
upstream = "echo"
price = {PRICE}

[models.m-chunks]
provider = "up"
upstream = "chunks"
price = {PRICE}

[paywalls.met]
starter_grant = "1"

[paywalls.met-broke]
starter_grant = "0"
"""


def scrape(proxy: Proxy, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(proxy.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def eventually_scrape(proxy: Proxy, done: Callable[[Samples], bool], what: str,
                      within: float = 10.0, token: str | None = None) -> Samples:
    deadline = time.monotonic() + within
    while True:
        samples = scrape(proxy, token)
        if done(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def check_histograms(samples: Samples) -> None:
    """Every histogram series: cumulative buckets, +Inf equal to _count."""
    series: dict[tuple[str, frozenset[tuple[str, str]]], list[tuple[float, float]]] = {}
    for (name, labels), v in samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            rest = frozenset(kv for kv in labels if kv[0] != "le")
            series.setdefault((name.removesuffix("_bucket"), rest), []).append(
                (float(le), v))
    assert series
    for (base, labels), buckets in series.items():
        counts = [v for _, v in sorted(buckets)]
        assert counts == sorted(counts), (base, labels)
        assert sorted(buckets)[-1][0] == float("inf")
        assert counts[-1] == samples[(base + "_count", labels)], (base, labels)


@dataclass
class Metered:
    proxy: Proxy
    keys: dict[str, str]
    database_url: str


@pytest.fixture(scope="module")
def metered(upstream: Upstream, own_database_url: str, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    keys = asyncio.run(mint_keys(own_database_url, ["met", "met-broke"]))
    with serving_proxy(metrics_config(upstream), own_database_url,
                       tmp_path_factory.mktemp("metrics"),
                       {"REDIS_URL": redis_server.url}) as proxy:
        yield Metered(proxy, keys, own_database_url)


async def send_mix(proxy: Proxy, keys: dict[str, str]) -> list[str]:
    """N_PLAIN completions, N_STREAMS streams, N_TOP_UP top-up replies, one unknown model."""
    async def plain(c: AsyncOpenAI, user: str) -> str:
        r = await c.chat.completions.with_raw_response.create(
            model="m-echo", user=user, messages=HELLO)
        assert r.parse().choices[0].message.content == "echo 0"
        assert "x-paywall-action" not in r.headers
        return "forward"

    async def stream(c: AsyncOpenAI, user: str) -> str:
        r = await c.chat.completions.with_raw_response.create(
            model="m-chunks", user=user, messages=HELLO, stream=True)
        text = [ch.choices[0].delta.content async for ch in r.parse() if ch.choices]
        assert text == WORDS
        return "forward"

    async def top_up(c: AsyncOpenAI, user: str, streamed: bool) -> str:
        r = await c.chat.completions.with_raw_response.create(
            model="m-echo", user=user, messages=HELLO, stream=streamed)
        parsed = r.parse()
        if not isinstance(parsed, ChatCompletion):
            assert [_ async for _ in parsed]
        return str(r.headers["x-paywall-action"])

    async with AsyncOpenAI(api_key=keys["met"], base_url=proxy.base_url, max_retries=0) as c, \
            AsyncOpenAI(api_key=keys["met-broke"], base_url=proxy.base_url,
                        max_retries=0) as broke:
        results = await asyncio.gather(
            *(plain(c, f"met-{i % 3}") for i in range(N_PLAIN)),
            *(stream(c, f"met-{i % 3}") for i in range(N_STREAMS)),
            *(top_up(broke, f"broke-{i}", i % 2 == 1) for i in range(N_TOP_UP)))
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.create(model="nope", user="met-0", messages=HELLO)
    return list(results)


async def ledger_sums(database_url: str, paywall: str) -> dict[str, tuple[int, int, int]]:
    """By model: prompt tokens, completion tokens and units charged, from the entries."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT e.model, sum(e.prompt_tokens) AS p, sum(e.completion_tokens) AS c,"
            " sum(-e.amount) AS charged FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.paywall_id = $1 AND e.kind = 'charge' GROUP BY e.model", paywall)
        return {r["model"]: (r["p"], r["c"], r["charged"]) for r in rows}
    finally:
        await conn.close()


async def count_holds(database_url: str, status: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM holds WHERE status = $1", status)
        return n
    finally:
        await conn.close()


def test_metrics_count_what_was_sent(metered: Metered) -> None:
    proxy = metered.proxy
    before = scrape(proxy)
    assert total(before, "paywall_requests_total", route=CHAT) == 0
    results = asyncio.run(send_mix(proxy, metered.keys))
    assert Counter(results) == {"forward": N_PLAIN + N_STREAMS, "top_up": N_TOP_UP}
    n_chat = N_PLAIN + N_STREAMS + N_TOP_UP + 1
    m = eventually_scrape(proxy, lambda s: total(s, "paywall_requests_total", route=CHAT)
                          >= n_chat, "every chat request to be counted")
    forwarded = N_PLAIN + N_STREAMS

    assert by(m, "paywall_requests_total", ("method", "status", "outcome"), route=CHAT) == {
        ("POST", "200", "forward"): forwarded,
        ("POST", "200", "top_up"): N_TOP_UP,
        ("POST", "404", "rejected"): 1,
    }
    assert total(m, "paywall_requests_total", route="/metrics") >= 1  # the first scrape
    assert by(m, "paywall_request_duration_seconds_count", ("outcome",), route=CHAT) == {
        ("forward",): forwarded, ("top_up",): N_TOP_UP, ("rejected",): 1}
    assert by(m, "paywall_upstream_duration_seconds_count", ("provider", "model")) == {
        ("up", "m-echo"): N_PLAIN, ("up", "m-chunks"): N_STREAMS}
    assert by(m, "paywall_upstream_ttft_seconds_count", ("provider", "model")) == {
        ("up", "m-echo"): N_PLAIN, ("up", "m-chunks"): N_STREAMS}
    assert by(m, "paywall_proxy_overhead_seconds_count", ("route",)) == {(CHAT,): forwarded}
    # A stream's upstream time is its whole length; its first byte comes at once.
    stream_seconds = (CHUNKS - 1) * CHUNK_DELAY
    up_sum = total(m, "paywall_upstream_duration_seconds_sum", model="m-chunks")
    assert up_sum >= N_STREAMS * stream_seconds * 0.9
    assert total(m, "paywall_upstream_ttft_seconds_sum", model="m-chunks") < up_sum / 2
    assert total(m, "paywall_request_duration_seconds_sum", route=CHAT, outcome="forward") >= \
        total(m, "paywall_upstream_duration_seconds_sum")
    check_histograms(m)

    ledger = asyncio.run(ledger_sums(metered.database_url, "met"))
    assert ledger == {"m-echo": (5 * N_PLAIN, 2 * N_PLAIN, cost_units(5, 2) * N_PLAIN),
                      "m-chunks": (5 * N_STREAMS, CHUNKS * N_STREAMS,
                                   cost_units(5, CHUNKS) * N_STREAMS)}
    assert asyncio.run(ledger_sums(metered.database_url, "met-broke")) == {}
    tokens = by(m, "paywall_tokens_total", ("direction", "model", "paywall"))
    assert tokens == {(d, model, "met"): float(v[i])
                      for model, v in ledger.items()
                      for i, d in enumerate(("prompt", "completion"))}
    charged = by(m, "paywall_charged_total", ("asset", "paywall"))
    assert charged.keys() == {("usd", "met")}
    exact = Decimal(sum(v[2] for v in ledger.values())) / USD
    assert charged["usd", "met"] == pytest.approx(float(exact), rel=1e-12)
    assert by(m, "paywall_settlements_total", ("paywall", "outcome")) == {
        ("met", "completed"): forwarded}
    assert by(m, "paywall_errors_total", ("component",)) == {}
    assert {dict(ls)["component"] for (n, ls) in m if n == "paywall_errors_total"} == {
        "ledger", "database", "redis", "upstream", "tokenizer", "breakers"}
    assert total(m, "paywall_holds_expired_total") == 0
    assert asyncio.run(count_holds(metered.database_url, "pending")) == 0
    assert total(m, "paywall_holds_pending") == 0
    assert total(m, "paywall_holds_live") == 0
    assert total(m, "paywall_db_pool_connections", state="open") >= 2
    assert total(m, "process_cpu_seconds_total") > 0  # one process: its own metrics too


def test_readyz_checks_database_and_redis(metered: Metered, redis_server: RedisServer) -> None:
    url = metered.proxy.url + "/readyz"
    r = httpx.get(url)
    assert (r.status_code, r.json()) == (
        200, {"status": "ready", "checks": {"database": "ok", "redis": "ok"}})
    redis_server.kill()
    try:
        r = httpx.get(url, timeout=10)
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["redis"].startswith("unavailable")
    finally:
        redis_server.start()
    deadline = time.monotonic() + 10
    while (r := httpx.get(url, timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.json()["checks"] == {"database": "ok", "redis": "ok"}


def worker_pids(proxy: Proxy) -> list[int]:
    """The serve process's children that write metrics files."""
    parent = proxy.process.pid
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        if f"\nPPid:\t{parent}\n" in status:
            out.append(int(entry.name))
    return sorted(out)


def metrics_dir(pid: int) -> Path | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(item.split(b"=", 1)[1].decode())
    return None


def forwarded_by(path: Path) -> float:
    """Forwarded chat requests in one worker's counter file."""
    n = 0.0
    for metric in MultiProcessCollector.merge([str(path)]):  # type: ignore[no-untyped-call]
        for s in metric.samples:
            if (s.name == "paywall_requests_total" and s.labels.get("route") == CHAT
                    and s.labels.get("outcome") == "forward"):
                n += s.value
    return n


def test_two_workers_sum_in_every_scrape(upstream: Upstream, own_database_url: str,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    pool_min = 3
    keys = asyncio.run(mint_keys(own_database_url, ["met"]))
    with serving_proxy(metrics_config(upstream, pool_min), own_database_url,
                       tmp_path_factory.mktemp("workers"), args=("--workers", "2")) as proxy:
        deadline = time.monotonic() + 20
        while True:  # both workers up: each has written its counter file
            files = {}
            for pid in worker_pids(proxy):
                d = metrics_dir(pid)
                if d is not None and (d / f"counter_{pid}.db").exists():
                    files[pid] = d / f"counter_{pid}.db"
            if len(files) == 2:
                break
            assert time.monotonic() < deadline, f"workers: {files}\n{proxy.output()}"
            time.sleep(0.1)

        async def burst() -> None:
            # All at once, so each opens a connection of its own, which either worker
            # may accept.
            async with AsyncOpenAI(api_key=keys["met"], base_url=proxy.base_url,
                                   max_retries=0, timeout=30) as c:
                replies = await asyncio.gather(*(
                    c.chat.completions.create(model="m-echo", user=f"w-{i % 5}",
                                              messages=HELLO)
                    for i in range(40)))
            assert [r.choices[0].message.content for r in replies] == ["echo 0"] * 40

        asyncio.run(burst())
        for i in range(6):
            m = eventually_scrape(
                proxy, lambda s: total(s, "paywall_requests_total", route=CHAT) >= 40,
                "both workers' requests")
            assert by(m, "paywall_requests_total", ("status", "outcome"), route=CHAT) == {
                ("200", "forward"): 40}, f"scrape {i}"
            assert by(m, "paywall_tokens_total", ("direction",), paywall="met") == {
                ("prompt",): 5 * 40, ("completion",): 2 * 40}
            assert by(m, "paywall_settlements_total", ("outcome",)) == {("completed",): 40}
            check_histograms(m)
            assert total(m, "process_cpu_seconds_total") == 0  # not in multiprocess mode
        per_worker = {pid: forwarded_by(path) for pid, path in files.items()}
        assert sum(per_worker.values()) == 40
        assert all(n > 0 for n in per_worker.values()), per_worker
        eventually_scrape(  # each worker samples its pool every two seconds
            proxy, lambda s: total(s, "paywall_db_pool_connections", state="open")
            >= 2 * pool_min, "both workers' pools in the gauge")


def test_access_writer_writes_one_redacted_json_line_per_call() -> None:


    read_end, write_end = os.pipe()
    try:
        writer = AccessWriter(Redactor(["configured-canary-secret"]), fd=write_end)
        writer.write({"request_id": "req_1", "user": "sk-pw-ABCDEFGHIJKLMNOP", "status": 200})
        writer.write({"request_id": "configured-canary-secret", "status": 402})
        os.close(write_end)
        write_end = -1
        lines = os.read(read_end, 65536).decode().splitlines()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    first, second = (orjson.loads(line) for line in lines)
    assert (first["logger"], first["msg"], first["level"]) == ("proxy.access", "request", "info")
    assert first["user"] == "[redacted]" and first["status"] == 200
    assert second["request_id"] == "[redacted]"
    assert "ABCDEFGHIJKLMNOP" not in "".join(lines) and "canary" not in "".join(lines)


def test_access_lines_of_one_loop_turn_go_out_together_in_whole_lines_within_pipe_buf(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines made in one turn of the event loop are written at its end, several a write,
    never more than PIPE_BUF bytes a write and never a line cut in two."""
    from proxy import observe

    writes: list[bytes] = []
    monkeypatch.setattr(observe.os, "write", lambda fd, data: writes.append(bytes(data))
                        or len(data))
    writer = AccessWriter(Redactor([]), fd=99)

    async def turn() -> tuple[int, int]:
        writer.write({"request_id": "req_0", "status": 200})
        alone = len(writes)  # nothing yet: the line waits for the end of the turn
        for i in range(1, 40):
            writer.write({"request_id": f"req_{i}", "status": 200, "pad": "x" * 200})
        within = b"".join(writes).count(b"\n")
        await asyncio.sleep(0)
        return alone, within

    alone, within = asyncio.run(turn())
    assert alone == 0
    assert 0 < within < 40  # only what filled a write went out within the turn
    lines = b"".join(writes).splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"req_{i}" for i in range(40)]
    assert 1 < len(writes) < 40  # batched, yet split
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
