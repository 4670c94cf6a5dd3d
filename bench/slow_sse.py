"""Slow streams, timed chunk by chunk: an upstream that streams like a model and a client
that holds many of its streams open at once.

``serve``: an OpenAI-speaking upstream (aiohttp, uvloop) whose streams send one
``chat.completion.chunk`` every ``--interval-ms``, ``--chunks`` of them after the first
(role) chunk, then the finish chunk, the usage chunk and ``data: [DONE]``. The chunks
are scheduled on fixed times from the request's arrival (a late one does not push the
next ones back), and each carries ``"bench_seq"`` and ``"bench_sent"``, the upstream's
``time.monotonic()`` right before it was written. ``GET /stats`` says how many streams
are open now, the most that were open at once, how many started and ended;
``POST /stats/reset`` starts those counts anew. A request without ``"stream": true``
gets a ``chat.completion`` at once.

``load``: opens ``--streams`` streams at once (one connection each, the request from
``BENCH_BODY`` with ``BENCH_AUTH``; with ``BENCH_USERS`` > 1 each names one of that
many end users in turn, as bench/chat.lua does) and reads every chunk as it arrives.
``time.monotonic()`` is CLOCK_MONOTONIC on Linux, one clock for every process of the
machine, so each chunk's lag, its arrival minus its ``bench_sent``, is exact up to the
client's own delay in reading it. A chunk *held back* is one that arrived only after
the upstream had sent the next chunk of its stream. Prints ``BENCH_OPEN {json}``,
times in milliseconds, instants in ``time.monotonic()`` seconds. Started by
bench/open_streams.py:

    python bench/slow_sse.py serve --port PORT --chunks 24 --interval-ms 500
    python bench/slow_sse.py load URL --streams 1000 [--samples chunks.csv]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from sse import Request  # this folder is on sys.path: both run as scripts

DONE = b"data: [DONE]\n\n"
STAMP = re.compile(rb'"bench_seq":(\d+),"bench_sent":([0-9.]+)')
EVENT_END = b"\n\n"


# --- serve -----------------------------------------------------------------------


@dataclass(slots=True)
class Counts:
    open: int = 0
    max_open: int = 0
    started: int = 0
    ended: int = 0

    def reset(self) -> None:
        self.max_open, self.started, self.ended = self.open, 0, 0


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + EVENT_END


def _chunk(seq: int, delta: dict[str, str], finish: str | None = None) -> bytes:
    # bench_seq and bench_sent come first and in this form: the client finds them
    # with STAMP, without parsing the JSON.
    return _event({"bench_seq": seq, "bench_sent": time.monotonic(),
                   "id": "chatcmpl-slow", "object": "chat.completion.chunk",
                   "created": 1767225600, "model": "bench-slow",
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}]})


def make_app(chunks: int, interval: float) -> web.Application:
    counts = Counts()
    words = ("Streaming", " one", " word", " at", " a", " time", " like", " a", " model.")

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream") is not True:
            return web.json_response({
                "id": "chatcmpl-slow", "object": "chat.completion", "created": 1767225600,
                "model": "bench-slow",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "Hello!"}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        counts.open += 1
        counts.started += 1
        counts.max_open = max(counts.max_open, counts.open)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            start = time.monotonic()
            await resp.write(_chunk(0, {"role": "assistant", "content": ""}))
            for seq in range(1, chunks + 1):
                await asyncio.sleep(max(0.0, start + seq * interval - time.monotonic()))
                await resp.write(_chunk(seq, {"content": words[(seq - 1) % len(words)]}))
            tail = _chunk(chunks + 1, {}, finish="stop")
            if usage:
                tail += _event({"id": "chatcmpl-slow", "object": "chat.completion.chunk",
                                "created": 1767225600, "model": "bench-slow", "choices": [],
                                "usage": {"prompt_tokens": 9, "completion_tokens": chunks,
                                          "total_tokens": 9 + chunks}})
            await resp.write(tail + DONE)
            await resp.write_eof()
            return resp
        finally:
            counts.open -= 1
            counts.ended += 1

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"open": counts.open, "max_open": counts.max_open,
                                  "started": counts.started, "ended": counts.ended})

    async def reset(request: web.Request) -> web.Response:
        counts.reset()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    return app


# --- load ------------------------------------------------------------------------


@dataclass(slots=True)
class Stream:
    """What one stream saw; instants in time.monotonic() seconds."""

    opened: float = 0.0  # before the connection was opened
    first: float = 0.0  # the first chunk arrived
    last: float = 0.0  # the last byte arrived
    done: bool = False  # a 200 whose body ended with data: [DONE]
    error: str = ""
    seqs: list[int] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)


async def _body_pieces(reader: asyncio.StreamReader, chunked: bool
                       ) -> AsyncIterator[tuple[float, bytes]]:
    """The body's pieces as they arrive (HTTP chunks, or reads), with their arrival."""
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            piece = await reader.readexactly(size + 2)
            yield time.monotonic(), piece[:-2]
    while piece := await reader.read(65536):
        yield time.monotonic(), piece


