"""The console's sessions and CSRF tokens: signed values, nothing kept server-side.

A session is a random id, an expiry and whether the operator has logged in, signed
with HMAC-SHA256 under a key derived from the admin token with scrypt — so every
replica accepts the sessions of the others, changing the token ends every session,
and a signed cookie is no cheap test of guessed tokens (each guess costs a scrypt). The login form
is served under an anonymous session of its own, so that POST too carries a CSRF token;
logging in issues a new session (a new id), never the anonymous one upgraded.

A form's CSRF token is the HMAC of its session's id: per session, never stored, and
worthless with any other session cookie. Pure: values in, values out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

COOKIE = "paywall_admin"
ANONYMOUS_SECONDS = 3600  # a login form's own session


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    expires: int  # Unix time
    operator: bool  # logged in (else: the anonymous session of the login form)


# scrypt's cost: about 0.1 s and 32 MiB per derivation, once per process.
_SCRYPT = {"n": 2**15, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


class Sessions:
    def __init__(self, token: str, hours: float):
        self._key = hashlib.scrypt(token.encode(), salt=b"paywall-admin-session", **_SCRYPT)
        self._token = token.encode()
        self.seconds = int(hours * 3600)

    def check_token(self, given: str) -> bool:
        """Whether ``given`` is the admin token (compared in constant time)."""
        return hmac.compare_digest(given.encode(), self._token)

    def new(self, now: float, *, operator: bool) -> Session:
        ttl = self.seconds if operator else ANONYMOUS_SECONDS
        return Session(secrets.token_urlsafe(18), int(now) + ttl, operator)

    def cookie(self, session: Session) -> str:
        body = f"{session.id}.{session.expires}.{int(session.operator)}"
        return f"{body}.{self._sign('session', body)}"

    def read(self, cookie: str | None, now: float) -> Session | None:
        """The session ``cookie`` carries, or None if it is missing, forged or expired."""
        parts = (cookie or "").split(".")
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in ("0", "1"):
            return None
        body = ".".join(parts[:3])
        if not hmac.compare_digest(parts[3].encode("utf-8", "replace"),
                                   self._sign("session", body).encode()):
            return None
        session = Session(parts[0], int(parts[1]), parts[2] == "1")
        return session if session.expires > now else None

    def csrf(self, session: Session) -> str:
        return self._sign("csrf", session.id)

    def csrf_ok(self, session: Session, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


class Failures:
    """Failed logins, per client address and over all: after ``per_client`` failures
    from one address (or ``overall`` from any) within ``window`` seconds, logins are
    refused until the window has passed — guessing the token online is then slow. A
    login that succeeds forgets its address's failures."""

    def __init__(self, per_client: int = 10, overall: int = 100, window: float = 60.0):
        self.per_client = per_client
        self.overall = overall
        self.window = window
        self._times: dict[str, list[float]] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        kept = [t for t in self._times.get(client, ()) if now - t < self.window]
        if kept:
            self._times[client] = kept
        else:
            self._times.pop(client, None)
        return kept

    def refused(self, client: str, now: float) -> bool:
        everyone = sum(len(self._recent(c, now)) for c in list(self._times))
        return len(self._recent(client, now)) >= self.per_client or everyone >= self.overall

    def failed(self, client: str, now: float) -> None:
        self._times.setdefault(client, []).append(now)

    def succeeded(self, client: str) -> None:
        self._times.pop(client, None)
