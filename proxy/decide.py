"""The decision: forward a request, or answer it with a link. Pure: no I/O.

In order: an unknown model is not found; a user who has not authorized a paywall
that requires it is asked to connect; a request that would pass a spend cap is
answered with the cap and when it resets; a user whose available balance does not
cover the hold is asked to top up; everything else is forwarded.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from proxy.settings import PaywallSettings


@dataclass(frozen=True, slots=True)
class CapReached:
    name: str  # user_daily, user_monthly, paywall_daily, paywall_monthly
    cap: int
    used: int  # spent + held in the window before this request
    resets: datetime

    @property
    def resets_at(self) -> str:
        """When the window starts anew, as ISO 8601 with a Z."""
        return self.resets.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class UserState:
    """What the decision needs to know of an end user, read with the hold attempt."""

    exists: bool
    connected: bool
    has_account: bool  # for the asset asked for
    available: int  # balance - held of that asset, before this request's hold
    hold_id: int | None  # set when the hold was placed
    cap: CapReached | None = None  # the spend cap that refused the hold
    balance: int | None = None  # the posted balance, when the hold was placed


class Action(enum.Enum):
    NOT_FOUND = "not_found"
    CONNECT = "connect"
    SPEND_CAP = "spend_cap"
    TOP_UP = "top_up"
    FORWARD = "forward"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    hold: int = 0  # the amount to hold when forwarding
    available: int = 0


def decide(paywall: PaywallSettings, model_known: bool, user: UserState | None,
           hold: int) -> Decision:
    if not model_known or user is None:
        return Decision(Action.NOT_FOUND)
    if paywall.require_connect and not user.connected:
        return Decision(Action.CONNECT, available=user.available)
    if user.cap is not None:
        return Decision(Action.SPEND_CAP, available=user.available)
    # The hold was attempted with this very condition; its absence means the
    # balance did not cover it, also when a concurrent request got there first.
    if user.hold_id is None or user.available < hold:
        return Decision(Action.TOP_UP, available=user.available)
    return Decision(Action.FORWARD, hold=hold, available=user.available - hold)
