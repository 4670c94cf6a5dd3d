"""Signed-in end users: the app's own sign-in token (a JWT), verified here.

An end user's ``Authorization: Bearer <token>`` proves who the user is — and nothing
more: it never moves a balance (that takes the paywall key). Per paywall, tokens are
checked against a JWKS (RS256, ES256, EdDSA…) or an HS256 secret, with issuer,
audience, expiry and ``nbf`` enforced by PyJWT; the algorithm comes from the key, never
from the token, so ``alg: none`` and key-confusion tokens fail. JWKS keys are fetched
without blocking the loop, cached, and refetched when a token names an unknown ``kid``
(at most every :data:`REFETCH_SECONDS`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.errors import AuthenticationFailed, ServiceUnavailable
from proxy.identity import VALID_USER
from proxy.settings import AuthSettings

if TYPE_CHECKING:
    import jwt

REFETCH_SECONDS = 10.0  # an unknown kid refetches the JWKS at most this often
_JWKS_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(frozen=True, slots=True)
class EndUser:
    id: str
    email: str | None


def _refused(why: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"The sign-in token was refused: {why}.", code="invalid_token")


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The sign-in keys (JWKS) could not be fetched.",
                              code="jwks_unavailable")


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class TokenVerifier:
    """Verifies one paywall's end-user tokens."""

    def __init__(self, conf: AuthSettings, session: aiohttp.ClientSession):
        self.conf = conf
        self.session = session
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched = 0.0  # monotonic time of the last JWKS fetch (0: never)
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.conf.jwks_url or self.conf.hs256_secret)

    async def verify(self, token: str | None) -> EndUser:
        import jwt  # loaded at start only where a paywall verifies tokens (≈9 MB)

        conf = self.conf
        if not self.configured:
            raise AuthenticationFailed("This paywall has no end-user sign-in configured.",
                                       code="auth_not_configured")
        if not token:
            raise AuthenticationFailed(
                "Missing sign-in token: send 'Authorization: Bearer <token>'.",
                code="missing_token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("not a JWT") from None
        key: Any
        if conf.hs256_secret:
            key, algorithms = conf.hs256_secret, ["HS256"]
        else:
            jwk = await self._key(header.get("kid"))
            key, algorithms = jwk, [jwk.algorithm_name]
        try:
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=conf.audience or None,
                issuer=conf.issuer or None, leeway=conf.leeway_seconds,
                options={"require": ["exp"], "verify_aud": bool(conf.audience)})
        except jwt.ExpiredSignatureError:
            raise _refused("it has expired") from None
        except jwt.InvalidAudienceError:
            raise _refused("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _refused("wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise _refused("algorithm not allowed") from None
        except jwt.PyJWTError as e:
            raise _refused(str(e).rstrip(".") or type(e).__name__) from None
        user = claims.get(conf.user_claim)
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not isinstance(user, str) or not VALID_USER.fullmatch(user):
            # The ledger keeps user ids of 1-128 letters, digits or ._:@|- only.
            raise _refused(f"no usable '{conf.user_claim}' claim (1-128 letters, digits "
                           "or '._:@|-')")
        email = claims.get(conf.email_claim) if conf.email_claim else None
        return EndUser(user, email if isinstance(email, str) else None)

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        stale = not self._fetched or now - self._fetched > self.conf.jwks_cache_seconds
        unknown = self._find(kid) is None and now - self._fetched > REFETCH_SECONDS
        if stale or unknown:
            async with self._lock:  # one fetch for all the requests that need it
                if self._fetched < now:
                    await self._fetch()
        found = self._find(kid)
        if found is None and not self._keys:  # the JWKS failed and we never had keys
            raise _unavailable()
        if found is None:
            raise _refused("signed with an unknown key")
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        import jwt

        self._fetched = time.monotonic()
        try:
            async with self.session.get(self.conf.jwks_url, timeout=_JWKS_TIMEOUT) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            keys = jwt.PyJWKSet.from_dict(data).keys
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError):
            if not self._keys:  # keep serving with the keys we had
                raise _unavailable() from None
            return
        self._keys = {k.key_id: k for k in keys if k.public_key_use in (None, "sig")}
