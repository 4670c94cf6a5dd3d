"""Many streams open at once through the proxy: its memory, and whether any chunk is
held back on the way.

The upstream is bench/slow_sse.py: each stream sends one chunk every ``interval``, each
stamped with the upstream's clock. bench/slow_sse.py's client opens ``streams`` streams
at once, first straight to that upstream (the client's own delay in reading them), then
through ``paywall-proxy serve`` with one worker and full metering on a real
PostgreSQL: with the default settings, and, when there are more streams than the
default ``upstream.pool_size`` (connections a worker keeps to its providers), again
with ``upstream.pool_size`` raised to the number of streams, as an operator expecting
that many would set it. The streams are spread over ``users`` funded end users, each
of whom has made one request before the run. While they are open, the worker's
resident memory is sampled every 50 ms.

Run by bench/run.py (``--setups open-streams``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from common import (
    BENCH_DIR,
    CHAT_PATH,
    chat_request,
    check_answer,
    free_port,
    load_result,
    markdown_table,
    ms,
    progress,
    running,
    wait_ready,
)
from proxyproc import (
    MB,
    RssSampler,
    create_key,
    database_env,
    embedded_version,
    serve_proxy,
    stop_leftover_postgres,
    tree_rss,
)

from proxy.settings import UpstreamSettings

SLOW_SSE = BENCH_DIR / "slow_sse.py"
MODEL = "bench-slow"
PAYWALL = "bench-streams"
UPSTREAM_KEY = "sk-upstream-bench"
DEFAULT_POOL = UpstreamSettings().pool_size
# The target: this many streams open at once, the worker's RSS at most this, and no
# chunk held back. "Held back" is measured two ways: no chunk may arrive after the
# upstream sent the next one of its stream, and the 99th percentile of the lag may not
# pass TARGET_LAG_P99_MS, which is under what a reader notices in streamed text and a
# fifth of the default interval between chunks, so a relay that kept chunks until more
# arrived could not meet it.
TARGET_STREAMS = 1000
TARGET_RSS_MB = 300
TARGET_LAG_P99_MS = 100.0
_URLS = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class StreamsRow:
    """One run of ``streams`` streams at once against one setup."""

    setup: str
    pool_size: int | None  # the proxy's upstream.pool_size; None for direct
    upstream_most_open: int  # the most streams the upstream served at once
    idle_rss_mb: float | None  # the proxy worker before the run
    peak_rss_mb: float | None  # … its highest over the run
    peak_rss_all_open_mb: float | None  # … while every stream was open
    peak_fds: int | None  # the most file descriptors the worker had open
    open_files_limit: int | None  # its RLIMIT_NOFILE (soft), as the harness passed it on
    result: dict[str, Any]  # what bench/slow_sse.py's client printed

    @property
    def completed(self) -> int:
        return int(self.result["completed"])

    @property
    def all_open(self) -> bool:
        return bool(self.result["most_open_at_once"] == self.result["streams"])


@dataclass(frozen=True, slots=True)
class OpenStreams:
    streams: int
    chunks: int
    interval_ms: float
    users: int
    database: str
    rows: list[StreamsRow]


def settings_toml(upstream_port: int, pool_size: int | None) -> str:
    pool = "" if pool_size is None else f"\n[upstream]\npool_size = {pool_size}\n"
    return f"""\
[server]
host = "127.0.0.1"
{pool}
[providers.slow]
kind = "openai"
base_url = "http://127.0.0.1:{upstream_port}/v1"
api_key = "{UPSTREAM_KEY}"

[models.{MODEL}]
provider = "slow"
price = {{ asset = "usd", input_per_million = "0.15", output_per_million = "0.60" }}

[paywalls.{PAYWALL}]
name = "Benchmark, open streams"
starter_grant = "1000000"
"""


def _get_json(url: str, data: bytes | None = None) -> dict[str, Any]:
    with _URLS.open(urllib.request.Request(url, data=data), timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


@dataclass(frozen=True, slots=True)
class SlowUpstream:
    port: int
    chunks: int
    interval_ms: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT_PATH}"

    def reset(self) -> None:
        _get_json(f"http://127.0.0.1:{self.port}/stats/reset", data=b"")

    def stats(self) -> dict[str, Any]:
        return _get_json(f"http://127.0.0.1:{self.port}/stats")


@contextlib.contextmanager
def slow_upstream(chunks: int, interval_ms: float, log: Path) -> Iterator[SlowUpstream]:
    port = free_port()
    argv = [sys.executable, str(SLOW_SSE), "serve", "--port", str(port), "--chunks",
            str(chunks), "--interval-ms", str(interval_ms)]
    with running(argv, log) as proc:
        upstream = SlowUpstream(port, chunks, interval_ms)
        wait_ready("the slow upstream", proc, log, f"http://127.0.0.1:{port}/stats")
        yield upstream


def open_at_once(url: str, auth: str, upstream: SlowUpstream, streams: int,
                 seconds: float) -> dict[str, Any]:
    """bench/slow_sse.py's client: ``streams`` streams at once, what it saw."""
    argv = [sys.executable, str(SLOW_SSE), "load", url, "--streams", str(streams),
            "--chunks", str(upstream.chunks), "--timeout", str(seconds)]
    return load_result(argv, chat_request(MODEL, stream=True), auth, seconds,
                        "BENCH_OPEN ", "bench/slow_sse.py load")


