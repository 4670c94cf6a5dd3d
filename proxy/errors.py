"""The errors the proxy answers with, rendered the way OpenAI renders its own.

Every error a client can see is a :class:`ProxyError`; one handler in
:mod:`proxy.app` turns it into ``{"error": {"message", "type", "param", "code"}}``
with the status carried on the class, so the OpenAI SDKs raise their typed
exceptions (``BadRequestError``, ``AuthenticationError``, ...).

    ProxyError (500, server_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── PayloadTooLarge (413)
    │   └── ModelNotFound (404, model_not_found)
    ├── AuthenticationFailed (401, invalid_api_key)
    ├── PaymentRequired (402, insufficient_balance)
    ├── Conflict (409, idempotency_conflict)
    ├── RateLimited (429, rate_limit_exceeded)
    ├── LimiterUnavailable (503, rate_limiter_unavailable)
    ├── UpstreamUnavailable (502, upstream_unavailable)
    └── UpstreamTimeout (504, upstream_timeout)

``ConfigError`` is separate: it stops the process at start-up and never reaches
a client.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param,
                                   "code": code}})


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


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

    def __init__(self, message: str, kind: str, headers: dict[str, str]):
        super().__init__(message, headers=headers)
        self.kind = kind

    def body(self) -> bytes:
        return error_body(self.message, self.kind, None, self.code)


class LimiterUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "rate_limiter_unavailable"


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
