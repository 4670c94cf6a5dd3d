"""Signed, expiring links for connecting and topping up.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256(secret, payload))``;
the payload names the paywall, the user, the action and the expiry, so a link can
neither be forged nor turned on another user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import orjson


@dataclass(frozen=True, slots=True)
class LinkClaims:
    paywall_id: str
    user_id: str
    action: str  # "connect" | "topup"
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    def __init__(self, secret: str, public_url: str):
        self._key = hashlib.sha256(secret.encode()).digest()
        self.public_url = public_url.rstrip("/")

    def token(self, claims: LinkClaims) -> str:
        payload = _b64(orjson.dumps([claims.paywall_id, claims.user_id, claims.action,
                                     claims.expires]))
        mac = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(mac)}"

    def link(self, paywall_id: str, user_id: str, action: str, ttl: int) -> str:
        claims = LinkClaims(paywall_id, user_id, action, int(time.time()) + ttl)
        return f"{self.public_url}/{action}?{urlencode({'token': self.token(claims)})}"

    def verify(self, token: str, action: str, now: float | None = None) -> LinkClaims | None:
        """The claims of a valid, unexpired token for ``action``; None otherwise."""
        payload, _, mac = token.partition(".")
        try:
            expected = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            paywall_id, user_id, kind, expires = orjson.loads(_unb64(payload))
        except (ValueError, TypeError, orjson.JSONDecodeError):
            return None
        if kind != action or expires < (time.time() if now is None else now):
            return None
        return LinkClaims(paywall_id, user_id, kind, expires)
