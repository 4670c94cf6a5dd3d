"""The settlement spool: what a stopping process still owes the ledger, kept on disk.

A process that must stop while PostgreSQL is out of reach writes the settlements it
could not post to a file of its own in the spool directory (``billing.spool_dir``,
else ``$PAYWALL_DATA_DIR/spool``), one JSON object a line; the next process to start
there replays every such file before its reaper runs.

- **Whole files only.** A file is written once, by the process that owes it: to a
  ``.tmp`` name, fsynced, renamed to ``settlements-<host>-<pid>-<random>.jsonl`` and
  the directory fsynced. A reader never sees a file being written; workers and
  replicas sharing the directory never write the same name.
- **Replayed exactly once.** Each file is taken under an exclusive ``flock`` (workers
  starting together take turns, and each finds a file the other finished already
  gone), its lines are handed to ``write`` in order, and the file is unlinked only
  once every line is in the ledger. A crash mid-replay leaves the file whole: the next
  start hands its lines over again, and since a hold resolves at most once
  (``paywall_post`` answers nothing for a resolved hold), the lines posted before the
  crash charge nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger("proxy.spool")

PATTERN = "settlements-*.jsonl"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(directory: Path, lines: Sequence[bytes]) -> Path:
    """Write ``lines`` (each one JSON object, no newline) durably as a new spool file."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"settlements-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = directory / f".{name}.tmp"
    final = directory / f"{name}.jsonl"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        data = memoryview(b"".join(line + b"\n" for line in lines))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    _fsync_dir(directory)
    return final


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int | None]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # replayed and removed by another process meanwhile
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _read(fd: int) -> list[bytes]:
    with os.fdopen(os.dup(fd), "rb") as f:
        return [line for line in f.read().split(b"\n") if line.strip()]


def files(directory: Path) -> list[Path]:
    """The spool files in ``directory``, oldest name first."""
    return sorted(directory.glob(PATTERN)) if directory.is_dir() else []


def _remove(path: Path) -> None:
    path.unlink()
    _fsync_dir(path.parent)


async def replay(directory: Path, write: Callable[[bytes], Awaitable[bool]]) -> int:
    """Hand every line of every spool file in ``directory`` to ``write`` (True: it is
    in the ledger now), and remove each file all of whose lines were written. Returns
    the number of lines handed over."""
    count = 0
    for path in files(directory):
        with _opened(path) as fd:
            if fd is None:
                continue
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # another process replayed it while we waited
                continue
            lines = _read(fd)
            written = 0
            for line in lines:
                count += 1
                if await write(line):
                    written += 1
            if written == len(lines):
                _remove(path)
                log.info("replayed %d settlements from %s", written, path.name)
            else:
                log.warning("%s: %d of %d settlements not yet written; the file stays",
                            path.name, len(lines) - written, len(lines))
    return count
