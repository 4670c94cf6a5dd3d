"""What the proxy costs per request on each metered endpoint: ``POST /v1/chat/completions``,
``POST /v1/responses`` and ``POST /v1/embeddings``, side by side in one run.

Starts nginx with a fixed answer per endpoint (bench/answers.py), bench/passthrough.py
in front of it (the bare floor: aiohttp client, no auth, no database, no metering) and
``paywall-proxy serve`` (one worker, full metering: key, identity, token estimate, hold
and settlement in PostgreSQL). Every model is priced, so every proxied request is
charged. Before any load each endpoint gets one request through each server, and a
proxied answer must carry the cost its usage x price comes to, to the nano-dollar. At
each concurrency, ``--rounds`` times, wrk posts each endpoint's request to the bare
pass-through and to the proxy in turn (the order alternating between rounds), so that
the figures compared are taken close together; the table gives the median of the rounds.

    .venv/bin/python bench/endpoints.py [--duration 5] [--concurrency 1,64] [--rounds 2]
                                        [--no-stream] [--users 1000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from answers import (
    EMBEDDING_USAGE,
    EMBEDDINGS_PATH,
    RESPONSE_USAGE,
    RESPONSES_PATH,
    STREAM_RESPONSES_PATH,
    embeddings_request,
    responses_request,
)
from common import (
    BENCH_DIR,
    CHAT_PATH,
    COMPLETION,
    STREAM_CHAT_PATH,
    Answer,
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
    post,
    progress,
    write_results,
    wrk,
)
from proxyproc import (
    PROXY,
    REPO,
    create_key,
    database_env,
    embedded_version,
    serve_proxy,
    stop_leftover_postgres,
)

UPSTREAM_KEY = "sk-upstream-bench"
PAYWALL = "bench"
INPUT_PER_MILLION = Decimal("0.15")
OUTPUT_PER_MILLION = Decimal("0.60")
NANO = Decimal("0.000000001")  # usd's smallest unit in the proxy


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One request wrk sends, and what a good answer to it looks like."""

    name: str
    path: str  # on the proxy
    bare_path: str  # on the pass-through, the same as nginx's
    model: str
    stream: bool
    request: Callable[[str], bytes]  # the body for an end user
    obj: str  # the answer's "object" (non-stream)
    prompt_tokens: int  # the usage nginx's answer reports
    output_tokens: int

    @property
    def cost(self) -> Decimal:
        """What the proxy must charge for one answer: usage x price, rounded up."""
        exact = (self.prompt_tokens * INPUT_PER_MILLION
                 + self.output_tokens * OUTPUT_PER_MILLION) / 1_000_000
        return exact.quantize(NANO, rounding=ROUND_CEILING)


def _chat(model: str, stream: bool) -> Callable[[str], bytes]:
    return functools.partial(chat_request, model, stream)


def _responses(model: str, stream: bool) -> Callable[[str], bytes]:
    return functools.partial(responses_request, model, stream)


_CHAT_USAGE = COMPLETION["usage"]
ENDPOINTS = (
    Endpoint("chat", CHAT_PATH, CHAT_PATH, "bench", False, _chat("bench", False),
             "chat.completion", _CHAT_USAGE["prompt_tokens"], _CHAT_USAGE["completion_tokens"]),
    Endpoint("responses", RESPONSES_PATH, RESPONSES_PATH, "bench-responses", False,
             _responses("bench-responses", False), "response",
             RESPONSE_USAGE["input_tokens"], RESPONSE_USAGE["output_tokens"]),
    Endpoint("embeddings", EMBEDDINGS_PATH, EMBEDDINGS_PATH, "bench-embed", False,
             functools.partial(embeddings_request, "bench-embed"), "list",
             EMBEDDING_USAGE["prompt_tokens"], 0),
    Endpoint("chat stream", CHAT_PATH, STREAM_CHAT_PATH, "bench-stream", True,
             _chat("bench-stream", True), "chat.completion.chunk",
             _CHAT_USAGE["prompt_tokens"], _CHAT_USAGE["completion_tokens"]),
    Endpoint("responses stream", RESPONSES_PATH, STREAM_RESPONSES_PATH,
             "bench-responses-stream", True, _responses("bench-responses-stream", True),
             "response", RESPONSE_USAGE["input_tokens"], RESPONSE_USAGE["output_tokens"]),
)
BASELINES = {True: "chat stream", False: "chat"}  # what "vs chat" compares with
SETUPS = ("bare", "proxy")


