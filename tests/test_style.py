"""The package stays typed (mypy strict) and lint-clean (ruff), as STYLE asks."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_mypy_strict() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    result = run("ruff", "check", "proxy", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def imports(module: str) -> set[str]:
    """What ``proxy.<module>`` imports when it is loaded (not under TYPE_CHECKING, not
    inside functions): top-level package names and proxy modules."""
    tree = ast.parse((ROOT / "proxy" / f"{module}.py").read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return {n if n.startswith("proxy.") else n.split(".")[0] for n in out}


def proxy_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "proxy").glob("*.py") if p.stem != "__init__")


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [f"proxy.{module}"]
    while todo:
        name = todo.pop()
        for dep in imports(name.removeprefix("proxy.")) if name.startswith("proxy.") else ():
            if dep not in seen:
                seen.add(dep)
                if dep.startswith("proxy.") and dep != "proxy.migrations":
                    todo.append(dep)
    return seen


def test_no_import_cycles() -> None:
    cycles = [m for m in proxy_modules() if f"proxy.{m}" in reachable(m)]
    assert cycles == []


# Pure modules: bytes and values in, values out. Not even transitively may they load a
# client, a server framework or a module that does I/O.
PURE = ("decide", "pricing", "metering", "sse", "translate", "replies", "response_events",
        "anthropic_wire")
IO = {"asyncpg", "aiohttp", "redis", "starlette", "uvicorn", "prometheus_client",
      "proxy.ledger", "proxy.db", "proxy.upstream", "proxy.services", "proxy.limits"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_no_io(module: str) -> None:
    assert reachable(module) & IO == set()


# A worker holds only what it uses: these load the first time a request needs them
# (Redis with REDIS_URL, Stripe with a payment, pypdf with a PDF), not at start.
ON_FIRST_USE = ("redis", "stripe", "pypdf", "requests", "httpx")


def test_a_worker_loads_its_heavy_libraries_on_first_use() -> None:
    probe = (
        "import sys, proxy.app, proxy.cli, proxy.payments\n"
        "from proxy.limits import build_limiter\n"
        "build_limiter(None)\n"
        "loaded = [m for m in sys.argv[1:] if m in sys.modules\n"
        "          and type(sys.modules[m]).__name__ != '_LazyModule']\n"
        "print(','.join(loaded))\n"
        "proxy.payments.load_stripe()  # at start, when a paywall takes payments\n"
        "assert type(sys.modules['stripe'].__loader__).__name__ == 'SourceFileLoader'\n"
        "from proxy.tokens import _pdf_bound\n"
        "_pdf_bound(b'%PDF-1.4')\n"
        "build_limiter('redis://127.0.0.1:1')\n"
        "print(','.join(m for m in ('redis', 'stripe', 'pypdf')\n"
        "               if type(sys.modules.get(m)).__name__ == 'module'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, *ON_FIRST_USE], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    at_start, after_use = result.stdout.splitlines()
    assert at_start == ""
    assert after_use == "redis,stripe,pypdf"


def test_a_lazy_module_that_fails_to_load_leaves_as_a_plain_import_does(
        tmp_path: pathlib.Path) -> None:
    (tmp_path / "broken_on_load.py").write_text("import no_such_module_here\nX = 1\n")
    probe = (
        "import sys\n"
        "from proxy import lazy\n"
        "m = lazy.module('broken_on_load')\n"
        "try:\n"
        "    m.X\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "print('broken_on_load' in sys.modules)\n"
        "try:\n"
        "    import broken_on_load\n"
        "except ModuleNotFoundError:\n"
        "    print('raised again')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "raised", "again"]

