"""The paywall-proxy command, run as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.conftest import PROVIDER_KEY, ROOT, Running, start_proxy, stop_proxy


def cli(*args: str, database_url: str | None = None,
        config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PAYWALL_CONFIG")}
    env["TEST_PROVIDER_KEY"] = PROVIDER_KEY
    if database_url:
        env["DATABASE_URL"] = database_url
    if config:
        env["PAYWALL_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_check_config() -> None:
    ok = cli("check-config", "--config", str(ROOT / "config" / "example.toml"))
    assert ok.returncode == 0 and "example.toml: ok" in ok.stdout


def test_bad_config_fails_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nread_timeout = \"soon\"\n")
    for command in (("check-config",), ("serve",), ("migrate",)):
        result = cli(*command, config=path)
        assert result.returncode == 2
        assert f"{path}: upstream.read_timeout: expected a non-negative number" in result.stderr


def test_keys_lifecycle_and_revocation_within_five_seconds(
        running: Running, database_url: str, request: pytest.FixtureRequest) -> None:
    config = Path(running.proxy.log).parent / "proxy.toml"
    created = cli("keys", "create", "--paywall", "app", "--name", "ops", "--config", str(config),
                  database_url=database_url)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"sk-pw-[A-Za-z0-9]{32}", key)
    key_id = re.search(r"key id (\d+)", created.stderr).group(1)  # type: ignore[union-attr]

    listed = cli("keys", "list", "--paywall", "app", "--config", str(config),
                 database_url=database_url)
    line = next(row for row in listed.stdout.splitlines() if row.startswith(key_id + "\t"))
    assert key[:12] in line and "active" in line and "ops" in line
    assert key not in listed.stdout  # only the prefix is ever shown again

    c = OpenAI(api_key=key, base_url=running.proxy.base_url, max_retries=0)
    request.addfinalizer(c.close)
    c.chat.completions.create(model="echo", user="u", messages=[{"role": "user", "content": "x"}])
    revoked = cli("keys", "revoke", "--paywall", "app", key_id, "--config", str(config),
                  database_url=database_url)
    assert revoked.returncode == 0, revoked.stderr
    since = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}
    while httpx.get(running.proxy.base_url + "/models", headers=headers).status_code == 200:
        assert time.monotonic() - since < 5.5, "revoked key still accepted"
        time.sleep(0.1)
    again = cli("keys", "revoke", "--paywall", "app", key_id, "--config", str(config),
                database_url=database_url)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_keys_for_an_unknown_paywall(running: Running, database_url: str) -> None:
    config = Path(running.proxy.log).parent / "proxy.toml"
    result = cli("keys", "create", "--paywall", "nope", "--config", str(config),
                 database_url=database_url)
    assert result.returncode == 2 and "unknown paywall 'nope'" in result.stderr


def test_quick_start_on_the_embedded_database(tmp_path: Path) -> None:
    """``serve --demo`` with no DATABASE_URL: embedded PostgreSQL, mock provider, a fresh key."""
    proxy = start_proxy(None, None, tmp_path, args=("--demo",))  # type: ignore[arg-type]
    try:
        out = proxy.output()
        key = re.search(r"A new paywall key for this demo: (\S+)", out).group(1)  # type: ignore[union-attr]
        assert f"-H \"Authorization: Bearer {key}\"" in out
        with OpenAI(api_key=key, base_url=proxy.base_url, max_retries=0) as c:
            answer = c.chat.completions.create(model="mock-1", user="user_123",
                                               messages=[{"role": "user", "content": "Hello!"}])
        assert answer.choices[0].message.content
        pgdata = tmp_path / ".paywall" / "pg"
        assert (pgdata / "PG_VERSION").exists()
    finally:
        stop_proxy(proxy)
    time.sleep(0.5)
    running_pg = [p for p in psutil.process_iter(["cmdline"])
                  if str(pgdata) in " ".join(p.info["cmdline"] or [])]
    assert running_pg == [], "the embedded PostgreSQL outlived the proxy"
