"""A bare pass-through proxy, for bench/clients.py: the choice of upstream HTTP client.

POST /v1/chat/completions bodies go to the upstream unchanged and its answer comes back
unchanged; nothing else is done, so what is measured is Starlette, uvicorn and the
client. Every client gets the same connection limit.

    python bench/passthrough.py {aiohttp,httpx-aiohttp,httpx} --upstream URL --port PORT
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx
import uvicorn
from common import UPSTREAM_CONNECTIONS
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HEADERS = {"content-type": "application/json"}
JSON = "application/json"
CLIENTS = ("aiohttp", "httpx-aiohttp", "httpx")
HTTPX_LIMITS = httpx.Limits(max_connections=UPSTREAM_CONNECTIONS,
                            max_keepalive_connections=UPSTREAM_CONNECTIONS)

# Sends one body upstream; returns the status, the body and its content type.
Forward = Callable[[bytes], Awaitable[tuple[int, bytes, str]]]


@contextlib.asynccontextmanager
async def aiohttp_forward(url: str) -> AsyncIterator[Forward]:
    connector = aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def forward(body: bytes) -> tuple[int, bytes, str]:
            async with session.post(url, data=body, headers=HEADERS) as resp:
                return resp.status, await resp.read(), resp.headers.get("content-type", JSON)

        yield forward


@contextlib.asynccontextmanager
async def httpx_forward(url: str,
                        transport: httpx.AsyncBaseTransport | None) -> AsyncIterator[Forward]:
    async with httpx.AsyncClient(transport=transport, limits=HTTPX_LIMITS, timeout=60) as client:

        async def forward(body: bytes) -> tuple[int, bytes, str]:
            resp = await client.post(url, content=body, headers=HEADERS)
            return resp.status_code, resp.content, resp.headers.get("content-type", JSON)

        yield forward


def client(name: str, url: str) -> contextlib.AbstractAsyncContextManager[Forward]:
    if name == "aiohttp":
        return aiohttp_forward(url)
    if name == "httpx-aiohttp":
        # The transport builds its own aiohttp session; httpx's limits apply only to
        # its default transport, so the transport gets them itself.
        return httpx_forward(url, AiohttpTransport(limits=HTTPX_LIMITS))
    if name == "httpx":
        return httpx_forward(url, None)
    raise ValueError(f"unknown client {name!r}")



def create_app(name: str, upstream: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client(name, upstream) as forward:
            app.state.forward = forward
            yield

    async def chat_completions(request: Request) -> Response:
        forward: Forward = request.app.state.forward
        status, content, content_type = await forward(await request.body())
        return Response(content, status_code=status, media_type=content_type)

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                     lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare pass-through proxy.")
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("--upstream", required=True, help="the upstream chat completions URL")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.client, args.upstream), host="127.0.0.1", port=args.port,
                workers=1, loop="uvloop", http="httptools", lifespan="on", access_log=False,
                server_header=False, log_level="warning")


if __name__ == "__main__":
    main()
