"""Routing: a public model's deployments, tried in turn until one begins to answer.

A model is served by one or more deployments: a provider, the model's name there, a
key or a pool of keys, a priority and a weight (``models.*.deployments``).
:meth:`Route.send` picks one — among the lowest priority that has one available, by
weight — and tries another when it fails before any of its answer was taken: it could
not be reached, did not begin in time, answered 408, 409, 429 or 5xx, or broke off
before its first chunk (a whole answer: before its last byte). Deployments not yet
tried come first; one tried again waits a backoff with full jitter. Once an answer has
begun it is the answer: nothing is retried after that, so the client sees one answer,
and since the lifecycle holds once, before the first attempt, and settles on the
answering attempt's usage, the user pays once, for the attempt that answered. Other
4xx answers are the provider's answer and are relayed as they are.

Each deployment has a circuit breaker (:class:`Breakers`): opened by
``breaker_failures`` consecutive failures (unreachable, timed out, broke off, 5xx) or
by a failure ratio over a window, skipped while open, probed by one request once the
cooldown is over (half-open), closed by a success and opened again by a failure. The
state lives in Redis when ``REDIS_URL`` is set, shared by every replica, and in the
process otherwise. A key that answered 429 rests for its Retry-After, in the process.

A model with one deployment, one key and one attempt — the single-provider form, by
default — is sent as it always was: no breaker, no header, nothing added.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import orjson

from proxy.errors import ServiceUnavailable, UpstreamTimeout, UpstreamUnavailable
from proxy.observe import Metrics
from proxy.pricing import Price, dearest, price_from
from proxy.providers import Call, Provider
from proxy.settings import RoutingSettings, Settings
from proxy.upstream import Reply, one

log = logging.getLogger("proxy.routing")


# What a provider's refusal says when a request is too long for the model's context
# window, or against its content policy (OpenAI's, Azure's and Anthropic's wording).
_TOO_LONG = ("context_length_exceeded", "context length", "context window",
             "maximum context", "prompt is too long", "too many tokens")
_POLICY = ("content_filter", "content_policy", "content policy", "content management policy")


def refusal(status: int, body: bytes) -> str | None:
    """"context_window" or "content_policy" when a 400 (or 413) answer refuses the
    request for that reason; None otherwise."""
    if status not in (400, 413):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    said = f"{error.get('code') or ''} {error.get('type') or ''} {error.get('message') or ''}"
    said = said.lower()
    if any(p in said for p in _TOO_LONG):
        return "context_window"
    if any(p in said for p in _POLICY):
        return "content_policy"
    return None


MAX_REST = 300.0  # the longest a key rests for a Retry-After, in seconds


def retried(status: int) -> bool:
    """Whether a provider's answer with ``status`` is tried again elsewhere."""
    return status in (408, 409, 429) or 500 <= status <= 599


