"""What the proxy costs per request, against the direct upstream and a bare pass-through.

Starts nginx as a near-free upstream and, in front of it, bench/passthrough.py (the bare
floor: aiohttp client, no auth, no database, no metering) and the proxy with each
``--workers`` count. At each concurrency wrk runs against every one of them, streaming
and not; the setups alternate within each concurrency so that the figures compared are
taken close together. Writes JSON and a Markdown report to the out dir and prints it.

    .venv/bin/python bench/run.py [--duration 10] [--concurrency 1,8,64] [--workers 1,2]
                                  [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path

import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from common import (
    BENCH_DIR,
    CHAT_PATH,
    STREAM_CHAT_PATH,
    Load,
    Upstream,
    chat_request,
    check_answer,
    exit_on_sigterm,
    free_port,
    machine_lines,
    markdown_table,
    missing_programs,
    ms,
    nginx_upstream,
    passthrough,
    positive_ints,
    progress,
    running,
    tail,
    wait_ready,
    write_results,
    wrk,
)

PROXY = Path(sys.executable).with_name("paywall-proxy")
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
UPSTREAM_KEY = "sk-upstream-bench"
BARE_CLIENT = "aiohttp"  # the proxy's own upstream client
MB = 1024 * 1024

# BENCH.md's targets, checked at the end of the report when the run has the rows.
TARGET_OVERHEAD_MS = 1.0  # proxy p50 - direct p50 at c=1, one worker
TARGET_STREAM_OVERHEAD_MS = 2.0  # the same for streams (time to first byte)
TARGET_RPS = 2000  # non-streaming, c=64, one worker, no errors
TARGET_RPS_CONCURRENCY = 64
TARGET_SCALING = 1.7  # two workers over one, RPS
TARGET_IDLE_RSS_MB = 100  # per worker


class Kind(Enum):
    DIRECT = "direct nginx"
    BARE = "bare pass-through"
    PROXY = "proxy"


@dataclass(frozen=True, slots=True)
class Server:
    """A process tree wrk talks to: the bare pass-through or one proxy."""

    name: str
    kind: Kind
    workers: int
    process: psutil.Process
    port: int


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
    load: Load
    overhead_p50_ms: float | None  # the setup's p50 - direct p50
    peak_rss_mb: float | None


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
class Memory:
    """A server's resident memory: idle before the load, and the peak under it."""

    setup: str
    idle_mb: float  # the whole tree
    worker_idle_mb: list[float]  # each process that serves requests
    peak_mb: float


def workers_label(workers: int) -> str:
    return f"{workers} worker" + ("" if workers == 1 else "s")


def setup_name(server: str, stream: bool) -> str:
    return server + (", stream" if stream else "")


# --- the proxy -------------------------------------------------------------------


def settings_toml(upstream: Upstream) -> str:
    return f"""\
[server]
host = "127.0.0.1"

[providers.nginx]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "{UPSTREAM_KEY}"

[providers.nginx-stream]
kind = "openai"
base_url = "{upstream.stream_base_url}"
api_key = "{UPSTREAM_KEY}"

[models.bench]
provider = "nginx"
price = {{ asset = "usd", input_per_million = "0.15", output_per_million = "0.60" }}

[models.bench-stream]
provider = "nginx-stream"
price = {{ asset = "usd", input_per_million = "0.15", output_per_million = "0.60" }}

[paywalls.bench]
name = "Benchmark"
# Every benchmark user starts funded, so each request is held and settled for real.
starter_grant = "1000000"
"""


def _reachable(url: str) -> bool:
    async def connect() -> None:
        conn = await asyncpg.connect(url, timeout=3)
        await conn.close()

    try:
        asyncio.run(connect())
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    return True


