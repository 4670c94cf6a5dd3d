from __future__ import annotations

import base64
import zlib
from typing import Any

import orjson
import pytest
import tiktoken

from proxy.errors import InvalidRequest
from proxy.settings import ModelSettings
from proxy.tokens import (
    DEFLATE_RATIO,
    IMAGE_TOKENS,
    OFFLINE,
    UNCOUNTED_PAGES,
    Prompt,
    Tokenizer,
    data_tokens,
    document_tokens,
    prompt_parts,
    prompt_text,
)

OFFLINE_ENC = tiktoken.get_encoding(OFFLINE)


def test_unknown_models_use_the_offline_encoding_without_a_fallback_count() -> None:
    t = Tokenizer()
    assert t.encoding("my-local-llama").name == OFFLINE
    assert t.fallbacks == 0
    assert t.count("hello world", "my-local-llama") == len(OFFLINE_ENC.encode("hello world"))


def test_an_encoding_that_cannot_load_falls_back_and_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiktoken.get_encoding

    def offline_only(name: str) -> tiktoken.Encoding:
        if name != OFFLINE:
            raise ConnectionError("no network to fetch " + name)
        return real(name)

    monkeypatch.setattr(tiktoken, "get_encoding", offline_only)
    t = Tokenizer()
    assert t.encoding("gpt-4o", "o200k_base").name == OFFLINE
    assert t.fallbacks == 1
    t.encoding("gpt-4o", "o200k_base")
    assert t.fallbacks == 1  # loaded once per process


async def test_estimate_bounds_the_real_count() -> None:
    t = Tokenizer()
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi there"},
                                                      {"type": "image_url", "image_url": {}}]}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    text, messages, extra = prompt_text(body)
    assert "Be brief." in text and "Hi there" in text and '"name":"f"' in text
    assert (messages, extra) == (2, IMAGE_TOKENS)
    estimate = await t.estimate_prompt(body, "m")
    assert estimate > len(OFFLINE_ENC.encode_ordinary(text)) + extra


async def test_large_texts_are_counted_off_the_loop_with_the_same_result() -> None:
    t = Tokenizer()
    text = "word " * 20_000
    assert await t.count_async(text, "m") == t.count(text, "m")


def user(*parts: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(parts)}]}


CALL = {"name": "lookup", "arguments": '{"city": "Paris"}'}
TOOL_CALLS = [{"id": "c1", "type": "function", "function": CALL}]
BIG_DATA = "QUJD" * 20_000  # 80,000 bytes of base64: more than any image's maximum
DATA_URL = "data:image/png;base64," + BIG_DATA


@pytest.mark.parametrize(("body", "expected"), [
    ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
     Prompt("user\nhi\nann", 1, 0)),
    ({"messages": [{"role": "assistant", "content": None, "function_call": CALL}]},
     Prompt("assistant\n" + orjson.dumps(CALL).decode(), 1, 0)),
    ({"messages": [{"role": "assistant", "tool_calls": TOOL_CALLS}]},
     Prompt("assistant\n" + orjson.dumps(TOOL_CALLS).decode(), 1, 0)),
    ({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "22 degrees"},
                   {"role": "function", "name": "lookup", "content": "sunny"}]},
     Prompt("tool\nc1\n22 degrees\nfunction\nlookup\nsunny", 2, 0)),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "text", "text": "Sure."}, {"type": "refusal", "refusal": "No."}]}]},
     Prompt("assistant\nSure.\nNo.", 1, 0)),
    (user({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}),
     Prompt("user", 1, IMAGE_TOKENS)),
    (user({"type": "image_url", "image_url": "https://x.test/a.png"}),
     Prompt("user", 1, IMAGE_TOKENS)),
    (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO",
                                              "detail": "high"}}),
     Prompt("user\nhigh", 1, IMAGE_TOKENS)),  # a tiny image still costs up to the maximum
    (user({"type": "image_url", "image_url": {"url": DATA_URL}}),
     Prompt("user", 1, len(DATA_URL))),  # a big one, its size
    (user({"type": "input_audio", "input_audio": {"data": BIG_DATA, "format": "wav"}}),
     Prompt("user\nwav", 1, len(BIG_DATA))),
    (user({"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE",
                                    "filename": "a.pdf"}}),
     Prompt("user\na.pdf", 1, len("data:application/pdf;base64,JVBE"))),
    (user("plain", {"type": "text", "text": "typed"}), Prompt("user\nplain\ntyped", 1, 0)),
    ({"messages": [], "prediction": {"type": "content", "content": "old code"}},
     Prompt("", 0, 0, "old code")),
    ({"messages": [], "prediction": {"type": "content", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}},
     Prompt("", 0, 0, "text\na\ntext\nb")),
    ({"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}],
      "functions": [{"name": "g"}], "response_format": {"type": "json_object"}},
     Prompt('[{"type":"function","function":{"name":"f"}}]\n[{"name":"g"}]\n'
            '{"type":"json_object"}', 0, 0)),
    ({"messages": "not a list"}, Prompt("", 0, 0)),
])
def test_every_billable_part_is_in_the_prompt(body: dict[str, Any], expected: Prompt) -> None:
    assert prompt_parts(body) == expected


def test_the_image_maximum_is_the_models() -> None:
    body = user({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}})
    assert prompt_parts(body, image_tokens=1445).media == 2 * 1445
    assert ModelSettings().max_image_tokens == IMAGE_TOKENS == 48_169


