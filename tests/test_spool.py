"""The spool file alone: written whole, replayed in order, removed only once all written."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from proxy import spool
from tests.conftest import eventually

LEDGER = "0123456789abcdef0123456789abcdef"  # a ledger's identity, as Ledger.identity says


def test_a_spool_file_is_whole_and_named_for_its_process(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    path = spool.write(directory, LEDGER, [b'{"a":1}', b'{"b":2}'])
    assert path.parent == directory and path.name.endswith(".jsonl")
    assert f"-{os.getpid()}-" in path.name and spool.ledger_of(path) == LEDGER
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert [p.name for p in directory.iterdir()] == [path.name]  # no .tmp left behind
    other = spool.write(directory, LEDGER, [b'{"c":3}'])
    assert other != path and spool.files(directory) == sorted([path, other])


async def test_replay_hands_every_line_over_and_removes_the_files(tmp_path: Path) -> None:
    spool.write(tmp_path, LEDGER, [b"1", b"2"])
    spool.write(tmp_path, LEDGER, [b"3"])
    seen: list[bytes] = []

    async def write(line: bytes) -> bool:
        seen.append(line)
        return True

    assert await spool.replay(tmp_path, LEDGER, write) == 3
    assert sorted(seen) == [b"1", b"2", b"3"]
    assert spool.files(tmp_path) == []
    assert await spool.replay(tmp_path, LEDGER, write) == 0
    assert await spool.replay(tmp_path / "missing", LEDGER, write) == 0


async def test_a_file_not_wholly_written_stays_for_the_next_start(tmp_path: Path) -> None:
    path = spool.write(tmp_path, LEDGER, [b"1", b"2", b"3"])

    async def refuse_two(line: bytes) -> bool:
        return line != b"2"

    assert await spool.replay(tmp_path, LEDGER, refuse_two) == 3
    assert spool.files(tmp_path) == [path] and path.read_bytes() == b"1\n2\n3\n"


async def test_a_crash_mid_replay_leaves_the_whole_file(tmp_path: Path) -> None:
    path = spool.write(tmp_path, LEDGER, [b"1", b"2"])

    async def crash(line: bytes) -> bool:
        if line == b"2":
            raise RuntimeError("the process dies here")
        return True

    with pytest.raises(RuntimeError):
        await spool.replay(tmp_path, LEDGER, crash)
    assert path.read_bytes() == b"1\n2\n"  # replayed whole next time; the ledger dedupes


async def test_processes_replaying_together_take_turns(tmp_path: Path) -> None:
    """Two replays at once (two workers starting): each line is handed over once,
    because the second waits for the first's lock and then finds the file gone."""
    spool.write(tmp_path, LEDGER, [b"1", b"2"])
    seen: list[bytes] = []

    async def slow(line: bytes) -> bool:
        await asyncio.sleep(0.1)
        seen.append(line)
        return True

    counts = await asyncio.gather(spool.replay(tmp_path, LEDGER, slow),
                                  spool.replay(tmp_path, LEDGER, slow))
    assert sorted(counts) == [0, 2] and seen == [b"1", b"2"]


# ---- the journal: a live process's answers sent before their post --------------------

OWNER = """
import sys, time
from pathlib import Path
from proxy import spool
journal = spool.Journal(Path(sys.argv[1]), sys.argv[2])
journal.append(b'{"n":1}')
journal.done(journal.append(b'{"n":2}'))  # in the ledger already: replayed all the same
journal.append(b'{"n":3}')
print("written", flush=True)
time.sleep(60)
"""


async def test_a_journal_is_replayed_only_once_its_process_is_gone(tmp_path: Path) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWNER, str(tmp_path), LEDGER, stdout=asyncio.subprocess.PIPE)
    try:
        assert owner.stdout is not None
        assert await asyncio.wait_for(owner.stdout.readline(), 30) == b"written\n"
        [path] = spool.files(tmp_path, spool.JOURNALS)
        assert f"-{owner.pid}-" in path.name
        seen: list[bytes] = []

        async def write(line: bytes) -> bool:
            seen.append(line)
            return True

        assert await spool.replay(tmp_path, LEDGER, write, live=True) == 0  # its owner lives
        assert seen == [] and path.exists()
        assert await spool.replay(tmp_path, LEDGER, write) == 0  # not a spool file
    finally:
        owner.kill()  # as SIGKILL, the OOM killer or a crash would end it
        await owner.wait()
    assert await spool.replay(tmp_path, LEDGER, write, live=True) == 3
    assert seen == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert spool.files(tmp_path, spool.JOURNALS) == []


