"""What the bounded HTTP protocol (proxy/server.py) costs against uvicorn's own.

Two uvicorn servers run the same minimal ASGI app (it reads the request body and answers
the upstream's fixed chat completion), one with uvicorn's ``httptools`` protocol, one with
``proxy.server``'s bounded one at its default limits, both on uvloop with one worker. wrk
POSTs bench/chat.lua's request to each in turn, alternating, ``--rounds`` times at each
concurrency, so both are measured under the same machine noise; the report gives each
protocol's median RPS, p50 and p99 and the ratio of the bounded one to uvicorn's. The app
is as cheap as an app can be, so that whatever the protocol adds is as large a share of
each request as it can ever be: the proxy's own pipeline costs far more per request.

    .venv/bin/python bench/protocol.py                       # 5 s runs, c = 1, 64, 3 rounds
    .venv/bin/python bench/protocol.py --duration 3 --rounds 5 --concurrency 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    CHAT_PATH,
    Load,
    chat_request,
    completion_body,
    exit_on_sigterm,
    free_port,
    install_missing,
    machine_lines,
    markdown_table,
    ms,
    positive_ints,
    progress,
    running,
    wait_ready,
    write_results,
    wrk,
)

PROTOCOLS = ("uvicorn httptools", "bounded httptools")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers the fixed completion."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = completion_body().encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(protocol: str, port: int) -> None:
    import uvicorn

    from proxy import server

    http: Any = "httptools" if protocol == PROTOCOLS[0] else server.protocol(
        server.ConnectionLimits())
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http=http,
                lifespan="off", access_log=False, server_header=False, log_level="warning")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    p.add_argument("--concurrency", type=positive_ints, default=[1, 64],
                   help="comma-separated open connections (default 1,64)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each protocol at each concurrency, alternating (default 3)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                   help="where to write the results (default bench/results)")
    p.add_argument("--serve", choices=PROTOCOLS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def median_of(loads: list[Load]) -> dict[str, float]:
    return {"rps": statistics.median(x.rps for x in loads),
            "p50_ms": statistics.median(x.p50_ms for x in loads),
            "p99_ms": statistics.median(x.p99_ms for x in loads),
            "errors": sum(x.non_2xx + x.socket_errors for x in loads)}


def main() -> int:
    args = parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    exit_on_sigterm()
    install_missing()
    started = datetime.now().astimezone()
    body = chat_request("bench", False)
    loads: dict[tuple[str, int], list[Load]] = {(p, c): [] for p in PROTOCOLS
                                                 for c in args.concurrency}
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp:
        ports = {p: free_port() for p in PROTOCOLS}
        with running([sys.executable, __file__, "--serve", PROTOCOLS[0], "--port",
                      str(ports[PROTOCOLS[0]])], Path(tmp) / "stock.log") as a, \
             running([sys.executable, __file__, "--serve", PROTOCOLS[1], "--port",
                      str(ports[PROTOCOLS[1]])], Path(tmp) / "bounded.log") as b:
            for p, proc in zip(PROTOCOLS, (a, b), strict=True):
                log = Path(tmp) / ("stock.log" if p == PROTOCOLS[0] else "bounded.log")
                wait_ready(p, proc, log, f"http://127.0.0.1:{ports[p]}{CHAT_PATH}", body)
            for c in args.concurrency:
                for r in range(args.rounds):
                    order = PROTOCOLS if r % 2 == 0 else PROTOCOLS[::-1]
                    for p in order:
                        wrk(f"http://127.0.0.1:{ports[p]}{CHAT_PATH}", body, "", c, 1)
                        load = wrk(f"http://127.0.0.1:{ports[p]}{CHAT_PATH}", body, "", c,
                                   args.duration)
                        loads[p, c].append(load)
                        progress(f"{p:<18} c={c:<3} round {r + 1}: {load.rps:>8,.0f} RPS  "
                                 f"p50 {ms(load.p50_ms)} ms  p99 {ms(load.p99_ms)} ms")
    results = {f"{p} c={c}": median_of(v) for (p, c), v in loads.items()}
    rows = []
    for c in args.concurrency:
        stock, bounded = (results[f"{p} c={c}"] for p in PROTOCOLS)
        for p in PROTOCOLS:
            m = results[f"{p} c={c}"]
            rows.append([p, str(c), f"{m['rps']:,.0f}", ms(m["p50_ms"]), ms(m["p99_ms"]),
                         str(int(m["errors"])),
                         f"{m['rps'] / stock['rps']:.3f}" if p == PROTOCOLS[1] else "1"])
        results[f"ratio c={c}"] = {"rps": bounded["rps"] / stock["rps"],
                                   "p50_ms": bounded["p50_ms"] - stock["p50_ms"]}
    markdown = "\n".join([
        "# The bounded HTTP protocol against uvicorn's httptools", "",
        *machine_lines(started), "",
        f"median of {args.rounds} alternating runs of {args.duration} s each", "",
        markdown_table(["protocol", "c", "RPS", "p50 ms", "p99 ms", "errors",
                        "RPS / uvicorn's"], rows)])
    stem = f"protocol-{started:%Y%m%d-%H%M%S}"
    for path in write_results(args.out, stem, {"args": vars(args) | {"out": str(args.out)},
                                               "results": results}, markdown):
        progress(f"wrote {path}")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
