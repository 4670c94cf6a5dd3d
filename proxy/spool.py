"""The settlement spool: what a stopping process still owes the ledger, kept on disk.

A process that must stop while PostgreSQL is out of reach writes the settlements it
could not post to a file of its own in the spool directory (``billing.spool_dir``,
else ``$PAYWALL_DATA_DIR/spool``), one JSON object a line; the next process of its
ledger to start there replays every such file before its reaper runs.

- **Whole files only.** A file is written once, by the process that owes it: to a
  ``.tmp`` name, fsynced, renamed to
  ``settlements-ledger_<id>-<host>-<pid>-<random>.jsonl`` and the directory fsynced.
  A reader never sees a file being written; workers and replicas sharing the directory
  never write the same name.
- **Replayed exactly once.** Each file is taken under an exclusive ``flock`` (workers
  starting together take turns, and each finds a file the other finished already
  gone), its lines are handed to ``write`` in order, and the file is unlinked only
  once every line is in the ledger. A crash mid-replay leaves the file whole: the next
  start hands its lines over again, and since a hold resolves at most once
  (``paywall_post`` answers nothing for a resolved hold), the lines posted before the
  crash charge nothing the second time.

A process's **journal** (:class:`Journal`) holds the settlements whose answers have gone
out and that the ledger does not have yet (owed ones, and with
``billing.settle_after_answer`` those of answers sent before their post): lines appended
to ``journal-ledger_<id>-<host>-<pid>-<random>.jsonl`` under an exclusive ``flock`` its
process holds for as long as it lives. The lock dies with the process, so a journal
whose lock can be taken is a dead process's: the next start, or any live worker's
reaper before it reaps, replays it as a spool file (:func:`replay` with ``live``).

**Named after their ledger.** Hold ids mean something only in the database that made
them, so every file's name carries its ledger's identity
(:meth:`proxy.ledger.Ledger.identity`): ``settlements-ledger_<id>-…`` and
``journal-ledger_<id>-…``. A proxy replays its own ledger's files and leaves another's
(a second deployment, or a proxy pointed at another database, sharing the directory)
for a proxy on that database, saying so once (of a journal, once its process is gone).
A file named without a ledger was written by an earlier release and is replayed by the
first proxy to start, as then; an earlier release replays every file, whatever its
ledger, so the processes sharing a directory are upgraded together.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger("proxy.spool")

PATTERN = "settlements-*.jsonl"
JOURNALS = "journal-*.jsonl"
JOURNAL_BYTES = 1 << 20  # a journal is rotated past this size
JOURNAL_SYNC_SECONDS = 0.2  # what is appended is fsynced at most this long after
TROUBLE_SECONDS = 60.0  # a journal that keeps failing is logged about once this often


# A file's ledger, the field after its kind: "ledger_" and the id's 32 hex digits, which
# no host name of an earlier release's names can be (a host name has no underscore).
_LEDGER = re.compile(r"ledger_([0-9a-f]{32})")
# The files of other ledgers this process has said it leaves, by pattern: a name is
# forgotten once its file is gone.
_left: dict[str, set[str]] = {}


def _name(kind: str, ledger: str) -> str:
    return (f"{kind}-ledger_{ledger}-{socket.gethostname()}-{os.getpid()}-"
            f"{secrets.token_hex(4)}")


def ledger_of(path: Path) -> str | None:
    """The ledger ``path``'s settlements are owed to; None for a file named without one
    (an earlier release's)."""
    parts = path.name.split("-", 2)
    m = _LEDGER.fullmatch(parts[1]) if len(parts) == 3 else None
    return m.group(1) if m else None


def _free(path: Path) -> bool:
    """Whether no process holds ``path``'s lock (its process is gone), or it is gone."""
    with _opened(path) as fd:
        return fd is None or _locked_now(fd)  # the lock ends with the descriptor


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(directory: Path, ledger: str, lines: Sequence[bytes]) -> Path:
    """Write ``lines`` (each one JSON object, no newline), owed to ``ledger``, durably as
    a new spool file."""
    directory.mkdir(parents=True, exist_ok=True)
    name = _name("settlements", ledger)
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


def files(directory: Path, pattern: str = PATTERN) -> list[Path]:
    """The spool files (or ``pattern``'s) in ``directory``, oldest name first."""
    return sorted(directory.glob(pattern)) if directory.is_dir() else []


def _locked_now(fd: int) -> bool:
    """Take ``fd``'s exclusive flock if no one holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove(path: Path) -> None:
    path.unlink()
    _fsync_dir(path.parent)


async def replay(directory: Path, ledger: str, write: Callable[[bytes], Awaitable[bool]],
                 *, live: bool = False) -> int:
    """Hand every line of every spool file in ``directory`` owed to ``ledger`` (or to
    none named) to ``write`` (True: it is in the ledger now), and remove each file all
    of whose lines were written. Returns the number of lines handed over. ``live``: the
    journals instead, of processes that died (one whose lock is held is its live
    process's, or being replayed: left be)."""
    count = 0
    pattern = JOURNALS if live else PATTERN
    found = files(directory, pattern)
    told = _left.setdefault(pattern, set())
    told &= {path.name for path in found}
    for path in found:
        if (owner := ledger_of(path)) not in (None, ledger):
            # Left for a proxy on that ledger; said once, and not of a live journal.
            if path.name not in told and (not live or _free(path)):
                told.add(path.name)
                log.warning("%s is owed to another ledger (%s), not this one (%s): left "
                            "for a proxy on that database", path.name, owner, ledger)
            continue
        with _opened(path) as fd:
            if fd is None:
                continue
            if live:
                if not _locked_now(fd):
                    continue
            else:
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


class JournalFile:
    """One journal file: open and locked while its process lives."""

    __slots__ = ("dirty", "fd", "path", "pending", "sealed", "size")

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.size = 0
        self.pending = 0  # lines written here and not yet in the ledger
        self.sealed = False  # rotated out: removed once nothing is pending
        self.dirty = False  # written since its last fsync


def _fsync_all(fds: list[int], directory: Path | None) -> None:
    try:
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    if directory is not None:
        _fsync_dir(directory)


class Journal:
    """Settlements of answers already sent, on disk until the ledger has them.

    :meth:`append` writes a line (an :class:`proxy.settler.Owed`) and returns its file;
    :meth:`durable` returns once it is on disk (one fsync, off the event loop, for all
    the lines appended meanwhile), which the answer waits for unless
    ``synchronous_commit`` is off (:meth:`syncing` then bounds what a machine's crash
    can lose); :meth:`done` says the ledger has the line. A file is rotated past
    :data:`JOURNAL_BYTES` and removed, with its lock, once every line in it is done."""

    def __init__(self, directory: Path, ledger: str):
        self.directory = directory
        self.ledger = ledger
        self._current: JournalFile | None = None
        self._open: list[JournalFile] = []
        self._new = False  # the directory has a name not yet fsynced
        self._appended = 0  # lines appended, ever
        self._durable = 0  # ...of which on disk
        self._round: asyncio.Task[None] | None = None  # the fsync under way
        self._wrote = asyncio.Event()  # appended to since syncing() last looked
        self._told_at = -TROUBLE_SECONDS  # when a failure of the journal was last logged
        self._untold = 0  # failures since then, not logged

    def append(self, line: bytes) -> JournalFile:
        current = self._current
        if current is None or current.size >= JOURNAL_BYTES:
            current = self._rotate()
        data = memoryview(line + b"\n")
        while data:
            data = data[os.write(current.fd, data):]
        current.size += len(line) + 1
        current.pending += 1
        current.dirty = True
        self._appended += 1
        self._wrote.set()
        return current

    async def durable(self) -> None:
        """Return once every line appended before this call is on disk."""
        wanted = self._appended
        while self._durable < wanted:
            if self._round is None:
                self._round = asyncio.get_running_loop().create_task(self._sync())
            await asyncio.shield(self._round)

    async def _sync(self) -> None:
        upto, files, new = self._appended, [j for j in self._open if j.dirty], self._new
        for journal in files:
            journal.dirty = False
        self._new = False
        try:
            await asyncio.to_thread(_fsync_all, [os.dup(j.fd) for j in files],
                                    self.directory if new else None)
        except BaseException:
            for journal in files:  # the next round tries again
                journal.dirty = True
            self._new = self._new or new
            raise
        finally:
            self._round = None
        self._durable = max(self._durable, upto)

    async def syncing(self) -> None:
        """Make what is appended durable within :data:`JOURNAL_SYNC_SECONDS`, until
        cancelled; idle while nothing is appended."""
        while True:
            await self._wrote.wait()
            await asyncio.sleep(JOURNAL_SYNC_SECONDS)
            self._wrote.clear()
            try:
                await self.durable()
            except OSError:
                self.trouble("syncing the settlement journal failed")

    def trouble(self, message: str, *args: object) -> None:
        """Log, from the ``except`` block, that the journal could not be written or
        synced: with the traceback, at most once each :data:`TROUBLE_SECONDS`, saying
        how many failures went unlogged meanwhile (a broken disk fails every answer)."""
        now = time.monotonic()
        if now - self._told_at < TROUBLE_SECONDS:
            self._untold += 1
            return
        untold, self._untold, self._told_at = self._untold, 0, now
        if untold:
            message += f" ({untold} more failures of the journal since the last such line)"
        log.error(message, *args, exc_info=True)

    def done(self, journal: JournalFile) -> None:
        journal.pending -= 1
        if journal.sealed and journal.pending == 0:
            self._remove(journal)

    def _rotate(self) -> JournalFile:
        if (old := self._current) is not None:
            old.sealed = True
            if old.pending == 0:
                self._remove(old)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{_name('journal', self.ledger)}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new name: nobody else can hold it
        self._current = JournalFile(path, fd)
        self._open.append(self._current)
        self._new = True
        return self._current

    def _remove(self, journal: JournalFile) -> None:
        journal.path.unlink(missing_ok=True)  # before the lock goes: never replayed
        os.close(journal.fd)
        self._open.remove(journal)
        if journal is self._current:
            self._current = None

    def close(self) -> None:
        """At the end: remove every file with nothing pending; the others keep their
        lines for the next start (their lock ends with the process)."""
        for journal in list(self._open):
            if journal.pending == 0:
                self._remove(journal)
            else:
                log.warning("%s: %d settlements not in the ledger; the next start posts "
                            "them", journal.path.name, journal.pending)
                os.close(journal.fd)
                self._open.remove(journal)
        self._current = None
