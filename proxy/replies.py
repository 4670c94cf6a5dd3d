"""The zero-branching replies: a connect or top-up link as an ordinary assistant message.

What a blocked request is told is the same in every wire format: a :class:`Notice`
(the text with its link, and a machine-readable ``paywall`` object), from
:func:`notice`. Each format shapes it like a provider's own answer; chat's is here —
a ``chat.completion``, or for ``stream: true`` a ``chat.completion.chunk`` SSE stream
ending in ``[DONE]`` — so an app renders it with the code it already has. Pure: they
build bytes and send nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.decide import Action, UserState
from proxy.links import LinkSigner
from proxy.pricing import format_amount
from proxy.settings import PaywallSettings


@dataclass(frozen=True, slots=True)
class Notice:
    """What a request that is not forwarded is told: ``text`` for the end user (with the
    connect or top-up link), ``paywall`` for the app, and why (``action``)."""

    action: Action
    text: str
    paywall: dict[str, Any]


def notice(signer: LinkSigner, paywall_id: str, paywall: PaywallSettings, user: str,
           action: Action, state: UserState, scale: int, asset: str, version: int = 0
           ) -> Notice:
    """The notice for ``action`` (connect, spend_cap, top_up). A connect link is signed
    for the user's connection ``version``; amounts are in ``asset`` at ``scale``."""
    ttl = paywall.link_ttl_seconds
    name = paywall.name or paywall_id
    if action is Action.CONNECT:
        url = signer.link(paywall_id, user, "connect", ttl, version=version)
        text = paywall.connect_message.format(name=name, url=url)
        info: dict[str, Any] = {"connected": False, "connect_link": url}
    elif action is Action.SPEND_CAP:
        cap = state.cap
        assert cap is not None
        label = cap.name.replace("_", " ")
        resets = cap.resets_at
        text = paywall.spend_cap_message.format(name=name, cap=label, resets=resets)
        info = {"connected": True, "spend_cap": cap.name, "cap": format_amount(cap.cap, scale),
                "spent": format_amount(cap.used, scale), "asset": asset, "resets_at": resets}
    else:
        url = signer.link(paywall_id, user, "topup", ttl)
        text = paywall.topup_message.format(name=name, url=url)
        info = {"connected": True, "balance": format_amount(state.available, scale),
                "asset": asset, "topup_link": url}
    return Notice(action, text, info)


def paywall_reply(*, request_id: str, model: str, text: str, paywall: dict[str, Any],
                  stream: bool, include_usage: bool, reply_format: str = "text"
                  ) -> tuple[bytes, str]:
    """The reply body and its content type. ``reply_format`` says where the text goes:
    "text" (the message's content), "refusal" (its refusal, content null: for a
    ``json_schema`` request) or "json_object" (content is a JSON object holding
    ``message`` and ``paywall``: for JSON mode)."""
    cid = "chatcmpl-" + request_id.removeprefix("req_")
    created = int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if reply_format == "refusal":
        said: dict[str, Any] = {"content": None, "refusal": text}
    elif reply_format == "json_object":
        said = {"content": orjson.dumps({"message": text, "paywall": paywall}).decode(),
                "refusal": None}
    else:
        said = {"content": text, "refusal": None}
    if not stream:
        body = {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", **said}}],
            "usage": usage, "paywall": paywall,
        }
        return orjson.dumps(body), "application/json"
    delta = {"role": "assistant", **{k: v for k, v in said.items() if v is not None}}

    def chunk(choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}) + b"\n\n"

    events = [
        chunk([{"index": 0, "delta": delta, "finish_reason": None}], paywall=paywall),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ]
    if include_usage:
        events.append(chunk([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events), "text/event-stream"
