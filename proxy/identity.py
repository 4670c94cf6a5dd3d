"""Who the end user is: one rule, a few places to look, in a fixed order."""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import InvalidRequest

USER_HEADER = "x-paywall-user"
VALID_USER = re.compile(r"[A-Za-z0-9._:@|-]{1,128}")  # as the users table's CHECK

_HOW = (
    "pass the end user's id in the body 'user' (or 'safety_identifier') field, the "
    "X-Paywall-User header, or the path /v1/{user}/chat/completions"
)
# The body fields naming the end user, in order: OpenAI's ``user``, and
# ``safety_identifier``, the name OpenAI gives the same id now.
MODEL_FIELDS = ("user", "safety_identifier")


def resolve_user(body: dict[str, Any], header: str | None, path_user: str | None,
                 fields: tuple[str, ...] = MODEL_FIELDS) -> str:
    """The body's ``user`` field, else its ``safety_identifier``, else the
    ``X-Paywall-User`` header, else the path segment (``fields`` names the body fields
    read, in order).

    The first one present decides; it must be 1-128 letters, digits or ``._:@|-``.
    """
    found = [(name, body.get(name)) for name in fields]
    for source, value in (*found, ("X-Paywall-User", header), ("path", path_user)):
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not VALID_USER.fullmatch(value):
            raise InvalidRequest(
                f"Invalid end-user id from {source}: use 1-128 letters, digits or '._:@|-'; "
                + _HOW + ".",
                param="user",
                code="invalid_user",
            )
        return value
    raise InvalidRequest(f"Missing end-user id: {_HOW}.", param="user", code="missing_user")