def database_env(workdir: Path) -> tuple[dict[str, str], str]:
    """The proxy's environment for its database, and a line saying which one it is."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PAYWALL_DATA_DIR")}
    if url := os.environ.get("BENCH_DATABASE_URL"):
        return {**env, "DATABASE_URL": url}, "PostgreSQL from BENCH_DATABASE_URL"
    if _reachable(LOCAL_DATABASE_URL):
        return {**env, "DATABASE_URL": LOCAL_DATABASE_URL}, f"PostgreSQL at {LOCAL_DATABASE_URL}"
    return {**env, "PAYWALL_DATA_DIR": str(workdir / "data")}, "embedded PostgreSQL"


def create_key(config: Path, env: Mapping[str, str]) -> str:
    done = subprocess.run([str(PROXY), "keys", "create", "--paywall", "bench",
                           "--config", str(config)],
                          env=dict(env), capture_output=True, text=True, check=False, timeout=180)
    key = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    if done.returncode != 0 or not key:
        raise RuntimeError(f"paywall-proxy keys create failed (status {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return key


def _wait_started(proc: subprocess.Popen[bytes], log: Path, workers: int,
                  timeout: float = 180) -> None:
    """Wait until each of the ``workers`` has logged the end of its start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited with status {proc.returncode}:\n{tail(log)}")
        text = log.read_text(encoding="utf-8", errors="replace")
        if text.count("Application startup complete.") >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the proxy's {workers} workers not all started after "
                       f"{timeout:.0f} s:\n{tail(log)}")


@contextlib.contextmanager
def proxy(config: Path, env: Mapping[str, str], workers: int, log: Path) -> Iterator[Server]:
    port = free_port()
    argv = [str(PROXY), "serve", "--config", str(config), "--port", str(port),
            "--workers", str(workers)]
    # Stopping includes an embedded PostgreSQL's shutdown.
    with running(argv, log, env, stop_timeout=60) as proc:
        wait_ready("the proxy", proc, log, f"http://127.0.0.1:{port}/healthz", timeout=180)
        _wait_started(proc, log, workers)
        yield Server(f"{Kind.PROXY.value}, {workers_label(workers)}", Kind.PROXY, workers,
                     psutil.Process(proc.pid), port)
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited with status {proc.returncode} during the "
                               f"runs:\n{tail(log)}")


def stop_leftover_postgres(data_dir: Path) -> None:
    """Stop an embedded PostgreSQL still running on ``data_dir`` once the proxy is gone.

    The proxy stops the one it started when it exits; if it ever does not, the server
    would outlive the temp dir, so it is found by its pid file and stopped here.
    """
    try:
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        server = psutil.Process(pid)
        if str(data_dir) not in " ".join(server.cmdline()):
            return
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    progress(f"the embedded PostgreSQL (pid {pid}) outlived the proxy; stopping it")
    with contextlib.suppress(psutil.Error):
        server.terminate()
        deadline = time.monotonic() + 15
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                server.kill()
                break
            time.sleep(0.1)


# --- memory ----------------------------------------------------------------------


def _tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its descendants, less an embedded PostgreSQL."""
    with contextlib.suppress(psutil.Error):
        processes = []
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                if p.name() not in ("postgres", "pg_ctl"):
                    processes.append(p)
        return processes
    return []


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_rss(root: psutil.Process) -> int:
    return _rss(_tree(root))


def worker_rss(server: Server) -> list[int]:
    """The RSS of each process that serves requests.

    One worker is the process itself. With more, uvicorn's supervisor spawns them
    (``multiprocessing.spawn``) next to a resource tracker; both others are left out.
    """
    if server.workers == 1:
        return [_rss([server.process])]
    spawned = []
    for p in _tree(server.process)[1:]:
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(p.cmdline()):
                spawned.append(p)
    return [_rss([p]) for p in spawned]


class RssSampler:
    """Samples the resident memory of the one process tree under load, in the background.

    Only one tree is sampled at a time (none while nginx itself is measured), so the
    sampling costs the same whatever the number of servers.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._root: psutil.Process | None = None
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def track(self, root: psutil.Process | None) -> None:
        """Sample ``root``'s tree from now on (nothing if None); the peak starts anew."""
        now = 0 if root is None else tree_rss(root)
        with self._lock:
            self._root, self._peak = root, now

    def peak(self) -> int:
        """The peak of the tracked tree since :meth:`track`."""
        with self._lock:
            root = self._root
        now = 0 if root is None else tree_rss(root)
        with self._lock:
            return max(self._peak, now)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                root = self._root
            if root is None:
                continue
            now = tree_rss(root)
            with self._lock:
                if self._root is root:
                    self._peak = max(self._peak, now)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the runs --------------------------------------------------------------------


