"""PostgreSQL behind a TCP forwarder the tests can cut: PostgreSQL out of reach for a
proxy under test, while the tests still read the ledger directly.

    with forwarding(database_url) as fwd:
        proxy = start_proxy(config, fwd.url(database_url), workdir)
        fwd.cut()      # every connection dropped, new ones refused
        fwd.restore()  # listening again
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Iterator
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.upstream import free_port

T = TypeVar("T")


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to PostgreSQL, in a thread with its own loop."""

    def __init__(self, database_url: str):
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        # An embedded PostgreSQL listens on a Unix socket only (host=/dir in the query).
        self.socket = (f"{query['host']}/.s.PGSQL.{parts.port or 5432}"
                       if not parts.hostname and query.get("host", "").startswith("/")
                       else None)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread.start()
        self.restore()

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.socket:
                up_reader, up_writer = await asyncio.open_unix_connection(self.socket)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                w.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            w.transport.abort()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def url(self, database_url: str) -> str:
        """``database_url``, pointed at the forwarder."""
        parts = urlsplit(database_url)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}", query=query))


@contextlib.contextmanager
def forwarding(database_url: str) -> Iterator[Forwarder]:
    fwd = Forwarder(database_url)
    try:
        yield fwd
    finally:
        fwd.close()
