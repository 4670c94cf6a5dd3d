"""The webhook API, with the paywall key: subscriptions, their deliveries, replays.

- ``POST /v1/webhooks/subscriptions`` ``{url, events?, headers?, enabled?,
  allow_private?}`` creates one; its ``secret`` is in this answer only.
- ``GET /v1/webhooks/subscriptions`` lists the paywall's (settings-defined ones too,
  never their secrets); ``GET``/``PATCH``/``DELETE /v1/webhooks/subscriptions/{id}``.
- ``POST /v1/webhooks/subscriptions/{id}/rotate`` ``{overlap_seconds?}``: a new secret
  (shown once); the old one keeps signing too for the overlap (default 24 h).
- ``GET /v1/webhooks/deliveries?status=&type=&subscription=&limit=&before=``: the
  delivery log, newest first (``before``: the ``next_before`` of the page before).
- ``POST /v1/webhooks/deliveries/replay`` ``{event_id, subscription?}`` sends an event
  again (to one subscription, or to all that want it).

A subscription defined in the settings file is changed there: the API answers 409.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import Conflict, InvalidRequest, NotFound
from proxy.event_types import valid_pattern
from proxy.events import PrivateTarget, check_target, new_secret, new_subscription_id
from proxy.services import Services, authenticate, json_response, read_json, services_of

_FIELDS = frozenset({"url", "events", "headers", "enabled", "allow_private"})
_STATUSES = ("pending", "delivered", "failed")
MAX_PAGE = 100


async def _caller(request: Request) -> tuple[Services, str]:
    services = services_of(request)
    principal = await authenticate(request, services)
    return services, principal.paywall_id


def _card(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "object": "webhook_subscription", "name": row["name"],
            "source": row["source"], "url": row["url"], "events": list(row["types"]),
            "headers": sorted(orjson.loads(row["headers"])), "enabled": row["enabled"],
            "allow_private": row["allow_private"], "disabled_reason": row["disabled_reason"],
            "created_at": row["created_at"].astimezone(UTC).isoformat()}


async def _fields(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown field {unknown[0]!r}.", param=unknown[0])
    out: dict[str, Any] = {}
    if "url" in body or creating:
        url = body.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) \
                or len(url) > 2048:
            raise InvalidRequest("'url' must be an http:// or https:// URL.", param="url")
        out["url"] = url
    if "events" in body or creating:
        types = body.get("events", ["*"])
        if not isinstance(types, list) or not types or not all(
                isinstance(t, str) and valid_pattern(t) for t in types):
            raise InvalidRequest("'events' must list event types (names, \"prefix.*\" or "
                                 "\"*\").", param="events")
        out["types"] = types
    if "headers" in body:
        headers = body["headers"]
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k.isascii() and "\n" not in v
                for k, v in headers.items()):
            raise InvalidRequest("'headers' must map header names to strings.",
                                 param="headers")
        out["headers"] = orjson.dumps(headers).decode()
    for flag in ("enabled", "allow_private"):
        if flag in body:
            if not isinstance(body[flag], bool):
                raise InvalidRequest(f"'{flag}' must be true or false.", param=flag)
            out[flag] = body[flag]
    return out


async def _checked(fields: dict[str, Any], current: Any = None) -> None:
    url = fields.get("url", current["url"] if current else "")
    allow = fields.get("allow_private", current["allow_private"] if current else False)
    try:
        await check_target(url, allow)
    except PrivateTarget as e:
        raise InvalidRequest(f"'url' is refused: {e} (set allow_private to allow it).",
                             param="url", code="private_address") from None


async def create(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    fields = await _fields(await read_json(request, 65536), creating=True)
    await _checked(fields)
    secret = new_secret()
    row = await services.pool.fetchrow(
        "INSERT INTO webhook_subscriptions (id, paywall_id, source, url, types, secret,"
        "  headers, enabled, allow_private) VALUES ($1, $2, 'api', $3, $4, $5,"
        "  coalesce($6::jsonb, '{}'), coalesce($7, true), coalesce($8, false)) RETURNING *",
        new_subscription_id(), paywall_id, fields["url"], fields["types"], secret,
        fields.get("headers"), fields.get("enabled"), fields.get("allow_private"))
    return json_response({**_card(row), "secret": secret}, 201)


async def listing(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    rows = await services.pool.fetch(
        "SELECT * FROM webhook_subscriptions WHERE paywall_id = $1 ORDER BY created_at, id",
        paywall_id)
    return json_response({"object": "list", "data": [_card(r) for r in rows]})


async def _own(services: Services, paywall_id: str, sub_id: str) -> Any:
    row = await services.pool.fetchrow(
        "SELECT * FROM webhook_subscriptions WHERE paywall_id = $1 AND id = $2",
        paywall_id, sub_id)
    if row is None:
        raise NotFound(f"No webhook subscription {sub_id!r}.", code="not_found")
    return row


def _api_only(row: Any) -> None:
    if row["source"] != "api":
        raise Conflict(f"Subscription {row['name']!r} is defined in the settings file; "
                       "change it there.", code="defined_in_settings")


async def show(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    return json_response(_card(await _own(services, paywall_id, request.path_params["id"])))


async def change(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    row = await _own(services, paywall_id, request.path_params["id"])
    _api_only(row)
    fields = await _fields(await read_json(request, 65536), creating=False)
    if "url" in fields or "allow_private" in fields:
        await _checked(fields, row)
    if fields.get("enabled"):
        fields["disabled_reason"] = None
    sets = ", ".join(f"{k} = ${i + 3}" + ("::jsonb" if k == "headers" else "")
                     for i, k in enumerate(fields))
    if sets:
        row = await services.pool.fetchrow(
            f"UPDATE webhook_subscriptions SET {sets} WHERE paywall_id = $1 AND id = $2"
            " RETURNING *", paywall_id, row["id"], *fields.values())
    return json_response(_card(row))


async def delete(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    row = await _own(services, paywall_id, request.path_params["id"])
    _api_only(row)
    await services.pool.execute("DELETE FROM webhook_subscriptions WHERE id = $1", row["id"])
    return json_response({"id": row["id"], "object": "webhook_subscription", "deleted": True})


async def rotate(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    row = await _own(services, paywall_id, request.path_params["id"])
    _api_only(row)
    body = await read_json(request, 65536) if await request.body() else {}
    overlap = body.get("overlap_seconds", 86400)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= 604800:
        raise InvalidRequest("'overlap_seconds' must be a whole number from 0 to 604800.",
                             param="overlap_seconds")
    secret = new_secret()
    row = await services.pool.fetchrow(
        "UPDATE webhook_subscriptions SET old_secret = secret, secret = $2,"
        " old_secret_until = now() + make_interval(secs => $3) WHERE id = $1 RETURNING *",
        row["id"], secret, overlap)
    return json_response({**_card(row), "secret": secret,
                          "old_secret_valid_until": row["old_secret_until"].astimezone(UTC)
                          .isoformat()})


def _int(raw: str | None, name: str, default: int, most: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not raw.isascii() or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"'{name}' must be a whole number from 1 to {most}.", param=name)
    return int(raw)


async def deliveries(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    q = request.query_params
    status = q.get("status")
    if status is not None and status not in _STATUSES:
        raise InvalidRequest(f"'status' is one of {', '.join(_STATUSES)}.", param="status")
    limit = _int(q.get("limit"), "limit", 50, MAX_PAGE)
    seq, sub = _cursor(q.get("before"))
    rows = await services.pool.fetch(
        "SELECT d.*, e.type, e.user_id, e.created_at AS event_created_at FROM"
        " webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id"
        " JOIN events e ON e.id = d.event_id WHERE s.paywall_id = $1"
        " AND ($2::text IS NULL OR d.status = $2) AND ($3::text IS NULL OR e.type = $3)"
        " AND ($4::text IS NULL OR d.subscription_id = $4)"
        " AND ($5::bigint IS NULL OR (d.seq, d.subscription_id) < ($5, $6))"
        " ORDER BY d.seq DESC, d.subscription_id DESC LIMIT $7",
        paywall_id, status, q.get("type"), q.get("subscription"), seq, sub, limit)
    data = [{"event_id": r["event_id"], "subscription": r["subscription_id"],
             "type": r["type"], "user": r["user_id"], "status": r["status"],
             "attempts": r["attempts"], "last_status": r["last_status"],
             "last_error": r["last_error"], "seq": r["seq"],
             "next_attempt_at": r["next_attempt_at"].astimezone(UTC).isoformat()
             if r["status"] == "pending" else None,
             "delivered_at": r["delivered_at"].astimezone(UTC).isoformat()
             if r["delivered_at"] else None} for r in rows]
    more = len(rows) == limit
    cursor = f"{rows[-1]['seq']}.{rows[-1]['subscription_id']}" if more else None
    return json_response({"object": "list", "data": data, "has_more": more,
                          "next_before": cursor})


def _cursor(raw: str | None) -> tuple[int | None, str]:
    """A page's ``before``: the ``next_before`` of the page before it."""
    if raw is None:
        return None, ""
    seq, _, sub = raw.partition(".")
    if not (seq.isascii() and seq.isdigit() and len(seq) <= 18 and sub.startswith("whsub_")):
        raise InvalidRequest("'before' must be a next_before from an earlier page.",
                             param="before")
    return int(seq), sub