async def one_stream(target: Request, n: int, s: Stream) -> None:
    s.opened = time.monotonic()
    reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
    try:
        writer.write(target.bytes_for(n))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in head[1:] if line)}
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        buf = b""
        tail = b""
        async for at, piece in _body_pieces(reader, chunked):
            if not s.first:
                s.first = at
            s.last = at
            buf += piece
            end = buf.rfind(EVENT_END)
            if end < 0:
                continue
            events, buf = buf[:end + 2], buf[end + 2:]
            for m in STAMP.finditer(events):
                s.seqs.append(int(m[1]))
                s.sent.append(float(m[2]))
                s.received.append(at)
            tail = (tail + events)[-len(DONE):]
        s.done = status == 200 and tail == DONE and not buf.strip()
        if not s.done:
            s.error = f"status {status}" if status != 200 else "no data: [DONE]"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def guarded(target: Request, n: int, s: Stream, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await one_stream(target, n, s)
    except TimeoutError:
        s.error = "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
            IndexError) as e:
        s.error = type(e).__name__


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def spread(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``values`` (seconds), in milliseconds."""
    return {"p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3,
            "max_ms": max(values, default=0.0) * 1e3}


def most_at_once(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals that overlap at one instant."""
    edges = sorted(e for start, end in intervals for e in ((start, 1), (end, -1)))
    now = top = 0
    for _, step in edges:
        now += step
        top = max(top, now)
    return top


def summary(streams: list[Stream], chunks: int, started: float, ended: float
            ) -> dict[str, Any]:
    """Every figure bench/open_streams.py reports, from what the streams saw."""
    errors: dict[str, int] = {}
    for s in streams:
        if not s.done:
            errors[s.error or "unknown"] = errors.get(s.error or "unknown", 0) + 1
    seen = [s for s in streams if s.received]  # got at least one stamped chunk
    # From the moment the last stream got its first chunk until the first one ended,
    # every stream is open at once; if any got none, they never all were.
    all_open = max((s.first for s in seen), default=0.0) if len(seen) == len(streams) else 0.0
    first_end = min((s.last for s in seen), default=0.0) if all_open else 0.0
    lags, steady, held, client_gaps, upstream_gaps, missing = [], [], 0, [], [], 0
    for s in streams:
        if s.done and s.seqs != list(range(chunks + 2)):
            missing += 1
        for i, (sent, got) in enumerate(zip(s.sent, s.received, strict=True)):
            lags.append(got - sent)
            if all_open <= sent <= first_end:
                steady.append(got - sent)
            # The finish chunk follows the last content chunk at once: not a next chunk.
            if i + 1 < len(s.sent) and s.seqs[i + 1] <= chunks and got > s.sent[i + 1]:
                held += 1
        # Gaps between content chunks only: the role chunk goes out at once.
        client_gaps += [b - a for a, b in zip(s.received[1:-2], s.received[2:-1],
                                              strict=False)]
        upstream_gaps += [b - a for a, b in zip(s.sent[1:-2], s.sent[2:-1], strict=False)]
    return {
        "streams": len(streams), "completed": sum(s.done for s in streams), "errors": errors,
        "chunks_expected": len(streams) * (chunks + 2), "chunks_received": len(lags),
        "streams_with_missing_chunks": missing,
        "most_open_at_once": most_at_once((s.first, s.last) for s in seen),
        "started_at": started, "ended_at": ended, "all_open_at": all_open,
        "first_end_at": first_end,
        "all_open_window_s": max(0.0, first_end - all_open) if seen else 0.0,
        "first_chunk": spread([s.first - s.opened for s in seen]),
        "lag": spread(lags), "lag_all_open": spread(steady),
        "lag_all_open_chunks": len(steady), "held_back": held,
        "client_gap": spread(client_gaps), "upstream_gap": spread(upstream_gaps),
    }


async def load(target: Request, count: int, seconds: float
               ) -> tuple[list[Stream], float, float]:
    """``count`` streams at once; what each saw, and when they started and ended."""
    streams = [Stream() for _ in range(count)]
    started = time.monotonic()
    await asyncio.gather(*(guarded(target, n, s, seconds) for n, s in enumerate(streams)))
    return streams, started, time.monotonic()


def write_samples(path: str, streams: list[Stream]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write("stream,seq,sent,received\n")
        for n, s in enumerate(streams):
            out.writelines(f"{n},{q},{a:.6f},{b:.6f}\n"
                           for q, a, b in zip(s.seqs, s.sent, s.received, strict=True))


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="the slow upstream")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--chunks", type=int, default=24)
    serve.add_argument("--interval-ms", type=float, default=500)
    client = sub.add_parser("load", help="hold many streams open at once")
    client.add_argument("url")
    client.add_argument("--streams", type=int, default=1000)
    client.add_argument("--chunks", type=int, default=24, help="as the upstream's --chunks")
    client.add_argument("--timeout", type=float, default=120.0, help="seconds per stream")
    client.add_argument("--samples", help="also write every chunk's times to this CSV file")
    args = parser.parse_args()
    import uvloop

    if args.command == "serve":
        raise_open_files(4096)
        web.run_app(make_app(args.chunks, args.interval_ms / 1000), host="127.0.0.1",
                    port=args.port, backlog=4096, access_log=None, print=None,
                    loop=uvloop.new_event_loop())
        return 0
    raise_open_files(args.streams + 64)
    url = urlsplit(args.url)
    target = Request(url.hostname or "127.0.0.1", url.port or 80, url.path or "/",
                    os.environ["BENCH_BODY"].encode(), os.environ.get("BENCH_AUTH", ""),
                    int(os.environ.get("BENCH_USERS", "1") or 1), close=True)
    streams, started, ended = uvloop.run(load(target, args.streams, args.timeout))
    if args.samples:
        write_samples(args.samples, streams)
    print("BENCH_OPEN " + json.dumps(summary(streams, args.chunks, started, ended)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
