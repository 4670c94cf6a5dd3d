"""Pricing as a table: exact integer costs, one rounding up per request."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.pricing import (
    Price,
    Usage,
    cost,
    format_amount,
    price_from,
    to_decimal,
    units,
    worst_case,
)
from proxy.settings import PriceSettings

# usd at scale 9: "0.15" per million tokens = 150_000_000 units per million = 150 per token.
GPT = Price("usd", per_request=0, input=150_000_000, output=600_000_000,
            cached_input=75_000_000, reasoning=600_000_000)
ODD = Price("usd", per_request=0, input=1, output=3, cached_input=1, reasoning=3)
CREDITS = Price("standard", per_request=1, input=0, output=0, cached_input=0, reasoning=0)

CASES = [
    ("nothing costs nothing", Usage(0, 0), GPT, 0, 0),
    ("prompt and completion", Usage(1000, 500), GPT, 0, 150 * 1000 + 600 * 500),
    ("cached prompt tokens at their price", Usage(1000, 0, cached_tokens=400), GPT, 0,
     150 * 600 + 75 * 400),
    ("markup 20%", Usage(1000, 500), GPT, 2000, (150 * 1000 + 600 * 500) * 12 // 10),
    ("fractions round up once per request", Usage(1, 0), ODD, 0, 1),
    ("a million tokens at 1 unit is exactly 1", Usage(1_000_000, 0), ODD, 0, 1),
    ("one over a million rounds up", Usage(1_000_001, 0), ODD, 0, 2),
    ("markup rounds up too", Usage(1_000_000, 0), ODD, 1, 2),
    ("per-request credit", Usage(123, 456), CREDITS, 0, 1),
]


@pytest.mark.parametrize(("usage", "price", "markup", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cost(usage: Usage, price: Price, markup: int, expected: int) -> None:
    assert cost(usage, price, markup) == expected


def test_reasoning_tokens_priced_apart() -> None:
    price = Price("usd", 0, 0, output=10, cached_input=0, reasoning=30)
    assert cost(Usage(0, 1_000_000, reasoning_tokens=500_000), price) == 5 + 15


OK = {"prompt_tokens": 5, "completion_tokens": 2}
TOO_MANY = 2**31  # one more than the ledger's token columns hold

USAGE_CASES: list[tuple[str, object, Usage | None]] = [
    ("totals", {**OK, "total_tokens": 7}, Usage(5, 2)),
    ("with details", {"prompt_tokens": 10, "completion_tokens": 4,
                      "prompt_tokens_details": {"cached_tokens": 6},
                      "completion_tokens_details": {"reasoning_tokens": 3}},
     Usage(10, 4, 6, 3)),
    ("details that are null", {**OK, "prompt_tokens_details": None,
                               "completion_tokens_details": {"reasoning_tokens": None}},
     Usage(5, 2)),
    ("other details are not read", {**OK, "completion_tokens_details": {
        "audio_tokens": -1, "reasoning_tokens": 1}}, Usage(5, 2, 0, 1)),
    ("zero is a count", {"prompt_tokens": 0, "completion_tokens": 0}, Usage(0, 0)),
    ("the largest count", {"prompt_tokens": TOO_MANY - 1, "completion_tokens": 0},
     Usage(TOO_MANY - 1, 0)),
    # A detail larger than its total earns no price of its own.
    ("more cached than prompt", {**OK, "prompt_tokens_details": {"cached_tokens": 9}},
     Usage(5, 2, 0, 0)),
    ("more reasoning than completion", {**OK, "completion_tokens_details": {
        "reasoning_tokens": 3}}, Usage(5, 2, 0, 0)),
    ("all of it cached", {**OK, "prompt_tokens_details": {"cached_tokens": 5}},
     Usage(5, 2, 5, 0)),
    # Refused: the output is counted instead.
    ("no completion", {"prompt_tokens": 3}, None),
    ("no prompt", {"completion_tokens": 3}, None),
    ("only a total", {"total_tokens": 3}, None),
    ("null completion", {"prompt_tokens": 3, "completion_tokens": None}, None),
    ("negative prompt", {"prompt_tokens": -1, "completion_tokens": 2}, None),
    ("negative completion", {"prompt_tokens": 5, "completion_tokens": -500}, None),
    ("string count", {"prompt_tokens": 5, "completion_tokens": "2"}, None),
    ("float count", {"prompt_tokens": 5.0, "completion_tokens": 2}, None),
    ("fractional count", {"prompt_tokens": 5, "completion_tokens": 2.5}, None),
    ("boolean count", {"prompt_tokens": True, "completion_tokens": 2}, None),
    ("absurd count", {"prompt_tokens": 5, "completion_tokens": TOO_MANY}, None),
    ("count beyond a bigint", {"prompt_tokens": 2**64, "completion_tokens": 2}, None),
    ("negative cached", {**OK, "prompt_tokens_details": {"cached_tokens": -1}}, None),
    ("float reasoning", {**OK, "completion_tokens_details": {"reasoning_tokens": 1.0}}, None),
    ("string cached", {**OK, "prompt_tokens_details": {"cached_tokens": "1"}}, None),
    ("absurd reasoning", {**OK, "completion_tokens_details": {"reasoning_tokens": TOO_MANY}},
     None),
    ("details not an object", {**OK, "prompt_tokens_details": [1]}, None),
    ("null", None, None),
    ("not an object", "usage", None),
    ("a list", [5, 2], None),
]


@pytest.mark.parametrize(("usage", "expected"), [c[1:] for c in USAGE_CASES],
                         ids=[c[0] for c in USAGE_CASES])
def test_usage_from_openai(usage: object, expected: Usage | None) -> None:
    assert Usage.from_openai(usage) == expected


def test_units_and_back() -> None:
    assert units(Decimal("0.15"), 9) == 150_000_000
    assert units(Decimal("2"), 0) == 2
    assert to_decimal(150_000_000, 9) == Decimal("0.15")
    with pytest.raises(ValueError, match="finer than"):
        units(Decimal("0.0000000001"), 9)
    with pytest.raises(ValueError):
        units(Decimal("0.5"), 0)


def test_price_from_settings_defaults_cached_and_reasoning() -> None:
    p = price_from(PriceSettings(asset="usd", per_request=Decimal("0.001"),
                                 input_per_million=Decimal("0.15"),
                                 output_per_million=Decimal("0.6")), 9)
    assert p == Price("usd", 1_000_000, 150_000_000, 600_000_000, 150_000_000, 600_000_000,
                      cache_write=150_000_000)


def test_cache_write_tokens_are_priced_apart() -> None:
    p = price_from(PriceSettings(asset="usd", input_per_million=Decimal("3"),
                                 output_per_million=Decimal("15"),
                                 cached_input_per_million=Decimal("0.3"),
                                 cache_write_per_million=Decimal("3.75")), 9)
    # 1M fresh + 2M read + 4M written prompt tokens, 1M output.
    usage = Usage(7_000_000, 1_000_000, cached_tokens=2_000_000, cache_write_tokens=4_000_000)
    assert cost(usage, p) == (3 + 2 * 0.3 + 4 * 3.75 + 15) * 10**9


@pytest.mark.parametrize(("usage", "expected"), [
    ({"input_tokens": 3, "output_tokens": 5}, Usage(3, 5)),
    ({"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 10,
      "cache_creation_input_tokens": 7}, Usage(20, 5, cached_tokens=10, cache_write_tokens=7)),
    ({"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": None}, Usage(3, 5)),
    ({"input_tokens": 3}, None),
    ({"input_tokens": "3", "output_tokens": 5}, None),
    ({"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": -1}, None),
    ({"input_tokens": 2**31 - 1, "output_tokens": 5, "cache_read_input_tokens": 1}, None),
    ([1, 2], None),
])
def test_anthropic_usage(usage: object, expected: Usage | None) -> None:
    assert Usage.from_anthropic(usage) == expected


@pytest.mark.parametrize(("usage", "expected"), [
    ({"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}, Usage(3, 5)),
    ({"input_tokens": 9, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 4},
      "output_tokens_details": {"reasoning_tokens": 2}}, Usage(9, 5, 4, 2)),
    ({"input_tokens": 9, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 10}},
     Usage(9, 5)),
    ({"input_tokens": 9, "output_tokens": True}, None),
    ({"prompt_tokens": 9, "completion_tokens": 5}, None),
    (None, None),
])
def test_responses_usage(usage: object, expected: Usage | None) -> None:
    assert Usage.from_responses(usage) == expected


def test_openai_usage_reads_cache_write_tokens() -> None:
    assert Usage.from_openai({"prompt_tokens": 9, "completion_tokens": 1,
                              "prompt_tokens_details": {"cached_tokens": 2,
                                                        "cache_write_tokens": 3}}
                             ) == Usage(9, 1, cached_tokens=2, cache_write_tokens=3)
    # together more than the prompt: neither can be true
    assert Usage.from_openai({"prompt_tokens": 4, "completion_tokens": 1,
                              "prompt_tokens_details": {"cached_tokens": 2,
                                                        "cache_write_tokens": 3}}
                             ) == Usage(4, 1)


PRICES = st.integers(0, 10**12)


@given(per_request=PRICES, plain=PRICES, cached=PRICES, written=PRICES, out=PRICES,
       reasoning=PRICES, markup=st.integers(0, 50_000), prompt=st.integers(0, 10**7),
       output=st.integers(0, 10**7), data=st.data())
def test_worst_case_bounds_every_usage_within_it(per_request: int, plain: int, cached: int,
                                                 written: int, out: int, reasoning: int,
                                                 markup: int, prompt: int, output: int,
                                                 data: st.DataObject) -> None:
    price = Price("usd", per_request, plain, out, cached, reasoning, written)
    read = data.draw(st.integers(0, prompt))
    write = data.draw(st.integers(0, prompt - read))
    thought = data.draw(st.integers(0, output))
    usage = Usage(prompt, output, cached_tokens=read, reasoning_tokens=thought,
                  cache_write_tokens=write)
    bound = worst_case(prompt, output, price, markup)
    assert cost(usage, price, markup) <= bound
    # and it is reached: the whole prompt at the dearest of its prices
    dearest = max((plain, Usage(prompt, output)), (cached, Usage(prompt, output, prompt)),
                  (written, Usage(prompt, output, cache_write_tokens=prompt)),
                  key=lambda p: p[0])[1]
    top = Usage(dearest.prompt_tokens, output, dearest.cached_tokens,
                output if reasoning > out else 0, dearest.cache_write_tokens)
    assert cost(top, price, markup) == bound


# Beyond any bigint, within the 28 digits a Decimal holds exactly.
@given(st.integers(min_value=-(10 ** 27), max_value=10 ** 27), st.integers(0, 18))
def test_an_amount_is_written_as_its_decimal_is(amount: int, scale: int) -> None:
    assert format_amount(amount, scale) == format(Decimal(amount).scaleb(-scale), "f")


def test_a_sum_the_database_made_is_written_as_an_integer_is() -> None:
    """SUM() over bigints comes back as a Decimal: written the same as the integer."""
    assert format_amount(Decimal(123), 9) == format_amount(123, 9) == "0.000000123"
    assert format_amount(Decimal(-5_000_000_000), 9) == "-5.000000000"