def measure(args: argparse.Namespace, workdir: Path, logs: Path) -> OpenStreams:
    """Direct, then through the proxy with the default pool and (more streams than it
    holds) with ``upstream.pool_size`` raised to the number of streams."""
    n = args.open_streams
    # Long enough for every stream, plus the wait of those queued behind others.
    seconds = 2 * (args.stream_chunks * args.chunk_interval_ms / 1000) + 60
    rows = []
    with slow_upstream(args.stream_chunks, args.chunk_interval_ms,
                       logs / "slow-upstream.log") as upstream:
        progress(f"{n} streams at once, straight to the slow upstream "
                 f"({args.stream_chunks} chunks {args.chunk_interval_ms:g} ms apart)")
        upstream.reset()
        direct = open_at_once(upstream.url, f"Bearer {UPSTREAM_KEY}", upstream, n, seconds)
        rows.append(StreamsRow("direct (slow upstream)", None,
                               int(upstream.stats()["max_open"]), None, None, None, None, None,
                               direct))
        progress(_line(rows[-1]))
        env, database = database_env(workdir)
        pools: list[int | None] = [None]
        if n > DEFAULT_POOL:
            pools.append(n)
        key = ""
        try:
            for pool in pools:
                config = workdir / f"open-streams-{pool or 'default'}.toml"
                config.write_text(settings_toml(upstream.port, pool), encoding="utf-8")
                if not key:
                    progress(f"creating a key for paywall {PAYWALL}")
                    key = create_key(config, env, PAYWALL)
                name = _proxy_name(pool)
                progress(f"starting {name}")
                log = logs / f"open-streams-{pool or 'default'}.log"
                with serve_proxy(config, env, 1, log) as (proc, port), RssSampler() as rss:
                    rows.append(_through_proxy(name, pool, psutil.Process(proc.pid), port,
                                               f"Bearer {key}", upstream, args.users, n,
                                               seconds, rss))
                progress(_line(rows[-1]))
        finally:
            stop_leftover_postgres(workdir / "data")
        if version := embedded_version(workdir / "data"):
            database = f"embedded PostgreSQL {version}"
    return OpenStreams(n, args.stream_chunks, args.chunk_interval_ms, args.users, database,
                       rows)


def _proxy_name(pool: int | None) -> str:
    if pool is None:
        return f"proxy, default settings (upstream.pool_size = {DEFAULT_POOL})"
    return f"proxy, upstream.pool_size = {pool}"


def _through_proxy(name: str, pool: int | None, process: psutil.Process, port: int,
                   auth: str, upstream: SlowUpstream, users: int, n: int, seconds: float,
                   rss: RssSampler) -> StreamsRow:
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    headers = {"Authorization": auth}
    check_answer(name, url, chat_request(MODEL, stream=False), headers, stream=False)
    names = [f"bench-user-{i}" for i in range(users)] if users > 1 else ["bench-user"]
    progress(f"one request per end user ({len(names)}) through {name}")
    with ThreadPoolExecutor(max_workers=8) as senders:
        list(senders.map(functools.partial(_one_request, name, url, headers), names))
    idle = tree_rss(process)
    soft, _ = process.rlimit(psutil.RLIMIT_NOFILE)
    if 0 <= soft < 2 * n + 100:
        progress(f"the proxy may open at most {soft} files: too few for {n} streams in and "
                 f"{n} out (raise it with ulimit -n)")
    upstream.reset()
    progress(f"{n} streams at once through {name}")
    rss.track(process, count_fds=True)
    result = open_at_once(url, auth, upstream, n, seconds)
    peak = rss.peak()
    while_open = (rss.peak_between(result["all_open_at"], result["first_end_at"])
                  if result["all_open_window_s"] > 0 else None)
    fds = rss.peak_fds()
    rss.track(None)
    return StreamsRow(name, pool or DEFAULT_POOL, int(upstream.stats()["max_open"]),
                      idle / MB, peak / MB, None if while_open is None else while_open / MB,
                      fds, None if soft < 0 else soft, result)


def _one_request(name: str, url: str, headers: dict[str, str], user: str) -> None:
    check_answer(name, url, chat_request(MODEL, stream=False, user=user), headers,
                 stream=False)


def _errors(result: dict[str, Any]) -> str:
    errors: dict[str, int] = result["errors"]
    return ", ".join(f"{v} {k}" for k, v in errors.items()) or "0"


