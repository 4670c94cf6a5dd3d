"""The routes every metered request takes, dispatched without Starlette's layers.

A POST to chat completions, Responses, embeddings or Messages (also under
``/v1/{user}/``, and Messages under ``/v1/{user}/v1/``) goes straight to its endpoint:
one path lookup instead of the router's regular expression per route, one Request
instead of two, and no send wrappers (Starlette's error middleware and its two
exception layers wrap every message sent). Everything else goes to the Starlette app.

What the endpoint raises is answered by the app's own exception handlers, as Starlette
would: the handler registered for the nearest class in the error's MRO. As Starlette's
error middleware does, the one for ``Exception`` sees every other error — one from the
endpoint, from sending the response (also once it has begun: then it is only logged
and recorded), from a handler itself — answers 500 unless a response has begun, and the
error is raised again for the server to see. The scope gets what the endpoints read: ``app``,
``endpoint`` (the route's label in metrics and logs) and ``path_params``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

Endpoint = Callable[[Request], Awaitable[Any]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


_PER_USER = "/v1/{user}/"


class HotPath:
    """``hot``: the endpoints taken straight; their POST routes are read from ``app``
    (those of the shapes ``/v1/<tail>`` and ``/v1/{user}/<tail>``, as declared)."""

    def __init__(self, app: Starlette, hot: Collection[Endpoint]):
        self.app = app
        self.endpoints: dict[str, Endpoint] = {}  # "chat/completions" → its endpoint
        self.per_user: dict[str, Endpoint] = {}  # … and after /v1/{user}/
        for route in app.routes:
            endpoint = getattr(route, "endpoint", None)
            if endpoint is None or endpoint not in hot \
                    or "POST" not in (getattr(route, "methods", None) or ()):
                continue
            path: str = route.path  # type: ignore[attr-defined]
            if path.startswith(_PER_USER) and "{" not in path[len(_PER_USER):]:
                self.per_user[path[len(_PER_USER):]] = endpoint
            elif path.startswith("/v1/") and "{" not in path:
                self.endpoints[path[4:]] = endpoint
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
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        crash = self.handlers.get(Exception)
        try:
            try:
                response = await endpoint(request)
                await response(scope, receive, sending)
            except Exception as exc:
                handler = self._handler(exc)
                if handler is None or handler is crash:
                    raise
                if started:  # as Starlette's exception layer says of it
                    raise RuntimeError(
                        "Caught handled exception, but response already started.") from exc
                response = await handler(request, exc)
                await response(scope, receive, sending)
        except Exception as exc:
            # Starlette's error middleware: the crash handler sees every error (it logs
            # and records it); its 500 goes out unless a response has begun; raised again.
            if crash is None:
                raise
            response = await crash(request, exc)
            if not started:
                await response(scope, receive, send)
            raise

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
