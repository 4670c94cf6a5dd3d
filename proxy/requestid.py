"""Request ids: the client's own when it sent a sane one, else a time-sortable new one."""

from __future__ import annotations

import os
import re
import time

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    """``req_`` + 12 hex digits of Unix milliseconds + 16 random hex digits.

    Ids sort by creation time (to the millisecond) as plain strings.
    """
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"


def request_id_from(header: str | None) -> str:
    if header is not None and _VALID.fullmatch(header):
        return header
    return new_request_id()
