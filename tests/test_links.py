from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from proxy.links import LinkClaims, LinkSigner


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


def test_link_round_trip() -> None:
    signer = LinkSigner("secret", "https://pay.example/")
    link = signer.link("app", "user@1", "connect", 60)
    assert link.startswith("https://pay.example/connect?token=")
    claims = signer.verify(token_of(link), "connect")
    assert claims is not None and (claims.paywall_id, claims.user_id) == ("app", "user@1")


def test_links_cannot_be_forged_reused_or_kept() -> None:
    signer = LinkSigner("secret", "http://x")
    token = token_of(signer.link("app", "alice", "connect", 60))
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