def settings_toml(base_url: str, stream_base_url: str) -> str:
    price = (f'{{ asset = "usd", input_per_million = "{INPUT_PER_MILLION}", '
             f'output_per_million = "{OUTPUT_PER_MILLION}" }}')
    models = "".join(
        f'\n[models.{e.model}]\nprovider = "{"nginx-stream" if e.stream else "nginx"}"\n'
        f"price = {price}\n" for e in ENDPOINTS)
    return f"""\
[server]
host = "127.0.0.1"

[providers.nginx]
kind = "openai"
base_url = "{base_url}"
api_key = "{UPSTREAM_KEY}"

[providers.nginx-stream]
kind = "openai"
base_url = "{stream_base_url}"
api_key = "{UPSTREAM_KEY}"
{models}
[paywalls.{PAYWALL}]
name = "Benchmark"
# Every benchmark user starts funded, so each request is held and settled for real.
starter_grant = "1000000"
"""


# --- checking answers ------------------------------------------------------------


def _sse_data(body: bytes) -> list[Any]:
    """The JSON ``data`` of each event of an SSE body (``[DONE]`` as the string)."""
    out: list[Any] = []
    for block in body.decode("utf-8", "replace").split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                data = line.removeprefix("data:").strip()
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _stream_usage(e: Endpoint, events: list[Any]) -> tuple[bool, Mapping[str, Any] | None]:
    """Whether the stream ended as the API ends it, and the usage it reported at the end."""
    if e.obj == "response":
        last = events[-1] if events else None
        if not isinstance(last, dict) or last.get("type") != "response.completed":
            return False, None
        usage = last["response"].get("usage")
        return True, usage if isinstance(usage, dict) else None
    ended = bool(events) and events[-1] == "[DONE]"
    usage = events[-2].get("usage") if ended and len(events) > 1 else None
    return ended, usage if isinstance(usage, dict) else None


def answer_problem(e: Endpoint, answer: Answer, metered: bool) -> str | None:
    """What is wrong with ``answer`` to ``e``'s request, or None. Pure.

    It must be the upstream's (a 200 of the right shape, no ``X-Paywall-Action``: the
    proxy's own replies are well-formed answers too); through the proxy (``metered``) a
    whole answer, and a Responses stream's ``response.completed``, must carry
    ``usage.cost`` equal to :attr:`Endpoint.cost`; a chat stream only if it has a usage
    chunk (chat.lua's request asks for none).
    """
    if answer.status != 200:
        return f"status {answer.status}"
    if (action := answer.headers.get("x-paywall-action")) is not None:
        return f"X-Paywall-Action {action!r}"
    try:
        if e.stream:
            if not answer.content_type.startswith("text/event-stream"):
                return f"content-type {answer.content_type!r}"
            ended, usage = _stream_usage(e, _sse_data(answer.body))
            if not ended:
                return "the stream does not end as the API ends it"
        else:
            data = json.loads(answer.body)
            if data.get("object") != e.obj:
                return f"object {data.get('object')!r}, not {e.obj!r}"
            usage = data.get("usage")
    except (ValueError, AttributeError, KeyError, TypeError) as error:
        return f"unreadable answer ({error})"
    if not metered:
        return None
    cost = usage.get("cost") if isinstance(usage, dict) else None
    if cost is None:
        return None if e.obj == "chat.completion.chunk" else "no usage.cost: not metered"
    if Decimal(str(cost)) != e.cost:
        return f"usage.cost {cost}, expected {e.cost:f} (usage x price)"
    return None


