"""Keeping live holds and leases alive, and resolving the holds of processes that died.

Each worker registers the holds of its in-flight requests here. Every
``reaper_interval_seconds`` one statement renews them all (with the usage each
stream has delivered so far, as a checkpoint) together with the holds whose
settlement is still owed (:mod:`proxy.settler`, at their final cost), the limiter's
concurrency leases are renewed likewise, and expired holds — whose process stopped
renewing them — are posted at their checkpoint or voided.

After a round the database refused, this worker reaps again only once the database
has answered for ``hold_ttl_seconds``: the holds that expired during the outage
belong to processes that could not renew them either, and they get one full
``hold_ttl_seconds`` to renew (and so to write their final checkpoints) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from proxy.errors import DatabaseUnavailable
from proxy.ledger import Ledger
from proxy.limits import Gate
from proxy.observe import Metrics
from proxy.settler import Settlements

log = logging.getLogger("proxy.reaper")

Checkpoint = Callable[[], dict[str, Any] | None]


class LiveHolds:
    def __init__(self) -> None:
        self._holds: dict[int, Checkpoint | None] = {}

    def add(self, hold_id: int, checkpoint: Checkpoint | None = None) -> None:
        self._holds[hold_id] = checkpoint

    def discard(self, hold_id: int) -> None:
        self._holds.pop(hold_id, None)

    def ids(self) -> list[int]:
        return list(self._holds)

    def __len__(self) -> int:
        return len(self._holds)

    def checkpoints(self) -> dict[int, dict[str, Any] | None]:
        return {h: (cp() if cp else None) for h, cp in list(self._holds.items())}


def may_reap(now: float, failed_at: float | None, hold_ttl: float) -> bool:
    """Whether to reap this round: not within ``hold_ttl`` of the last refused round."""
    return failed_at is None or now - failed_at >= hold_ttl


async def run(ledger: Ledger, live: LiveHolds, settlements: Settlements, interval: float,
              metrics: Metrics) -> None:
    failed_at: float | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            await ledger.renew({**live.checkpoints(), **settlements.checkpoints()})
            if may_reap(time.monotonic(), failed_at, ledger.hold_ttl):
                failed_at = None
                await settlements.replay(spooled=False)  # a dead worker's answers first
                if reaped := await ledger.reap(exclude=live.ids() + settlements.ids()):
                    metrics.holds_expired.inc(reaped)
                    log.info("resolved %d expired holds", reaped)
        except Exception as e:  # a database hiccup must not end the loop; the next round retries
            metrics.errors.labels("database").inc()
            if isinstance(e, DatabaseUnavailable):
                if failed_at is None:
                    log.warning("renewing holds failed: the database is unavailable (%s)",
                                type(e.__cause__).__name__)
            else:
                log.exception("renewing or reaping holds failed")
            failed_at = time.monotonic()


async def renew_leases(gate: Gate, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await gate.renew()  # never raises: an unreachable limiter is logged and counted


@contextlib.asynccontextmanager
async def running(ledger: Ledger, live: LiveHolds, settlements: Settlements, gate: Gate,
                  interval: float, lease_interval: float, metrics: Metrics
                  ) -> AsyncIterator[None]:
    """Renew and reap holds every ``interval``, retry owed settlements as they come, and
    renew concurrency leases every ``lease_interval`` (a fraction of the shortest
    ``lease_seconds``), until exit."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run(ledger, live, settlements, interval, metrics)),
                 tg.create_task(settlements.run()),
                 tg.create_task(settlements.journal.syncing()),
                 tg.create_task(renew_leases(gate, lease_interval))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
