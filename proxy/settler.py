"""Settlements owed: a final cost is never forgotten before it is in the ledger.

Every held request ends in one settlement, posted (a charge) or voided through
:func:`proxy.services.resolve_hold`. When the database refuses it, the settlement
becomes an :class:`Owed` kept here and written again, with backoff, until the ledger
takes it. Meanwhile:

- its hold keeps being renewed by this worker's reaper with the final cost as its
  checkpoint, and this worker never reaps it; so once the database is back, the hold
  carries the final cost from the first renewal on, and should another replica's
  reaper resolve it first (this process died, say), it posts exactly that;
- a write whose answer was lost (the commit went through, the reply did not) is
  harmless to repeat: a hold resolves at most once, and a second post answers
  "already resolved".

At shutdown (SIGTERM, after uvicorn's graceful drain) :meth:`Settlements.shutdown`
keeps trying for ``billing.shutdown_settle_seconds``, then spools what is still owed
(:mod:`proxy.spool`, fsynced) before the process exits; the next start replays the
spool (:meth:`Settlements.replay`) before its reaper runs. What is owed is also in the
process's journal (:class:`proxy.spool.Journal`) from the moment it is owed until it is
written or spooled, so a process killed meanwhile (SIGKILL, a power loss) loses
nothing either: its journal is replayed by the next start or a live worker's reaper.
Lost only to a dead disk: the hold then expires and a reaper posts it at its last
checkpoint.

A known limit: a replica that cannot reach the database while others can is, to
them, a process that died; its holds expire after ``hold_ttl_seconds`` and their
reapers resolve them at the checkpoint written last, and this one's later write
finds them resolved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy import spool
from proxy.errors import DatabaseUnavailable
from proxy.ledger import Ledger, Posted
from proxy.pricing import Usage

log = logging.getLogger("proxy.settler")

RETRY_FIRST = 0.2  # seconds before the first retry; doubled up to RETRY_MOST
RETRY_MOST = 2.0


@dataclass(frozen=True, slots=True)
class Owed:
    """A settlement the ledger has not taken yet: post ``charge``, or void for None."""

    hold_id: int
    charge: int | None
    usage: Usage | None
    outcome: str
    metadata: dict[str, Any] | None = None
    request_id: str = ""

    def checkpoint(self) -> dict[str, Any]:
        """The hold's checkpoint meanwhile: what a reaper posts (nothing, for a void)."""
        u = self.usage or Usage(0, 0)
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "cost": self.charge or 0}

    def line(self) -> bytes:
        return orjson.dumps({
            "hold_id": self.hold_id, "request_id": self.request_id, "charge": self.charge,
            "usage": None if self.usage is None else self.usage.as_dict(),
            "outcome": self.outcome, "metadata": self.metadata})

    @classmethod
    def from_line(cls, raw: bytes) -> Owed:
        d = orjson.loads(raw)
        u = d.get("usage")
        return cls(int(d["hold_id"]), None if d["charge"] is None else int(d["charge"]),
                   None if u is None else Usage(**u), str(d["outcome"]), d.get("metadata"),
                   str(d.get("request_id") or ""))


def backoff(attempt: int) -> float:
    """Seconds to wait after the ``attempt``-th failed round in a row (from 1)."""
    return float(min(RETRY_FIRST * 2 ** (attempt - 1), RETRY_MOST))


MAX_REFUSALS = 5


