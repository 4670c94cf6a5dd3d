"""What one connection may cost the server, over real sockets against the real server:
heads past ``max_head_bytes`` get 431 as soon as the limit is passed, clients that send
their head or body too slowly are dropped, and neither stalls anyone else.

The proxy here runs with ``head_timeout_seconds = 1`` and ``body_timeout_seconds = 1.5``
and the default ``max_head_bytes`` (64 KiB). Timings are asserted generously: the
machine may be busy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import orjson
import pytest

from tests.conftest import Proxy, mint_key, serving_proxy
from tests.upstream import Upstream

HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
MAX_HEAD = 65536
HUGE = 96 * 1024 * 1024


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
