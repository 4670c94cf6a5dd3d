"""Keeping live holds and leases alive, and resolving the holds of processes that died.

Each worker registers the holds of its in-flight requests here. Every
``reaper_interval_seconds`` one statement renews them all (with the usage each
stream has delivered so far, as a checkpoint), the limiter's concurrency leases are
renewed likewise, and expired holds — whose process stopped renewing them — are
posted at their checkpoint or voided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from proxy.errors import DatabaseUnavailable
from proxy.ledger import Ledger
from proxy.limits import Gate
from proxy.observe import Metrics

log = logging.getLogger("proxy.reaper")

Checkpoint = Callable[[], dict[str, Any] | None]


class LiveHolds:
    def __init__(self) -> None:
        self._holds: dict[int, Checkpoint | None] = {}
        self._retired: dict[int, dict[str, Any] | None] = {}

    def add(self, hold_id: int, checkpoint: Checkpoint | None = None) -> None:
        self._holds[hold_id] = checkpoint

    def discard(self, hold_id: int) -> None:
        self._holds.pop(hold_id, None)

    def retire(self, hold_id: int, final: dict[str, Any] | None) -> None:
        """Stop renewing a hold whose settlement failed, after writing ``final`` as its
        checkpoint once: the reaper then posts exactly that (or voids it, for None)."""
        self._holds.pop(hold_id, None)
        self._retired[hold_id] = final

    def ids(self) -> list[int]:
        return list(self._holds)

    def __len__(self) -> int:
        return len(self._holds)

    def checkpoints(self) -> dict[int, dict[str, Any] | None]:
        out = {h: (cp() if cp else None) for h, cp in list(self._holds.items())}
        out.update(self._retired)
        self._retired = {}
        return out


async def run(ledger: Ledger, live: LiveHolds, interval: float, metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await ledger.renew(live.checkpoints())
            if reaped := await ledger.reap(exclude=live.ids()):
                metrics.holds_expired.inc(reaped)
                log.info("resolved %d expired holds", reaped)
        except DatabaseUnavailable as e:  # one line a round, no traceback
            metrics.errors.labels("database").inc()
            log.warning("renewing or reaping holds failed: the database is unavailable (%s)",
                        type(e.__cause__).__name__)
        except Exception:  # a database hiccup must not end the loop; the next round retries
            metrics.errors.labels("database").inc()
            log.exception("renewing or reaping holds failed")


async def renew_leases(gate: Gate, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await gate.renew()  # never raises: an unreachable limiter is logged and counted


@contextlib.asynccontextmanager
async def running(ledger: Ledger, live: LiveHolds, gate: Gate, interval: float,
                  lease_interval: float, metrics: Metrics) -> AsyncIterator[None]:
    """Renew and reap holds every ``interval`` and renew concurrency leases every
    ``lease_interval`` (a fraction of the shortest ``lease_seconds``), until exit."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run(ledger, live, interval, metrics)),
                 tg.create_task(renew_leases(gate, lease_interval))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
