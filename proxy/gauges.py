"""The gauges sampled between scrapes: pool connections, live and pending holds, and
the error counts other components keep as plain totals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from proxy.errors import DatabaseUnavailable
from proxy.services import Services

log = logging.getLogger("proxy.observe")


async def sample(services: Services) -> None:
    """Refresh the gauges and the counters kept as plain totals elsewhere."""
    m = services.metrics
    pool = services.pool
    size = pool.get_size()
    m.pool.labels("in_use").set(size - pool.get_idle_size())
    m.pool.labels("open").set(size)
    m.holds_live.set(len(services.live))
    m.settlements_owed.set(len(services.settlements))
    m.count_since("redis", services.gate.errors)
    m.count_since("tokenizer", services.tokenizer.fallbacks)
    m.count_since("breakers", services.breakers.errors)
    try:
        m.holds_pending.set(await services.ledger.pending_holds())
        m.events_oldest.set(await services.events.oldest_pending_seconds())
    except DatabaseUnavailable:  # the reaper's log says so, once per outage
        m.errors.labels("database").inc()
    except Exception:
        m.errors.labels("database").inc()
        log.warning("could not count pending holds and events", exc_info=True)


@contextlib.asynccontextmanager
async def sampling(services: Services, interval: float) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            await sample(services)
            await asyncio.sleep(interval)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
