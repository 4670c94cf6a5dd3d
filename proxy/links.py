"""Signed, expiring links for connecting and topping up.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256(secret, payload))``,
unpadded; the payload names the paywall, the user, the action, the expiry and, for a
connect link, the user's connection version it was issued against, so a link can
neither be forged nor turned on another user, and a disconnect (which moves the
version on) retires every connect link issued before it. Tokens are read strictly:
exactly two parts of the base64url alphabet, each in its one canonical encoding —
nothing before, between or after them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import orjson

# 32 bytes of MAC are 43 characters unpadded.
_TOKEN = re.compile(r"([A-Za-z0-9_-]{1,2048})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True, slots=True)
class LinkClaims:
    paywall_id: str
    user_id: str
    action: str  # "connect" | "topup"
    expires: int
    version: int = 0  # the user's connection version (connect links)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """The bytes ``text`` encodes; ValueError unless it is their canonical unpadded
    base64url (a last character with stray low bits is another string, refused)."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None
    if _b64(data) != text:
        raise ValueError("not the canonical encoding")
    return data


def _claims(payload: bytes) -> LinkClaims:
    fields = orjson.loads(payload)
    if not isinstance(fields, list):
        raise ValueError("not a list")
    if len(fields) == 4:  # issued before links carried a version
        fields.append(0)
    paywall_id, user_id, action, expires, version = fields
    if not (isinstance(paywall_id, str) and isinstance(user_id, str)
            and isinstance(action, str) and _whole(expires) and _whole(version)):
        raise ValueError("bad claims")
    return LinkClaims(paywall_id, user_id, action, expires, version)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class LinkSigner:
    def __init__(self, secret: str, public_url: str):
        self._key = hashlib.sha256(secret.encode()).digest()
        self.public_url = public_url.rstrip("/")

    def token(self, claims: LinkClaims) -> str:
        payload = _b64(orjson.dumps([claims.paywall_id, claims.user_id, claims.action,
                                     claims.expires, claims.version]))
        return f"{payload}.{_b64(self._mac(payload))}"

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()

    def link(self, paywall_id: str, user_id: str, action: str, ttl: int, *,
             version: int | None = None) -> str:
        """A link for ``action``; a connect link needs the user's connection
        ``version`` (:meth:`proxy.ledger.Ledger.connect_version`) it is issued against."""
        if action == "connect" and version is None:
            raise ValueError("a connect link is issued against the user's connection version")
        claims = self.claims(paywall_id, user_id, action, ttl, version or 0)
        return f"{self.public_url}/{action}?{urlencode({'token': self.token(claims)})}"

    @staticmethod
    def claims(paywall_id: str, user_id: str, action: str, ttl: int,
               version: int = 0) -> LinkClaims:
        """The claims of a link for ``action`` valid at least ``ttl`` seconds from now: the
        expiry is a whole second, rounded up."""
        return LinkClaims(paywall_id, user_id, action, math.ceil(time.time()) + ttl, version)

    def verify(self, token: str, action: str, now: float | None = None) -> LinkClaims | None:
        """The claims of a valid, unexpired token for ``action``; None otherwise. For a
        connect link the caller still checks its ``version`` against the user's."""
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None
        payload, mac = m.groups()
        try:
            if not hmac.compare_digest(self._mac(payload), _unb64(mac)):
                return None
            claims = _claims(_unb64(payload))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if claims.action != action or claims.expires < (time.time() if now is None else now):
            return None
        return claims
