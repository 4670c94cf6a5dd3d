"""A user the operator blocks is refused every metered request (403 ``user_blocked``),
nothing is held or forwarded; lifting the block lets the next requests through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import openai
import pytest

from proxy import console
from proxy.ledger import Ledger
from tests.conftest import Proxy, mint_key, new_user, serving_proxy

CONFIG = """
[server]
key_cache_seconds = 0.2

[providers.mock]
kind = "mock"

[models.mock-1]
provider = "mock"
price = { input_per_million = "0.15", output_per_million = "0.60" }

[paywalls.app]
name = "Blocking app"
starter_grant = "1"
"""


@pytest.fixture(scope="module")
def proxy(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with serving_proxy(CONFIG, database_url, tmp_path_factory.mktemp("block")) as p:
        yield p


async def set_blocked(url: str, user: str, blocked: bool) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        await console.block(Ledger(pool, 60), "app", user, blocked)
    finally:
        await pool.close()


async def holds_of(url: str, user: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM holds h JOIN accounts a ON a.id = h.account_id"
            " WHERE a.paywall_id = 'app' AND a.user_id = $1", user))
    finally:
        await conn.close()


def test_a_blocked_user_is_refused_until_the_block_is_lifted(
        proxy: Proxy, database_url: str, tmp_path: Path) -> None:
    user = new_user("blocked")
    key = mint_key(database_url)
    client = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
    hello: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model="mock-1", user=user, messages=hello)
    asyncio.run(set_blocked(database_url, user, True))
    time.sleep(0.3)  # past key_cache_seconds: the overrides are read again
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="mock-1", user=user, messages=hello)
    assert caught.value.code == "user_blocked"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="mock-1", user=user, messages=hello, stream=True)
    assert asyncio.run(holds_of(database_url, user)) == 1  # the first request's only
    other = new_user("free")
    assert client.chat.completions.create(model="mock-1", user=other, messages=hello)
    asyncio.run(set_blocked(database_url, user, False))
    time.sleep(0.3)
    assert client.chat.completions.create(model="mock-1", user=user, messages=hello)
    assert asyncio.run(holds_of(database_url, user)) == 2
