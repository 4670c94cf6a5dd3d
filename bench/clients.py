"""Which upstream HTTP client for a bare pass-through proxy: one run, one table.

Starts nginx as a near-free upstream, then in turn bench/passthrough.py (Starlette under
uvicorn, uvloop + httptools, one worker) with each client, and runs wrk against it and
against nginx directly at each concurrency (non-streaming answers only).

    .venv/bin/python bench/clients.py [--duration 5] [--concurrency 1,64] [--out bench/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from common import (
    BENCH_DIR,
    CHAT_PATH,
    UPSTREAM_CONNECTIONS,
    Load,
    chat_request,
    exit_on_sigterm,
    install_missing,
    machine_lines,
    markdown_table,
    ms,
    nginx_upstream,
    passthrough,
    positive_ints,
    progress,
    write_results,
    wrk,
)

SETUPS = {
    "aiohttp": "bare pass-through, aiohttp client",
    "httpx-aiohttp": "bare pass-through, httpx API + httpx-aiohttp transport",
    "httpx": "bare pass-through, httpx default transport",
}
DIRECT = "direct to nginx"
AUTH = "Bearer sk-upstream-bench"


@dataclass(frozen=True, slots=True)
class Row:
    setup: str
    concurrency: int
    load: Load
    overhead_p50_ms: float | None


def measure(args: argparse.Namespace, workdir: Path) -> dict[tuple[str, int], Load]:
    body = chat_request("bench", stream=False)
    loads: dict[tuple[str, int], Load] = {}

    def load(setup: str, url: str) -> None:
        for c in args.concurrency:
            if args.warmup:
                wrk(url, body, AUTH, c, args.warmup)
            result = loads[setup, c] = wrk(url, body, AUTH, c, args.duration)
            progress(f"{setup:<55} c={c:<4} {result.rps:>9,.0f} RPS  "
                     f"p50 {ms(result.p50_ms)} ms  errors {result.errors}")

    with nginx_upstream(workdir) as upstream:
        load(DIRECT, upstream.origin + CHAT_PATH)
        for name, setup in SETUPS.items():
            with passthrough(name, upstream, workdir / f"passthrough-{name}.log") as served:
                load(setup, served.url)
    return loads


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Which upstream HTTP client for a bare pass-through proxy.")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 64],
                        help="comma-separated open connections (default 1,64)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured load before each run (default 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="where to write the results (default bench/results)")
    args = parser.parse_args()
    modules = [m for m in ("httpx", "httpx_aiohttp") if importlib.util.find_spec(m) is None]
    if modules:
        progress(f"bench/clients.py: {', '.join(modules)} not installed: "
                 "pip install -e '.[bench]' (or pip install httpx httpx-aiohttp)")
        return 2
    try:
        install_missing()
    except RuntimeError as e:
        progress(f"bench/clients.py: {e}")
        return 2
    exit_on_sigterm()
    started = datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="paywall-bench-") as tmp:
        try:
            loads = measure(args, Path(tmp))
        except KeyboardInterrupt:
            progress("interrupted")
            return 130
        except RuntimeError as e:
            progress(f"bench/clients.py: {e}")
            return 1
    rows = [Row(setup, c, loads[setup, c],
                None if setup == DIRECT else loads[setup, c].p50_ms - loads[DIRECT, c].p50_ms)
            for setup in [DIRECT, *SETUPS.values()] for c in args.concurrency]
    header = machine_lines(started)
    table = markdown_table(
        ["setup", "concurrency", "RPS", "p50 ms", "p99 ms", "errors", "overhead p50 vs direct ms"],
        [[r.setup, str(r.concurrency), f"{r.load.rps:,.0f}", ms(r.load.p50_ms),
          ms(r.load.p99_ms), r.load.errors,
          "" if r.overhead_p50_ms is None else f"{r.overhead_p50_ms:+.3f}"] for r in rows],
    )
    markdown = "\n".join([
        "# Upstream HTTP client for a bare pass-through proxy", "",
        *[f"- {line}" for line in header],
        f"- pass-through: Starlette, uvicorn (uvloop, httptools), 1 worker, "
        f"up to {UPSTREAM_CONNECTIONS} upstream connections per client",
        "", table, "", "Figures are comparable only within this run.",
    ])
    data = {"started": started.isoformat(timespec="seconds"), "machine": header,
            "duration_s": args.duration, "warmup_s": args.warmup,
            "rows": [asdict(r) for r in rows]}
    paths = write_results(args.out, f"clients-{started:%Y%m%d-%H%M%S}", data, markdown)
    print(markdown)
    progress("written: " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
