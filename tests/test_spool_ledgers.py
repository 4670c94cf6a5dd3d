"""Settlements kept on disk go to the ledger they are owed to, whoever else shares the
spool directory: hold ids mean something only in the database that made them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy import spool
from proxy.ledger import Ledger
from proxy.pricing import Usage
from proxy.settler import Owed, Settlements
from tests.conftest import fresh_database, new_user

PAYWALL, ASSET = "app", "usd"
HOLD, COST = 1_000, 700


@pytest.fixture(scope="module")
def other_database_url(pg_server: str) -> Iterator[str]:
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
async def ledgers(own_database_url: str, other_database_url: str
                  ) -> AsyncIterator[tuple[Ledger, Ledger]]:
    pools = [await asyncpg.create_pool(url, min_size=1, max_size=2)
             for url in (own_database_url, other_database_url)]
    try:
        yield Ledger(pools[0], hold_ttl=3600), Ledger(pools[1], hold_ttl=3600)
    finally:
        for pool in pools:
            await pool.close()


async def held(ledger: Ledger, user: str) -> int:
    await ledger.open_user(PAYWALL, user, assets={ASSET}, grants={ASSET: 10 * HOLD})
    state = await ledger.hold(PAYWALL, user, ASSET, HOLD, request_id=f"req-{user}",
                              model="m", require_connect=False)
    assert state.hold_id is not None
    return state.hold_id


async def status(ledger: Ledger, hold_id: int) -> str:
    return str(await ledger.pool.fetchval("SELECT status FROM holds WHERE id = $1", hold_id))


async def test_a_dead_process_s_journal_is_posted_to_its_own_ledger_alone(
        ledgers: tuple[Ledger, Ledger], tmp_path: Path) -> None:
    """Two deployments on two databases share a spool directory. One dies owing a
    charge; the other, starting, must not post it to the hold of the same id in its
    own ledger (another user's request); a proxy on the first database posts it."""
    mine, theirs = ledgers
    assert await mine.identity() != await theirs.identity()
    with pytest.raises(asyncpg.UniqueViolationError):  # one identity a ledger
        await mine.pool.execute("INSERT INTO ledger_identity DEFAULT VALUES")
    user = new_user("owed")
    hold_id = await held(mine, user)
    # The other ledger has a pending hold of that very id, someone else's.
    while (other_hold := await held(theirs, new_user("other"))) < hold_id:
        pass
    if other_hold != hold_id:
        pytest.skip("the other ledger's holds are numbered past this one's")
    dying = Settlements(mine, tmp_path, await mine.identity())
    dying.owe(Owed(hold_id, COST, Usage(5, 2), "completed", request_id=f"req-{user}"))
    await dying.durable()
    dying.journal.close()  # killed: its line stays, its lock goes with the process
    assert len(spool.files(tmp_path, spool.JOURNALS)) == 1

    starting = Settlements(theirs, tmp_path, await theirs.identity())
    assert await starting.replay() == 0
    assert await status(theirs, hold_id) == "pending"
    assert len(spool.files(tmp_path, spool.JOURNALS)) == 1

    back = Settlements(mine, tmp_path, await mine.identity())
    assert await back.replay() == 1
    assert await status(mine, hold_id) == "posted"
    assert await mine.pool.fetchval(
        "SELECT -amount FROM entries WHERE hold_id = $1", hold_id) == COST
    assert spool.files(tmp_path, spool.JOURNALS) == []
    await theirs.void(other_hold)