async def test_a_journal_not_wholly_written_stays(tmp_path: Path) -> None:
    journal = spool.Journal(tmp_path, LEDGER)
    journal.append(b"1")
    journal.append(b"2")
    [path] = spool.files(tmp_path, spool.JOURNALS)
    journal.close()  # its lines pending: kept, the lock let go

    async def refuse_two(line: bytes) -> bool:
        return line != b"2"

    assert await spool.replay(tmp_path, LEDGER, refuse_two, live=True) == 2
    assert spool.files(tmp_path, spool.JOURNALS) == [path]
    assert path.read_bytes() == b"1\n2\n"


def test_a_journal_is_rotated_and_each_file_removed_once_all_of_it_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "JOURNAL_BYTES", 10)
    journal = spool.Journal(tmp_path, LEDGER)
    assert spool.files(tmp_path, spool.JOURNALS) == []  # made with the first line
    first = [journal.append(b"aaaa"), journal.append(b"bbbb")]  # 10 bytes: full
    second = journal.append(b"cccc")
    assert first[0] is first[1] and second is not first[0]
    a, b = sorted(spool.files(tmp_path, spool.JOURNALS), key=lambda p: p.stat().st_mtime_ns)
    assert a.read_bytes() == b"aaaa\nbbbb\n" and b.read_bytes() == b"cccc\n"
    journal.done(first[0])
    assert a.exists()  # one line of it still pending
    journal.done(first[1])
    assert not a.exists() and b.exists()
    journal.done(second)
    assert b.exists()  # the current file stays while the process writes
    third = journal.append(b"dddd")
    assert third is second  # 5 bytes: room for more
    journal.close()
    assert b.exists()  # "dddd" pending
    journal = spool.Journal(tmp_path, LEDGER)
    journal.done(journal.append(b"eeee"))
    journal.close()
    assert spool.files(tmp_path, spool.JOURNALS) == [b]


async def test_lines_appended_together_are_made_durable_by_one_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    fsync = os.fsync
    gate = threading.Event()  # holds an fsync while cleared
    gate.set()

    def counted(fd: int) -> None:
        synced.append(fd)
        gate.wait(10)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    journal = spool.Journal(tmp_path, LEDGER)
    await journal.durable()
    assert synced == []  # nothing written: nothing to do
    journal.append(b"1")
    journal.append(b"2")
    await asyncio.gather(journal.durable(), journal.durable())
    assert len(synced) == 2  # the file, and the directory that has its new name
    await journal.durable()
    assert len(synced) == 2  # nothing new
    gate.clear()
    journal.append(b"3")
    first = asyncio.ensure_future(journal.durable())  # noqa: TID251

    async def under_way() -> bool:
        return len(synced) == 3

    await eventually(under_way, "its fsync under way")  # ...and then
    journal.append(b"4")  # ...this line may have missed it: a round of its own
    second = asyncio.ensure_future(journal.durable())  # noqa: TID251
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    gate.set()
    await asyncio.gather(first, second)
    assert len(synced) == 4
    journal.close()


async def test_a_failed_fsync_fails_its_waiters_and_is_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsync = os.fsync
    failing = [True]

    def flaky(fd: int) -> None:
        if failing[0]:
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    journal = spool.Journal(tmp_path, LEDGER)
    journal.append(b"1")
    with pytest.raises(OSError):
        await journal.durable()
    failing[0] = False
    await journal.durable()  # the same line, synced now
    journal.close()


