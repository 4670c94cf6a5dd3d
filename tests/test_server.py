"""What one connection may cost the server: the head limit as a table of reads and
answers (the protocol on a stand-in transport), then over real sockets against the real
server: heads past ``max_head_bytes`` get 431 as soon as the limit is passed, clients
that send their head or body too slowly are dropped, and neither stalls anyone else.

The proxy here runs with ``head_timeout_seconds = 1`` and ``body_timeout_seconds = 1.5``
and the default ``max_head_bytes`` (64 KiB). Timings are asserted generously: the
machine may be busy.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from proxy.server import BoundedHttpToolsProtocol, ConnectionLimits
from tests.conftest import Proxy, mint_key, serving_proxy
from tests.upstream import Upstream

HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
MAX_HEAD = 65536
HUGE = 96 * 1024 * 1024


# --- the head limit, read by read -------------------------------------------------------

LIMIT = 1024


async def echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 with the length of the body it read."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(str(size))).encode())]})
    await send({"type": "http.response.body", "body": str(size).encode()})


class StandInTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol


def get(size: int, path: str = "/") -> bytes:
    """A GET whose head is exactly ``size`` bytes."""
    start, end = f"GET {path} HTTP/1.1\r\nhost: x\r\nx-pad: ".encode(), b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def post(head_size: int, body: bytes) -> bytes:
    start = f"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\nx-pad: ".encode()
    end = b"\r\n\r\n"
    return start + b"p" * (head_size - len(start) - len(end)) + end + body


def reads(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


HEAD_CASES = [
    ("at the limit, one read", [get(LIMIT)], [b"200"]),
    ("a byte over, one read", [get(LIMIT + 1)], [b"431"]),
    ("at the limit, 100-byte reads", reads(get(LIMIT), 100), [b"200"]),
    ("a byte over, 100-byte reads", reads(get(LIMIT + 1), 100), [b"431"]),
    ("a byte over, the last read one byte", [get(LIMIT + 1)[:-1], b"\n"], [b"431"]),
    ("far over, one read", [get(100 * LIMIT)], [b"431"]),
    ("a body in the head's read is not head", [post(LIMIT, b"b" * 10 * LIMIT)],
     [b"200 10240"]),
    ("two requests in one read, each at the limit", [get(LIMIT) + get(LIMIT)],
     [b"200", b"200"]),
    ("one at the limit, then one over", [get(LIMIT), get(LIMIT + 1)], [b"200", b"431"]),
    ("one at the limit, then one over, in 300-byte reads",
     reads(get(LIMIT) + get(2 * LIMIT), 300), [b"200", b"431"]),
]


@pytest.mark.parametrize(("reads_", "answers"), [c[1:] for c in HEAD_CASES],
                         ids=[c[0] for c in HEAD_CASES])
async def test_the_head_limit(reads_: list[bytes], answers: list[bytes]) -> None:
    config = Config(app=echo_length, lifespan="off", log_config=None)
    protocol = BoundedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={},
        limits=ConnectionLimits(max_head_bytes=LIMIT))
    transport = StandInTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    try:
        for data in reads_:
            if not transport.closed:
                protocol.data_received(data)
            for _ in range(20):  # let the application answer
                await asyncio.sleep(0)
        seen = re.findall(rb"HTTP/1\.1 (\d{3}) ", transport.written)
        assert seen == [a[:3] for a in answers], transport.written
        for a in answers:
            if b" " in a:  # the body length the application read
                assert transport.written.endswith(a.split(b" ")[1])
        if answers[-1] == b"431":
            assert b"request_header_fields_too_large" in transport.written
    finally:
        protocol.connection_lost(None)


@dataclass
class Served:
    proxy: Proxy
    key: str


@pytest.fixture(scope="module")
def served(upstream: Upstream, database_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = f"""
[server]
head_timeout_seconds = {HEAD_TIMEOUT}
body_timeout_seconds = {BODY_TIMEOUT}

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[models.echo]
provider = "up"

[models.slow-stream]
provider = "up"
upstream = "linger-2.5"