@pytest.mark.parametrize(("data", "bound"), [
    ("", 0), ("QUJD", 4), ("é", 2), ("日本", 6)])
def test_inline_data_is_bounded_by_its_bytes(data: str, bound: int) -> None:
    assert data_tokens(data) == bound
    assert len(OFFLINE_ENC.encode_ordinary(data)) <= bound


@pytest.mark.parametrize(("part", "param"), [
    ({"type": "file", "file": {"file_id": "file-abc"}}, "messages[0].content[0].file.file_id"),
    ({"type": "file", "file": {"filename": "a.pdf"}}, "messages[0].content[0].file.file_data"),
    ({"type": "file"}, "messages[0].content[0].file"),
    ({"type": "input_audio", "input_audio": {"format": "wav"}},
     "messages[0].content[0].input_audio.data"),
    ({"type": "video_url", "video_url": {"url": "https://x.test/v.mp4"}},
     "messages[0].content[0].type"),
    ({"text": "no type"}, "messages[0].content[0].type"),
    (5, "messages[0].content[0]"),
])
def test_a_part_that_cannot_be_bounded_is_refused(part: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        prompt_parts(user(part))
    assert raised.value.param == param
    assert raised.value.status == 400


def test_an_earlier_audio_answer_is_refused() -> None:
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "audio": {"id": "audio_abc"}}]}
    with pytest.raises(InvalidRequest) as raised:
        prompt_parts(body)
    assert raised.value.param == "messages[1].audio"


async def test_a_prediction_is_estimated_as_output() -> None:
    t = Tokenizer()
    predicted = "def f(x):\n    return x * 2\n" * 50
    body = {"messages": [{"role": "user", "content": "Rename f to g."}],
            "prediction": {"type": "content", "content": predicted}}
    counted, estimate, output = await t.prompt_tokens(body, "m")
    assert counted == len(OFFLINE_ENC.encode_ordinary("user\nRename f to g."))
    assert estimate < 100  # the prediction is no part of the prompt
    assert output >= len(OFFLINE_ENC.encode_ordinary(predicted))
    assert (await t.prompt_tokens({"messages": []}, "m"))[2] == 0


CONTENT = b"BT /F1 12 Tf 72 720 Td (Hello) Tj ET"


def pdf(pages: int, page_type: bytes = b"/Type /Page", content: bytes = CONTENT,
        compressed: bool = False) -> bytes:
    """A PDF of ``pages`` pages sharing one content stream (a few bytes a page): the
    first page's type as usual, the others' as ``page_type`` (all valid to readers)."""
    stream = zlib.compress(content, 9) if compressed else content
    flate = b" /Filter /FlateDecode" if compressed else b""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + i) for i in range(pages))
            + b"] /Count %d >>" % pages,
            b"<< /Length %d%s >>\nstream\n" % (len(stream), flate) + stream + b"\nendstream"]
    objs += [b"<< " + (b"/Type /Page" if i == 0 else page_type)
             + b" /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R >>"
             for i in range(pages)]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objs):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % (i + 1) + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objs) + 1, xref)
    return bytes(out)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BOMB = b"(AAAAAAAA) Tj " * 50_000  # 700 kB of text in a few kB of file


@pytest.mark.parametrize(("data", "pages", "content"), [
    (b64(pdf(1)), 1, len(CONTENT)),
    (b64(pdf(100)), 100, 100 * len(CONTENT)),
    ("data:application/pdf;base64," + b64(pdf(7)), 7, 7 * len(CONTENT)),
    # pages a regular expression would miss, which readers count
    (b64(pdf(100, b"/Type /P#61ge")), 100, 100 * len(CONTENT)),
    (b64(pdf(100, b"")), 100, 100 * len(CONTENT)),
    (b64(pdf(100, b"/Type %c\n/Page")), 100, 100 * len(CONTENT)),
    (b64(b"junk before the header " + pdf(3)), 3, 3 * len(CONTENT)),
    # compressed text: bounded by what it decompresses to
    (b64(pdf(1, content=BOMB, compressed=True)), 1, len(BOMB)),
    (b64(b"%PDF-1.4\nnothing a reader can read"), UNCOUNTED_PAGES,
     len(b"%PDF-1.4\nnothing a reader can read") * DEFLATE_RATIO),
    (b64(b"plain text, not a PDF"), 0, 0),
    ("not base64 at all!", 0, 0),
])
def test_a_pdf_is_bounded_by_its_pages_and_its_text(data: str, pages: int, content: int
                                                    ) -> None:
    assert document_tokens(data, 1000) == max(data_tokens(data), content) + pages * 1000


def test_a_hundred_page_pdf_is_held_for_its_pages_in_chat() -> None:
    data = "data:application/pdf;base64," + b64(pdf(100))
    body = {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": data}}]}]}
    assert prompt_parts(body, image_tokens=1500).media == data_tokens(data) + 100 * 1500


def test_every_wire_format_bounds_a_pdf_by_its_pages() -> None:
    from proxy import anthropic_wire, responses

    raw = b64(pdf(40))
    responses_body = {"input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "a.pdf",
         "file_data": "data:application/pdf;base64," + raw}]}]}
    assert responses.prompt_parts(responses_body, 1500).media >= 40 * 1500
    messages_body = {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                        "data": raw}}]}]}
    assert anthropic_wire.prompt_of(messages_body, 1500).media >= 40 * 1500