def check(e: Endpoint, setup: str, url: str, auth: str, user: str = "bench-user") -> None:
    answer = post(url, e.request(user), {"Authorization": auth} if auth else {})
    if (problem := answer_problem(e, answer, metered=setup == "proxy")) is not None:
        raise RuntimeError(f"{e.name} through {setup}: {problem}; from {url}: "
                           f"body {answer.body[:500]!r}")


# --- the runs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    endpoint: Endpoint
    setup: str  # "bare" or "proxy"
    url: str
    auth: str


@dataclass(frozen=True, slots=True)
class Figures:
    """The median of the rounds of one endpoint, setup and concurrency."""

    endpoint: str
    setup: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int  # over every round
    non_2xx: int
    socket_errors: int
    rounds: list[dict[str, float]]  # each round's rps, p50_ms, p99_ms

    @property
    def errors(self) -> str:
        if not self.non_2xx and not self.socket_errors:
            return "0"
        return f"{self.non_2xx} non-2xx, {self.socket_errors} socket"


def figures(endpoint: str, setup: str, c: int, loads: Sequence[Load]) -> Figures:
    return Figures(
        endpoint, setup, c, statistics.median(x.rps for x in loads),
        statistics.median(x.p50_ms for x in loads), statistics.median(x.p99_ms for x in loads),
        sum(x.requests for x in loads), sum(x.non_2xx for x in loads),
        sum(x.socket_errors for x in loads),
        [{"rps": round(x.rps, 1), "p50_ms": x.p50_ms, "p99_ms": x.p99_ms} for x in loads])


def run(args: argparse.Namespace, plan: list[Target]) -> list[Figures]:
    """wrk on every target, ``--rounds`` times per concurrency; the medians."""
    loads: dict[tuple[str, str, int], list[Load]] = {}
    for c in args.concurrency:
        for r in range(args.rounds):
            for e in dict.fromkeys(t.endpoint for t in plan):
                pair = [t for t in plan if t.endpoint is e]
                for t in pair if r % 2 == 0 else reversed(pair):
                    body = e.request("bench-user")
                    if args.warmup:
                        wrk(t.url, body, t.auth, c, args.warmup)
                    load = wrk(t.url, body, t.auth, c, args.duration)
                    loads.setdefault((e.name, t.setup, c), []).append(load)
                    progress(f"round {r + 1} {e.name:<17} {t.setup:<5} c={c:<3} "
                             f"{load.rps:>7,.0f} RPS  p50 {ms(load.p50_ms)} ms  "
                             f"p99 {ms(load.p99_ms)} ms  errors {load.errors}")
    return [figures(name, setup, c, runs) for (name, setup, c), runs in loads.items()]


def open_users(e: Endpoint, url: str, auth: str, users: list[str]) -> None:
    """One checked request per end user before any load: a user's first request opens
    its account and grant, which nearly every request of a running app comes after."""
    progress(f"one request per end user ({len(users)}) through the proxy")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(functools.partial(check, e, "proxy", url, auth), users))


