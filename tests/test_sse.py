"""The SSE parser as a table: chunks in, events out."""

from __future__ import annotations

import pytest

from proxy.sse import Event, SSEParser, encode

CASES = [
    ("one event", [b"data: a\n\n"], [Event("a")]),
    ("no space after colon", [b"data:a\n\n"], [Event("a")]),
    ("only one leading space is dropped", [b"data:  a\n\n"], [Event(" a")]),
    ("multi-line data joins with LF", [b"data: a\ndata: b\n\n"], [Event("a\nb")]),
    ("CRLF endings", [b"data: a\r\n\r\n"], [Event("a")]),
    ("CR endings", [b"data: a\r\rdata: b\r\r"], [Event("a"), Event("b")]),
    ("CRLF split between chunks", [b"data: a\r", b"\n\r", b"\n"], [Event("a")]),
    ("split inside a line", [b"da", b"ta: h", b"ello\n", b"\n"], [Event("hello")]),
    ("comment lines are ignored", [b": ping\n\n", b"data: x\n\n"], [Event("x")]),
    ("event and id fields", [b"event: done\nid: 7\ndata: x\n\n"], [Event("x", "done", "7")]),
    ("id persists to later events", [b"id: 1\ndata: a\n\ndata: b\n\n"],
     [Event("a", id="1"), Event("b", id="1")]),
    ("event type resets after dispatch", [b"event: e\ndata: a\n\ndata: b\n\n"],
     [Event("a", "e"), Event("b")]),
    ("no data, no event", [b"event: e\n\n"], []),
    ("unknown fields ignored", [b"retry: 10\nfoo: bar\ndata: x\n\n"], [Event("x")]),
    ("field with no colon", [b"data\n\n"], [Event("")]),
    ("incomplete event is held", [b"data: a\n"], []),
    ("utf-8 split across chunks", ["data: é€\n\n".encode()[:8], "data: é€\n\n".encode()[8:]],
     [Event("é€")]),
    ("a byte order mark opening the stream is ignored", ["\ufeffdata: a\n\n".encode()],
     [Event("a")]),
    ("a byte order mark split across chunks", [b"\xef", b"\xbb", b"\xbfdata: a\n\n"],
     [Event("a")]),
    ("only one byte order mark is ignored", ["\ufeff\ufeffdata: a\n\n".encode()], []),
    ("a byte order mark later is data", ["data: a\n\n\ufeffdata: b\n\n".encode()],
     [Event("a")]),
    ("a short first chunk that is no byte order mark", [b"d", b"ata: a\n\n"], [Event("a")]),
    ("bytes that are not UTF-8 are replaced, not dropped", [b"data: \xff\xfe\n\n"],
     [Event("\ufffd\ufffd")]),
    ("an empty data line is an event", [b"data:\n\n"], [Event("")]),
    ("odd line endings still dispatch", [b"data: a\n\r\ndata: b\r\n\n"],
     [Event("a"), Event("b")]),
    ("many events in one chunk", [b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"],
     [Event("1"), Event("2"), Event("[DONE]")]),
]


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_parser(chunks: list[bytes], expected: list[Event]) -> None:
    parser = SSEParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    assert events == expected


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_split_gives_the_same_events(size: int) -> None:
    stream = b"data: a\r\ndata: b\r\n\r\n: c\nevent: x\ndata: y\n\ndata: z\r\r"
    parser = SSEParser()
    events = [e for i in range(0, len(stream), size) for e in parser.feed(stream[i:i + size])]
    assert events == [Event("a\nb"), Event("y", "x"), Event("z")]


def test_encode_writes_one_event_the_parser_reads_back() -> None:
    raw = encode("response.created", {"text": "two\nlines"})
    assert raw == b'event: response.created\ndata: {"text":"two\\nlines"}\n\n'
    assert SSEParser().feed(raw) == [Event('{"text":"two\\nlines"}', "response.created")]
