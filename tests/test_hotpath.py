"""The hot routes are the routes Starlette would have picked: for every path the app
serves (and a few that look like them), a POST goes to the same endpoint with the same
path parameters, or to Starlette when it is not hot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Match

from proxy import settings as config_of
from proxy.app import create_app
from proxy.hotpath import HotPath

DEMO = Path(__file__).parent.parent / "proxy" / "demo.toml"


def starlette_choice(app: Any, path: str) -> tuple[Any, dict[str, Any]] | None:
    scope = {"type": "http", "method": "POST", "path": path, "root_path": ""}
    for route in app.routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "endpoint", route), child.get("path_params", {})
    return None


@pytest.fixture(scope="module")
def apps() -> tuple[HotPath, Any]:
    observe = create_app(config_of.load(DEMO, env={"DATABASE_URL": "postgresql://unused"}))
    hot = observe.app.app  # Observe → Cors → HotPath
    assert isinstance(hot, HotPath)
    return hot, hot.app


def paths(app: Any) -> list[str]:
    out = ["/v1/chat/completions/x", "/v1/x/y/chat/completions", "/v1//chat/completions",
           "/v1/messages/count_tokens", "/v1/responses/messages", "/v1/v1/messages",
           "/v1/x/v1/responses", "/v1/chat", "/v1/", "/v2/chat/completions",
           "/v1/x/v1/v1/messages", "/v1/user@example.com/responses"]
    for route in app.routes:
        path = getattr(route, "path", None)
        if path:
            for user in ("alice", "chat", "messages", "v1", "responses"):
                out.append(path.replace("{user}", user).replace("{model:path}", "m/n")
                           .replace("{model}", "m").replace("{id}", "i"))
    return out


def test_a_hot_post_goes_where_starlette_would_send_it(apps: tuple[HotPath, Any]) -> None:
    hot, app = apps
    taken = 0
    for path in paths(app):
        mine = hot.route({"type": "http", "method": "POST", "path": path})
        theirs = starlette_choice(app, path)
        if mine is not None:
            taken += 1
            assert theirs == mine, path
        else:  # not hot: it goes to Starlette, which may serve it (not one of ours)
            assert theirs is None or theirs[0] not in hot.per_user.values(), path
    assert taken >= 20


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "DELETE"])
def test_only_a_post_is_hot(apps: tuple[HotPath, Any], method: str) -> None:
    hot, _ = apps
    assert hot.route({"type": "http", "method": method, "path": "/v1/chat/completions"}) is None
