"""A bare pass-through proxy: the floor a Python proxy on this stack starts from.

POST bodies go to the upstream unchanged and its answer comes back unchanged; nothing
else is done (no auth, no database, no metering), so what is measured is Starlette,
uvicorn and the upstream client. Every client gets the same connection limit.

- ``/v1/chat/completions``: the upstream's answer is read whole, then sent;
- ``/stream/v1/chat/completions``: the upstream's answer is relayed chunk by chunk as it
  arrives (a ``StreamingResponse``), as a streaming proxy does.

``/v1/responses`` and ``/v1/embeddings`` are forwarded like the first,
``/stream/v1/responses`` relayed like the second (bench/endpoints.py). Each path is
forwarded to the same path on the upstream origin. Started by
``common.passthrough`` for bench/clients.py and bench/run.py:

    python bench/passthrough.py {aiohttp,httpx-aiohttp,httpx} --upstream ORIGIN --port PORT
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import uvicorn
from answers import EMBEDDINGS_PATH, RESPONSES_PATH, STREAM_RESPONSES_PATH
from common import CHAT_PATH, STREAM_CHAT_PATH, UPSTREAM_CONNECTIONS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    import httpx

HEADERS = {"content-type": "application/json"}
JSON = "application/json"
CLIENTS = ("aiohttp", "httpx-aiohttp", "httpx")


def httpx_limits() -> httpx.Limits:
    # httpx and httpx-aiohttp (the bench extras) are imported only by the clients that
    # use them: bench/run.py needs aiohttp alone, a dependency of the proxy.
    import httpx

    return httpx.Limits(max_connections=UPSTREAM_CONNECTIONS,
                        max_keepalive_connections=UPSTREAM_CONNECTIONS)


@dataclass(frozen=True, slots=True)
class Opened:
    """An upstream answer whose body is still to be read."""

    status: int
    content_type: str
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Client:
    # POSTs a body to a URL; returns the status, the whole body and its content type.
    forward: Callable[[str, bytes], Awaitable[tuple[int, bytes, str]]]
    # POSTs a body to a URL; returns once the headers are in.
    open: Callable[[str, bytes], Awaitable[Opened]]


@contextlib.asynccontextmanager
async def aiohttp_client() -> AsyncIterator[Client]:
    connector = aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def forward(url: str, body: bytes) -> tuple[int, bytes, str]:
            async with session.post(url, data=body, headers=HEADERS) as resp:
                return resp.status, await resp.read(), resp.headers.get("content-type", JSON)

        async def open_(url: str, body: bytes) -> Opened:
            resp = await session.post(url, data=body, headers=HEADERS)

            async def close() -> None:
                resp.release()

            return Opened(resp.status, resp.headers.get("content-type", JSON),
                          resp.content.iter_any(), close)

        yield Client(forward, open_)


@contextlib.asynccontextmanager
async def httpx_client(transport: httpx.AsyncBaseTransport | None) -> AsyncIterator[Client]:
    import httpx

    async with httpx.AsyncClient(transport=transport, limits=httpx_limits(),
                                 timeout=60) as client:

        async def forward(url: str, body: bytes) -> tuple[int, bytes, str]:
            resp = await client.post(url, content=body, headers=HEADERS)
            return resp.status_code, resp.content, resp.headers.get("content-type", JSON)

        async def open_(url: str, body: bytes) -> Opened:
            request = client.build_request("POST", url, content=body, headers=HEADERS)
            resp = await client.send(request, stream=True)
            return Opened(resp.status_code, resp.headers.get("content-type", JSON),
                          resp.aiter_raw(), resp.aclose)

        yield Client(forward, open_)


def client(name: str) -> contextlib.AbstractAsyncContextManager[Client]:
    if name == "aiohttp":
        return aiohttp_client()
    if name == "httpx-aiohttp":
        # The transport builds its own aiohttp session; httpx's limits apply only to
        # its default transport, so the transport gets them itself.
        from httpx_aiohttp import AiohttpTransport

        return httpx_client(AiohttpTransport(limits=httpx_limits()))
    if name == "httpx":
        return httpx_client(None)
    raise ValueError(f"unknown client {name!r}")


Handler = Callable[[Request], Awaitable[Response]]


def whole(url: str) -> Handler:
    """A handler forwarding to ``url``: the answer read whole, then sent."""

    async def forward(request: Request) -> Response:
        upstream: Client = request.app.state.upstream
        status, content, content_type = await upstream.forward(url, await request.body())
        return Response(content, status_code=status, media_type=content_type)

    return forward


def relayed(url: str) -> Handler:
    """A handler forwarding to ``url``: the answer relayed chunk by chunk."""

    async def forward(request: Request) -> Response:
        upstream: Client = request.app.state.upstream
        opened = await upstream.open(url, await request.body())

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in opened.chunks:
                    yield chunk
            finally:
                await opened.close()

        return StreamingResponse(relay(), status_code=opened.status,
                                 headers={"content-type": opened.content_type})

    return forward


def create_app(name: str, origin: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client(name) as upstream:
            app.state.upstream = upstream
            yield

    return Starlette(routes=[
        *(Route(path, whole(origin + path), methods=["POST"])
          for path in (CHAT_PATH, RESPONSES_PATH, EMBEDDINGS_PATH)),
        *(Route(path, relayed(origin + path), methods=["POST"])
          for path in (STREAM_CHAT_PATH, STREAM_RESPONSES_PATH)),
    ], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare pass-through proxy.")
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("--upstream", required=True,
                        help="the upstream origin, e.g. http://127.0.0.1:8080")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.client, args.upstream), host="127.0.0.1", port=args.port,
                workers=1, loop="uvloop", http="httptools", lifespan="on", access_log=False,
                server_header=False, log_level="warning")


if __name__ == "__main__":
    main()
