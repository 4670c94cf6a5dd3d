"""The spool file alone: written whole, replayed in order, removed only once all written."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy import spool


def test_a_spool_file_is_whole_and_named_for_its_process(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    path = spool.write(directory, [b'{"a":1}', b'{"b":2}'])
    assert path.parent == directory and path.name.endswith(".jsonl")
    assert f"-{os.getpid()}-" in path.name
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert [p.name for p in directory.iterdir()] == [path.name]  # no .tmp left behind
    other = spool.write(directory, [b'{"c":3}'])
    assert other != path and spool.files(directory) == sorted([path, other])


async def test_replay_hands_every_line_over_and_removes_the_files(tmp_path: Path) -> None:
    spool.write(tmp_path, [b"1", b"2"])
    spool.write(tmp_path, [b"3"])
    seen: list[bytes] = []

    async def write(line: bytes) -> bool:
        seen.append(line)
        return True

    assert await spool.replay(tmp_path, write) == 3
    assert sorted(seen) == [b"1", b"2", b"3"]
    assert spool.files(tmp_path) == []
    assert await spool.replay(tmp_path, write) == 0
    assert await spool.replay(tmp_path / "missing", write) == 0


async def test_a_file_not_wholly_written_stays_for_the_next_start(tmp_path: Path) -> None:
    path = spool.write(tmp_path, [b"1", b"2", b"3"])

    async def refuse_two(line: bytes) -> bool:
        return line != b"2"

    assert await spool.replay(tmp_path, refuse_two) == 3
    assert spool.files(tmp_path) == [path] and path.read_bytes() == b"1\n2\n3\n"


async def test_a_crash_mid_replay_leaves_the_whole_file(tmp_path: Path) -> None:
    path = spool.write(tmp_path, [b"1", b"2"])

    async def crash(line: bytes) -> bool:
        if line == b"2":
            raise RuntimeError("the process dies here")
        return True

    with pytest.raises(RuntimeError):
        await spool.replay(tmp_path, crash)
    assert path.read_bytes() == b"1\n2\n"  # replayed whole next time; the ledger dedupes


async def test_processes_replaying_together_take_turns(tmp_path: Path) -> None:
    """Two replays at once (two workers starting): each line is handed over once,
    because the second waits for the first's lock and then finds the file gone."""
    spool.write(tmp_path, [b"1", b"2"])
    seen: list[bytes] = []

    async def slow(line: bytes) -> bool:
        await asyncio.sleep(0.1)
        seen.append(line)
        return True

    counts = await asyncio.gather(spool.replay(tmp_path, slow), spool.replay(tmp_path, slow))
    assert sorted(counts) == [0, 2] and seen == [b"1", b"2"]
