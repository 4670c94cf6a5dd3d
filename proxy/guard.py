"""The guardrails that apply to one request: the paywall's limits, with the user's
overrides laid over them, turned into limiter rules, spend caps and an output cap.
Pure: no I/O.

User overrides (set through ``PATCH /v1/user/limits``) are stored as JSON:
``requests_per_minute``, ``tokens_per_minute``, ``concurrency``,
``max_tokens_per_request`` (integers, 0 = no limit) and ``daily_spend_cap``,
``monthly_spend_cap`` (asset -> decimal string). A key that is absent falls back to
the paywall's setting.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from proxy.errors import InvalidRequest
from proxy.ledger import SpendCap
from proxy.limits import Rule
from proxy.pricing import parse_decimal, units
from proxy.settings import AssetSettings, LimitSettings

INT_OVERRIDES = ("requests_per_minute", "tokens_per_minute", "concurrency",
                 "max_tokens_per_request")
CAP_OVERRIDES = ("daily_spend_cap", "monthly_spend_cap")
MAX_OUTPUT_TOKENS = 2**31 - 1  # what an output cap may be: the ledger's token counts are int4
# OpenAI's service tiers billed at the model's standard prices or below; "priority"
# (and "scale") cost more than a model's configured price.
PRICED_TIERS = (None, "auto", "default", "flex")


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force for one user of one paywall."""

    user_rpm: int
    user_tpm: int
    user_concurrency: int
    paywall_rpm: int
    paywall_tpm: int
    paywall_concurrency: int
    user_daily: dict[str, Decimal]
    user_monthly: dict[str, Decimal]
    paywall_daily: dict[str, Decimal]
    paywall_monthly: dict[str, Decimal]
    max_tokens: int
    clamp: bool
    timezone: str
    fail_open: bool
    lease_seconds: float
    blocked: bool = False  # the operator blocked this user: every request is refused

    def as_overridable(self) -> dict[str, Any]:
        return {
            "requests_per_minute": self.user_rpm,
            "tokens_per_minute": self.user_tpm,
            "concurrency": self.user_concurrency,
            "max_tokens_per_request": self.max_tokens,
            "daily_spend_cap": {a: format(v, "f") for a, v in self.user_daily.items()},
            "monthly_spend_cap": {a: format(v, "f") for a, v in self.user_monthly.items()},
        }


# Not a limit a user's overrides can set: the users row's ``blocked`` column, which the
# overrides read (Ledger.limits_of) carries under this key.
BLOCKED = "blocked"


def effective(conf: LimitSettings, overrides: dict[str, Any]) -> Limits:
    """The limits of a user with ``overrides`` under a paywall's ``conf``; those of a
    user with none are made once per ``conf`` (most requests' case)."""
    if not overrides:
        plain = _PLAIN.get(id(conf))
        if plain is None:
            if len(_PLAIN) >= 64:  # settings made anew many times (tests): forget them
                _PLAIN.clear()
            plain = _PLAIN[id(conf)] = (conf, _effective(conf, overrides))
        return plain[1]
    return _effective(conf, overrides)


# id(conf) → conf (kept, so that its id is not reused while it is here), its plain limits
_PLAIN: dict[int, tuple[LimitSettings, Limits]] = {}


def _effective(conf: LimitSettings, overrides: dict[str, Any]) -> Limits:
    def pick(name: str, default: int) -> int:
        value = overrides.get(name)
        return value if isinstance(value, int) else default

    def caps(name: str, default: dict[str, Decimal]) -> dict[str, Decimal]:
        value = overrides.get(name)
        if not isinstance(value, dict):
            return default
        return {a: Decimal(v) for a, v in value.items()}

    return Limits(
        user_rpm=pick("requests_per_minute", conf.user_requests_per_minute),
        user_tpm=pick("tokens_per_minute", conf.user_tokens_per_minute),
        user_concurrency=pick("concurrency", conf.user_concurrency),
        paywall_rpm=conf.paywall_requests_per_minute,
        paywall_tpm=conf.paywall_tokens_per_minute,
        paywall_concurrency=conf.paywall_concurrency,
        user_daily=caps("daily_spend_cap", conf.user_daily_spend_cap),
        user_monthly=caps("monthly_spend_cap", conf.user_monthly_spend_cap),
        paywall_daily=conf.paywall_daily_spend_cap,
        paywall_monthly=conf.paywall_monthly_spend_cap,
        max_tokens=pick("max_tokens_per_request", conf.max_tokens_per_request),
        clamp=conf.max_tokens_mode == "clamp",
        timezone=conf.timezone,
        fail_open=conf.on_redis_error == "open",
        lease_seconds=conf.lease_seconds,
        blocked=overrides.get(BLOCKED) is True,
    )


