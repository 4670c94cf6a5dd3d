"""Request ids: the client's own when it sent a sane one, else a time-sortable new one."""

from __future__ import annotations

import os
import re
import time

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


_RANDOM_BATCH = 4096  # random bytes read from the kernel at a time: 512 ids' worth
_random = b""
_taken = 0


def _forget_random() -> None:
    global _random, _taken
    _random, _taken = b"", 0


os.register_at_fork(after_in_child=_forget_random)  # a child never repeats its parent's


def new_request_id() -> str:
    """``req_`` + 12 hex digits of Unix milliseconds + 16 random hex digits.

    Ids sort by creation time (to the millisecond) as plain strings. The random part
    comes from ``os.urandom``, read 4 KiB at a time rather than one system call an id.
    """
    global _random, _taken
    if _taken + 8 > len(_random):
        _random, _taken = os.urandom(_RANDOM_BATCH), 0
    part = _random[_taken:_taken + 8]
    _taken += 8
    return f"req_{time.time_ns() // 1_000_000:012x}{part.hex()}"


def request_id_from(header: str | None) -> str:
    if header is not None and _VALID.fullmatch(header):
        return header
    return new_request_id()
