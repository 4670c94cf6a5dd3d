"""The decision as a table."""

from __future__ import annotations

import pytest

from proxy.decide import Action, Decision, UserState, decide
from proxy.settings import PaywallSettings

OPEN = PaywallSettings(name="open")
GATED = PaywallSettings(name="gated", require_connect=True)


def user(connected: bool = True, available: int = 100, hold_id: int | None = 1) -> UserState:
    return UserState(exists=True, connected=connected, has_account=True, available=available,
                     hold_id=hold_id)


CASES = [
    ("unknown model first", GATED, False, user(connected=False), 10, Decision(Action.NOT_FOUND)),
    ("not connected, connect required", GATED, True, user(connected=False, hold_id=None), 10,
     Decision(Action.CONNECT, available=100)),
    ("not connected, not required", OPEN, True, user(connected=False), 10,
     Decision(Action.FORWARD, hold=10, available=90)),
    ("connected and funded", GATED, True, user(), 10, Decision(Action.FORWARD, 10, 90)),
    ("exactly funded", OPEN, True, user(available=10), 10, Decision(Action.FORWARD, 10, 0)),
    ("short by one", OPEN, True, user(available=9, hold_id=None), 10,
     Decision(Action.TOP_UP, available=9)),
    ("a concurrent request took the balance", OPEN, True, user(available=50, hold_id=None), 10,
     Decision(Action.TOP_UP, available=50)),
    ("free model, empty balance", OPEN, True, user(available=0), 0,
     Decision(Action.FORWARD, 0, 0)),
]


@pytest.mark.parametrize(("paywall", "known", "state", "hold", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(paywall: PaywallSettings, known: bool, state: UserState, hold: int,
                expected: Decision) -> None:
    assert decide(paywall, known, state, hold) == expected