@dataclass(frozen=True, slots=True)
class Measured:
    figures: list[Figures]
    database: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def measure(args: argparse.Namespace, workdir: Path, logs: Path) -> Measured:
    endpoints = [e for e in ENDPOINTS if args.stream or not e.stream]
    with nginx_upstream(workdir) as upstream:
        env, database = database_env(workdir)
        config = workdir / "bench.toml"
        config.write_text(settings_toml(upstream.base_url, upstream.stream_base_url),
                          encoding="utf-8")
        progress(f"database: {database}")
        try:
            with contextlib.ExitStack() as stack:
                bare = stack.enter_context(passthrough("aiohttp", upstream,
                                                       logs / "passthrough.log"))
                progress(f"creating a key for paywall {PAYWALL}")
                auth = f"Bearer {create_key(config, env, PAYWALL)}"
                progress("starting the proxy, 1 worker")
                _, port = stack.enter_context(
                    serve_proxy(config, env, 1, logs / "proxy-w1.log"))
                plan = [t for e in endpoints for t in (
                    Target(e, "bare", f"http://127.0.0.1:{bare.port}{e.bare_path}", ""),
                    Target(e, "proxy", f"http://127.0.0.1:{port}{e.path}", auth))]
                for t in plan:
                    check(t.endpoint, t.setup, t.url, t.auth)
                users = ([f"bench-user-{i}" for i in range(args.users)] if args.users > 1
                         else ["bench-user"])
                open_users(endpoints[0], plan[1].url, auth, users)
                if version := embedded_version(workdir / "data"):
                    database = f"embedded PostgreSQL {version}"
                before = os.getloadavg()
                results = run(args, plan)
                after = os.getloadavg()
                for t in plan:  # still metered right after the load
                    check(t.endpoint, t.setup, t.url, t.auth)
        finally:
            stop_leftover_postgres(workdir / "data")
    return Measured(results, database, before, after)


# --- the report ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ratios:
    endpoint: str
    concurrency: int
    rps_vs_bare: float  # proxy RPS / bare RPS
    p50_over_bare_ms: float  # proxy p50 - bare p50
    rps_vs_chat: float  # proxy RPS / chat's proxy RPS
    p50_vs_chat: float  # proxy p50 / chat's proxy p50
    pipeline_vs_chat: float  # (proxy p50 - bare p50) / chat's


def ratios(rows: list[Figures]) -> list[Ratios]:
    by = {(f.endpoint, f.setup, f.concurrency): f for f in rows}
    out = []
    for e in ENDPOINTS:
        for c in dict.fromkeys(f.concurrency for f in rows):
            proxy, bare = by.get((e.name, "proxy", c)), by.get((e.name, "bare", c))
            chat = by.get((BASELINES[e.stream], "proxy", c))
            chat_bare = by.get((BASELINES[e.stream], "bare", c))
            if proxy is None or bare is None or chat is None or chat_bare is None:
                continue
            chat_cost = chat.p50_ms - chat_bare.p50_ms
            out.append(Ratios(
                e.name, c, proxy.rps / bare.rps if bare.rps else 0.0,
                proxy.p50_ms - bare.p50_ms, proxy.rps / chat.rps if chat.rps else 0.0,
                proxy.p50_ms / chat.p50_ms if chat.p50_ms else 0.0,
                (proxy.p50_ms - bare.p50_ms) / chat_cost if chat_cost else 0.0))
    return out


def report(m: Measured, header: list[str], args: argparse.Namespace) -> str:
    concurrency = args.concurrency
    by = {(f.endpoint, f.setup, f.concurrency): f for f in m.figures}
    names = list(dict.fromkeys(f.endpoint for f in m.figures))

    def cell(f: Figures | None) -> str:
        if f is None:
            return ""
        errors = "" if f.errors == "0" else f" ({f.errors})"
        return f"{f.rps:,.0f} · {ms(f.p50_ms)} / {ms(f.p99_ms)}{errors}"

    summary = markdown_table(
        ["endpoint", "setup", *(f"c={c}: RPS · p50 / p99 ms" for c in concurrency)],
        [[n, s, *(cell(by.get((n, s, c))) for c in concurrency)]
         for n in names for s in SETUPS])
    rs = ratios(m.figures)
    ratio_table = markdown_table(
        ["endpoint", "c", "proxy / bare RPS", "proxy p50 - bare p50", "RPS vs chat",
         "p50 vs chat", "pipeline cost vs chat"],
        [[r.endpoint, str(r.concurrency), f"{r.rps_vs_bare:.2f}x",
          f"{ms(r.p50_over_bare_ms)} ms", f"{r.rps_vs_chat:.2f}x", f"{r.p50_vs_chat:.2f}x",
          f"{r.pipeline_vs_chat:.2f}x"] for r in rs])
    load = " ".join(f"{x:.2f}" for x in m.load_before), " ".join(
        f"{x:.2f}" for x in m.load_after)
    return "\n".join([
        "# The metered endpoints: chat, Responses, embeddings", "",
        *(f"- {line}" for line in header),
        f"- database: {m.database}",
        f"- load average (1, 5, 15 min) before the runs: {load[0]}; after: {load[1]} "
        "(other work on the machine shows here)",
        f"- {args.duration} s per wrk run after {args.warmup} s of warm-up, "
        f"{args.rounds} round(s) per concurrency (the median shown), {args.users} end "
        "users; one proxy worker, full metering, every model priced",
        "", "**Figures are only comparable within this run**: quote the ratios.", "",
        "## RPS · p50 / p99 latency (whole answers; streams: whole streams, wrk)", "",
        summary, "",
        "## Ratios", "",
        "Each endpoint through the proxy against the bare pass-through of the same request "
        "(same run, same concurrency), and against chat completions through the proxy "
        "(streams against the chat stream). *Pipeline cost vs chat*: (proxy p50 - bare "
        "p50) over chat's.", "",
        ratio_table,
    ])


