"""An incremental Server-Sent Events parser: bytes in, events out, no I/O.

Follows the WHATWG HTML "event stream interpretation" rules: lines end in CRLF,
LF or CR; a line starting with ``:`` is a comment; ``field: value`` with one
optional space after the colon; ``data`` lines accumulate joined by ``\\n``; an
empty line dispatches the event (an event with no data is dropped); one UTF-8 byte
order mark opening the stream is ignored. Chunks may split anywhere, including
between the CR and LF of one line ending or inside that byte order mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

_BOM = "\ufeff".encode()


def encode(kind: str, data: Any) -> bytes:
    """One event as it is written: ``event: kind`` and ``data`` as JSON, which is one
    line (JSON escapes the line breaks in its strings)."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    __slots__ = ("_buf", "_data", "_event", "_id", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._buf = b""
        self._started = False  # past where a byte order mark may be
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Take the next bytes of the stream; return the events they complete."""
        if not self._started:
            chunk, self._buf = self._buf + chunk, b""
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._buf = chunk
                return []
            self._started = True
            chunk = chunk.removeprefix(_BOM)
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        buf = self._buf + chunk if self._buf else chunk
        events: list[Event] = []
        start = 0
        n = len(buf)
        while start < n:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < n:
                end, nxt = cr, cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
            else:  # CR at the end of this chunk: an LF may open the next one.
                end, nxt = cr, cr + 1
                self._skip_lf = True
            event = self._line(buf[start:end])
            if event is not None:
                events.append(event)
            start = nxt
        self._buf = buf[start:]
        return events

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            return None
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return Event(data="\n".join(data), event=event or "message", id=self._id)
