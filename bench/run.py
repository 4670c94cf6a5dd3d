"""Pass-through overhead of the proxy against the direct upstream, in one invocation.

Starts nginx as a near-free upstream, the proxy (one worker) in front of it, and runs
wrk against both, streaming and not, at each concurrency; the setups alternate within
each concurrency so that direct and proxy figures are taken close together. Writes JSON
and a Markdown table to the out dir and prints the table.

    .venv/bin/python bench/run.py [--duration 10] [--concurrency 1,8,64] [--out bench/results]
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
from pathlib import Path
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from common import (
    BENCH_DIR,
    Load,
    Upstream,
    chat_request,
    check_answer,
    concurrency_list,
    exit_on_sigterm,
    free_port,
    machine_lines,
    markdown_table,
    missing_programs,
    ms,
    nginx_upstream,
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
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Target:
    setup: str
    url: str
    model: str
    stream: bool
    auth: str
    via_proxy: bool


@dataclass(frozen=True, slots=True)
class Row:
    setup: str
    stream: bool
    concurrency: int
    load: Load
    overhead_p50_ms: float | None
    proxy_peak_rss_mb: float | None


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


@contextlib.contextmanager
def proxy(config: Path, env: Mapping[str, str], log: Path) -> Iterator[tuple[psutil.Process, int]]:
    port = free_port()
    argv = [str(PROXY), "serve", "--config", str(config), "--port", str(port), "--workers", "1"]
    # Stopping includes an embedded PostgreSQL's shutdown.
    with running(argv, log, env, stop_timeout=60) as proc:
        wait_ready("the proxy", proc, log, f"http://127.0.0.1:{port}/healthz", timeout=180)
        yield psutil.Process(proc.pid), port
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


class RssSampler:
    """Samples the resident memory of a process tree in the background.

    An embedded PostgreSQL, if the proxy started one as its child, is not counted.
    """

    def __init__(self, root: psutil.Process, interval: float = 0.05):
        self.root = root
        self.interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def current(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    if p.name() not in ("postgres", "pg_ctl"):
                        total += p.memory_info().rss
        return total

    def take_peak(self) -> int:
        """The peak since the previous call (or the start)."""
        now = self.current()
        with self._lock:
            peak, self._peak = max(self._peak, now), now
        return peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = self.current()
            with self._lock:
                self._peak = max(self._peak, now)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the runs --------------------------------------------------------------------


def targets(upstream: Upstream, proxy_port: int, key: str) -> list[Target]:
    proxied = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
    direct_auth = f"Bearer {UPSTREAM_KEY}"
    return [
        Target("direct nginx", upstream.base_url + "/chat/completions", "bench", False,
               direct_auth, False),
        Target("proxy", proxied, "bench", False, f"Bearer {key}", True),
        Target("direct nginx, stream", upstream.stream_base_url + "/chat/completions",
               "bench-stream", True, direct_auth, False),
        Target("proxy, stream", proxied, "bench-stream", True, f"Bearer {key}", True),
    ]


def run_setups(args: argparse.Namespace, plan: list[Target], rss: RssSampler,
               ) -> tuple[dict[tuple[str, int], Load], dict[tuple[str, int], int]]:
    """wrk on every setup at each concurrency; the loads and the proxy's peak RSS."""
    loads: dict[tuple[str, int], Load] = {}
    peaks: dict[tuple[str, int], int] = {}
    for c in args.concurrency:
        for t in plan:
            body = chat_request(t.model, t.stream)
            if args.warmup:
                wrk(t.url, body, t.auth, c, args.warmup)
            rss.take_peak()
            load = loads[t.setup, c] = wrk(t.url, body, t.auth, c, args.duration)
            peaks[t.setup, c] = rss.take_peak()
            progress(f"{t.setup:<22} c={c:<4} {load.rps:>9,.0f} RPS  "
                     f"p50 {ms(load.p50_ms)} ms  p99 {ms(load.p99_ms)} ms  "
                     f"errors {load.errors}")
    return loads, peaks


