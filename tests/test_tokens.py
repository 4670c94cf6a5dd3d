from __future__ import annotations

import pytest
import tiktoken

from proxy.tokens import OFFLINE, Tokenizer, prompt_text

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
    assert (messages, extra) == (2, 1000)
    estimate = await t.estimate_prompt(body, "m")
    assert estimate > len(OFFLINE_ENC.encode_ordinary(text)) + extra


async def test_large_texts_are_counted_off_the_loop_with_the_same_result() -> None:
    t = Tokenizer()
    text = "word " * 20_000
    assert await t.count_async(text, "m") == t.count(text, "m")
