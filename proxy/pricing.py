"""Prices and costs, in integers of an asset's smallest unit. Pure: no I/O.

A price holds, for one model, integer units per request and per million tokens of
each kind. A request's cost is

    ceil( (per_request * 1e6 + Σ tokens_k * price_k) * (10_000 + markup_bps)
          / (1e6 * 10_000) )

— one rounding, upwards, per request, so the paywall never undercharges by a unit
and never charges more than one unit over the exact amount. Cached prompt tokens
are priced at ``cached_input`` and reasoning tokens at ``reasoning`` (both default
to the plain input and output prices) when the provider reports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol


class PriceTerms(Protocol):
    """Prices as configured: decimals per request and per million tokens (the
    ``[models.*.price]`` settings)."""

    @property
    def asset(self) -> str: ...
    @property
    def per_request(self) -> Decimal: ...
    @property
    def input_per_million(self) -> Decimal: ...
    @property
    def output_per_million(self) -> Decimal: ...
    @property
    def cached_input_per_million(self) -> Decimal | None: ...
    @property
    def reasoning_per_million(self) -> Decimal | None: ...

MILLION = 1_000_000
MAX_UNITS = 2**63 - 1  # PostgreSQL bigint
MAX_TOKENS = 2**31 - 1  # the ledger's token columns are PostgreSQL integers
_BPS = 10_000


@dataclass(frozen=True, slots=True)
class Price:
    asset: str
    per_request: int
    input: int  # per million tokens
    output: int
    cached_input: int
    reasoning: int


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI ``usage`` object, or refuse it (None) so that the output is
        counted instead.

        Refused: anything but an object with both ``prompt_tokens`` and
        ``completion_tokens``, and any count read here (the two totals,
        ``prompt_tokens_details.cached_tokens``,
        ``completion_tokens_details.reasoning_tokens``) that is not a whole number from
        0 to :data:`MAX_TOKENS` — floats, strings and booleans included. A details
        object may be absent or null, and so may a count inside it (then 0).

        The totals are what is charged; the details only say which price applies to
        part of them. A detail larger than its total cannot be true, so it earns no
        price of its own: it is read as 0 and the whole total is charged at the plain
        input or output price.
        """
        if not isinstance(usage, dict):
            return None
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        cached = _detail(usage.get("prompt_tokens_details"), "cached_tokens")
        reasoning = _detail(usage.get("completion_tokens_details"), "reasoning_tokens")
        if prompt is None or completion is None or cached is None or reasoning is None:
            return None
        return cls(prompt, completion, cached if cached <= prompt else 0,
                   reasoning if reasoning <= completion else 0)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "reasoning_tokens": self.reasoning_tokens}


def _count(value: Any) -> int | None:
    """``value`` if it is a token count the ledger can hold, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def _detail(details: Any, key: str) -> int | None:
    """The count ``details[key]``: 0 when absent or null, None when it is refused."""
    if details is None:
        return 0
    if not isinstance(details, dict):
        return None
    value = details.get(key)
    return 0 if value is None else _count(value)


def units(amount: Decimal, scale: int) -> int:
    """``amount`` of the asset in its smallest unit; ValueError unless that is a whole
    number the ledger can hold (a PostgreSQL bigint)."""
    if not amount.is_finite():
        raise ValueError(f"{amount} is not a number")
    scaled = amount.scaleb(scale)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} is finer than the asset's smallest unit (1e-{scale})")
    if abs(scaled) > MAX_UNITS:
        raise ValueError(f"{amount} is more than the ledger holds in this asset")
    return int(scaled)


# Amounts in strings are plain ASCII decimals: no signs, exponents, spaces, "_" or
# other scripts' digits, all of which Decimal() would take.
_DECIMAL = re.compile(r"[0-9]{1,40}(\.[0-9]{1,40})?")


def parse_decimal(value: Any) -> Decimal | None:
    """An amount as a client sends it — a plain decimal string (``"1.50"``) or a finite
    JSON number — or None for anything else."""
    if isinstance(value, str):
        return Decimal(value) if _DECIMAL.fullmatch(value) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    amount = Decimal(repr(value))
    return amount if amount.is_finite() else None


def to_decimal(amount: int, scale: int) -> Decimal:
    return Decimal(amount).scaleb(-scale)


def format_amount(amount: int, scale: int) -> str:
    """``amount`` smallest units as a plain decimal string: 79 at scale 9 is "0.000000079"."""
    return format(to_decimal(amount, scale), "f")


def price_from(conf: PriceTerms, scale: int) -> Price:
    return Price(
        asset=conf.asset,
        per_request=units(conf.per_request, scale),
        input=units(conf.input_per_million, scale),
        output=units(conf.output_per_million, scale),
        cached_input=units(conf.input_per_million if conf.cached_input_per_million is None
                           else conf.cached_input_per_million, scale),
        reasoning=units(conf.output_per_million if conf.reasoning_per_million is None
                        else conf.reasoning_per_million, scale),
    )


def cost(usage: Usage, price: Price, markup_bps: int = 0) -> int:
    exact = (
        price.per_request * MILLION
        + (usage.prompt_tokens - usage.cached_tokens) * price.input
        + usage.cached_tokens * price.cached_input
        + (usage.completion_tokens - usage.reasoning_tokens) * price.output
        + usage.reasoning_tokens * price.reasoning
    ) * (_BPS + markup_bps)
    return -(-exact // (MILLION * _BPS))
