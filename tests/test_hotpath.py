"""The hot routes are the routes Starlette would have picked: for every path the app
serves (and a few that look like them), a POST goes to the same endpoint with the same
path parameters, or to Starlette when it is not hot."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.routing import Match, Route

from proxy import observe
from proxy import settings as config_of
from proxy.app import create_app
from proxy.errors import DatabaseUnavailable
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


class _BrokenMidStream:
    """A response whose end fails once its headers and a first event are out (as a
    relay's settlement could)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        raise RuntimeError("failed after the headers")


async def _mid_stream(request: Any) -> Any:
    return _BrokenMidStream()


async def _database_down(request: Any) -> Any:
    raise DatabaseUnavailable()  # its handler reads services, absent without a lifespan


def _served(apps: tuple[HotPath, Any], endpoint: Any, hot: bool) -> Any:
    """``endpoint`` at /v1/chat/completions behind the app's own handlers, through the
    hot path or through Starlette alone; Observe outermost, as in the app."""
    app = Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
                    exception_handlers=apps[1].exception_handlers)
    inner = HotPath(app, {endpoint}) if hot else app
    return observe.Observe(inner, {endpoint: "/v1/chat/completions"})


async def _call(app: Any) -> tuple[list[Any], Any]:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "root_path": "", "headers": [], "query_string": b"", "scheme": "http",
             "server": ("proxy", 80), "http_version": "1.1"}
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    return sent, scope["state"]["record"]


@pytest.mark.parametrize("hot", [False, True])
async def test_an_error_after_the_response_began_is_logged_and_recorded(
        apps: tuple[HotPath, Any], hot: bool, caplog: pytest.LogCaptureFixture) -> None:
    """As through Starlette: the crash handler logs it and the access line says so
    (the hot path once let it pass in silence)."""
    with caplog.at_level(logging.ERROR, logger="proxy"):
        sent, record = await _call(_served(apps, _mid_stream, hot))
    assert [m.get("status") for m in sent[:1]] == [200] and len(sent) == 2
    assert record.error == "RuntimeError"
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("hot", [False, True])
async def test_a_handler_that_fails_still_answers_the_json_500(
        apps: tuple[HotPath, Any], hot: bool) -> None:
    """An error handler that raises itself (here: no services without a lifespan) is
    answered by the crash handler's JSON 500, not the server's bare one."""
    sent, _ = await _call(_served(apps, _database_down, hot))
    assert sent[0]["status"] == 500
    assert orjson.loads(sent[1]["body"])["error"]["type"] == "server_error"