class State(IntEnum):
    """A circuit's state, as the breaker-state gauge shows it."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class Deployment:
    name: str
    provider_id: str
    provider: Provider
    upstream: str
    priority: int
    weight: int
    keys: tuple[str, ...]  # at least one ("" when the provider takes none)
    timeout: float | None  # for a stream's first chunk; None: the upstream timeouts
    price: Price | None = None  # what the user pays when it answers; None: the model's
    answer_timeout: float | None = None  # for a whole answer; None: upstream.read_timeout
    turn: int = 0  # the pool's next key
    resting: dict[int, float] = field(default_factory=dict)  # key → usable again at

    def key(self, own: Mapping[str, str], now: float) -> tuple[int, str] | None:
        """The key to send with (its index, -1 for the paywall's own) and move the pool
        on; None while every key of the pool rests."""
        if mine := own.get(self.provider_id):
            return -1, mine
        n = len(self.keys)
        for i in range(n):
            k = (self.turn + i) % n
            if self.resting.get(k, 0.0) <= now:
                self.turn = k + 1
                return k, self.keys[k]
        return None

    def ready(self, own: Mapping[str, str], now: float) -> bool:
        return bool(own.get(self.provider_id)) or any(
            self.resting.get(k, 0.0) <= now for k in range(len(self.keys)))

    def rests_until(self) -> float:
        return min(self.resting.get(k, 0.0) for k in range(len(self.keys)))


@dataclass(frozen=True, slots=True)
class Attempt:
    """A failed attempt: the deployment and what went wrong ("HTTP 503", "timed out")."""

    deployment: str
    error: str
    status: int | None = None
    reason: str = ""  # the metrics' label: unreachable, timeout, broke_off, http_503...
    breaker: bool = True  # counts against the deployment's circuit


class RoutingFailed(UpstreamUnavailable):
    """Every attempt failed: the message and ``details`` list them."""

    def __init__(self, model: str, attempts: Sequence[Attempt]):
        listed = "; ".join(f"{a.deployment}: {a.error}" for a in attempts)
        super().__init__(
            f"The model '{model}' could not be served: {len(attempts)} attempt"
            f"{'s' if len(attempts) != 1 else ''} failed ({listed}).",
            details=[{"deployment": a.deployment, "error": a.error, "status": a.status}
                     for a in attempts])
        self.attempts = list(attempts)


class NoDeployment(ServiceUnavailable):
    code = "no_deployment_available"


class RateLimitedEverywhere(RoutingFailed):
    """Every attempt was answered 429: so is the client, with the soonest Retry-After."""

    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"

    def __init__(self, model: str, attempts: Sequence[Attempt], wait: float | None):
        super().__init__(model, attempts)
        self.headers = {"retry-after": str(max(1, math.ceil(wait or 1)))}


# ---- circuit breakers ----------------------------------------------------------------

class Store(Protocol):
    """Counters and flags that expire: what a breaker's state is kept in."""

    failures: tuple[type[Exception], ...]  # what the store raises when it is unavailable

    async def get(self, keys: Sequence[str]) -> list[int]: ...  # 0 for none

    async def incr(self, key: str, ttl: float) -> int: ...

    async def put(self, key: str, ttl: float, only_new: bool = False) -> bool: ...

    async def drop(self, keys: Sequence[str]) -> None: ...


class LocalStore:
    """A :class:`Store` in this process (one replica)."""

    failures: tuple[type[Exception], ...] = (OSError,)

    def __init__(self) -> None:
        self._items: dict[str, tuple[int, float]] = {}

    def _value(self, key: str, now: float) -> int:
        item = self._items.get(key)
        if item is None or item[1] <= now:
            self._items.pop(key, None)
            return 0
        return item[0]

    async def get(self, keys: Sequence[str]) -> list[int]:
        now = time.monotonic()
        return [self._value(k, now) for k in keys]

    async def incr(self, key: str, ttl: float) -> int:
        now = time.monotonic()
        value = self._value(key, now) + 1
        self._items[key] = value, now + ttl
        return value

    async def put(self, key: str, ttl: float, only_new: bool = False) -> bool:
        now = time.monotonic()
        if only_new and self._value(key, now):
            return False
        self._items[key] = 1, now + ttl
        return True

    async def drop(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._items.pop(k, None)


class RedisStore:
    """A :class:`Store` in Redis, shared by every replica. Short timeouts: the breaker
    is consulted in the request's path, and without it routing still works."""

    def __init__(self, url: str, read_timeout: float = 1.0, connect_timeout: float = 0.5):
        import redis.asyncio as redis  # the Redis client only where it is used
        from redis.exceptions import RedisError

        self.failures: tuple[type[Exception], ...] = (RedisError, OSError)
        self.redis = redis.Redis.from_url(url, socket_timeout=read_timeout,
                                          socket_connect_timeout=connect_timeout)

    async def get(self, keys: Sequence[str]) -> list[int]:
        return [int(v or 0) for v in await self.redis.mget(keys)]

    async def incr(self, key: str, ttl: float) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.pexpire(key, max(1, int(ttl * 1000)))
            value, _ = await pipe.execute()
        return int(value)

    async def put(self, key: str, ttl: float, only_new: bool = False) -> bool:
        return bool(await self.redis.set(key, 1, px=max(1, int(ttl * 1000)), nx=only_new))

    async def drop(self, keys: Sequence[str]) -> None:
        await self.redis.delete(*keys)

    async def close(self) -> None:
        await self.redis.aclose()


class Breakers:
    """The circuit of every deployment (by ``model/deployment``), kept in a
    :class:`Store`. Should the store fail, circuits read as closed: routing goes on
    without breakers rather than fail requests (``errors`` counts the failures)."""

    PREFIX = "paywall:breaker:"

    def __init__(self, store: Store, conf: RoutingSettings):
        self.store = store
        self.conf = conf
        self.errors = 0
        self.seen: dict[str, State] = {}  # the last state known here

    def _keys(self, name: str) -> tuple[str, str, str]:
        p = self.PREFIX + name
        return p + ":open", p + ":tripped", p + ":fails"

    async def _safely(self, work: Coroutine[Any, Any, Any], default: Any) -> Any:
        """A breaker never fails a request: should its store fail (or anything else),
        circuits read closed."""
        try:
            return await work
        except self.store.failures:
            self.errors += 1
            log.warning("circuit breakers: the store is unavailable; circuits read closed")
            return default
        except Exception:
            self.errors += 1
            log.exception("circuit breakers failed; circuits read closed")
            return default

    async def states(self, names: Sequence[str]) -> list[tuple[State, int]]:
        """Each circuit's state and its consecutive failures."""
        keys = [k for n in names for k in self._keys(n)]
        values = await self._safely(self.store.get(keys), [0] * len(keys))
        out = []
        for i, name in enumerate(names):
            is_open, tripped, fails = values[3 * i: 3 * i + 3]
            state = State.OPEN if is_open else State.HALF_OPEN if tripped else State.CLOSED
            self.seen[name] = state
            out.append((state, fails))
        return out

    async def probe(self, name: str) -> bool:
        """Claim the one probe of a half-open circuit (for as long as a cooldown)."""
        return bool(await self._safely(self.store.put(
            self.PREFIX + name + ":probe", self.conf.breaker_cooldown_seconds, only_new=True),
            True))

    async def release(self, name: str) -> None:
        """Give up a probe claimed with :meth:`probe` whose outcome says nothing."""
        await self._safely(self.store.drop([self.PREFIX + name + ":probe"]), None)

    async def record(self, name: str, ok: bool, known: tuple[State, int]) -> State:
        """Count an attempt's outcome; the circuit's state after it. ``known``: its
        state and failures as read before the attempt: a success writes nothing when
        there is nothing to clear (nor counts, unless the ratio is on), so the usual
        request pays one read."""
        await self._safely(self._record(name, ok, known), None)
        return self.seen.get(name, State.CLOSED)

    async def _record(self, name: str, ok: bool, known: tuple[State, int]) -> None:
        c = self.conf
        is_open, tripped, fails = self._keys(name)
        state, failures = known
        window = None
        if c.breaker_failure_ratio:
            slot = int(time.time() // c.breaker_window_seconds)
            window = f"{self.PREFIX}{name}:{slot}"
            attempts = await self.store.incr(window + ":n", 2 * c.breaker_window_seconds)
        if ok:
            if state is State.HALF_OPEN:  # the probe succeeded: closed, counts afresh
                done = [is_open, tripped, fails, self.PREFIX + name + ":probe"]
                if window is not None:
                    done += [window + ":n", window + ":f"]
                await self.store.drop(done)
                self.seen[name] = State.CLOSED
            elif failures:  # a success ends a run of failures, but opens nothing
                await self.store.drop([fails])
            return
        failed = await self.store.incr(fails, max(c.breaker_window_seconds,
                                                  c.breaker_cooldown_seconds))
        trip = state is State.HALF_OPEN or (c.breaker_failures and failed >= c.breaker_failures)
        if window is not None and not trip:
            bad = await self.store.incr(window + ":f", 2 * c.breaker_window_seconds)
            trip = attempts >= c.breaker_min_attempts and bad >= c.breaker_failure_ratio * attempts
        if trip:
            await self.store.put(is_open, c.breaker_cooldown_seconds)
            await self.store.put(tripped, 24 * 3600.0)
            await self.store.drop([fails, self.PREFIX + name + ":probe"])
            if self.seen.get(name) is not State.OPEN:
                log.warning("circuit of %s opened: skipped for %.0f s", name,
                            c.breaker_cooldown_seconds)
            self.seen[name] = State.OPEN

    async def close(self) -> None:
        closing = getattr(self.store, "close", None)
        if closing is not None:
            await closing()


def build_breakers(settings: Settings) -> Breakers:
    store: Store = RedisStore(settings.redis_url) if settings.redis_url else LocalStore()
    return Breakers(store, settings.routing)


# ---- the route ------------------------------------------------------------------------

def retry_after(headers: Sequence[tuple[str, str]]) -> float | None:
    """Seconds a provider asked to wait: ``retry-after-ms``, else ``retry-after`` as
    seconds or an HTTP date."""
    found = dict(headers)
    try:
        if "retry-after-ms" in found:
            ms = float(found["retry-after-ms"])
            return max(0.0, ms / 1000) if math.isfinite(ms) else None
        value = found.get("retry-after")
        if value is None:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


def _named(body: bytes, model: str) -> bytes:
    """A request body with ``model`` as its model."""
    data = orjson.loads(body)
    data["model"] = model
    return orjson.dumps(data)


async def _then(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()


class Route:
    """How one public model is sent: its deployments, in turn (module docstring)."""

    def __init__(self, model: str, deployments: Sequence[Deployment], conf: RoutingSettings,
                 breakers: Breakers, metrics: Metrics | None = None):
        self.model = model
        self.deployments = list(deployments)
        self.conf = conf
        self.breakers = breakers
        self.metrics = metrics
        self.attempts = conf.max_attempts or sum(len(d.keys) for d in deployments)
        self.breaking = bool(conf.breaker_failures or conf.breaker_failure_ratio)
        # Deployments priced apart: a charge is at the answering one's price, a hold
        # at the dearest (None: the model's price throughout).
        self.prices = {d.name: d.price for d in deployments if d.price is not None}
        self.simple = self.attempts == 1 and len(deployments) == 1 and len(
            deployments[0].keys) == 1 and not self.prices
        # Every name a deployment knows the model by, the first deployment's first (and
        # then the fallback models').
        self.upstreams = tuple(dict.fromkeys(d.upstream for d in deployments))
        self.fallbacks: dict[str, Route] = {}  # by refusal(): the model sent to instead

    def hold_price(self, price: Price) -> Price:
        """What a request to this model, priced ``price``, is held at."""
        return dearest([price, *self.prices.values()]) if self.prices else price

    def fall_back(self, reason: str, other: Route) -> None:
        """Send a request this model refuses for ``reason`` (:func:`refusal`) to ``other``."""
        self.fallbacks[reason] = other
        self.simple = False
        self.upstreams = tuple(dict.fromkeys((*self.upstreams, *other.upstreams)))

    def _circuit(self, d: Deployment) -> str:
        return f"{self.model}/{d.name}"

    async def send(self, call: Call, own_keys: Mapping[str, str]) -> Reply:
        """The answer of the first deployment that begins one; :class:`RoutingFailed`
        when every attempt failed, :class:`NoDeployment` when none could be tried.
        ``call.body`` names the first deployment's model; ``own_keys`` are the
        paywall's own provider keys."""
        if self.simple:
            d = self.deployments[0]
            return await d.provider.send(call.keyed(own_keys.get(d.provider_id) or d.keys[0]))
        reply = await self._routed(call, own_keys)
        if not self.fallbacks or reply.status not in (400, 413):
            return reply
        body = await reply.read()
        other = self.fallbacks.get(refusal(reply.status, body) or "")
        if other is None:
            reply.chunks = one(body)
            return reply
        # One hop: the fallback model's own fallbacks are not followed. Should it fail
        # too, the client gets the refusal, which says more than the fallback's failure.
        try:
            answer = await other._routed(dataclasses.replace(
                call, body=_named(call.body, other.upstreams[0])), own_keys)
        except (RoutingFailed, NoDeployment):
            reply.chunks = one(body)
            return reply
        answer.deployment = f"{other.model}/{answer.deployment}"
        answer.attempts += reply.attempts
        if self.metrics is not None and answer.ok:
            self.metrics.fallbacks.labels(self.model, answer.deployment).inc()
        return answer

    async def _routed(self, call: Call, own_keys: Mapping[str, str]) -> Reply:
        c = self.conf
        started = time.monotonic()
        tried: dict[str, int] = {}
        failed: list[Attempt] = []
        skipped: list[str] = []  # open circuits, for the error when nothing was tried
        while len(failed) < self.attempts:
            now = time.monotonic()
            if failed and now - started >= c.max_seconds:
                break
            chosen = await self._choose(tried, own_keys, now, skipped)
            if chosen is None:
                # Nothing available: wait for a resting key when that is soon enough.
                wait = self._resting_for(own_keys, now)
                if wait is None or wait > c.max_retry_after_seconds or (
                        now + wait - started >= c.max_seconds):
                    break
                await asyncio.sleep(wait)
                continue
            d, known = chosen
            picked = d.key(own_keys, now)
            assert picked is not None  # _choose took only ready deployments
            n = tried.get(d.name, 0)
            if n >= len(d.keys):  # tried again (each key once first): back off, full jitter
                left = c.max_seconds - (time.monotonic() - started)
                await asyncio.sleep(min(left, random.uniform(
                    0, c.backoff_ms * 2 ** (n - len(d.keys)) / 1000)))
            tried[d.name] = n + 1
            probing = known[0] is State.HALF_OPEN
            try:
                result = await self._attempt(d, picked, call)
            except BaseException:
                if probing:  # cancelled mid-probe: another request may probe
                    await self.breakers.release(self._circuit(d))
                raise
            if isinstance(result, Reply):
                result.deployment, result.attempts = d.name, len(failed) + 1
                self._count(d, "ok", bool(failed))
                if self.breaking:
                    try:
                        self._show(d, await self.breakers.record(self._circuit(d), True, known))
                    except BaseException:
                        await result.aclose()
                        raise
                return result
            failed.append(result)
            self._count(d, result.reason, False)
            if self.breaking and result.breaker:
                self._show(d, await self.breakers.record(self._circuit(d), False, known))
            elif probing:  # a 429, 408 or 409 says nothing of its health: probe again
                await self.breakers.release(self._circuit(d))
        if failed and all(a.status == 429 for a in failed):
            raise RateLimitedEverywhere(self.model, failed, self._resting_for(own_keys,
                                                                             time.monotonic()))
        if not failed:
            raise NoDeployment(
                f"No deployment of the model '{self.model}' is available now "
                f"({', '.join(skipped) or 'every key is resting'}); try again shortly.",
                headers={"retry-after": str(max(1, int(c.breaker_cooldown_seconds)))})
        raise RoutingFailed(self.model, failed)

    def _count(self, d: Deployment, result: str, fallback: bool) -> None:
        if self.metrics is not None:
            self.metrics.attempted(self.model, d.name, result, fallback)

    def _show(self, d: Deployment, state: State) -> None:
        if self.metrics is not None:
            self.metrics.circuit(self.model, d.name, int(state))

    async def _choose(self, tried: Mapping[str, int], own_keys: Mapping[str, str],
                      now: float, skipped: list[str]
                      ) -> tuple[Deployment, tuple[State, int]] | None:
        """A deployment to try: not yet tried before tried ones, then the lowest
        priority, then by weight; one whose circuit is open is skipped, one half-open
        only when this request gets its probe."""
        if self.breaking:
            states = await self.breakers.states([self._circuit(d) for d in self.deployments])
        else:
            states = [(State.CLOSED, 0)] * len(self.deployments)
        known = {d.name: s for d, s in zip(self.deployments, states, strict=True)}
        if self.breaking:
            for d in self.deployments:
                self._show(d, known[d.name][0])
        # A paywall that brings its own keys is sent only where they work: never on
        # the operator's keys at another provider.
        mine = [d for d in self.deployments if own_keys.get(d.provider_id)]
        usable = mine or self.deployments
        skipped[:] = [d.name + " (circuit open)" for d in usable
                      if known[d.name][0] is State.OPEN]
        available = [d for d in usable
                     if known[d.name][0] is not State.OPEN and d.ready(own_keys, now)]
        while available:
            # Fresh: a key of it not yet tried by this request.
            fresh = [d for d in available if tried.get(d.name, 0) < (
                1 if own_keys.get(d.provider_id) else len(d.keys))]
            group = fresh or available
            best = min(d.priority for d in group)
            level = [d for d in group if d.priority == best]
            d = random.choices(level, weights=[x.weight for x in level])[0]
            if known[d.name][0] is State.HALF_OPEN and not await self.breakers.probe(
                    self._circuit(d)):
                available.remove(d)
                skipped.append(d.name + " (circuit half-open, probed by another request)")
                continue
            return d, known[d.name]
        return None

    def _resting_for(self, own_keys: Mapping[str, str], now: float) -> float | None:
        """Seconds until a resting key of a deployment whose circuit is closed is usable
        again; None when no key rests (what is unavailable is so for its circuit)."""
        times = [d.rests_until() - now for d in self.deployments
                 if self.breakers.seen.get(self._circuit(d), State.CLOSED) is State.CLOSED
                 and not own_keys.get(d.provider_id) and d.rests_until() > now]
        return min(times) if times else None

    def _body(self, call: Call, d: Deployment) -> bytes:
        return call.body if d.upstream == self.upstreams[0] else _named(call.body, d.upstream)

    async def _attempt(self, d: Deployment, picked: tuple[int, str], call: Call
                       ) -> Reply | Attempt:
        """One attempt: the answer once it has begun (a stream's first chunk read, a
        whole answer read), or what went wrong."""
        k, key = picked
        sent = call.keyed(key, self._body(call, d))
        reply: Reply | None = None
        try:
            async with asyncio.timeout(d.timeout if call.stream else d.answer_timeout):
                reply = await d.provider.send(sent)
                if retried(reply.status):
                    wait = retry_after(reply.headers)
                    await reply.aclose()
                    if reply.status == 429:
                        if k >= 0:
                            d.resting[k] = time.monotonic() + min(
                                MAX_REST, wait if wait is not None else 1.0)
                        return Attempt(d.name, "HTTP 429", 429, "http_429", breaker=False)
                    return Attempt(d.name, f"HTTP {reply.status}", reply.status,
                                   f"http_{reply.status}", breaker=reply.status >= 500)
                if reply.ok and call.stream and reply.stream:
                    first = await anext(aiter(reply.chunks), None)
                    if first is not None:
                        reply.chunks = _then(first, reply.chunks)
                    return reply
            if reply.ok and not reply.stream:  # read whole: it may still break off
                async with asyncio.timeout(None if call.stream else d.answer_timeout):
                    reply.chunks = one(await reply.read())
            return reply
        except (TimeoutError, UpstreamTimeout):
            if reply is not None:
                await reply.aclose()
            return Attempt(d.name, "timed out", reason="timeout")
        except UpstreamUnavailable:
            if reply is not None:
                await reply.aclose()
                return Attempt(d.name, "broke off", reason="broke_off")
            return Attempt(d.name, "unreachable", reason="unreachable")
        except BaseException:
            if reply is not None:
                await reply.aclose()
            raise


def build_routes(settings: Settings, providers: Mapping[str, Provider], breakers: Breakers,
                 metrics: Metrics | None = None) -> dict[str, Route]:
    routes = {}
    for name, m in settings.models.items():
        deployments = [
            Deployment(d.name, d.provider, providers[d.provider], d.upstream or name,
                       d.priority, d.weight,
                       tuple(d.api_keys) or (settings.providers[d.provider].api_key,),
                       d.timeout_seconds or None,
                       None if d.price is None else price_from(
                           d.price, settings.assets[d.price.asset].scale),
                       d.answer_timeout_seconds or None)
            for d in m.deployments]
        routes[name] = Route(name, deployments, settings.routing, breakers, metrics)
    for name, m in settings.models.items():
        if m.context_window_fallback:
            routes[name].fall_back("context_window", routes[m.context_window_fallback])
        if m.content_policy_fallback:
            routes[name].fall_back("content_policy", routes[m.content_policy_fallback])
    return routes
