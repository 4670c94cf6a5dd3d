"""Who the end user is: one rule, a few places to look, in a fixed order."""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import InvalidRequest

USER_HEADER = "x-paywall-user"
VALID_USER = re.compile(r"[A-Za-z0-9._:@|-]{1,128}")  # as the users table's CHECK

# The body fields naming the end user, in order: OpenAI's ``user``, and
# ``safety_identifier``, the name OpenAI gives the same id now.
MODEL_FIELDS = ("user", "safety_identifier")


def _how(fields: tuple[str, ...], route: str) -> str:
    named = f"'{fields[0]}'" + "".join(f" (or '{f}')" for f in fields[1:])
    return (f"pass the end user's id in the body {named} field, the X-Paywall-User header,"
            f" or the path /v1/{{user}}/{route}")


def resolve_user(body: dict[str, Any], header: str | None, path_user: str | None,
                 fields: tuple[str, ...] = MODEL_FIELDS, *, route: str = "chat/completions"
                 ) -> str:
    """The body's ``user`` field, else its ``safety_identifier``, else the
    ``X-Paywall-User`` header, else the path segment (``fields`` names the body fields
    read, in order).

    The first one present decides; it must be 1-128 letters, digits or ``._:@|-``. The
    400 for a missing or invalid id names ``fields[0]`` as its ``param`` and tells how
    to pass one: those fields, the header, or the path ``/v1/{user}/<route>``.
    """
    found = [(name, body.get(name)) for name in fields]
    how = _how(fields, route)
    for source, value in (*found, ("X-Paywall-User", header), ("path", path_user)):
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not VALID_USER.fullmatch(value):
            raise InvalidRequest(
                f"Invalid end-user id from {source}: use 1-128 letters, digits or '._:@|-'; "
                + how + ".",
                param=fields[0],
                code="invalid_user",
            )
        return value
    raise InvalidRequest(f"Missing end-user id: {how}.", param=fields[0], code="missing_user")