def targets(upstream: Upstream, servers: list[Server], key: str) -> list[Target]:
    """Every setup, in the order they run at each concurrency: direct first."""
    plan = []
    for stream in (False, True):
        model = "bench-stream" if stream else "bench"
        path = STREAM_CHAT_PATH if stream else CHAT_PATH
        plan.append(Target(setup_name(Kind.DIRECT.value, stream), upstream.origin + path,
                           model, stream, f"Bearer {UPSTREAM_KEY}", Kind.DIRECT, None))
        for server in servers:
            if server.kind is Kind.BARE:  # serves nginx's two paths
                url, auth = f"http://127.0.0.1:{server.port}{path}", ""
            else:  # one path; the model picks the provider
                url, auth = f"http://127.0.0.1:{server.port}{CHAT_PATH}", f"Bearer {key}"
            plan.append(Target(setup_name(server.name, stream), url, model, stream, auth,
                               server.kind, server))
    return plan


def run_setups(args: argparse.Namespace, plan: list[Target], rss: RssSampler,
               ) -> tuple[dict[tuple[str, int], Load], dict[tuple[str, int], int]]:
    """wrk on every setup at each concurrency; the loads and the servers' peak RSS."""
    loads: dict[tuple[str, int], Load] = {}
    peaks: dict[tuple[str, int], int] = {}
    for c in args.concurrency:
        for t in plan:
            body = chat_request(t.model, t.stream)
            if args.warmup:
                wrk(t.url, body, t.auth, c, args.warmup)
            rss.track(None if t.server is None else t.server.process)
            load = loads[t.setup, c] = wrk(t.url, body, t.auth, c, args.duration)
            if t.server is not None:
                peaks[t.setup, c] = rss.peak()
            progress(f"{t.setup:<28} c={c:<4} {load.rps:>9,.0f} RPS  "
                     f"p50 {ms(load.p50_ms)} ms  p99 {ms(load.p99_ms)} ms  "
                     f"errors {load.errors}")
    rss.track(None)
    return loads, peaks


def pipeline_costs(plan: list[Target], loads: Mapping[tuple[str, int], Load],
                   concurrency: list[int]) -> list[PipelineCost]:
    costs = []
    for t in plan:
        if t.server is None or t.kind is not Kind.PROXY:
            continue
        bare = setup_name(Kind.BARE.value, t.stream)
        one = setup_name(f"{Kind.PROXY.value}, {workers_label(1)}", t.stream)
        for c in concurrency:
            load = loads[t.setup, c]
            base = loads[bare, c]
            single = loads.get((one, c))
            costs.append(PipelineCost(
                t.setup, t.server.workers, t.stream, c,
                load.p50_ms - base.p50_ms,
                load.rps / base.rps if base.rps else 0.0,
                load.rps / single.rps if single and single.rps and t.server.workers > 1
                else None,
            ))
    return costs


