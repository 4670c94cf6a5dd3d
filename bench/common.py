"""Shared by the benchmarks: the nginx upstream, the bare pass-through, child processes,
wrk runs, the tables.

The upstream is nginx answering every POST with a fixed ``chat.completion`` (or a fixed
SSE stream) from its configuration, so it costs almost nothing and what is measured is
whatever stands between wrk and it. It also serves bench/answers.py's fixed Responses
and embeddings answers, for bench/endpoints.py.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from answers import (
    EMBEDDINGS_PATH,
    RESPONSES_PATH,
    STREAM_RESPONSES_PATH,
    embeddings_body,
    response_body,
    response_stream_body,
)

BENCH_DIR = Path(__file__).resolve().parent
CHAT_LUA = BENCH_DIR / "chat.lua"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
WRK_TIMEOUT = "10s"  # slower answers count as socket errors (timeouts)
UPSTREAM_CONNECTIONS = 512  # per upstream client in bench/passthrough.py
PASSTHROUGH = BENCH_DIR / "passthrough.py"
SSE_CLIENT = BENCH_DIR / "sse.py"
# The upstream's two answers; bench/passthrough.py serves the same paths.
CHAT_PATH = "/v1/chat/completions"
STREAM_CHAT_PATH = "/stream/v1/chat/completions"
# Loopback only: never through an http_proxy from the environment.
_URLS = urllib.request.build_opener(urllib.request.ProxyHandler({}))

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "bench",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
}


def _chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "bench-stream",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


STREAM_CHUNKS: list[dict[str, Any]] = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hello!"}),
    _chunk({"content": " How can I help"}),
    _chunk({"content": " you today?"}),
    _chunk({}, finish="stop"),
    {**_chunk({}), "choices": [],
     "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}},
]


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def completion_body() -> str:
    return _compact(COMPLETION)


def stream_body() -> str:
    events = "".join(f"data: {_compact(c)}\n\n" for c in STREAM_CHUNKS)
    return events + "data: [DONE]\n\n"


def chat_request(model: str, stream: bool, user: str = "bench-user") -> bytes:
    """The request wrk sends; chat.lua gives ``"bench-user"`` a number per request."""
    body: dict[str, Any] = {"model": model, "user": user,
                            "messages": [{"role": "user", "content": "Hello"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def positive_ints(text: str) -> list[int]:
    """argparse type for a comma-separated list such as --concurrency 1,8,64."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return values