def rules(limits: Limits, paywall_id: str, user_id: str, tokens: int) -> list[Rule]:
    """Limiter rules for one request estimated at ``tokens``. Keys share the paywall's
    hash tag, so one script can touch them all in a Redis cluster."""
    user = f"pl:{{{paywall_id}}}:u:{user_id}"
    app = f"pl:{{{paywall_id}}}:app"
    out = []
    for key, rpm, tpm, conc in ((user, limits.user_rpm, limits.user_tpm,
                                 limits.user_concurrency),
                                (app, limits.paywall_rpm, limits.paywall_tpm,
                                 limits.paywall_concurrency)):
        if rpm:
            out.append(Rule(key + ":rpm", "requests", rpm, 1))
        if tpm:
            out.append(Rule(key + ":tpm", "tokens", tpm, tokens))
        if conc:
            out.append(Rule(key + ":conc", "concurrency", conc, 1))
    return out


def spend_caps(limits: Limits, user_id: str, asset: str,
               assets: dict[str, AssetSettings]) -> list[SpendCap]:
    scale = assets[asset].scale
    out = []
    for scope, period, caps in (
        (user_id, "day", limits.user_daily), (user_id, "month", limits.user_monthly),
        ("", "day", limits.paywall_daily), ("", "month", limits.paywall_monthly),
    ):
        if asset in caps:
            cap = caps[asset]  # remembered unless it is no number (a NaN hashes badly)
            out.append(SpendCap(scope, period, _units(cap, scale) if cap.is_finite()
                                else units(cap, scale)))
    return out


@functools.lru_cache(maxsize=1024)
def _units(amount: Decimal, scale: int) -> int:
    """:func:`proxy.pricing.units`, remembered: the caps in use are few and converted
    for every request (an error is not remembered: it is raised again)."""
    return units(amount, scale)


def output_cap(requested: int | None, default: int, limits: Limits, field: str) -> int:
    """The output cap a request runs with: its own, else ``default``, within
    ``max_tokens_per_request`` (lowered to it, or refused, per the paywall). A cap past
    :data:`MAX_OUTPUT_TOKENS` is refused whatever the paywall's limit."""
    if requested is not None and requested > MAX_OUTPUT_TOKENS:
        raise InvalidRequest(f"'{field}' is {requested}; it can be at most "
                             f"{MAX_OUTPUT_TOKENS} tokens.", param=field,
                             code="invalid_value")
    cap = requested if requested is not None else default
    if limits.max_tokens and cap > limits.max_tokens:
        if requested is not None and not limits.clamp:
            raise InvalidRequest(
                f"'{field}' is {requested}, above this app's limit of {limits.max_tokens} "
                "tokens per request.", param=field, code="max_tokens_exceeded")
        cap = limits.max_tokens
    return cap


def parse_overrides(body: dict[str, Any], assets: dict[str, AssetSettings],
                    current: dict[str, Any]) -> dict[str, Any]:
    """Validate a PATCH body into the stored overrides; ``null`` removes one."""
    out = dict(current)
    for name in INT_OVERRIDES:
        if name not in body:
            continue
        value = body[name]
        if value is None:
            out.pop(name, None)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"'{name}' must be a non-negative integer or null.",
                                 param=name)
        else:
            out[name] = value
    for name in CAP_OVERRIDES:
        if name not in body:
            continue
        value = body[name]
        if value is None:
            out.pop(name, None)
            continue
        if not isinstance(value, dict):
            raise InvalidRequest(f"'{name}' must map assets to amounts, or be null.",
                                 param=name)
        caps = {}
        for asset, amount in value.items():
            if asset not in assets:
                raise InvalidRequest(f"Unknown asset {asset!r} in '{name}'.", param=name)
            parsed = parse_decimal(amount)
            try:
                if parsed is None or parsed < 0:
                    raise ValueError(amount)
                units(parsed, assets[asset].scale)
            except ValueError:
                raise InvalidRequest(f"'{name}.{asset}' must be a plain decimal amount "
                                     "such as \"1.50\".", param=name) from None
            caps[asset] = format(parsed, "f")
        out[name] = caps
    unknown = set(body) - {"user", *INT_OVERRIDES, *CAP_OVERRIDES}
    if unknown:
        raise InvalidRequest(f"Unknown limit(s): {', '.join(sorted(unknown))}.",
                             param=sorted(unknown)[0])
    return out


def priced_options(body: dict[str, Any], unpriced: dict[str, str]) -> None:
    """Refuse (400) what a request may ask of the provider that bills more than the
    model's configured prices: a ``service_tier`` not in :data:`PRICED_TIERS`, and each
    field of ``unpriced`` present in ``body`` (the value says why). Cheaper options
    pass: the charge is the provider's usage at the configured prices, never more."""
    tier = body.get("service_tier")
    if tier not in PRICED_TIERS:
        raise InvalidRequest(
            f"service_tier {tier!r} is billed above this model's prices; use 'auto', "
            "'default' or 'flex'.", param="service_tier")
    for key, why in unpriced.items():
        if body.get(key) is not None:
            raise InvalidRequest(f"'{key}' is not supported: {why}.", param=key)