def measure(args: argparse.Namespace, workdir: Path, logs: Path,
            ) -> tuple[list[Row], list[PipelineCost], list[Memory], str]:
    with nginx_upstream(workdir) as upstream:
        env, database = database_env(workdir)
        config = workdir / "bench.toml"
        config.write_text(settings_toml(upstream), encoding="utf-8")
        progress(f"database: {database}; creating a key")
        try:
            key = create_key(config, env)
            with contextlib.ExitStack() as stack:
                bare = stack.enter_context(
                    passthrough(BARE_CLIENT, upstream, logs / "passthrough.log"))
                servers = [Server(Kind.BARE.value, Kind.BARE, 1,
                                  psutil.Process(bare.process.pid), bare.port)]
                for n in args.workers:
                    progress(f"starting the proxy with {workers_label(n)}")
                    servers.append(stack.enter_context(
                        proxy(config, env, n, logs / f"proxy-w{n}.log")))
                plan = targets(upstream, servers, key)
                for t in plan:
                    check_answer(t.setup, t.url, chat_request(t.model, t.stream),
                                 {"Authorization": t.auth} if t.auth else {}, t.stream)
                idle = {s.name: (tree_rss(s.process), worker_rss(s)) for s in servers}
                with RssSampler() as rss:
                    loads, peaks = run_setups(args, plan, rss)
        finally:
            stop_leftover_postgres(workdir / "data")
    rows = []
    for t in plan:
        direct = setup_name(Kind.DIRECT.value, t.stream)
        for c in args.concurrency:
            load = loads[t.setup, c]
            rows.append(Row(
                t.setup, t.kind.value, None if t.server is None else t.server.workers,
                t.stream, c, load,
                None if t.server is None else load.p50_ms - loads[direct, c].p50_ms,
                None if t.server is None else peaks[t.setup, c] / MB,
            ))
    memory = [Memory(s.name, idle[s.name][0] / MB, [w / MB for w in idle[s.name][1]],
                     max((v for (setup, _), v in peaks.items()
                          if setup in (s.name, setup_name(s.name, True))), default=0) / MB)
              for s in servers]
    return rows, pipeline_costs(plan, loads, args.concurrency), memory, database


# --- the report ------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def target_lines(rows: list[Row], costs: list[PipelineCost], memory: list[Memory]) -> list[str]:
    """BENCH.md's targets against this run, for those the run has the rows of."""
    one = f"{Kind.PROXY.value}, {workers_label(1)}"
    by_key = {(r.setup, r.concurrency): r for r in rows}
    lines = []
    for stream, limit in ((False, TARGET_OVERHEAD_MS), (True, TARGET_STREAM_OVERHEAD_MS)):
        if (r := by_key.get((setup_name(one, stream), 1))) and r.overhead_p50_ms is not None:
            what = "stream overhead (whole stream)" if stream else "overhead"
            lines.append(f"{what} at c=1, 1 worker: {r.overhead_p50_ms:+.3f} ms vs direct, "
                         f"target ≤ {limit:.1f} ms: {_verdict(r.overhead_p50_ms <= limit)}")
    if r := by_key.get((one, TARGET_RPS_CONCURRENCY)):
        met = r.load.rps >= TARGET_RPS and r.load.errors == "0"
        lines.append(f"RPS at c={TARGET_RPS_CONCURRENCY}, 1 worker: {r.load.rps:,.0f} "
                     f"({r.load.errors} errors), target ≥ {TARGET_RPS:,} with no errors: "
                     f"{_verdict(met)}")
    for cost in costs:
        if (cost.workers == 2 and not cost.stream and cost.rps_vs_one_worker is not None
                and cost.concurrency == TARGET_RPS_CONCURRENCY):
            lines.append(f"2 workers / 1 worker at c={cost.concurrency}: "
                         f"{cost.rps_vs_one_worker:.2f}x, target ≥ {TARGET_SCALING}x: "
                         f"{_verdict(cost.rps_vs_one_worker >= TARGET_SCALING)}")
    for m in memory:
        if m.setup.startswith(Kind.PROXY.value) and m.worker_idle_mb:
            worst = max(m.worker_idle_mb)
            lines.append(f"idle RSS per worker, {m.setup}: {worst:.0f} MB at most, "
                         f"target ≤ {TARGET_IDLE_RSS_MB} MB: "
                         f"{_verdict(worst <= TARGET_IDLE_RSS_MB)}")
    return lines


