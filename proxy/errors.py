"""The errors the proxy answers with, rendered the way OpenAI renders its own.

Every error a client can see is a :class:`ProxyError`; one handler in
:mod:`proxy.app` turns it into ``{"error": {"message", "type", "param", "code"}}``
with the status carried on the class, so the OpenAI SDKs raise their typed
exceptions (``BadRequestError``, ``AuthenticationError``, ...).

    ProxyError (500, server_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── PayloadTooLarge (413)
    │   ├── NotFound (404, not_found)
    │   │   └── ModelNotFound (404, model_not_found)
    │   └── MethodNotAllowed (405)
    ├── AuthenticationFailed (401, invalid_api_key)
    ├── Forbidden (403, permission_error)
    ├── PaymentRequired (402, insufficient_balance)
    ├── Conflict (409, idempotency_conflict)
    ├── RateLimited (429, rate_limit_exceeded)
    ├── LimiterUnavailable (503, rate_limiter_unavailable)
    ├── ServiceUnavailable (503, unavailable)
    │   └── DatabaseUnavailable (503, database_unavailable; Retry-After)
    ├── UpstreamUnavailable (502, upstream_unavailable)
    └── UpstreamTimeout (504, upstream_timeout)

The /api/v1 routes (gateway, end users, balances) render the same errors in the
hosted gateway's shape instead: ``{"error": message, "code": code, "details": ...}``
(:meth:`ProxyError.api_body`), and the Messages routes in Anthropic's:
``{"type": "error", "error": {"type", "message"}}`` (:meth:`ProxyError.anthropic_body`).

``ConfigError`` is separate: it stops the process at start-up and never reaches
a client.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param,
                                   "code": code}})


# Anthropic's error type for each status (its API's own pairs; others: api_error).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    402: "billing_error", 403: "permission_error", 404: "not_found_error",
                    405: "invalid_request_error", 409: "invalid_request_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    502: "api_error", 503: "overloaded_error", 504: "timeout_error"}


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.details = details
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)

    def anthropic_body(self) -> bytes:
        """The error as Anthropic's Messages API renders its own, so the Anthropic SDKs
        raise their typed exceptions: its type follows from the status."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})

    def api_body(self) -> bytes:
        out: dict[str, Any] = {"error": self.message, "code": self.code or self.type}
        if self.param:
            out["param"] = self.param
        if self.details is not None:
            out["details"] = self.details
        return orjson.dumps(out)


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class PaymentRequired(ProxyError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_balance"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_conflict"


class RateLimited(ProxyError):
    """Over a rate, token or concurrency limit; ``kind`` is OpenAI's error type for it."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, headers: dict[str, str], limit: str = ""):
        super().__init__(message, headers=headers)
        self.kind = kind
        self.limit = limit  # which: user_requests, app_concurrency, ...

    def body(self) -> bytes:
        return error_body(self.message, self.kind, None, self.code)


class LimiterUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "rate_limiter_unavailable"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """PostgreSQL cannot be reached or did not answer in time (made in one place,
    :mod:`proxy.db`). Callers that retry on their own (the reaper, the settlements)
    catch it to log one line instead of a traceback."""

    code = "database_unavailable"
    RETRY_AFTER = "1"

    def __init__(self, message: str = "The ledger database is unavailable; retry shortly."):
        super().__init__(message, headers={"retry-after": self.RETRY_AFTER})


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the file and the key."""