class Settlements:
    def __init__(self, ledger: Ledger, spool_dir: Path, identity: str):
        """``identity``: the ledger's (:meth:`proxy.ledger.Ledger.identity`), which the
        files kept in ``spool_dir`` are named after."""
        self.ledger = ledger
        self.spool_dir = spool_dir
        self._owed: dict[int, Owed] = {}
        self._refusals: dict[int, int] = {}  # hold id → times the ledger refused it
        self._wake = asyncio.Event()
        # On disk until the ledger has them: what is owed, answers sent before their post.
        self.journal = spool.Journal(spool_dir, identity)
        self._journaled: dict[int, spool.JournalFile] = {}  # hold id → its owed line's

    def owe(self, owed: Owed) -> None:
        """Keep ``owed`` until written; in the journal too (:meth:`durable` makes it
        so on disk), so that a process killed meanwhile loses nothing."""
        if owed.hold_id not in self._journaled:
            try:
                self._journaled[owed.hold_id] = self.journal.append(owed.line())
            except OSError:
                self.journal.trouble("the settlement journal could not be written; hold "
                                     "%s is owed in memory alone", owed.hold_id)
        self._owed[owed.hold_id] = owed
        self._wake.set()

    async def durable(self) -> None:
        """Return once what is owed is on disk (failing that, logged)."""
        try:
            await self.journal.durable()
        except OSError:
            self.journal.trouble("the settlement journal could not be synced")

    def _settled(self, hold_id: int) -> None:
        """``hold_id`` is owed no more: written, left to the reaper, or spooled."""
        self._owed.pop(hold_id, None)
        self._refusals.pop(hold_id, None)
        if (entry := self._journaled.pop(hold_id, None)) is not None:
            self.journal.done(entry)

    def __len__(self) -> int:
        return len(self._owed)

    def ids(self) -> list[int]:
        return list(self._owed)

    def checkpoints(self) -> dict[int, dict[str, Any] | None]:
        return {h: o.checkpoint() for h, o in self._owed.items()}

    async def write(self, owed: Owed) -> Posted | None:
        """Post or void ``owed`` once; None when the hold was resolved already (or voided)."""
        if owed.charge is None:
            await self.ledger.void(owed.hold_id)
            return None
        return await self.ledger.post(owed.hold_id, owed.charge, owed.usage, owed.outcome,
                                      owed.metadata)

    async def write_owed(self) -> bool:
        """One round: write what is owed, in order, until the database is unavailable.
        True when nothing is owed any more. A settlement the ledger itself refuses does
        not hold up the others; refused ``MAX_REFUSALS`` times, it is left to the reaper,
        which posts the hold at its checkpoint (the final cost, renewed meanwhile)."""
        for hold_id, owed in list(self._owed.items()):
            try:
                posted = await self.write(owed)
            except DatabaseUnavailable:
                return False
            except Exception:
                refused = self._refusals[hold_id] = self._refusals.get(hold_id, 0) + 1
                if refused < MAX_REFUSALS:
                    log.warning("writing the settlement of hold %s failed", hold_id,
                                exc_info=refused == 1)
                    continue
                log.error("the ledger refused the settlement of hold %s %d times; the "
                          "reaper will post it at its checkpoint", hold_id, refused)
                self._settled(hold_id)
                continue
            if owed.charge is not None and posted is None:
                log.warning("hold %s of %s was resolved before its owed settlement",
                            hold_id, owed.request_id)
            if self._owed.get(hold_id) is owed:
                self._settled(hold_id)
        return not self._owed

    async def run(self) -> None:
        """Write owed settlements as they come, retrying with backoff until written."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            attempt = 0
            while not await self.write_owed():
                attempt += 1
                if attempt == 1:
                    log.warning("%d settlements owed: the database is unavailable; "
                                "retrying until it is back", len(self._owed))
                await asyncio.sleep(backoff(attempt))
            if attempt:
                log.info("the database is back: every owed settlement is written")

    async def shutdown(self, within: float) -> Path | None:
        """Keep writing for at most ``within`` seconds, then spool what is still owed;
        returns the spool file written, if any."""
        deadline = time.monotonic() + within
        attempt = 0
        while not await self.write_owed():
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(backoff(attempt), left))
        try:
            if not self._owed:
                return None
            owed = list(self._owed.values())
            path = spool.write(self.spool_dir, self.journal.ledger, [o.line() for o in owed])
            for o in owed:
                self._settled(o.hold_id)
            log.warning("the database is unavailable: %d settlements spooled to %s for "
                        "the next start", len(owed), path)
            return path
        finally:
            self.journal.close()

    async def replay(self, *, spooled: bool = True) -> int:
        """Write what earlier processes of this ledger spooled and the journals of its
        processes that died (at the start, before the reaper; and each reaper round, the
        journals alone: ``spooled`` False); what the database refuses now is owed here,
        and its file kept."""
        async def write(raw: bytes) -> bool:
            try:
                owed = Owed.from_line(raw)
            except (ValueError, KeyError, TypeError):
                log.error("an unreadable spooled settlement, left out: %r", raw)
                return True
            try:
                posted = await self.write(owed)
            except Exception as e:
                if not isinstance(e, DatabaseUnavailable):
                    log.exception("writing spooled hold %s failed", owed.hold_id)
                self.owe(owed)
                return False
            if owed.charge is not None and posted is None:
                log.info("spooled hold %s was resolved already", owed.hold_id)
            return True

        ledger = self.journal.ledger
        count = await spool.replay(self.spool_dir, ledger, write) if spooled else 0
        return count + await spool.replay(self.spool_dir, ledger, write, live=True)