def _line(row: StreamsRow) -> str:
    r = row.result
    return (f"{row.setup}: {r['completed']}/{r['streams']} completed, errors "
            f"{_errors(r)}, {r['most_open_at_once']} open at once, lag p50 "
            f"{ms(r['lag']['p50_ms'])} p99 {ms(r['lag']['p99_ms'])} max "
            f"{ms(r['lag']['max_ms'])} ms, {r['held_back']} held back"
            + ("" if row.peak_rss_mb is None else f", peak RSS {row.peak_rss_mb:.0f} MB"))


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _count(value: int | None) -> str:
    return "unlimited" if value is None else f"{value:,}"


def _rss_cell(row: StreamsRow) -> str:
    values = (row.idle_rss_mb, row.peak_rss_mb, row.peak_rss_all_open_mb)
    return "" if row.pool_size is None else " / ".join(_mb(v) for v in values)


def target_lines(o: OpenStreams) -> list[str]:
    """The streaming target, for each proxy row of a run of at least TARGET_STREAMS."""
    if o.streams < TARGET_STREAMS:
        return []
    lines = []
    for row in o.rows:
        if row.pool_size is None:
            continue
        r = row.result
        assert row.peak_rss_mb is not None
        parts = [
            (row.completed == o.streams and row.all_open
             and r["streams_with_missing_chunks"] == 0,
             f"{row.completed:,} of {o.streams:,} completed, {r['most_open_at_once']:,} open at "
             f"once" + (f", {r['streams_with_missing_chunks']} missing chunks"
                        if r["streams_with_missing_chunks"] else "")),
            (row.peak_rss_mb <= TARGET_RSS_MB,
             f"peak RSS {row.peak_rss_mb:.0f} MB (≤ {TARGET_RSS_MB})"),
            (r["held_back"] == 0 and r["lag"]["p99_ms"] <= TARGET_LAG_P99_MS,
             f"{r['held_back']} chunks held back, lag p99 {ms(r['lag']['p99_ms'])} ms "
             f"(≤ {TARGET_LAG_P99_MS:.0f})"),
        ]
        met = all(ok for ok, _ in parts)
        lines.append(f"{o.streams:,} streams open at once, {row.setup}: "
                     + "; ".join(text + ("" if ok else " **(no)**") for ok, text in parts)
                     + f": {'met' if met else '**missed**'}")
    return lines


def report_lines(o: OpenStreams) -> list[str]:
    stream_s = o.chunks * o.interval_ms / 1000
    rate = o.streams * 1000 / o.interval_ms
    lines = [
        f"## {o.streams:,} streams open at once", "",
        f"The upstream (bench/slow_sse.py) sends each stream's first chunk at once, then "
        f"{o.chunks} chunks {o.interval_ms:g} ms apart ({stream_s:g} s; {rate:,.0f} chunks/s "
        f"over all the streams), each stamped with "
        f"the time it was written; one client opens all {o.streams:,} streams at once, "
        f"spread over {o.users:,} funded end users (each made one request before). The "
        f"proxy has one worker, full metering, {o.database}. Lag: a chunk's arrival at the "
        "client minus the upstream's send time (one clock, CLOCK_MONOTONIC), so it holds "
        "the client's own delay too: the direct row shows it. Held back: chunks that "
        "arrived after the upstream had sent the next chunk of their stream. Gaps: between "
        "a stream's consecutive content chunks, at the client and at the upstream. Open at "
        "once: streams between their first and last chunk at one instant (client) and "
        "streams the upstream served at once. RSS: the worker (no PostgreSQL), idle "
        "before, highest over the run, and highest while every stream was open. Files: the "
        "most file descriptors the worker had open, and its limit (RLIMIT_NOFILE).", "",
        markdown_table(
            ["setup", "completed", "errors", "open at once (client / upstream)",
             "first chunk p50 / max ms", "lag p50 / p99 / max ms", "lag p99 while all open ms",
             "held back", "gap max client / upstream ms", "RSS idle / peak / all open MB",
             "files open / limit"],
            [[row.setup, f"{row.completed:,} / {row.result['streams']:,}",
              _errors(row.result),
              f"{row.result['most_open_at_once']:,} / {row.upstream_most_open:,}",
              f"{ms(row.result['first_chunk']['p50_ms'])} / "
              f"{ms(row.result['first_chunk']['max_ms'])}",
              " / ".join(ms(row.result["lag"][k]) for k in ("p50_ms", "p99_ms", "max_ms")),
              ms(row.result["lag_all_open"]["p99_ms"])
              if row.result["lag_all_open_chunks"] else "never all open",
              f"{row.result['held_back']:,} of {row.result['chunks_received']:,}",
              f"{ms(row.result['client_gap']['max_ms'])} / "
              f"{ms(row.result['upstream_gap']['max_ms'])}",
              _rss_cell(row),
              "" if row.pool_size is None else
              f"{'-' if row.peak_fds is None else f'{row.peak_fds:,}'} / "
              f"{_count(row.open_files_limit)}"]
             for row in o.rows]), ""]
    return lines
