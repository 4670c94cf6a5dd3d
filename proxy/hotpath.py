"""The routes every metered request takes, dispatched without Starlette's layers.

A POST to chat completions, Responses, embeddings or Messages (also under
``/v1/{user}/``, and Messages under ``/v1/{user}/v1/``) goes straight to its endpoint:
one path lookup instead of the router's regular expression per route, one Request
instead of two, and no send wrappers (Starlette's error middleware and its two
exception layers wrap every message sent). Everything else goes to the Starlette app.

What the endpoint raises is answered by the app's own exception handlers, as Starlette
would: the handler registered for the nearest class in the error's MRO; the one for
``Exception`` answers 500 and the error is raised again (for the server to see), as
Starlette's error middleware does. The scope gets what the endpoints read: ``app``,
``endpoint`` (the route's label in metrics and logs) and ``path_params``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

Endpoint = Callable[[Request], Awaitable[Any]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotPath:
    def __init__(self, app: Starlette, endpoints: Mapping[str, Endpoint],
                 per_user: Mapping[str, Endpoint]):
        self.app = app
        # "chat/completions" → its endpoint, for /v1/chat/completions and
        # /v1/{user}/chat/completions; ``per_user`` also holds the tails only taken
        # after a user ("v1/messages").
        self.endpoints = dict(endpoints)
        self.per_user = {**endpoints, **per_user}
        self.handlers: dict[type[BaseException], Handler] = {
            cls: handler for cls, handler in app.exception_handlers.items()
            if isinstance(cls, type)}

    @property
    def state(self) -> Any:
        return self.app.state

    def route(self, scope: Mapping[str, Any]) -> tuple[Endpoint, dict[str, str]] | None:
        """The endpoint and path parameters of a hot route, else None."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        if not path.startswith("/v1/"):
            return None
        rest = path[4:]
        endpoint = self.endpoints.get(rest)
        if endpoint is not None:
            return endpoint, {}
        user, _, tail = rest.partition("/")
        endpoint = self.per_user.get(tail) if user else None
        return (endpoint, {"user": user}) if endpoint is not None else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hot = self.route(scope)
        if hot is None:
            await self.app(scope, receive, send)
            return
        endpoint, params = hot
        scope["app"] = self.app
        scope["endpoint"] = endpoint
        scope["path_params"] = params
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
            if handler is self.handlers.get(Exception):  # a crash: answered, then raised
                await response(scope, receive, send)
                raise
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
