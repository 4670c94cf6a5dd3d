"""Group commit: one statement's calls from requests in flight at the same moment run
together, as one batch with one round trip and one commit.

A call waits in the queue; the first call into an empty, idle queue starts a flush for
the next turn of the event loop, so every call made meanwhile by other requests joins it
and a call alone waits for nothing but that turn. While a batch is in PostgreSQL the next
one gathers, up to ``max_batch`` calls. One batch at a time per process: batches of one
process never wait on each other's locks.

A batch is asyncpg's ``fetchmany``: the calls are sent as one pipeline ending in a single
Sync, so PostgreSQL runs them in order in one implicit transaction and commits (and
flushes its WAL) once for all. The statement must return exactly one row per call, so
that rows map onto calls in order.

Each call's outcome is what it would be alone:

- when the database refuses the batch (one call raises, or a deadlock with another
  process's batch), nothing of it was committed; its calls are then run again one by
  one, each in its own transaction, and each gets its own row or its own error;
- when the database is out of reach, every call of the batch gets
  :class:`~proxy.errors.DatabaseUnavailable`, as each would alone, with the same
  uncertainty a lost reply always has (the commit may have happened);
- a caller that stops waiting (cancelled) does not take its call out of a batch that
  has left: the call runs, as a statement whose reply was lost would have.

A call no one is waiting on (``deferrable``: a post made after its answer has gone)
starts no batch of its own at once: it rides the next one another call starts, or leaves
after ``defer_seconds`` (0: at once). A closed loop of requests then commits once a
request, the post of one with the hold of the next, instead of twice; under load nothing
changes, since a batch is always gathering. Only a process that serves every request
may wait so (:func:`proxy.app.settles_alone`): the next request's hold, here, is queued
after the post; in another process it would find the last worst case still held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from proxy.db import is_outage
from proxy.errors import DatabaseUnavailable

log = logging.getLogger("proxy.ledger")

MAX_BATCH = 64
DEFER_SECONDS = 0.005  # the longest a deferrable call waits for a batch to ride


class GroupCommit:
    def __init__(self, pool: Any, statement: str, max_batch: int = MAX_BATCH,
                 defer_seconds: float = DEFER_SECONDS):
        self.pool = pool
        self.statement = statement
        self.max_batch = max_batch
        self.defer_seconds = defer_seconds
        self._queue: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._deferred: asyncio.TimerHandle | None = None  # when deferred calls leave
        self._hurried = False  # shutting down: nothing is deferred any more
        self.batches = 0  # batches sent (the tests read them)
        self.calls = 0  # calls sent in them
        self.refused = 0  # batches the database refused, their calls run one by one

    async def fetchrow(self, *args: Any, deferrable: bool = False) -> Any:
        """The statement's row for ``args``, run in the next batch; ``deferrable``: in
        the next batch another call starts, or after :attr:`defer_seconds`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if self._flushing is None:
            if (not deferrable or self._hurried or not self.defer_seconds
                    or len(self._queue) >= self.max_batch):
                self._start()
            elif self._deferred is None:
                self._deferred = loop.call_later(self.defer_seconds, self._start)
        return await future

    def _start(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        if self._flushing is None and self._queue:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                await self._run(batch)
        finally:
            self._flushing = None

    async def _run(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            if len(batch) == 1:  # alone: the plain statement, no pipeline to set up
                rows = [await self.pool.fetchrow(self.statement, *batch[0][0])]
            else:
                rows = await self.pool.fetchmany(self.statement, [args for args, _ in batch])
        except Exception as e:
            if is_outage(e) or isinstance(e, DatabaseUnavailable):
                for _, future in batch:  # an error of its own each: tracebacks differ
                    if not future.done():
                        future.set_exception(_chained(DatabaseUnavailable(), e))
                return
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(e)
                return
            self.refused += 1
            log.debug("a batch of %d was refused (%s); its calls run one by one",
                      len(batch), type(e).__name__)
            await self._one_by_one(batch)
            return
        if len(rows) != len(batch):  # the statement broke its contract: say so to all
            error = RuntimeError(f"{len(rows)} rows for a batch of {len(batch)} calls")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), row in zip(batch, rows, strict=True):
            if not future.done():
                future.set_result(row)

    async def _one_by_one(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]
                          ) -> None:
        """Each call of a refused batch alone, in its own transaction."""
        for args, future in batch:
            try:
                row = await self.pool.fetchrow(self.statement, *args)
            except Exception as e:
                error: BaseException = e
                if is_outage(e):
                    error = _chained(DatabaseUnavailable(), e)
                if not future.done():
                    future.set_exception(error)
                continue
            if not future.done():
                future.set_result(row)

    def hurry(self) -> None:
        """Send what is deferred now, and defer nothing from now on (shutdown)."""
        self._hurried = True
        self._start()

    async def aclose(self) -> None:
        """Send what is deferred; wait for the batch in flight and those queued (at
        shutdown)."""
        self.hurry()
        while (task := self._flushing) is not None:
            await asyncio.shield(task)


def _chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause.__cause__ if isinstance(cause, DatabaseUnavailable) else cause
    return error