def measure(args: argparse.Namespace, workdir: Path, log: Path) -> tuple[list[Row], dict[str, Any]]:
    with nginx_upstream(workdir) as upstream:
        env, database = database_env(workdir)
        config = workdir / "bench.toml"
        config.write_text(settings_toml(upstream), encoding="utf-8")
        progress(f"database: {database}; creating a key")
        try:
            key = create_key(config, env)
            with proxy(config, env, log) as (process, port), RssSampler(process) as rss:
                plan = targets(upstream, port, key)
                for t in plan:
                    check_answer(t.setup, t.url, chat_request(t.model, t.stream),
                                 {"Authorization": t.auth}, t.stream)
                idle = rss.take_peak()
                loads, peaks = run_setups(args, plan, rss)
        finally:
            stop_leftover_postgres(workdir / "data")
    rows = []
    for t in plan:
        direct = "direct nginx, stream" if t.stream else "direct nginx"
        for c in args.concurrency:
            load = loads[t.setup, c]
            rows.append(Row(
                t.setup, t.stream, c, load,
                load.p50_ms - loads[direct, c].p50_ms if t.via_proxy else None,
                peaks[t.setup, c] / MB if t.via_proxy else None,
            ))
    peak = max(peaks.values(), default=0)
    return rows, {"database": database, "proxy_rss_idle_mb": idle / MB,
                  "proxy_rss_peak_mb": peak / MB}


def report(rows: list[Row], info: Mapping[str, Any], header: list[str]) -> str:
    table = markdown_table(
        ["setup", "concurrency", "RPS", "p50 ms", "p99 ms", "errors",
         "overhead p50 vs direct ms", "proxy peak RSS MB"],
        [[r.setup, str(r.concurrency), f"{r.load.rps:,.0f}", ms(r.load.p50_ms),
          ms(r.load.p99_ms), r.load.errors,
          "" if r.overhead_p50_ms is None else f"{r.overhead_p50_ms:+.3f}",
          "" if r.proxy_peak_rss_mb is None else f"{r.proxy_peak_rss_mb:.0f}"]
         for r in rows],
    )
    lines = ["# Proxy pass-through overhead", "", *[f"- {line}" for line in header],
             f"- proxy: 1 worker, {info['database']}; "
             f"RSS idle {info['proxy_rss_idle_mb']:.0f} MB, "
             f"peak {info['proxy_rss_peak_mb']:.0f} MB",
             "", table, "",
             "Figures are comparable only within this run. Stream rows time the whole "
             "stream (nginx sends it at once)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Pass-through overhead of the proxy against the direct upstream.")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 8, 64],
                        help="comma-separated open connections (default 1,8,64)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured load before each run (default 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="where to write the results (default bench/results)")
    parser.add_argument("--users", type=int, default=1000,
                        help="end users the requests are spread over (default 1000)")
    args = parser.parse_args()
    os.environ["BENCH_USERS"] = str(args.users)  # read by chat.lua
    if missing := missing_programs(PROXY):
        progress(f"bench/run.py: not found: {', '.join(missing)}")
        return 2
    exit_on_sigterm()
    started = datetime.now().astimezone()
    stem = f"run-{started:%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="paywall-bench-") as tmp:
        log = Path(tmp) / "proxy.log"
        try:
            rows, info = measure(args, Path(tmp), log)
        except KeyboardInterrupt:
            progress("interrupted")
            return 130
        except RuntimeError as e:
            progress(f"bench/run.py: {e}")
            return 1
        finally:
            if log.exists():
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, args.out / f"{stem}.proxy.log")
    header = machine_lines(started)
    markdown = report(rows, info, header)
    data = {
        "started": started.isoformat(timespec="seconds"), "machine": header,
        "duration_s": args.duration, "warmup_s": args.warmup, **info,
        "rows": [asdict(r) for r in rows],
    }
    paths = write_results(args.out, stem, data, markdown)
    print(markdown)
    progress("written: " + ", ".join(map(str, [*paths, args.out / f"{stem}.proxy.log"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
