from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import InvalidRequest
from proxy.identity import resolve_user

CASES: list[tuple[str, dict[str, Any], str | None, str | None, str]] = [
    ("body wins", {"user": "b"}, "h", "p", "b"),
    ("header next", {}, "h", "p", "h"),
    ("path last", {}, None, "p", "p"),
    ("empty body user falls through", {"user": ""}, "h", None, "h"),
    ("all allowed characters", {"user": "aZ09._:@|-"}, None, None, "aZ09._:@|-"),
    ("128 characters", {"user": "u" * 128}, None, None, "u" * 128),
    ("safety_identifier when user is absent", {"safety_identifier": "s"}, "h", "p", "s"),
    ("user before safety_identifier", {"user": "b", "safety_identifier": "s"}, None, None,
     "b"),
    ("empty user falls to safety_identifier", {"user": "", "safety_identifier": "s"}, None,
     None, "s"),
]


@pytest.mark.parametrize(("body", "header", "path", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_resolution_order(body: dict[str, Any], header: str | None, path: str | None,
                          expected: str) -> None:
    assert resolve_user(body, header, path) == expected


@pytest.mark.parametrize(("body", "header", "path", "code"), [
    ({}, None, None, "missing_user"),
    ({"user": "a b"}, None, None, "invalid_user"),
    ({"user": "u" * 129}, None, None, "invalid_user"),
    ({"user": 42}, None, None, "invalid_user"),
    ({"user": "ok/../x"}, None, None, "invalid_user"),
    ({}, "bad\u00e9", None, "invalid_user"),
    ({"user": "bad!"}, "good", None, "invalid_user"),  # the first one present decides
    ({"safety_identifier": "a b"}, "good", None, "invalid_user"),
])
def test_rejections(body: dict[str, Any], header: str | None, path: str | None,
                    code: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        resolve_user(body, header, path)
    assert e.value.status == 400
    assert e.value.code == code
    assert e.value.param == "user"
    assert "X-Paywall-User" in e.value.message


def test_owner_apis_read_only_user() -> None:
    with pytest.raises(InvalidRequest):
        resolve_user({"safety_identifier": "s"}, None, None, ("user",))


@pytest.mark.parametrize(("fields", "route", "says", "not_said"), [
    (("user", "safety_identifier"), "chat/completions",
     ["'user' (or 'safety_identifier')", "/v1/{user}/chat/completions"], []),
    (("user", "safety_identifier"), "responses",
     ["'user' (or 'safety_identifier')", "/v1/{user}/responses"], ["chat/completions"]),
    (("metadata.user_id",), "messages", ["'metadata.user_id'", "/v1/{user}/messages"],
     ["'user'", "safety_identifier", "chat/completions"]),
])
def test_the_message_names_the_routes_own_fields_and_path(
        fields: tuple[str, ...], route: str, says: list[str], not_said: list[str]) -> None:
    for body, code in (({}, "missing_user"), ({fields[0]: "a b"}, "invalid_user")):
        with pytest.raises(InvalidRequest) as e:
            resolve_user(body, None, None, fields, route=route)
        assert e.value.code == code
        assert e.value.param == fields[0]
        assert "X-Paywall-User" in e.value.message
        for part in says:
            assert part in e.value.message
        for part in not_said:
            assert part not in e.value.message
