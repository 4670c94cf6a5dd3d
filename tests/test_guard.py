"""The guardrails for one request, as tables."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from proxy import guard
from proxy.errors import InvalidRequest
from proxy.ledger import SpendCap
from proxy.settings import DEFAULT_ASSETS, LimitSettings

CONF = LimitSettings(user_requests_per_minute=60, user_tokens_per_minute=10_000,
                     user_concurrency=4, paywall_requests_per_minute=1000,
                     user_daily_spend_cap={"usd": Decimal("1")},
                     paywall_monthly_spend_cap={"usd": Decimal("100"),
                                                "standard": Decimal("50")},
                     max_tokens_per_request=1000)


def test_overrides_lay_over_the_paywall_settings() -> None:
    limits = guard.effective(CONF, {"requests_per_minute": 5, "concurrency": 0,
                                    "daily_spend_cap": {"usd": "2.5"}})
    assert (limits.user_rpm, limits.user_tpm, limits.user_concurrency) == (5, 10_000, 0)
    assert limits.paywall_rpm == 1000
    assert limits.user_daily == {"usd": Decimal("2.5")}
    assert limits.max_tokens == 1000 and limits.clamp and limits.fail_open


def test_rules_share_the_paywall_hash_tag_and_skip_zero_limits() -> None:
    rules = guard.rules(guard.effective(CONF, {}), "app", "alice", 321)
    assert [(r.key, r.kind, r.limit, r.cost) for r in rules] == [
        ("pl:{app}:u:alice:rpm", "requests", 60, 1),
        ("pl:{app}:u:alice:tpm", "tokens", 10_000, 321),
        ("pl:{app}:u:alice:conc", "concurrency", 4, 1),
        ("pl:{app}:app:rpm", "requests", 1000, 1),
    ]
    assert guard.rules(guard.effective(LimitSettings(), {}), "app", "alice", 1) == []


def test_spend_caps_for_the_asset_in_units() -> None:
    limits = guard.effective(CONF, {})
    assert guard.spend_caps(limits, "alice", "usd", DEFAULT_ASSETS) == [
        SpendCap("alice", "day", 1_000_000_000), SpendCap("", "month", 100_000_000_000)]
    assert guard.spend_caps(limits, "alice", "standard", DEFAULT_ASSETS) == [
        SpendCap("", "month", 50)]
    assert guard.spend_caps(limits, "alice", "advanced", DEFAULT_ASSETS) == []


@pytest.mark.parametrize(("requested", "mode", "expected"), [
    (None, "clamp", 1000),  # the default 4096 is lowered to the limit
    (500, "clamp", 500),
    (2000, "clamp", 1000),
    (500, "reject", 500),
    (None, "reject", 1000),  # a default is lowered, never refused
])
def test_output_cap(requested: int | None, mode: str, expected: int) -> None:
    limits = guard.effective(LimitSettings(max_tokens_per_request=1000,
                                           max_tokens_mode=mode), {})  # type: ignore[arg-type]
    assert guard.output_cap(requested, 4096, limits, "max_tokens") == expected


def test_output_cap_rejects_when_told_to() -> None:
    limits = guard.effective(LimitSettings(max_tokens_per_request=1000,
                                           max_tokens_mode="reject"), {})
    with pytest.raises(InvalidRequest) as e:
        guard.output_cap(2000, 4096, limits, "max_completion_tokens")
    assert e.value.param == "max_completion_tokens" and e.value.code == "max_tokens_exceeded"


@pytest.mark.parametrize(("requested", "max_tokens", "mode", "expected"), [
    (2**31 - 1, 0, "clamp", 2**31 - 1),  # the most an output cap can be
    (2**31, 0, "clamp", None),
    (2**31, 1000, "clamp", None),  # refused, not clamped: it is no token count at all
    (2**63, 1000, "reject", None),
    (10**30, 0, "reject", None),
    (None, 0, "clamp", 4096),
])
def test_output_caps_past_int32_are_refused(requested: int | None, max_tokens: int,
                                            mode: str, expected: int | None) -> None:
    limits = guard.effective(LimitSettings(max_tokens_per_request=max_tokens,
                                           max_tokens_mode=mode), {})  # type: ignore[arg-type]
    if expected is not None:
        assert guard.output_cap(requested, 4096, limits, "max_tokens") == expected
        return
    with pytest.raises(InvalidRequest) as e:
        guard.output_cap(requested, 4096, limits, "max_tokens")
    assert e.value.param == "max_tokens" and str(guard.MAX_OUTPUT_TOKENS) in e.value.message


def test_parse_overrides() -> None:
    current = {"requests_per_minute": 5, "concurrency": 2}
    out = guard.parse_overrides({"user": "u", "requests_per_minute": None, "tokens_per_minute": 0,
                                 "daily_spend_cap": {"usd": "0.50"}}, DEFAULT_ASSETS, current)
    assert out == {"concurrency": 2, "tokens_per_minute": 0,
                   "daily_spend_cap": {"usd": "0.50"}}


@pytest.mark.parametrize("body", [
    {"requests_per_minute": -1}, {"concurrency": "3"}, {"concurrency": True},
    {"daily_spend_cap": {"gold": "1"}}, {"daily_spend_cap": {"usd": "abc"}},
    {"daily_spend_cap": {"usd": "-1"}}, {"daily_spend_cap": {"usd": "0.0000000001"}},
    {"daily_spend_cap": "1"}, {"rpm": 3},
])
def test_parse_overrides_rejects(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        guard.parse_overrides(body, DEFAULT_ASSETS, {})


@pytest.mark.parametrize(("body", "param"), [
    ({}, None), ({"service_tier": "auto"}, None), ({"service_tier": "default"}, None),
    ({"service_tier": "flex"}, None), ({"service_tier": None}, None),
    ({"service_tier": "priority"}, "service_tier"), ({"service_tier": "scale"}, "service_tier"),
    ({"service_tier": 1}, "service_tier"),
    ({"speed": "fast"}, "speed"), ({"speed": None}, None),
])
def test_options_billed_above_the_models_prices_are_refused(body: dict[str, Any],
                                                            param: str | None) -> None:
    unpriced = {"speed": "fast mode is billed at a multiple of the model's prices"}
    if param is None:
        guard.priced_options(body, unpriced)
        return
    with pytest.raises(InvalidRequest) as refused:
        guard.priced_options(body, unpriced)
    assert refused.value.param == param


def test_the_limits_of_a_user_without_overrides_are_their_paywalls_whatever_came_before(
) -> None:
    """Made once per paywall's settings: each settings object gets its own, however many
    were made before (an id can be reused once the settings it named are gone)."""
    for rpm in range(1, 200):
        conf = LimitSettings(user_requests_per_minute=rpm, timezone="Europe/Paris")
        plain = guard.effective(conf, {})
        assert (plain.user_rpm, plain.timezone, plain.blocked) == (rpm, "Europe/Paris", False)
        assert guard.effective(conf, {}) == plain
        assert guard.effective(conf, {"requests_per_minute": rpm + 1}).user_rpm == rpm + 1
        assert guard.effective(conf, {guard.BLOCKED: True}).blocked
        assert guard.effective(conf, {}) == plain


def test_spend_caps_are_converted_for_their_assets_scale_and_refused_as_before() -> None:
    conf = LimitSettings(user_daily_spend_cap={"usd": Decimal("1"), "standard": Decimal("1")})
    limits = guard.effective(conf, {})
    for _ in range(2):  # the second time from what was remembered
        assert guard.spend_caps(limits, "u", "usd", DEFAULT_ASSETS) == [
            SpendCap("u", "day", 10 ** DEFAULT_ASSETS["usd"].scale)]
        assert guard.spend_caps(limits, "u", "standard", DEFAULT_ASSETS) == [
            SpendCap("u", "day", 1)]
    for bad in ("sNaN", "NaN", "Infinity", "0.0000000001"):
        odd = guard.effective(conf, {"daily_spend_cap": {"usd": bad}})
        for _ in range(2):
            with pytest.raises(ValueError):
                guard.spend_caps(odd, "u", "usd", DEFAULT_ASSETS)