def code_line() -> str:
    """The commit the proxy ran from, and how many of its files differed from it."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True,
                              text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = len(git("status", "--porcelain", "--", "proxy").splitlines())
    return (f"proxy code: commit {commit}"
            + (f", {changed} file(s) under proxy/ uncommitted" if changed else ""))


def main() -> int:
    parser = argparse.ArgumentParser(
        description="What the proxy costs on chat completions, the Responses API and "
                    "embeddings, against a bare pass-through, in one run.")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 64],
                        help="comma-separated open connections (default 1,64)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each setup per concurrency, alternating the order "
                             "(default 2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured load before each run (default 1)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the chat and Responses streams (default: yes)")
    parser.add_argument("--users", type=int, default=1000,
                        help="end users the requests are spread over (default 1000)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="where to write the results (default bench/results)")
    args = parser.parse_args()
    if args.rounds < 1 or args.users < 1:
        progress("bench/endpoints.py: --rounds and --users must be at least 1")
        return 2
    os.environ["BENCH_USERS"] = str(args.users)  # read by chat.lua
    if not os.access(PROXY, os.X_OK):
        progress(f"bench/endpoints.py: not found: {PROXY} (the project installed in .venv)")
        return 2
    try:
        install_missing()
    except RuntimeError as e:
        progress(f"bench/endpoints.py: {e}")
        return 2
    exit_on_sigterm()
    started = datetime.now().astimezone()
    code = code_line()  # before the run: others may change the tree while it lasts
    clock = time.monotonic()
    stem = f"endpoints-{started:%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="paywall-bench-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        try:
            measured = measure(args, Path(tmp), logs)
        except KeyboardInterrupt:
            progress("interrupted")
            return 130
        except RuntimeError as e:
            progress(f"bench/endpoints.py: {e}")
            return 1
        finally:
            args.out.mkdir(parents=True, exist_ok=True)
            for log in sorted(logs.iterdir()):
                (args.out / f"{stem}.{log.name}").write_bytes(log.read_bytes())
    wall = f"wall time of the run: {time.monotonic() - clock:.0f} s"
    header = [*machine_lines(started), code, wall]
    markdown = report(measured, header, args)
    data = {
        "started": started.isoformat(timespec="seconds"), "machine": header,
        "command": " ".join(["bench/endpoints.py", *sys.argv[1:]]),
        "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
        "users": args.users, "database": measured.database,
        "load_average": {"before": measured.load_before, "after": measured.load_after},
        "rows": [asdict(f) for f in measured.figures],
        "ratios": [asdict(r) for r in ratios(measured.figures)],
    }
    paths = write_results(args.out, stem, data, markdown)
    print(markdown)
    progress("written: " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
