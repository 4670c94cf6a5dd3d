from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from proxy.links import LinkClaims, LinkSigner


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


def test_link_round_trip() -> None:
    signer = LinkSigner("secret", "https://pay.example/")
    link = signer.link("app", "user@1", "connect", 60, version=0)
    assert link.startswith("https://pay.example/connect?token=")
    claims = signer.verify(token_of(link), "connect")
    assert claims is not None and (claims.paywall_id, claims.user_id) == ("app", "user@1")


def test_links_cannot_be_forged_reused_or_kept() -> None:
    signer = LinkSigner("secret", "http://x")
    token = token_of(signer.link("app", "alice", "connect", 60, version=0))
    assert signer.verify(token, "topup") is None  # another action
    assert LinkSigner("other", "http://x").verify(token, "connect") is None  # another secret
    payload, mac = token.split(".")
    forged = LinkSigner("other", "http://x").token(LinkClaims("app", "mallory", "connect",
                                                              int(time.time()) + 60))
    assert signer.verify(forged.split(".")[0] + "." + mac, "connect") is None
    assert signer.verify(payload + "." + mac[:-2] + "AA", "connect") is None
    assert signer.verify("garbage", "connect") is None
    assert signer.verify("", "connect") is None
    assert signer.verify(token, "connect", now=time.time() + 61) is None  # expired


def test_a_connect_link_carries_the_connection_version() -> None:
    signer = LinkSigner("secret", "http://x")
    token = token_of(signer.link("app", "alice", "connect", 60, version=7))
    claims = signer.verify(token, "connect")
    assert claims is not None and claims.version == 7
    topup = signer.verify(token_of(signer.link("app", "alice", "topup", 60)), "topup")
    assert topup is not None and topup.version == 0
    with pytest.raises(ValueError, match="connection version"):
        signer.link("app", "alice", "connect", 60)


def test_links_issued_before_versions_read_as_version_0() -> None:
    signer = LinkSigner("secret", "http://x")
    payload = _b64(orjson.dumps(["app", "alice", "connect", int(time.time()) + 60]))
    claims = signer.verify(f"{payload}.{_b64(mac(b'secret', payload))}", "connect")
    assert claims == LinkClaims("app", "alice", "connect", claims.expires if claims else 0, 0)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mac(secret: bytes, payload: str) -> bytes:
    return hmac.new(hashlib.sha256(secret).digest(), payload.encode(), hashlib.sha256).digest()


SIGNER = LinkSigner("secret", "http://x")
GOOD = SIGNER.token(LinkClaims("app", "alice", "connect", 4_000_000_000, 3))
PAYLOAD, MAC = GOOD.split(".")
def signed(fields: object) -> str:
    payload = _b64(orjson.dumps(fields))
    return f"{payload}.{_b64(mac(b'secret', payload))}"


def same_bytes_other_text(text: str) -> str:
    """``text`` (unpadded base64url) with its last character's unused low bits set:
    another string for the same bytes, which a strict reader refuses."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for c in alphabet:
        other = text[:-1] + c
        if other != text and base64.urlsafe_b64decode(other + "=" * (-len(other) % 4)) == raw:
            return other
    raise AssertionError("no alias")


STRICT: list[tuple[str, str]] = [
    ("garbage-after-mac", GOOD + "garbage"),
    ("bang-after-mac", GOOD + "!!"),
    ("padding-after-mac", GOOD + "="),
    ("double-padding", GOOD + "=="),
    ("extra-dot", GOOD + "."),
    ("extra-part", GOOD + ".e30"),
    ("dot-inside-mac", PAYLOAD + "." + MAC[:20] + "." + MAC[20:]),
    ("two-dots", PAYLOAD + ".." + MAC),
    ("space-after", GOOD + " "),
    ("newline-after", GOOD + "\n"),
    ("space-before", " " + GOOD),
    ("non-ascii-after", GOOD + "\u00e9"),
    ("non-ascii-inside", PAYLOAD + "." + MAC[:10] + "\u00e9" + MAC[10:]),
    ("percent-inside", PAYLOAD + "." + MAC[:10] + "%" + MAC[10:]),
    ("standard-alphabet", GOOD.replace("-", "+").replace("_", "/")
     if ("-" in GOOD or "_" in GOOD) else GOOD + "+"),
    ("mac-alias", PAYLOAD + "." + same_bytes_other_text(MAC)),
    ("payload-padded", PAYLOAD + "=" * (-len(PAYLOAD) % 4 or 4) + "." + MAC),
    ("mac-only", "." + MAC),
    ("payload-only", PAYLOAD + "."),
    ("not-a-list", signed({"p": "app"})),
    ("too-few", signed(["app", "alice", "connect"])),
    ("too-many", signed(["app", "alice", "connect", 4_000_000_000, 3, "x"])),
    ("bool-expiry", signed(["app", "alice", "connect", True, 3])),
    ("float-version", signed(["app", "alice", "connect", 4_000_000_000, 1.5])),
    ("negative-version", signed(["app", "alice", "connect", 4_000_000_000, -1])),
    ("number-user", signed(["app", 5, "connect", 4_000_000_000, 3])),
]


@pytest.mark.parametrize("token", [t for _, t in STRICT], ids=[n for n, _ in STRICT])
def test_anything_but_the_exact_token_is_refused(token: str) -> None:
    assert SIGNER.verify(GOOD, "connect") is not None
    assert SIGNER.verify(token, "connect") is None


def test_a_link_lives_at_least_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    minted = 1_000_000.95
    monkeypatch.setattr(time, "time", lambda: minted)
    token = token_of(SIGNER.link("app", "alice", "topup", 1))
    assert SIGNER.verify(token, "topup", now=minted + 0.99) is not None
    assert SIGNER.verify(token, "topup", now=minted + 2.01) is None