async def replay(request: Request) -> Response:
    services, paywall_id = await _caller(request)
    body = await read_json(request, 65536)
    event_id, sub = body.get("event_id"), body.get("subscription")
    if not isinstance(event_id, str) or (sub is not None and not isinstance(sub, str)):
        raise InvalidRequest("'event_id' (and optionally 'subscription') must be strings.",
                             param="event_id")
    event = await services.pool.fetchrow(
        "SELECT * FROM events WHERE paywall_id = $1 AND id = $2", paywall_id, event_id)
    if event is None:
        raise NotFound(f"No event {event_id!r}.", code="not_found")
    rows = await services.pool.fetch(
        "INSERT INTO webhook_deliveries (subscription_id, event_id, seq, user_key)"
        " SELECT s.id, $2, $3, coalesce($4, '') FROM webhook_subscriptions s"
        " WHERE s.paywall_id = $1 AND s.enabled AND ($5::text IS NULL OR s.id = $5)"
        "   AND paywall_wants(s.types, $6)"
        " ON CONFLICT (subscription_id, event_id) DO UPDATE SET status = 'pending',"
        "  next_attempt_at = now(), lease_until = NULL, delivered_at = NULL"
        " RETURNING subscription_id", paywall_id, event_id, event["seq"], event["user_id"],
        sub, event["type"])
    services.events.wake()
    return json_response({"event_id": event_id, "queued": [r["subscription_id"] for r in rows],
                          "at": datetime.now(UTC).isoformat()})


routes = [
    Route("/v1/webhooks/subscriptions", create, methods=["POST"]),
    Route("/v1/webhooks/subscriptions", listing, methods=["GET"]),
    Route("/v1/webhooks/subscriptions/{id}", show, methods=["GET"]),
    Route("/v1/webhooks/subscriptions/{id}", change, methods=["PATCH"]),
    Route("/v1/webhooks/subscriptions/{id}", delete, methods=["DELETE"]),
    Route("/v1/webhooks/subscriptions/{id}/rotate", rotate, methods=["POST"]),
    Route("/v1/webhooks/deliveries", deliveries, methods=["GET"]),
    Route("/v1/webhooks/deliveries/replay", replay, methods=["POST"]),
]
