from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy import settings
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path


def test_defaults_and_demo() -> None:
    s = settings.load(env={})
    assert s.source.endswith("demo.toml")
    assert s.server.port == 8080 and s.server.max_body_bytes == 10 * 1024 * 1024
    assert s.providers["mock"].kind == "mock"
    assert s.models["mock-1"].price.input_per_million == Decimal("0.15")
    assert s.database_url is None and s.data_dir == ".paywall"


def test_environment(tmp_path: Path) -> None:
    path = write(tmp_path, """
[providers.p]
base_url = "https://${HOST}/v1"
api_key = "${KEY}"
headers = { X-Title = "${TITLE:-fallback}" }
""")
    env = {"HOST": "example.test", "KEY": "sk-1", "DATABASE_URL": "postgresql://x/y",
           "REDIS_URL": "redis://r", "PAYWALL_DATA_DIR": "/data"}
    s = settings.load(path, env)
    p = s.providers["p"]
    assert (p.base_url, p.api_key, p.headers) == ("https://example.test/v1", "sk-1",
                                                   {"X-Title": "fallback"})
    assert (s.database_url, s.redis_url, s.data_dir) == ("postgresql://x/y", "redis://r", "/data")


def test_config_from_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9999\n")
    assert settings.load(env={"PAYWALL_CONFIG": str(path)}).server.port == 9999


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("[server]\nprot = 1\n", "server.prot", "unknown setting"),
    ("[server]\nport = \"80\"\n", "server.port", "expected an integer"),
    ("[server]\nport = -1\n", "server.port", "negative"),
    ("[server]\nkey_cache_seconds = 60\n", "server.key_cache_seconds", "at most 5"),
    ("[upstream]\nread_timeout = true\n", "upstream.read_timeout", "number"),
    ("[providers.p]\nkind = \"grpc\"\n", "providers.p.kind", "must be one of"),
    ("[providers.p]\nbase_url = \"ftp://x\"\n", "providers.p.base_url", "http"),
    ("[providers.p]\nbase_url = \"http://x\"\napi_key = \"${NOPE}\"\n", "providers.p.api_key",
     "NOPE is not set"),
    ("[models.m]\nprovider = \"ghost\"\n", "models.m.provider", "unknown provider"),
    ("[providers.p]\nkind = \"mock\"\n[models.m]\nprovider = \"p\"\nprice = { input_per_million "
     "= 0.15 }\n", "models.m.price.input_per_million", "decimal string"),
    ("[providers.p]\nkind = \"mock\"\n[models.m]\nprovider = \"p\"\nprice = { per_request "
     "= \"abc\" }\n", "models.m.price.per_request", "not a decimal"),
    ("[paywalls.w]\nprovider_keys = { ghost = \"k\" }\n", "paywalls.w.provider_keys.ghost",
     "unknown provider"),
    ("server = 3\n", "server", "expected a table"),
])
def test_bad_settings_name_the_file_and_key(tmp_path: Path, text: str, key: str,
                                            problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        settings.load(path, {})
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: ")
    assert problem in message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        settings.load(write(tmp_path, "[server\n"), {})
    with pytest.raises(ConfigError, match="no such settings file"):
        settings.load(tmp_path / "missing.toml", {})


def _present(raw: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head == "*" and isinstance(raw, list):  # an array of tables: any item
        return any(_present(v, rest) for v in raw)
    if not isinstance(raw, dict):
        return False
    if head == "*":
        return any(_present(v, rest) for v in raw.values())
    return head in raw and _present(raw[head], rest)


def test_example_documents_every_setting() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    missing = [p for p in settings.declared() if not _present(raw, p.split("."))]
    assert missing == [], f"config/example.toml lacks: {missing}"
    # ...and it is a valid settings file in its own right.
    assert settings.load(EXAMPLE, {}).providers["openai"].api_key == ""


def test_declared_paths_are_complete() -> None:
    paths = settings.declared()
    assert "server.port" in paths
    assert "providers.*.base_url" in paths
    assert "models.*.price.output_per_million" in paths
    assert "paywalls.*.provider_keys" in paths
    assert not any(p.startswith(("source", "database_url")) for p in paths)


def test_a_jwks_paywall_must_name_its_audience(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[paywalls.a.auth]\njwks_url = "https://id.example.test/jwks.json"\n')
    with pytest.raises(ConfigError, match=r"paywalls\.a\.auth\.audience: required"):
        settings.load(path, {})
    path.write_text('[paywalls.a.auth]\njwks_url = "https://id.example.test/jwks.json"\n'
                    'audience = "app"\n')
    assert settings.load(path, {}).paywalls["a"].auth.audience == "app"


def test_credit_types_are_whole_credits_assets(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[paywalls.a.credits]\ntypes = ["usd"]\n')
    with pytest.raises(ConfigError, match=r"credits\.types\[0\]: 'usd' is not a credits"):
        settings.load(path, {})
    path.write_text('[assets.tenths]\nscale = 1\nkind = "credits"\n'
                    '[paywalls.a.credits]\ntypes = ["tenths"]\n')
    with pytest.raises(ConfigError, match=r"assets\.tenths\.scale must be 0"):
        settings.load(path, {})
    path.write_text('[paywalls.a.credits]\ntypes = ["standard"]\ntrial = { advanced = 1 }\n')
    with pytest.raises(ConfigError, match=r"credits\.trial\.advanced: not one of"):
        settings.load(path, {})


def test_prompt_margins_follow_the_providers_kind(tmp_path: Path) -> None:
    path = write(tmp_path, """
[providers.o]
kind = "openai"
base_url = "http://o"
[providers.a]
kind = "anthropic"
base_url = "http://a"
[models.gpt]
provider = "o"
[models.claude]
provider = "a"
[models.mine]
provider = "a"
prompt_margin = 1.2
""")
    models = settings.load(path, {}).models
    assert (models["gpt"].prompt_margin, models["claude"].prompt_margin,
            models["mine"].prompt_margin) == (1.05, 1.35, 1.2)
    bad = write(tmp_path, '[providers.o]\nbase_url = "http://o"\n'
                          '[models.m]\nprovider = "o"\nprompt_margin = 0.5\n')
    with pytest.raises(ConfigError, match=r"models\.m\.prompt_margin"):
        settings.load(bad, {})
