"""Prices and costs, in integers of an asset's smallest unit. Pure: no I/O.

A price holds, for one model, integer units per request and per million tokens of
each kind. A request's cost is

    ceil( (per_request * 1e6 + Σ tokens_k * price_k) * (10_000 + markup_bps)
          / (1e6 * 10_000) )

— one rounding, upwards, per request, so the paywall never undercharges by a unit
and never charges more than one unit over the exact amount. Cached prompt tokens
are priced at ``cached_input``, prompt tokens written to the cache at ``cache_write``
and reasoning tokens at ``reasoning`` (the first two default to the plain input
price, the last to the output price) when the provider reports them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, cast


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
    @property
    def cache_write_per_million(self) -> Decimal | None: ...

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
    cache_write: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Prompt tokens written to the provider's prompt cache (Anthropic bills them apart);
    # part of prompt_tokens, like cached_tokens, and never overlapping them.
    cache_write_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI ``usage`` object, or refuse it (None) so that the output is
        counted instead.

        Refused: anything but an object with both ``prompt_tokens`` and
        ``completion_tokens``, and any count read here (the two totals,
        ``prompt_tokens_details.cached_tokens``,
        ``completion_tokens_details.reasoning_tokens``) that is not a whole number from
        0 to :data:`MAX_TOKENS` — floats, strings and booleans included.
        ``prompt_tokens_details.cache_write_tokens`` (as OpenRouter reports the prompt
        written to a provider's cache, and the Anthropic translation does) is read
        too. A details
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
        written = _detail(usage.get("prompt_tokens_details"), "cache_write_tokens")
        reasoning = _detail(usage.get("completion_tokens_details"), "reasoning_tokens")
        if (prompt is None or completion is None or cached is None or reasoning is None
                or written is None):
            return None
        if cached + written > prompt:
            cached = written = 0
        return cls(prompt, completion, cached, reasoning if reasoning <= completion else 0,
                   written)

    @classmethod
    def from_responses(cls, usage: Any) -> Usage | None:
        """Read the ``usage`` of a Responses API object (``input_tokens``,
        ``output_tokens``, ``input_tokens_details.cached_tokens``,
        ``output_tokens_details.reasoning_tokens``), refused as :meth:`from_openai`
        refuses."""
        if not isinstance(usage, dict):
            return None
        return cls.from_openai({
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": usage.get("input_tokens_details"),
            "completion_tokens_details": usage.get("output_tokens_details")})

    @classmethod
    def from_anthropic(cls, usage: Any) -> Usage | None:
        """Read an Anthropic Messages ``usage`` object, or refuse it (None).

        Anthropic's ``input_tokens`` leaves out the prompt tokens read from the cache
        (``cache_read_input_tokens``) and written to it
        (``cache_creation_input_tokens``); the prompt is all three. The two cache
        counts may be absent or null (then 0); every count present must be a whole
        number from 0 to :data:`MAX_TOKENS`, and so must the sum."""
        if not isinstance(usage, dict):
            return None
        counts = [_count(usage.get("input_tokens")), _count(usage.get("output_tokens"))]
        for key in ("cache_read_input_tokens", "cache_creation_input_tokens"):
            value = usage.get(key)
            counts.append(0 if value is None else _count(value))
        if any(c is None for c in counts):
            return None
        fresh, output, read, written = cast(list[int], counts)
        prompt = fresh + read + written
        if prompt > MAX_TOKENS:
            return None
        return cls(prompt, output, cached_tokens=read, cache_write_tokens=written)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "reasoning_tokens": self.reasoning_tokens,
                "cache_write_tokens": self.cache_write_tokens}


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
    """``amount`` smallest units as a plain decimal string: 79 at scale 9 is "0.000000079"
    (``format(to_decimal(amount, scale), "f")``, in integer arithmetic: it is in every
    answer's headers)."""
    if scale <= 0 or type(amount) is not int:  # a sum PostgreSQL made is a Decimal
        return format(to_decimal(amount, scale), "f")
    if amount < 0:
        return "-" + format_amount(-amount, scale)
    whole, fraction = divmod(amount, 10 ** scale)
    return f"{whole}.{str(fraction).zfill(scale)}"  # 2.5 times as fast as a nested format spec


def shown_amount(amount: int, scale: int) -> str:
    """``amount`` for people: as :func:`format_amount`, without the trailing zeros past
    two decimals (10.000000000 is "10.00", 0.000000079 stays "0.000000079")."""
    text = format_amount(amount, scale)
    if "." not in text:
        return text
    whole, frac = text.split(".")
    frac = frac.rstrip("0")
    return f"{whole}.{frac.ljust(2, '0')}"


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
        cache_write=units(conf.input_per_million if conf.cache_write_per_million is None
                          else conf.cache_write_per_million, scale),
    )


def dearest(prices: Sequence[Price]) -> Price:
    """Each of the prices' terms at its highest: what covers any of them (one asset)."""
    first = prices[0]
    return Price(first.asset, *(max(getattr(p, f) for p in prices) for f in (
        "per_request", "input", "output", "cached_input", "reasoning", "cache_write")))


def cost(usage: Usage, price: Price, markup_bps: int = 0) -> int:
    exact = (
        price.per_request * MILLION
        + (usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens) * price.input
        + usage.cached_tokens * price.cached_input
        + usage.cache_write_tokens * price.cache_write
        + (usage.completion_tokens - usage.reasoning_tokens) * price.output
        + usage.reasoning_tokens * price.reasoning
    ) * (_BPS + markup_bps)
    return -(-exact // (MILLION * _BPS))


def worst_case(prompt_tokens: int, output_tokens: int, price: Price, markup_bps: int = 0
               ) -> int:
    """The most a call of at most ``prompt_tokens`` in and ``output_tokens`` out can
    cost, what a hold is placed for: every prompt token at the dearest prompt price
    (plain, read from the cache, written to it: a provider may write the whole prompt
    to its cache) and every output token at the dearer of the output and reasoning
    prices. No :class:`Usage` within those totals costs more (:func:`cost`)."""
    exact = (
        price.per_request * MILLION
        + prompt_tokens * max(price.input, price.cached_input, price.cache_write)
        + output_tokens * max(price.output, price.reasoning)
    ) * (_BPS + markup_bps)
    return -(-exact // (MILLION * _BPS))


# Stripe's zero- and three-decimal currencies; every other one has two decimals.
# https://docs.stripe.com/currencies#zero-decimal
_ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf",
                           "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def currency_exponent(currency: str) -> int:
    """Decimal places of ``currency``'s minor unit, as Stripe counts them."""
    c = currency.lower()
    return 0 if c in _ZERO_DECIMAL else 3 if c in _THREE_DECIMAL else 2


def units_per_minor(asset_per_unit: Decimal, currency: str, scale: int) -> int:
    """Smallest units of the asset one minor unit of ``currency`` buys; ValueError when
    that is not a whole number of at least 1 (the conversion must be exact)."""
    n = asset_per_unit * Decimal(10) ** (scale - currency_exponent(currency))
    if n < 1 or n != n.to_integral_value():
        raise ValueError(f"one minor unit of {currency} must buy a whole number (at least 1) "
                         f"of the asset's smallest units, not {n}")
    return int(n)


def to_minor(amount: Decimal, currency: str) -> int:
    return int(amount * Decimal(10) ** currency_exponent(currency))


def format_minor(minor: int, currency: str) -> str:
    """``1050, "usd"`` → ``"10.50 USD"``."""
    e = currency_exponent(currency)
    text = f"{Decimal(minor).scaleb(-e):.{e}f}"
    return f"{text} {currency.upper()}"
