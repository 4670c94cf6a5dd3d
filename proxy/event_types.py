"""The event types the proxy writes, and the patterns subscriptions choose them by."""

from __future__ import annotations

from collections.abc import Sequence

EVENT_TYPES = (
    "balance.deposit.created", "balance.low", "balance.depleted", "balance.adjusted",
    "charge.created", "charge.refunded", "credits.granted", "user.created",
    "user.connected", "user.disconnected", "limit.reached", "request.blocked",
    "topup.checkout.completed", "topup.failed", "hold.expired",
    "webhook.subscription.disabled",
)


def matches(patterns: Sequence[str], event_type: str) -> bool:
    """Whether ``event_type`` is one of ``patterns``: exact names, ``prefix.*``, ``*``."""
    return any(p == "*" or p == event_type
               or (p.endswith(".*") and event_type.startswith(p[:-1])) for p in patterns)


def valid_pattern(pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return any(t.startswith(pattern[:-1]) for t in EVENT_TYPES)
    return pattern in EVENT_TYPES