async def test_a_journal_not_waited_on_is_synced_soon_after_and_idle_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What no answer waited for (``synchronous_commit`` off) is fsynced within
    JOURNAL_SYNC_SECONDS; with nothing appended, the syncer does nothing."""
    synced: list[int] = []
    fsync = os.fsync

    def counted(fd: int) -> None:
        synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    journal = spool.Journal(tmp_path, LEDGER)
    syncing = asyncio.ensure_future(journal.syncing())  # noqa: TID251
    try:
        await asyncio.sleep(3 * spool.JOURNAL_SYNC_SECONDS)
        assert synced == []
        journal.append(b"1")

        async def synced_once() -> bool:
            return len(synced) == 2  # the file, and the directory with its new name

        await eventually(synced_once, "the line synced")
        await asyncio.sleep(3 * spool.JOURNAL_SYNC_SECONDS)
        assert len(synced) == 2  # nothing new: nothing more
    finally:
        syncing.cancel()
        journal.close()


# ---- named after their ledger --------------------------------------------------------

OTHER = "fedcba9876543210fedcba9876543210"


async def test_files_of_another_ledger_are_left_for_it(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Left, and said once each; a journal whose process lives (another deployment's,
    still writing) is not even mentioned until that process is gone."""
    spooled = spool.write(tmp_path, OTHER, [b"1"])
    journal = spool.Journal(tmp_path, OTHER)
    journal.append(b"2")
    [journaled] = spool.files(tmp_path, spool.JOURNALS)
    assert spool.ledger_of(spooled) == spool.ledger_of(journaled) == OTHER
    seen: list[bytes] = []

    async def write(line: bytes) -> bool:
        seen.append(line)
        return True

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if "another ledger" in r.getMessage()]

    with caplog.at_level("WARNING", logger="proxy.spool"):
        assert await spool.replay(tmp_path, LEDGER, write) == 0
        assert await spool.replay(tmp_path, LEDGER, write, live=True) == 0
        assert [spooled.name in m for m in told()] == [True]  # the live journal unsaid
        journal.close()  # its process gone: its line stays, its lock with it
        for _ in range(2):
            assert await spool.replay(tmp_path, LEDGER, write) == 0
            assert await spool.replay(tmp_path, LEDGER, write, live=True) == 0
    assert seen == [] and spooled.exists() and journaled.exists()
    assert len(told()) == 2 and all(OTHER in m and LEDGER in m for m in told())  # once each
    assert await spool.replay(tmp_path, OTHER, write) == 1
    assert await spool.replay(tmp_path, OTHER, write, live=True) == 1
    assert seen == [b"1", b"2"] and not spooled.exists() and not journaled.exists()


LEGACY = [  # an earlier release's names: <kind>-<host>-<pid>-<random>
    "settlements-db1-77-0a1b2c3d.jsonl",
    "settlements-abc-def-12-00ff00ff.jsonl",  # a host name with a dash
    f"settlements-{OTHER}-9-0badf00d.jsonl",  # a host name of 32 hex digits
]


async def test_a_file_named_without_a_ledger_is_replayed_as_before(tmp_path: Path) -> None:
    for name in [*LEGACY, f"journal-{OTHER}-5-feedf00d.jsonl"]:  # a journal, its owner gone
        (tmp_path / name).write_bytes(b"1\n")
    assert {spool.ledger_of(p) for p in spool.files(tmp_path, "*")} == {None}

    async def write(line: bytes) -> bool:
        return True

    assert await spool.replay(tmp_path, LEDGER, write) == len(LEGACY)
    assert await spool.replay(tmp_path, LEDGER, write, live=True) == 1
    assert spool.files(tmp_path, "*") == []


def test_a_failing_journal_is_logged_about_once_a_while_with_what_went_unsaid(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]  # the journal's clock, moved by the test alone: no timing to race
    monkeypatch.setattr(spool.time, "monotonic", lambda: now[0])
    journal = spool.Journal(tmp_path, LEDGER)

    def fail(request: str) -> None:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            journal.trouble("the journal failed for %s", request)

    with caplog.at_level("ERROR", logger="proxy.spool"):
        for _ in range(3):
            fail("r1")
            now[0] += 1.0
        now[0] += spool.TROUBLE_SECONDS
        fail("r2")
    said = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said == [("the journal failed for r1", True),
                    ("the journal failed for r2 (2 more failures of the journal since the "
                     "last such line)", True)]