# --- processes -------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C does, so every child process is stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def install_missing(with_redis: bool = False) -> None:
    """``apt-get install -y`` nginx and wrk (and redis-server) when they are not there.

    Only as root on a system with apt-get; anywhere else, say what to install and stop.
    """
    packages = [pkg for pkg, program in (("nginx", NGINX), ("wrk", WRK))
                if not os.access(program, os.X_OK)]
    if with_redis and not shutil.which("redis-server"):
        packages.append("redis-server")
    if not packages:
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(f"missing: {', '.join(packages)}; install them "
                           f"(Debian: apt-get install -y {' '.join(packages)})")
    argv = [apt, "install", "-y", "--no-install-recommends", *packages]
    progress("running: " + " ".join(argv))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(argv, env=env, check=False).returncode != 0:
        subprocess.run([apt, "update"], env=env, check=False)
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise RuntimeError(f"apt-get could not install {', '.join(packages)}")
    if still := [p for p in (NGINX, WRK) if not os.access(p, os.X_OK)]:
        raise RuntimeError(f"still not found after apt-get: {', '.join(still)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def check_survived(name: str, proc: subprocess.Popen[Any], log: Path) -> None:
    """Fail the run if ``proc`` died while it was being measured."""
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited with status {proc.returncode} during the "
                           f"runs:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
            stop_timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with its output in ``log``; on exit stop it (SIGTERM, then SIGKILL).

    The child gets its own session, so a Ctrl-C meant for the benchmark reaches it only
    through this clean-up, in order.
    """
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=None if env is None else dict(env), start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                progress(f"{Path(argv[0]).name} did not stop in {stop_timeout:.0f} s; killing it")
                proc.kill()
                proc.wait()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float = 10.0) -> Answer:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with _URLS.open(request, timeout=timeout) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                          resp.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def wait_ready(name: str, proc: subprocess.Popen[bytes], log: Path, url: str,
               body: bytes | None = None, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers 200 (GET, or POST of ``body``) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail(log)}")
        try:
            if body is None:
                with _URLS.open(url, timeout=2) as resp:
                    status = resp.status
            else:
                status = post(url, body, {}, timeout=2).status
            if status == 200:
                return
            last = f"status {status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready at {url} after {timeout:.0f} s ({last}):\n{tail(log)}")


def check_answer(name: str, url: str, body: bytes, headers: Mapping[str, str],
                 stream: bool) -> Answer:
    """One request: fail loudly unless it gets the upstream's answer, and return it.

    The proxy's own replies (connect, top-up, spend cap) are chat completions too; their
    ``X-Paywall-Action`` header tells them apart.
    """
    answer = post(url, body, headers)
    if stream:
        good = (answer.content_type.startswith("text/event-stream")
                and answer.body.endswith(b"data: [DONE]\n\n"))
    else:
        try:
            good = json.loads(answer.body).get("object") == "chat.completion"
        except ValueError:
            good = False
    action = answer.headers.get("x-paywall-action")
    if answer.status != 200 or not good or action is not None:
        raise RuntimeError(f"{name}: unexpected answer from {url}: status {answer.status}, "
                           f"content-type {answer.content_type!r}, "
                           + (f"X-Paywall-Action {action!r}, " if action is not None else "")
                           + f"body {answer.body[:500]!r}")
    return answer


# --- the nginx upstream ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upstream:
    port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + CHAT_PATH.removesuffix("/chat/completions")

    @property
    def stream_base_url(self) -> str:
        return self.origin + STREAM_CHAT_PATH.removesuffix("/chat/completions")


def _nginx_string(text: str) -> str:
    if any(c in text for c in "'\\$"):
        raise ValueError("the fixed answers must not contain ', \\ or $")
    return "'" + text.replace("\n", "\\n") + "'"


def nginx_conf(root: Path, port: int) -> str:
    # As root, workers would otherwise drop to 'nobody'; as anyone else nginx keeps the user.
    user = ""
    if os.geteuid() == 0:
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                f"{grp.getgrgid(os.getegid()).gr_name};")
    temp = " ".join(f"{kind}_temp_path {root / kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
daemon off;
{user}
worker_processes 1;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    {temp}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {CHAT_PATH} {{
            default_type application/json;
            return 200 {_nginx_string(completion_body())};
        }}
        location = {STREAM_CHAT_PATH} {{
            default_type text/event-stream;
            return 200 {_nginx_string(stream_body())};
        }}
        # bench/answers.py: what bench/endpoints.py measures beside chat.
        location = {RESPONSES_PATH} {{
            default_type application/json;
            return 200 {_nginx_string(response_body())};
        }}
        location = {STREAM_RESPONSES_PATH} {{
            default_type text/event-stream;
            return 200 {_nginx_string(response_stream_body())};
        }}
        location = {EMBEDDINGS_PATH} {{
            default_type application/json;
            return 200 {_nginx_string(embeddings_body())};
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_upstream(workdir: Path) -> Iterator[Upstream]:
    root = workdir / "nginx"
    root.mkdir()
    upstream = Upstream(free_port())
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(root, upstream.port), encoding="utf-8")
    log = root / "error.log"
    with running([NGINX, "-p", str(root), "-c", str(conf), "-e", str(log)], log) as proc:
        url = upstream.origin + CHAT_PATH
        wait_ready("nginx", proc, log, url, body=chat_request("bench", stream=False))
        check_answer("nginx", url, chat_request("bench", False), {}, stream=False)
        check_answer("nginx", upstream.origin + STREAM_CHAT_PATH,
                     chat_request("bench-stream", True), {}, stream=True)
        yield upstream


# --- the bare pass-through -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Passthrough:
    """A running bench/passthrough.py."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT_PATH}"

    @property
    def stream_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{STREAM_CHAT_PATH}"


@contextlib.contextmanager
def passthrough(client: str, upstream: Upstream, log: Path) -> Iterator[Passthrough]:
    """bench/passthrough.py with ``client`` in front of ``upstream``, checked both ways."""
    port = free_port()
    argv = [sys.executable, str(PASSTHROUGH), client, "--upstream", upstream.origin,
            "--port", str(port)]
    name = f"the bare pass-through ({client})"
    with running(argv, log) as proc:
        served = Passthrough(proc, port)
        body = chat_request("bench", stream=False)
        wait_ready(name, proc, log, served.url, body=body)
        check_answer(name, served.url, body, {}, stream=False)
        check_answer(name, served.stream_url, chat_request("bench-stream", True), {}, stream=True)
        yield served
        check_survived(name, proc, log)


# --- wrk -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """What one wrk run saw."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> str:
        if not self.non_2xx and not self.socket_errors:
            return "0"
        return f"{self.non_2xx} non-2xx, {self.socket_errors} socket"


def load_result(argv: list[str], body: bytes, auth: str, seconds: float, marker: str,
                 name: str) -> dict[str, Any]:
    """Run a load client posting ``body`` and return the JSON it prints after ``marker``."""
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_AUTH": auth}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                          timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith(marker):
            result: dict[str, Any] = json.loads(line.removeprefix(marker))
            return result
    raise RuntimeError(f"{name} gave no result (status {done.returncode}):\n"
                       f"{done.stdout}\n{done.stderr}")


def wrk(url: str, body: bytes, auth: str, concurrency: int, seconds: int) -> Load:
    """``wrk -t1 -cC -dD --latency -s chat.lua URL`` POSTing ``body``."""
    argv = [WRK, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency",
            "--timeout", WRK_TIMEOUT, "-s", str(CHAT_LUA), url]
    r = load_result(argv, body, auth, seconds, "BENCH_RESULT ", "wrk")
    secs = r["duration_us"] / 1e6
    return Load(
        requests=r["requests"], seconds=secs, rps=r["requests"] / secs if secs else 0.0,
        p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000, non_2xx=r["status"],
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
    )


# --- the stream client -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamLoad:
    """What one bench/sse.py run saw: time to first byte and to the end of each stream."""

    requests: int
    seconds: float
    rps: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float
    bad_answers: int  # not a 200 ending with data: [DONE]
    socket_errors: int

    @property
    def errors(self) -> str:
        if not self.bad_answers and not self.socket_errors:
            return "0"
        return f"{self.bad_answers} bad, {self.socket_errors} socket"


def sse_load(url: str, body: bytes, auth: str, concurrency: int, seconds: float) -> StreamLoad:
    """``bench/sse.py`` against ``url``: ``concurrency`` connections for ``seconds``."""
    argv = [sys.executable, str(SSE_CLIENT), url, "--concurrency", str(concurrency),
            "--duration", str(seconds)]
    r = load_result(argv, body, auth, seconds, "BENCH_SSE ", "bench/sse.py")
    secs = r["duration_us"] / 1e6
    return StreamLoad(
        requests=r["requests"], seconds=secs, rps=r["requests"] / secs if secs else 0.0,
        ttfb_p50_ms=r["ttfb_p50_us"] / 1000, ttfb_p99_ms=r["ttfb_p99_us"] / 1000,
        total_p50_ms=r["total_p50_us"] / 1000, total_p99_ms=r["total_p99_us"] / 1000,
        bad_answers=r["status"], socket_errors=r["socket"],
    )


# --- reporting -------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _version_output(argv: list[str]) -> str:
    """What ``argv`` prints (stdout, else stderr), or "" when it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return (done.stdout or done.stderr).strip()


def machine_lines(started: datetime) -> list[str]:
    nginx = _version_output([NGINX, "-v"]).removeprefix("nginx version: ") or "no nginx"
    wrk_version = _version_output([WRK, "-v"]).split(" [")[0].strip() or "no wrk"
    return [
        f"date: {started.isoformat(timespec='seconds')}",
        f"machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
        f"{platform.system()} {platform.release()}",
        f"software: Python {platform.python_version()}, {nginx}, {wrk_version}",
    ]


def ms(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, stem: str, data: Mapping[str, Any], markdown: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown + "\n", encoding="utf-8")
    return [json_path, md_path]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
