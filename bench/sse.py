"""Streaming load with time to first byte: what wrk cannot see.

wrk times a response once it is complete. For a stream the figure users feel is when
the first event arrives, so this client keeps ``--concurrency`` keep-alive connections
busy for ``--duration`` seconds, each POSTing the same chat request over and over, and
times both the first byte of the response body (the start of the first SSE event) and
the whole stream. Each answer must be a 200 ending with ``data: [DONE]``; any other
answer, or a broken connection, counts as an error.

The request and its ``Authorization`` header come from ``BENCH_BODY`` and
``BENCH_AUTH`` and, with ``BENCH_USERS`` > 1, each request names one of that many end
users in turn, exactly as bench/chat.lua does for wrk. Prints one line,
``BENCH_SSE {json}``, latencies in microseconds. Started by ``common.sse_load``:

    python bench/sse.py URL --concurrency 8 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DONE = b"data: [DONE]\n\n"
READ_TIMEOUT = 10.0  # as wrk's --timeout


class BadAnswer(Exception):
    pass


@dataclass(slots=True)
class Tally:
    ttfb_us: list[float] = field(default_factory=list)
    total_us: list[float] = field(default_factory=list)
    status_errors: int = 0  # non-200, or a 200 that is not a whole stream
    socket_errors: int = 0


@dataclass(frozen=True, slots=True)
class Request:
    host: str
    port: int
    path: str
    body: bytes
    auth: str
    users: int
    close: bool = False  # ask the server to close the connection after the answer

    def bytes_for(self, n: int) -> bytes:
        body = self.body
        if self.users > 1:
            body = body.replace(b'"bench-user"', f'"bench-user-{n % self.users}"'.encode())
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", "Accept: text/event-stream",
                "User-Agent: OpenAI/Python 1.99.0",  # as the official SDKs send one
                *(["Connection: close"] if self.close else []),
                f"Content-Length: {len(body)}"]
        if self.auth:
            head.append(f"Authorization: {self.auth}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader, sent: float) -> tuple[float, bool, bool]:
    """Read one response; return (time of its first body byte, whether it is a whole
    stream with status 200, whether the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = headers.get("connection", "").lower() != "close"
    first = 0.0
    body = bytearray()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected
                break
            chunk = await reader.readexactly(size + 2)
            if not first:
                first = time.perf_counter()
            body += chunk[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            chunk = await reader.read(min(left, 65536))
            if not chunk:
                raise ConnectionError("closed in the middle of a body")
            if not first:
                first = time.perf_counter()
            body += chunk
            left -= len(chunk)
    else:
        body += await reader.read()
        first = time.perf_counter()
        keep = False
    return (first or time.perf_counter()) - sent, status == 200 and body.endswith(DONE), keep


async def worker(req: Request, counter: itertools.count[int], stop: float,
                 tally: Tally) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while time.perf_counter() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(req.host, req.port)
            assert reader is not None
            sent = time.perf_counter()
            writer.write(req.bytes_for(next(counter)))
            ttfb, good, keep = await asyncio.wait_for(read_answer(reader, sent), READ_TIMEOUT)
            done = time.perf_counter()
            if not good:
                tally.status_errors += 1
            else:
                tally.ttfb_us.append(ttfb * 1e6)
                tally.total_us.append((done - sent) * 1e6)
            if not keep:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError, IndexError):
            tally.socket_errors += 1
            if writer is not None:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def run(req: Request, concurrency: int, seconds: float) -> dict[str, float | int]:
    tally = Tally()
    counter = itertools.count()
    started = time.perf_counter()
    stop = started + seconds
    await asyncio.gather(*(worker(req, counter, stop, tally) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(tally.total_us), "duration_us": round(elapsed * 1e6),
        "ttfb_p50_us": percentile(tally.ttfb_us, 50), "ttfb_p99_us": percentile(tally.ttfb_us, 99),
        "total_p50_us": percentile(tally.total_us, 50),
        "total_p99_us": percentile(tally.total_us, 99),
        "status": tally.status_errors, "socket": tally.socket_errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    url = urlsplit(args.url)
    req = Request(url.hostname or "127.0.0.1", url.port or 80, url.path or "/",
                  os.environ["BENCH_BODY"].encode(), os.environ.get("BENCH_AUTH", ""),
                  int(os.environ.get("BENCH_USERS", "1") or 1))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(req, args.concurrency, args.duration))
    else:
        result = uvloop.run(run(req, args.concurrency, args.duration))
    print("BENCH_SSE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