[paywalls.app]
starter_grant = "100"
"""
    with serving_proxy(settings, database_url, tmp_path_factory.mktemp("server")) as proxy:
        yield Served(proxy, mint_key(database_url))


def connect(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it closed it
    (seconds from now); fails if it is still open after ``within``."""
    start = time.monotonic()
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {within} s; "
                             f"it sent {got[:200]!r}") from None
    except ConnectionResetError:
        pass
    return got, time.monotonic() - start


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> dict[str, object]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    assert b"x-request-id: req_" in head.lower(), head
    assert b"connection: close" in head.lower(), head
    error: dict[str, object] = orjson.loads(body)["error"]
    return error


def sdk(served: Served, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.proxy.base_url, api_key=served.key, max_retries=0,
                         timeout=10, **kw)  # type: ignore[arg-type]


def chat(client: openai.OpenAI, **kw: object) -> str:
    reply = client.chat.completions.create(
        model="echo", user="server-user", messages=[{"role": "user", "content": "Hi"}],
        **kw)  # type: ignore[call-overload]
    return str(reply.choices[0].message.content)


# --- the size of a head -----------------------------------------------------------------


def test_a_head_over_the_limit_gets_431_from_an_ordinary_client(served: Served) -> None:
    started = time.monotonic()
    r = httpx.get(served.proxy.url + "/healthz", headers={"x-big": "a" * (MAX_HEAD + 10)},
                  timeout=10)
    assert time.monotonic() - started < 2
    assert r.status_code == 431
    assert r.headers["connection"] == "close"
    assert r.headers["x-request-id"].startswith("req_")
    error = r.json()["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(MAX_HEAD) in error["message"]
    # The SDK raises its typed error for it.
    with pytest.raises(openai.APIStatusError) as e:
        chat(sdk(served, default_headers={"x-big": "b" * (2 * MAX_HEAD)}))
    assert e.value.status_code == 431


@pytest.mark.parametrize("size", [MAX_HEAD, MAX_HEAD + 1])
def test_the_limit_is_on_the_whole_head_to_the_byte(served: Served, size: int) -> None:
    """A head of exactly ``max_head_bytes`` passes, one byte more does not, however the
    bytes arrive."""
    start = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: "
    end = b"\r\n\r\n"
    head = start + b"p" * (size - len(start) - len(end)) + end
    assert len(head) == size
    for pieces in (1, 7):  # in one write, and in a few
        with connect(served.proxy) as sock:
            step = -(-len(head) // pieces)
            for i in range(0, len(head), step):
                sock.sendall(head[i:i + step])
                time.sleep(0.01)
            response, _ = read_all(sock, 5)
        assert status_of(response) == (200 if size <= MAX_HEAD else 431), response[:300]


def test_a_96_mb_header_is_cut_off_and_healthz_keeps_answering(served: Served) -> None:
    """The head is refused once 64 KiB are in: the sender is cut off long before it has
    sent its 96 MB, and /healthz, asked all along on the same worker, stays quick."""
    sent = 0
    answer = b""
    done = threading.Event()

    def send_huge() -> None:
        nonlocal sent, answer
        chunk = b"x" * (1024 * 1024)
        try:
            with connect(served.proxy) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-huge: ")
                while sent < HUGE:
                    sock.sendall(chunk)
                    sent += len(chunk)
                sock.sendall(b"\r\n\r\n")
                answer, _ = read_all(sock, 30)
        except OSError:
            pass
        finally:
            done.set()

    sender = threading.Thread(target=send_huge, daemon=True)
    latencies: list[float] = []
    with httpx.Client(base_url=served.proxy.url, timeout=30) as client:
        sender.start()
        started = time.monotonic()
        while not done.is_set() or len(latencies) < 20:
            t = time.monotonic()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - t)
            if time.monotonic() - started > 30:
                break
            time.sleep(0.02)
    sender.join(30)
    assert done.is_set(), "the 96 MB sender was never cut off"
    assert sent < 32 * 1024 * 1024, f"the server read {sent} bytes of a refused head"
    assert max(latencies) < 1.0, f"/healthz took up to {max(latencies):.2f} s"
    if answer:  # a sender that got to read before the reset sees the 431
        assert status_of(answer) == 431


# --- slow clients -----------------------------------------------------------------------


def trickle(sock: socket.socket, start: bytes, more: bytes, every: float,
            within: float) -> tuple[bytes, float]:
    """Send ``start``, then ``more`` one byte each ``every`` seconds, until the server
    answers or closes; returns what it sent and when it closed (seconds from ``start``)."""
    began = time.monotonic()
    sock.sendall(start)
    for i in range(len(more)):
        if time.monotonic() - began > within:
            break
        sock.settimeout(every)
        try:
            sock.recv(1, socket.MSG_PEEK)
            break  # the server answered, or closed
        except TimeoutError:
            pass
        except ConnectionResetError:
            return b"", time.monotonic() - began
        try:
            sock.sendall(more[i:i + 1])
        except OSError:
            break
    else:
        raise AssertionError("the server read the whole request")
    if time.monotonic() - began > within:
        raise AssertionError(f"the server still read a byte every {every} s after "
                             f"{within} s")
    response, _ = read_all(sock, 5)
    return response, time.monotonic() - began


def test_a_slowloris_head_is_dropped_after_the_head_timeout(served: Served) -> None:
    with connect(served.proxy) as sock:
        response, closed = trickle(sock, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n",
                                   b"x-slow: " + b"s" * 200, every=0.1, within=10)
    assert HEAD_TIMEOUT - 0.2 < closed < HEAD_TIMEOUT + 3, closed
    assert status_of(response) == 408
    assert error_of(response)["code"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
        served: Served) -> None:
    with connect(served.proxy) as sock:
        response, closed = read_all(sock, 10)
    assert response == b""
    assert HEAD_TIMEOUT - 0.2 < closed < HEAD_TIMEOUT + 3, closed


def test_a_slow_body_is_dropped_with_408_and_others_are_served_meanwhile(
        served: Served) -> None:
    body = orjson.dumps({"model": "echo", "user": "slow-body",
                         "messages": [{"role": "user", "content": "x" * 500}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            f"authorization: Bearer {served.key}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    results: list[tuple[bytes, float]] = []
    logged = len(served.proxy.output())

    def slow_clients() -> None:
        with connect(served.proxy) as sock:
            results.append(trickle(sock, head + body[:10], body[10:], every=0.1, within=10))

    slow = [threading.Thread(target=slow_clients) for _ in range(5)]
    for t in slow:
        t.start()
    client = sdk(served)
    served_meanwhile = 0
    while any(t.is_alive() for t in slow):
        t0 = time.monotonic()
        assert chat(client)
        assert time.monotonic() - t0 < 2
        served_meanwhile += 1
    for t in slow:
        t.join()
    assert served_meanwhile >= 3
    assert len(results) == 5
    for response, closed in results:
        assert BODY_TIMEOUT - 0.2 < closed < BODY_TIMEOUT + 3, closed
        assert status_of(response) == 408
        assert error_of(response)["code"] == "request_timeout"
    # The app sees a client gone mid-body: an answer nobody reads, not a crash.
    assert "unhandled error" not in served.proxy.output()[logged:]


# --- what the limits leave alone --------------------------------------------------------


def test_a_head_and_a_body_sent_slowly_within_the_timeouts_are_served(served: Served) -> None:
    body = orjson.dumps({"model": "echo", "user": "patient",
                         "messages": [{"role": "user", "content": "Hello"}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            f"authorization: Bearer {served.key}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    with connect(served.proxy) as sock:
        for part in (head[:20], head[20:], body[:5], body[5:]):
            time.sleep(0.3)  # ~0.6 s for the head, ~0.6 s for the body
            sock.sendall(part)
        sock.settimeout(10)
        response = sock.recv(65536)
    assert status_of(response) == 200, response[:300]


def test_kept_alive_connections_are_not_timed_between_requests(served: Served) -> None:
    """The head's deadline starts with its first byte, so a connection kept alive for
    longer than the head timeout, idle between requests, keeps serving."""
    with httpx.Client(base_url=served.proxy.url, timeout=10) as client:
        started = time.monotonic()
        while time.monotonic() - started < 3 * HEAD_TIMEOUT:
            assert client.get("/healthz").status_code == 200
            time.sleep(0.4)


def test_a_response_longer_than_the_body_timeout_is_not_cut(served: Served) -> None:
    """The body's deadline ends with the body: a stream that lasts longer keeps going."""
    stream = sdk(served).chat.completions.create(
        model="slow-stream", user="streamer", stream=True,
        messages=[{"role": "user", "content": "Hi"}])
    started = time.monotonic()
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert time.monotonic() - started > BODY_TIMEOUT
    # And a head of nearly 64 KiB is an ordinary request.
    assert chat(sdk(served, default_headers={"x-pad": "p" * (MAX_HEAD - 4096)}))