def report(rows: list[Row], costs: list[PipelineCost], memory: list[Memory], database: str,
           header: list[str]) -> str:
    table = markdown_table(
        ["setup", "concurrency", "RPS", "p50 ms", "p99 ms", "errors",
         "overhead p50 vs direct ms", "peak RSS MB"],
        [[r.setup, str(r.concurrency), f"{r.load.rps:,.0f}", ms(r.load.p50_ms),
          ms(r.load.p99_ms), r.load.errors,
          "" if r.overhead_p50_ms is None else f"{r.overhead_p50_ms:+.3f}",
          "" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"]
         for r in rows],
    )
    scaling = any(c.rps_vs_one_worker is not None for c in costs)
    pipeline = markdown_table(
        ["setup", "concurrency", "proxy p50 - bare p50 ms", "proxy RPS / bare RPS",
         *(["RPS vs 1 worker"] if scaling else [])],
        [[c.setup, str(c.concurrency), f"{c.p50_over_bare_ms:+.3f}", _ratio(c.rps_vs_bare),
          *([_ratio(c.rps_vs_one_worker)] if scaling else [])] for c in costs],
    )
    rss = markdown_table(
        ["server", "idle RSS MB (tree)", "idle RSS MB per worker", "peak RSS MB (tree)"],
        [[m.setup, f"{m.idle_mb:.0f}", ", ".join(f"{w:.0f}" for w in m.worker_idle_mb),
          f"{m.peak_mb:.0f}"] for m in memory],
    )
    lines = ["# Proxy overhead: direct, bare pass-through, proxy", "",
             *[f"- {line}" for line in header],
             f"- proxy: full metering, {database}",
             f"- bare pass-through: bench/passthrough.py, {BARE_CLIENT} client, 1 worker, "
             "no auth, no database, no metering",
             "", table, "",
             "## What the proxy's pipeline costs over the bare pass-through", "",
             pipeline, "",
             "## Memory", "",
             rss, ""]
    if checks := target_lines(rows, costs, memory):
        lines += ["## BENCH.md targets", "", *[f"- {line}" for line in checks], ""]
    lines.append("Figures are comparable only within this run. Stream rows time the whole "
                 "stream (nginx sends it at once). RSS leaves out an embedded PostgreSQL.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="What the proxy costs per request, against nginx and a bare pass-through.")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 8, 64],
                        help="comma-separated open connections (default 1,8,64)")
    parser.add_argument("--workers", type=positive_ints, default=[1],
                        help="comma-separated proxy worker counts, one proxy each (default 1)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured load before each run (default 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="where to write the results (default bench/results)")
    parser.add_argument("--users", type=int, default=1000,
                        help="end users the requests are spread over (default 1000)")
    args = parser.parse_args()
    args.workers = sorted(set(args.workers))
    os.environ["BENCH_USERS"] = str(args.users)  # read by chat.lua
    if missing := missing_programs(PROXY):
        progress(f"bench/run.py: not found: {', '.join(missing)}")
        return 2
    exit_on_sigterm()
    started = datetime.now().astimezone()
    stem = f"run-{started:%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="paywall-bench-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        try:
            rows, costs, memory, database = measure(args, Path(tmp), logs)
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
    header = machine_lines(started)
    markdown = report(rows, costs, memory, database, header)
    data = {
        "started": started.isoformat(timespec="seconds"), "machine": header,
        "duration_s": args.duration, "warmup_s": args.warmup, "users": args.users,
        "workers": args.workers, "database": database,
        "rows": [asdict(r) for r in rows], "pipeline": [asdict(c) for c in costs],
        "memory": [asdict(m) for m in memory],
    }
    paths = write_results(args.out, stem, data, markdown)
    print(markdown)
    progress("written: " + ", ".join(map(str, [*paths, *saved])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
