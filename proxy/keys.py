"""Paywall API keys: minted once, stored as digests, looked up through a short cache."""

from __future__ import annotations

import hashlib
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.tasks import Shared

KEY_PREFIX = "sk-pw-"
_ALPHABET = string.ascii_letters + string.digits
_KEY_CHARS = 32  # 32 base62 characters: about 190 bits.
_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """The app a request comes from, as proven by its key."""

    paywall_id: str
    key_id: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    paywall_id: str
    prefix: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


def new_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_KEY_CHARS))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyStore:
    """Creates, lists and revokes keys, and answers "whose key is this?".

    Answers (also "nobody's") are cached for ``cache_seconds`` at most, which bounds
    how long a revoked key keeps working. Requests that miss the cache together for one
    key share one lookup.
    """

    def __init__(self, pool: Any, cache_seconds: float = 5.0):
        self._pool = pool
        self._ttl = cache_seconds
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}
        self._looking: Shared[Principal | None] = Shared()  # lookups in flight, by digest

    async def authenticate(self, key: str) -> Principal | None:
        d = digest(key)
        now = time.monotonic()
        hit = self._cache.get(d)
        if hit is not None and hit[0] > now:
            return hit[1]
        return await self._looking.run(d, lambda: self._look_up(d, now))

    async def _look_up(self, d: bytes, started: float) -> Principal | None:
        """The key's owner, read once for all the requests that asked meanwhile."""
        row = await self._pool.fetchrow(
            "SELECT id, paywall_id FROM api_keys WHERE digest = $1 AND revoked_at IS NULL", d
        )
        principal = Principal(row["paywall_id"], row["id"]) if row else None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[d] = (started + self._ttl, principal)
        return principal

    async def create(self, paywall_id: str, name: str = "") -> tuple[str, KeyRecord]:
        key = new_key()
        row = await self._pool.fetchrow(
            "INSERT INTO api_keys (paywall_id, prefix, digest, name) VALUES ($1, $2, $3, $4)"
            " RETURNING *",
            paywall_id, key[: len(KEY_PREFIX) + 6], digest(key), name,
        )
        return key, _record(row)

    async def list(self, paywall_id: str) -> list[KeyRecord]:
        rows = await self._pool.fetch(
            "SELECT * FROM api_keys WHERE paywall_id = $1 ORDER BY id", paywall_id
        )
        return [_record(r) for r in rows]

    async def revoke(self, paywall_id: str, key_id: int) -> bool:
        status = await self._pool.execute(
            "UPDATE api_keys SET revoked_at = now()"
            " WHERE id = $1 AND paywall_id = $2 AND revoked_at IS NULL",
            key_id, paywall_id,
        )
        return bool(status == "UPDATE 1")


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row["id"], paywall_id=row["paywall_id"], prefix=row["prefix"], name=row["name"],
        created_at=row["created_at"], revoked_at=row["revoked_at"],
    )
