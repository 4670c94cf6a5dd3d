"""Settings: declared once, read from a TOML file, checked before anything starts.

Each setting is a dataclass field with its default and its help text; the loader
walks those declarations, so a key nobody declared, a value of the wrong type or
a reference to a provider that does not exist stops start-up with a message that
names the file and the key. ``config/example.toml`` documents every declared
setting, and a test keeps it that way.

Strings may refer to the environment as ``${NAME}`` or ``${NAME:-default}``, so
secrets stay out of the file. ``DATABASE_URL``, ``REDIS_URL`` and
``PAYWALL_DATA_DIR`` come from the environment only.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import tomllib
import types
import typing
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from proxy.errors import ConfigError
from proxy.event_types import valid_pattern
from proxy.pricing import currency_exponent, price_from, units, units_per_minor

CONFIG_ENV = "PAYWALL_CONFIG"
LINK_SECRET_ENV = "PAYWALL_LINK_SECRET"
WORKERS_ENV = "PAYWALL_WORKERS"  # how many workers serve runs (set by serve for them)
DEMO_CONFIG = Path(__file__).with_name("demo.toml")


def setting(default: Any, help: str) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(8080, "TCP port to listen on.")
    workers: int = setting(1, "Worker processes (serve --workers overrides).")
    max_body_bytes: int = setting(10 * 1024 * 1024, "Largest request body accepted; 413 above.")
    max_head_bytes: int = setting(
        65536, "Largest request line plus headers accepted; 431 above, read no further.")
    head_timeout_seconds: float = setting(
        10.0, "Longest a client may take to send a request's head; 408 and closed after.")
    body_timeout_seconds: float = setting(
        60.0, "Longest a client may take to send a request's body after its head; 408 "
              "(or closed, once the answer has begun) after.")
    key_cache_seconds: float = setting(
        5.0, "How long a looked-up API key is trusted before it is checked again (max 5)."
    )
    public_url: str = setting(
        "http://127.0.0.1:8080", "Base URL end users reach the proxy at; links start with it."
    )
    link_secret: str = setting(
        "", "HMAC secret signing links; empty = $PAYWALL_LINK_SECRET, else random per start."
    )
    log_format: Literal["json", "text"] = setting(
        "json", "Log lines as JSON objects (one per request, plus events) or as plain text."
    )
    access_log: bool = setting(True, "Write one log line per request.")
    metrics_token: str = setting(
        "", "Bearer token /metrics requires; empty = /metrics is open (keep it internal)."
    )


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = setting(10.0, "Seconds to open a connection to a provider.")
    read_timeout: float = setting(600.0, "Seconds to wait for a whole non-streaming response.")
    stream_idle_timeout: float = setting(120.0, "Longest silence between two stream chunks.")
    stream_max_seconds: float = setting(1800.0, "Longest total duration of one stream.")
    pool_size: int = setting(
        4096, "Most connections per worker to providers, over all of them (one per stream).")


@dataclass(frozen=True, slots=True)
class BillingSettings:
    hold_ttl_seconds: float = setting(
        60.0, "A hold not renewed for this long is resolved by the reaper (its process died)."
    )
    reaper_interval_seconds: float = setting(
        5.0, "How often each worker renews its live holds and resolves expired ones."
    )
    synchronous_commit: bool = setting(
        True, "Wait for holds and charges to reach the disk before going on; false is "
              "faster but a database crash may lose the last charges (never deposits), "
              "and with settle_after_answer a machine's crash those of its last 0.2 s."
    )
    settle_after_answer: bool = setting(
        False, "Send a whole answer once its cost is known (and end a stream's request "
               "once it has gone) and post the charge right after (faster; with one "
               "worker and no Redis it rides the next request's batch, within 5 ms); the "
               "charge is in the process's journal (fsynced unless synchronous_commit is "
               "off) before the answer goes out, so a crash loses nothing, but a read or "
               "another worker's hold right after the answer may not see it yet."
    )
    shutdown_settle_seconds: float = setting(
        5.0, "At shutdown, how long to keep writing settlements the database refused "
             "before spooling the rest to disk."
    )
    spool_dir: str = setting(
        "", "Where settlements still owed at shutdown are spooled, one file per process, "
            "and replayed at start, and where each process journals the charges not yet in "
            "the ledger; empty = $PAYWALL_DATA_DIR/spool."
    )


@dataclass(frozen=True, slots=True)
class AssetSettings:
    scale: int = setting(0, "Decimal places of the smallest unit: 9 makes usd count in 1e-9.")
    kind: Literal["currency", "credits"] = setting(
        "currency", "'currency' (priced per token) or 'credits' (counted queries)."
    )


DEFAULT_ASSETS = {
    "usd": AssetSettings(9, "currency"),
    "standard": AssetSettings(0, "credits"),
    "advanced": AssetSettings(0, "credits"),
}


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    pool_min: int = setting(2, "Connections a worker keeps open to PostgreSQL.")
    pool_max: int = setting(20, "Most connections a worker opens to PostgreSQL.")
    connect_timeout: float = setting(
        1.0, "Seconds to wait for a new connection; past it, a request answers 503."
    )
    command_timeout: float = setting(
        5.0, "Seconds to wait for a statement's answer; past it, a request answers 503."
    )


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    kind: Literal["openai", "anthropic", "mock"] = setting(
        "openai", "'openai' for any OpenAI-compatible API, 'anthropic' for Anthropic's "
                  "Messages API, 'mock' for the built-in fake."
    )
    base_url: str = setting(
        "", "Base URL ending before /chat/completions (openai kind) or /messages "
            "(anthropic kind: https://api.anthropic.com/v1).")
    api_key: str = setting("", "The operator's built-in key; paywalls may bring their own.")
    auth_header: str = setting(
        "authorization", "Header carrying the key: 'authorization' (Bearer) or e.g. 'api-key' "
                         "(the anthropic kind always sends x-api-key)."
    )
    anthropic_version: str = setting(
        "2023-06-01", "Anthropic kind: the anthropic-version header sent upstream.")
    anthropic_betas: list[str] = setting(
        [], "Anthropic kind: the anthropic-beta features clients may turn on; others are "
            "dropped (a beta may bill above the model's prices: 1M context, fast mode).")
    headers: dict[str, str] = setting({}, "Extra headers sent with every upstream request.")
    query: dict[str, str] = setting({}, "Query parameters added upstream (e.g. api-version).")
    latency_ms: int = setting(0, "Mock: delay before the first byte.")
    chunk_delay_ms: int = setting(0, "Mock: delay between stream chunks.")
    completion_tokens: int = setting(16, "Mock: tokens in each answer.")


@dataclass(frozen=True, slots=True)
class PriceSettings:
    asset: str = setting("usd", "Asset the prices are in.")
    per_request: Decimal = setting(Decimal(0), "Price of one request, as a decimal string.")
    input_per_million: Decimal = setting(Decimal(0), "Price of 1M prompt tokens.")
    output_per_million: Decimal = setting(Decimal(0), "Price of 1M completion tokens.")
    cached_input_per_million: Decimal | None = setting(
        None, "Price of 1M cached prompt tokens (default: the input price)."
    )
    reasoning_per_million: Decimal | None = setting(
        None, "Price of 1M reasoning tokens (default: the output price)."
    )
    cache_write_per_million: Decimal | None = setting(
        None, "Price of 1M prompt tokens written to the provider's cache (Anthropic's "
              "cache_creation_input_tokens; default: the input price)."
    )


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    provider: str = setting("", "Id of the provider this deployment is on.")
    upstream: str = setting("", "Model name sent to it (default: the public name).")
    name: str = setting(
        "", "Name in X-Upstream-Deployment, the ledger and the metrics (default: the "
            "provider id, with '#2', '#3' for a provider listed again).")
    priority: int = setting(0, "Lower first: a priority is tried only when every "
                               "deployment of the ones before is unavailable or failed.")
    weight: int = setting(1, "Share of the requests among deployments of one priority.")
    api_keys: list[str] = setting(
        [], "Keys that take turns (default: the provider's api_key); one answering 429 "
            "rests for its Retry-After. A paywall's provider_keys take precedence.")
    timeout_seconds: float = setting(
        0.0, "Seconds a stream from this deployment has to send its first chunk before "
             "the next is tried; 0 = upstream.stream_idle_timeout.")
    answer_timeout_seconds: float = setting(
        0.0, "Seconds a whole (non-streaming) answer from it may take before the next is "
             "tried; 0 = upstream.read_timeout (a whole answer begins when it is done).")
    price: PriceSettings | None = setting(
        None, "What the user pays when this deployment answers, in the model's asset "
              "(default: the model's price); holds cover the dearest.")


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    max_attempts: int = setting(
        0, "Attempts a request may make, over its model's deployments; 0 = one per "
           "deployment. A model with one deployment and this 0 is sent as it always was.")
    max_seconds: float = setting(
        30.0, "No attempt starts later than this after the request's first (nor does a "
              "backoff wait past it).")
    backoff_ms: int = setting(
        100, "Wait before trying a deployment again, doubled at each retry, with full "
             "jitter (a different deployment is tried at once).")
    max_retry_after_seconds: float = setting(
        5.0, "A Retry-After the request waits for when no other deployment is left; a "
             "longer one ends the attempts.")
    breaker_failures: int = setting(
        5, "Consecutive failures (connection errors, timeouts, 5xx) that open a "
           "deployment's circuit: it is skipped for breaker_cooldown_seconds; 0 = no breaker.")
    breaker_failure_ratio: float = setting(
        0.0, "Also open it when this share of its attempts in breaker_window_seconds "
             "failed (at least breaker_min_attempts of them); 0 = off.")
    breaker_window_seconds: float = setting(60.0, "The window of breaker_failure_ratio.")
    breaker_min_attempts: int = setting(20, "Attempts in the window before the ratio counts.")
    breaker_cooldown_seconds: float = setting(
        30.0, "How long an open circuit skips its deployment; then one request probes it "
              "(half-open), closing it on success and opening it again on failure.")


@dataclass(frozen=True, slots=True)
class ModelSettings:
    provider: str = setting(
        "", "Id of the provider that serves this model (or list deployments instead).")
    upstream: str = setting("", "Model name sent to the provider (default: the public name).")
    deployments: list[DeploymentSettings] = setting(
        [], "Where this model is served, tried in turn when one fails before answering "
            "(see [routing]); instead of provider and upstream.")
    context_window_fallback: str = setting(
        "", "A model to send the request to when this one refuses it as too long for its "
            "context window (the price stays this model's).")
    content_policy_fallback: str = setting(
        "", "A model to send the request to when this one refuses it under its content "
            "policy (the price stays this model's).")
    price: PriceSettings = setting(PriceSettings(), "What the end user pays.")
    owned_by: str = setting("", "Shown in /v1/models (default: the provider id).")
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = setting(
        "max_completion_tokens", "Body field that caps the output, as this provider names it."
    )
    encoding: str = setting(
        "", "tiktoken encoding for estimates (default: the model's own, else cl100k_base)."
    )
    max_image_tokens: int = setting(
        48_169, "Most prompt tokens one image part can be billed for (holds are placed for "
        "it; an inline image for its size when larger). Default: gpt-4o-mini's high-detail "
        "maximum, the most of any OpenAI model."
    )
    prompt_margin: float = setting(
        0.0, "What the prompt's tiktoken count is multiplied by for the hold; 0 = 1.05 "
             "for openai-kind providers, 1.35 for others (Claude's tokenizer counts more)."
    )


@dataclass(frozen=True, slots=True)
class LimitSettings:
    user_requests_per_minute: int = setting(0, "Requests one user may make per minute; 0 = none.")
    user_tokens_per_minute: int = setting(
        0, "Tokens one user may use per minute (estimated on admission, corrected after)."
    )
    user_concurrency: int = setting(0, "Requests one user may have in flight at once.")
    user_daily_spend_cap: dict[str, Decimal] = setting(
        {}, "Most one user may spend per calendar day, by asset."
    )
    user_monthly_spend_cap: dict[str, Decimal] = setting(
        {}, "Most one user may spend per calendar month, by asset."
    )
    paywall_requests_per_minute: int = setting(0, "Requests the whole app may make per minute.")
    paywall_tokens_per_minute: int = setting(0, "Tokens the whole app may use per minute.")
    paywall_concurrency: int = setting(0, "Requests the whole app may have in flight at once.")
    paywall_daily_spend_cap: dict[str, Decimal] = setting(
        {}, "Most all users together may spend per calendar day, by asset."
    )
    paywall_monthly_spend_cap: dict[str, Decimal] = setting(
        {}, "Most all users together may spend per calendar month, by asset."
    )
    max_tokens_per_request: int = setting(0, "Largest output one request may ask for; 0 = any.")
    max_tokens_mode: Literal["clamp", "reject"] = setting(
        "clamp", "Above max_tokens_per_request: lower the request's cap, or answer 400."
    )
    timezone: str = setting("UTC", "Time zone whose calendar days and months the caps follow.")
    on_redis_error: Literal["open", "closed"] = setting(
        "open", "Redis unreachable: let requests through (open) or refuse them (closed)."
    )
    lease_seconds: float = setting(
        30.0, "A concurrency slot held by a process that stopped frees itself after this."
    )


@dataclass(frozen=True, slots=True)
class AuthSettings:
    jwks_url: str = setting("", "JWKS URL of the app's sign-in (RS256/ES256/EdDSA tokens).")
    hs256_secret: str = setting("", "Shared secret of HS256 tokens, instead of jwks_url.")
    issuer: str = setting("", "Required `iss` claim; empty = not checked.")
    audience: str = setting("", "Required `aud` claim; empty = not checked.")
    user_claim: str = setting("sub", "Claim holding the end user's id.")
    email_claim: str = setting("email", "Claim holding the end user's email, if any.")
    leeway_seconds: float = setting(30.0, "Clock skew tolerated on exp, nbf and iat.")
    jwks_cache_seconds: float = setting(
        300.0, "How long fetched keys are used before a refetch; an unknown kid refetches "
               "at once (at most every 10 s).")


@dataclass(frozen=True, slots=True)
class PlanSettings:
    name: str = setting("", "Shown to end users.")
    credits: dict[str, int] = setting({}, "Credits of each type one grant of the plan adds.")


@dataclass(frozen=True, slots=True)
class CreditSettings:
    types: list[str] = setting([], "Credit types (credit assets) the app's users hold.")
    trial: dict[str, int] = setting({}, "Credits granted once to each new end user.")
    plans: dict[str, PlanSettings] = setting({}, "Plans by id; granting one credits its counts.")


@dataclass(frozen=True, slots=True)
class ApiProviderSettings:
    url: str = setting("", "Upstream URL; the path after the provider id is appended to it.")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = setting(
        "POST", "HTTP method of the upstream call; the only one clients may use.")
    headers: dict[str, str] = setting(
        {}, "Headers sent upstream, over the client's (put secrets in via ${ENV}).")
    body: dict[str, Any] = setting({}, "Default JSON body fields; the client's fields win.")
    query_type: str = setting("standard", "Credit type one call costs; \"free\" costs none.")


@dataclass(frozen=True, slots=True)
class EventSettings:
    deliver: bool = setting(True, "Deliver webhooks from this process (every worker shares "
                                  "the work); false = only write events.")
    poll_seconds: float = setting(
        1.0, "Longest a worker waits for new events or due retries when it has none.")
    timeout_seconds: float = setting(10.0, "Longest one delivery may take, connect to answer.")
    retry_hours: float = setting(
        72.0, "How long a delivery is retried after its event; then it is given up, and a "
              "subscription with no success for as long is disabled.")
    first_retry_seconds: float = setting(5.0, "Wait before the first retry, doubled each time.")
    max_retry_seconds: float = setting(3600.0, "Longest wait between two retries.")
    batch: int = setting(50, "Deliveries a worker sends at once.")
    sample_seconds: float = setting(
        60.0, "request.blocked and limit.reached: at most one per user, reason and window "
              "of this many seconds (each counts the occurrences it stands for).")
    retention_days: int = setting(
        30, "Events older than this with nothing left to deliver are deleted.")


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str = setting("", "Where events are POSTed (http:// or https://).")
    events: list[str] = setting(["*"], "Event types sent: names, \"prefix.*\" or \"*\".")
    secret: str = setting("", "Signing secret (whsec_ + base64), e.g. \"${APP_WEBHOOK_SECRET}\".")
    headers: dict[str, str] = setting({}, "Extra headers sent with every delivery.")
    enabled: bool = setting(True, "Deliver to it; false keeps it without sending.")
    allow_private: bool = setting(
        False, "Allow a loopback or private address (refused otherwise: no SSRF).")


@dataclass(frozen=True, slots=True)
class PackSettings:
    name: str = setting("", "Shown to end users, e.g. \"100 queries\".")
    asset: str = setting("", "The credit type the pack adds (one of credits.types).")
    credits: int = setting(0, "How many credits of `asset` one pack adds.")
    price: Decimal = setting(Decimal(0), "What it costs, in `payments.currency` (or "
                             "stripe_price).")
    stripe_price: str = setting("", "A Stripe Price id (price_...) to charge instead of `price`.")


@dataclass(frozen=True, slots=True)
class PaymentSettings:
    stripe_secret_key: str = setting(
        "", "Stripe secret key (sk_... or a restricted rk_...), e.g. \"${STRIPE_SECRET_KEY}\"; "
            "empty = no Stripe: the top-up page links to checkout_url.")
    stripe_webhook_secret: str = setting(
        "", "Signing secret (whsec_...) of the webhook endpoint /webhooks/stripe/{paywall}.")
    stripe_api_base: str = setting(
        "https://api.stripe.com", "Stripe's API address (a Stripe-compatible test server "
                                  "may stand in for it).")
    webhook_tolerance_seconds: int = setting(
        300, "Oldest a webhook's signature timestamp may be; older ones are refused (400).")
    currency: str = setting("usd", "Currency end users pay in (ISO code, lower case).")
    asset_per_unit: Decimal = setting(
        Decimal(1), "How much of the paywall's `asset` one unit of `currency` buys.")
    amounts: list[Decimal] = setting(
        [Decimal(5), Decimal(10), Decimal(20)],
        "Fixed top-up amounts offered, in `currency`.")
    custom_min: Decimal = setting(Decimal(0), "Smallest custom amount; 0 = no custom amount.")
    custom_max: Decimal = setting(Decimal(500), "Largest custom amount.")
    packs: dict[str, PackSettings] = setting({}, "Credit packs by id, for credit paywalls.")
    success_url: str = setting(
        "", "Where Checkout returns after paying ({CHECKOUT_SESSION_ID} is filled in by "
            "Stripe); empty = the proxy's own receipt page.")
    cancel_url: str = setting("", "Where Checkout returns when abandoned; empty = the top-up "
                                  "page.")
    auto_recharge: bool = setting(
        False, "Offer automatic recharge: end users may save their card on the top-up page "
               "and be charged their chosen amount when under their threshold.")
    recharge_max_failures: int = setting(
        3, "Failed automatic recharges in a row after which none is tried until the user "
           "saves a card again.")
    recharge_retry_seconds: float = setting(
        60.0, "Wait before retrying a failed automatic recharge, doubled after each failure.")


@dataclass(frozen=True, slots=True)
class PaywallSettings:
    name: str = setting("", "The app's name, shown to end users.")
    provider_keys: dict[str, str] = setting(
        {}, "Bring-your-own keys: provider id -> key, used instead of the built-in one."
    )
    require_connect: bool = setting(
        False, "End users must authorize the app (connect link) before anything is charged."
    )
    asset: str = setting("usd", "Asset of the starter grant.")
    starter_grant: Decimal = setting(Decimal(0), "Granted to each new end user, in `asset`.")
    markup_percent: Decimal = setting(Decimal(0), "Added to every model price, in percent.")
    max_output_tokens: int = setting(
        4096, "Output cap sent upstream when a request sets none; it bounds each hold."
    )
    checkout_url: str = setting(
        "", "Where the top-up page sends end users to pay when payments has no Stripe key.")
    link_ttl_seconds: int = setting(3600, "How long a connect or top-up link stays valid.")
    connect_message: str = setting(
        "To continue, please authorize {name} to charge your account: {url}",
        "Assistant reply asking to connect; {name} and {url} are filled in.",
    )
    topup_message: str = setting(
        "Your balance is too low to continue. Top up your {name} balance here: {url}",
        "Assistant reply asking for a top-up; {name} and {url} are filled in.",
    )
    spend_cap_message: str = setting(
        "You have reached the {cap} spending limit of {name}. It resets at {resets}.",
        "Assistant reply when a spend cap is reached; {name}, {cap} and {resets} are filled in.",
    )
    limits: LimitSettings = setting(LimitSettings(), "Rate, token, concurrency and spend limits.")
    auth: AuthSettings = setting(AuthSettings(), "Verifying end users' sign-in tokens (JWT).")
    credits: CreditSettings = setting(CreditSettings(), "Query-type credits and plans.")
    allowed_origins: list[str] = setting(
        [], "Browser origins (scheme://host[:port]) allowed to call /api/v1 (CORS).")
    payments: PaymentSettings = setting(
        PaymentSettings(), "Top-ups through Stripe Checkout, confirmed by signed webhooks.")
    webhooks: dict[str, WebhookSettings] = setting(
        {}, "Webhook subscriptions by name: the paywall's events, signed (Standard Webhooks).")
    low_balance: dict[str, Decimal] = setting(
        {}, "balance.low is sent when a user's balance falls under this, by asset.")


@dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str = setting(
        "", "The operator's token that logs in to /admin; empty = the console is off (404).")
    session_hours: float = setting(8.0, "How long a console login lasts.")
    operator: str = setting(
        "admin", "Operator name written in the metadata of every console action.")


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = setting(ServerSettings(), "The HTTP server.")
    upstream: UpstreamSettings = setting(UpstreamSettings(), "Calls to providers.")
    database: DatabaseSettings = setting(DatabaseSettings(), "The PostgreSQL pool.")
    billing: BillingSettings = setting(BillingSettings(), "Holds and their reaper.")
    assets: dict[str, AssetSettings] = setting(
        {}, "Assets beyond the built-in usd (scale 9), standard and advanced credits."
    )
    providers: dict[str, ProviderSettings] = setting({}, "Providers by id.")
    models: dict[str, ModelSettings] = setting({}, "Public model names.")
    routing: RoutingSettings = setting(
        RoutingSettings(), "Retries and fallbacks over a model's deployments.")
    paywalls: dict[str, PaywallSettings] = setting({}, "Paywalls (apps) by id.")
    api_providers: dict[str, ApiProviderSettings] = setting(
        {}, "HTTP APIs the gateway calls for apps without a backend, by id.")
    events: EventSettings = setting(EventSettings(), "Events and their webhook delivery.")
    admin: AdminSettings = setting(AdminSettings(), "The operator's console at /admin.")
    # From the environment, never from the file.
    source: str = field(default="<defaults>", metadata={"env": True})
    database_url: str | None = field(default=None, metadata={"env": True})
    redis_url: str | None = field(default=None, metadata={"env": True})
    data_dir: str = field(default=".paywall", metadata={"env": True})


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load(path: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None) -> Settings:
    """Read and check the settings file (``path``, else ``$PAYWALL_CONFIG``, else the demo)."""
    env = os.environ if env is None else env
    chosen = Path(path or env.get(CONFIG_ENV) or DEMO_CONFIG)
    try:
        raw = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: no such settings file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{chosen}: not valid TOML: {e}") from None
    reader = _Reader(str(chosen), env)
    values = reader.section(Settings, raw, "")
    values["assets"] = {**DEFAULT_ASSETS, **values.get("assets", {})}
    server = values.get("server", ServerSettings())
    if not server.link_secret and env.get(LINK_SECRET_ENV):
        values["server"] = dataclasses.replace(server, link_secret=env[LINK_SECRET_ENV])
    settings = Settings(
        **values,
        source=str(chosen),
        database_url=env.get("DATABASE_URL") or None,
        redis_url=env.get("REDIS_URL") or None,
        data_dir=env.get("PAYWALL_DATA_DIR") or ".paywall",
    )
    settings = _with_deployments(settings)
    _check_references(settings)
    return _with_margins(settings)


def _with_deployments(s: Settings) -> Settings:
    """Every model with its deployments: the single-provider form is one deployment. A
    model's provider and upstream are its first deployment's."""
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{s.source}: {key}: {problem}")

    models = {}
    for name, m in s.models.items():
        key = f"models.{name}"
        if not m.deployments:
            one = DeploymentSettings(provider=m.provider, upstream=m.upstream, name=m.provider)
            models[name] = dataclasses.replace(m, deployments=[one])
            continue
        if m.provider or m.upstream:
            raise fail(key, "give provider and upstream, or deployments, not both")
        named: list[DeploymentSettings] = []
        seen: dict[str, int] = {}
        for i, d in enumerate(m.deployments):
            where = f"{key}.deployments[{i}]"
            if d.provider not in s.providers:
                known = ", ".join(s.providers) or "none"
                raise fail(f"{where}.provider", f"unknown provider {d.provider!r} (known: {known})")
            if d.weight < 1:
                raise fail(f"{where}.weight", "must be at least 1")
            if d.price is not None:
                if d.price.asset != m.price.asset:
                    raise fail(f"{where}.price.asset", f"must be the model's, {m.price.asset!r}")
                try:
                    price_from(d.price, s.assets[d.price.asset].scale)
                except (ValueError, KeyError) as e:
                    raise fail(f"{where}.price", str(e)) from None
            label = d.name
            if not label:
                seen[d.provider] = seen.get(d.provider, 0) + 1
                label = d.provider + (f"#{seen[d.provider]}" if seen[d.provider] > 1 else "")
            if any(n.name == label for n in named):
                raise fail(f"{where}.name", f"two deployments are named {label!r}")
            named.append(dataclasses.replace(d, name=label))
        kinds = {s.providers[d.provider].kind == "anthropic" for d in named}
        if len(kinds) > 1:
            raise fail(f"{key}.deployments", "the deployments of a model speak one wire "
                                             "format: all anthropic, or none")
        models[name] = dataclasses.replace(m, provider=named[0].provider,
                                           upstream=named[0].upstream, deployments=named)
    for name, m in models.items():
        for key in ("context_window_fallback", "content_policy_fallback"):
            other = getattr(m, key)
            if not other:
                continue
            if other == name or other not in models:
                raise fail(f"models.{name}.{key}", f"not another model: {other!r}")
            if ((s.providers[m.provider].kind == "anthropic")
                    != (s.providers[models[other].provider].kind == "anthropic")):
                raise fail(f"models.{name}.{key}", "a fallback speaks the model's wire format")
            if models[other].max_tokens_field != m.max_tokens_field:
                raise fail(f"models.{name}.{key}", "a fallback caps output in the model's "
                                                   f"field ({m.max_tokens_field})")
    r = s.routing
    if min(r.max_seconds, r.breaker_window_seconds, r.breaker_cooldown_seconds) <= 0 or (
            not 0 <= r.breaker_failure_ratio <= 1):
        raise fail("routing", "max_seconds, breaker_window_seconds and "
                              "breaker_cooldown_seconds must be more than 0, "
                              "breaker_failure_ratio from 0 to 1")
    return dataclasses.replace(s, models=models)


# The prompt margins by provider kind (models.*.prompt_margin = 0): tiktoken is the
# tokenizer of OpenAI's models; other providers' count more for the same text.
PROMPT_MARGINS = {"openai": 1.05, "mock": 1.05}
OTHER_PROMPT_MARGIN = 1.35


def _with_margins(s: Settings) -> Settings:
    for name, m in s.models.items():
        if m.prompt_margin and not 1 <= m.prompt_margin <= 10:
            raise ConfigError(f"{s.source}: models.{name}.prompt_margin: must be 0 (by the "
                              f"provider's kind) or from 1 to 10, got {m.prompt_margin}")
    models = {name: m if m.prompt_margin else dataclasses.replace(
        m, prompt_margin=PROMPT_MARGINS.get(s.providers[m.provider].kind, OTHER_PROMPT_MARGIN))
        for name, m in s.models.items()}
    return dataclasses.replace(s, models=models)


def declared(cls: type[Any] = Settings, prefix: str = "") -> list[str]:
    """Dotted paths of every declared setting, with ``*`` for table names users choose."""
    paths: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("env"):
            continue
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            paths += declared(typing.cast(type, tp), path + ".")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            paths += declared(typing.get_args(tp)[1], path + ".*.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            paths += declared(typing.get_args(tp)[0], path + ".*.")  # each item
        else:
            paths.append(path)
    return paths


class _Reader:
    def __init__(self, source: str, env: Mapping[str, str]):
        self.source = source
        self.env = env

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {problem}")

    def section(self, cls: type[Any], raw: Any, key: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(key or "<top>", "expected a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("env")}
        for name in raw:
            if name not in fields:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown setting (known: {', '.join(fields)})")
        return {
            name: self.value(hints[name], raw[name], f"{key}.{name}" if key else name)
            for name in fields
            if name in raw
        }

    def value(self, tp: Any, raw: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            cls = typing.cast(type, tp)
            return cls(**self.section(cls, raw, key))
        if origin is dict:
            if not isinstance(raw, dict):
                raise self.fail(key, "expected a table")
            inner = typing.get_args(tp)[1]
            return {str(k): self.value(inner, v, f"{key}.{k}") for k, v in raw.items()}
        if origin is list:
            if not isinstance(raw, list):
                raise self.fail(key, "expected an array")
            inner = typing.get_args(tp)[0]
            return [self.value(inner, v, f"{key}[{i}]") for i, v in enumerate(raw)]
        if tp is Any:  # free-form JSON: strings are interpolated, nothing else is checked
            if isinstance(raw, str):
                return self.interpolate(raw, key)
            if isinstance(raw, list):
                return [self.value(Any, v, f"{key}[{i}]") for i, v in enumerate(raw)]
            if isinstance(raw, dict):
                return {str(k): self.value(Any, v, f"{key}.{k}") for k, v in raw.items()}
            return raw
        if origin is Literal:
            choices = typing.get_args(tp)
            value = self.value(str, raw, key)
            if value not in choices:
                raise self.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {raw!r}")
            return value
        if origin in (types.UnionType, typing.Union):
            return self.value(typing.get_args(tp)[0], raw, key)
        if tp is str:
            if not isinstance(raw, str):
                raise self.fail(key, f"expected a string, got {raw!r}")
            return self.interpolate(raw, key)
        if tp is bool:
            if not isinstance(raw, bool):
                raise self.fail(key, f"expected true or false, got {raw!r}")
            return raw
        if tp is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise self.fail(key, f"expected an integer, got {raw!r}")
            if raw < 0:
                raise self.fail(key, f"must not be negative, got {raw}")
            return raw
        if tp is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
                raise self.fail(key, f"expected a non-negative number, got {raw!r}")
            return float(raw)
        if tp is Decimal:
            # Money never passes through a float: prices are strings or integers.
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise self.fail(key, f"expected a decimal string such as \"0.15\", got {raw!r}")
            try:
                amount = Decimal(self.interpolate(raw, key) if isinstance(raw, str) else raw)
            except InvalidOperation:
                raise self.fail(key, f"not a decimal number: {raw!r}") from None
            if not amount.is_finite() or amount < 0:
                raise self.fail(key, f"must be a non-negative number, got {raw!r}")
            return amount
        raise AssertionError(f"undeclared setting type {tp!r}")

    def interpolate(self, text: str, key: str) -> str:
        def substitute(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            raise self.fail(key, f"environment variable {name} is not set")

        return _ENV_REF.sub(substitute, text)


def _check_references(s: Settings) -> None:
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{s.source}: {key}: {problem}")

    _check_api_providers(s, fail)
    ev = s.events
    if min(ev.poll_seconds, ev.timeout_seconds, ev.retry_hours, ev.first_retry_seconds,
           ev.max_retry_seconds, ev.sample_seconds) <= 0 or ev.batch < 1:
        raise fail("events", "times, the batch and the window must be more than 0")
    b = s.billing
    if b.reaper_interval_seconds <= 0:
        raise fail("billing.reaper_interval_seconds", "must be more than 0")
    if b.hold_ttl_seconds < 2 * b.reaper_interval_seconds:
        raise fail("billing.hold_ttl_seconds",
                   "must be at least twice billing.reaper_interval_seconds, or live holds "
                   "would expire between renewals")
    for key in ("read_timeout", "stream_idle_timeout", "stream_max_seconds"):
        if getattr(s.upstream, key) <= 0:
            raise fail(f"upstream.{key}", "must be more than 0")
    for key in ("max_head_bytes", "head_timeout_seconds", "body_timeout_seconds"):
        if getattr(s.server, key) <= 0:
            raise fail(f"server.{key}", "must be more than 0")
    if s.server.key_cache_seconds > 5:
        raise fail("server.key_cache_seconds", "must be at most 5 so revocation is prompt")
    if s.admin.token and (len(s.admin.token) < 24 or len(set(s.admin.token)) < 12):
        raise fail("admin.token", "must be 24 characters or more, not a repetition "
                                  "(`python -c 'import secrets; print(secrets.token_urlsafe"
                                  "(32))'`), or empty: console off")
    if s.admin.session_hours <= 0 or not s.admin.operator.strip():
        raise fail("admin", "session_hours must be more than 0 and operator not empty")
    for pid, p in s.providers.items():
        if p.kind == "openai" and not p.base_url.startswith(("http://", "https://")):
            raise fail(f"providers.{pid}.base_url", "an http:// or https:// URL is required")
    for name, m in s.models.items():
        if m.provider not in s.providers:
            known = ", ".join(s.providers) or "none"
            raise fail(f"models.{name}.provider",
                       f"unknown provider {m.provider!r} (known: {known})")
        if m.max_image_tokens < 0:
            raise fail(f"models.{name}.max_image_tokens", "must be 0 or more")
        if m.price.asset not in s.assets:
            raise fail(f"models.{name}.price.asset", f"unknown asset {m.price.asset!r}")
        try:
            price_from(m.price, s.assets[m.price.asset].scale)
        except ValueError as e:
            raise fail(f"models.{name}.price", str(e)) from None
    for wid, w in s.paywalls.items():
        for pid in w.provider_keys:
            if pid not in s.providers:
                raise fail(f"paywalls.{wid}.provider_keys.{pid}", "unknown provider")
        if w.asset not in s.assets:
            raise fail(f"paywalls.{wid}.asset", f"unknown asset {w.asset!r}")
        try:
            units(w.starter_grant, s.assets[w.asset].scale)
        except ValueError as e:
            raise fail(f"paywalls.{wid}.starter_grant", str(e)) from None
        if w.markup_percent.as_tuple().exponent < -2:  # type: ignore[operator]
            raise fail(f"paywalls.{wid}.markup_percent", "at most two decimal places")
        for template, fields in (("connect_message", ("name", "url")),
                                 ("topup_message", ("name", "url")),
                                 ("spend_cap_message", ("name", "cap", "resets"))):
            try:
                getattr(w, template).format(**dict.fromkeys(fields, ""))
            except (KeyError, IndexError, ValueError):
                allowed = " and ".join("{" + f + "}" for f in fields)
                raise fail(f"paywalls.{wid}.{template}",
                           f"only {allowed} may be filled in") from None
        _check_credits(s, wid, w, fail)
        _check_payments(s, wid, w, fail)
        _check_webhooks(s, wid, w, fail)
        if w.auth.jwks_url and w.auth.hs256_secret:
            raise fail(f"paywalls.{wid}.auth", "set jwks_url or hs256_secret, not both")
        if w.auth.jwks_url and not w.auth.jwks_url.startswith(("http://", "https://")):
            raise fail(f"paywalls.{wid}.auth.jwks_url", "an http:// or https:// URL is required")
        if w.auth.jwks_url and not w.auth.audience:
            # A shared sign-in provider signs tokens for many apps with the same keys.
            raise fail(f"paywalls.{wid}.auth.audience",
                       "required with jwks_url: the keys may sign other apps' tokens too")
        for i, o in enumerate(w.allowed_origins):
            if not re.fullmatch(r"https?://[^/\s]+", o):
                raise fail(f"paywalls.{wid}.allowed_origins[{i}]",
                           f"an origin is scheme://host[:port] with no path, got {o!r}")
        lim = w.limits
        if lim.lease_seconds <= 0:
            raise fail(f"paywalls.{wid}.limits.lease_seconds", "must be more than 0")
        try:
            zoneinfo.ZoneInfo(lim.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise fail(f"paywalls.{wid}.limits.timezone",
                       f"unknown time zone {lim.timezone!r}") from None
        for cap_field in ("user_daily_spend_cap", "user_monthly_spend_cap",
                          "paywall_daily_spend_cap", "paywall_monthly_spend_cap"):
            for asset, amount in getattr(lim, cap_field).items():
                key = f"paywalls.{wid}.limits.{cap_field}.{asset}"
                if asset not in s.assets:
                    raise fail(key, f"unknown asset {asset!r}")
                try:
                    units(amount, s.assets[asset].scale)
                except ValueError as e:
                    raise fail(key, str(e)) from None


def _check_credits(s: Settings, wid: str, w: PaywallSettings, fail: Any) -> None:
    c = w.credits
    for i, t in enumerate(c.types):
        if t not in s.assets or s.assets[t].kind != "credits":
            raise fail(f"paywalls.{wid}.credits.types[{i}]",
                       f"{t!r} is not a credits asset (declare it under [assets.{t}])")
        if s.assets[t].scale != 0:
            raise fail(f"paywalls.{wid}.credits.types[{i}]",
                       f"credits are whole: assets.{t}.scale must be 0")
    tables = [(f"paywalls.{wid}.credits.trial", c.trial)] + [
        (f"paywalls.{wid}.credits.plans.{pid}.credits", p.credits) for pid, p in c.plans.items()]
    for key, counts in tables:
        for t in counts:
            if t not in c.types:
                raise fail(f"{key}.{t}", f"not one of the paywall's credit types {c.types}")


def _check_payments(s: Settings, wid: str, w: PaywallSettings, fail: Any) -> None:
    p = w.payments
    key = f"paywalls.{wid}.payments"
    if not p.stripe_secret_key:
        return
    if not p.stripe_webhook_secret:
        raise fail(f"{key}.stripe_webhook_secret", "required with stripe_secret_key")
    if not re.fullmatch(r"[a-z]{3}", p.currency):
        raise fail(f"{key}.currency", f"a three-letter ISO code in lower case, got {p.currency!r}")
    if not p.stripe_api_base.startswith(("http://", "https://")):
        raise fail(f"{key}.stripe_api_base", "an http:// or https:// URL is required")
    if p.webhook_tolerance_seconds <= 0:
        raise fail(f"{key}.webhook_tolerance_seconds", "must be more than 0")
    if s.assets[w.asset].kind != "currency" and (p.amounts or p.custom_min):
        raise fail(f"{key}.amounts", f"the paywall's asset {w.asset!r} is credits: "
                                     "offer packs, not amounts")
    if s.assets[w.asset].kind == "currency":
        try:
            units_per_minor(p.asset_per_unit, p.currency, s.assets[w.asset].scale)
        except ValueError as e:
            raise fail(f"{key}.asset_per_unit", str(e)) from None
    exponent = currency_exponent(p.currency)
    prices = [(f"{key}.amounts[{i}]", a) for i, a in enumerate(p.amounts)]
    prices += [(f"{key}.custom_min", p.custom_min)] if p.custom_min else []
    prices += [(f"{key}.custom_max", p.custom_max)] if p.custom_min else []
    prices += [(f"{key}.packs.{k}.price", k_.price) for k, k_ in p.packs.items()
               if not k_.stripe_price]
    for where, amount in prices:
        if amount <= 0 or amount.as_tuple().exponent < -exponent:  # type: ignore[operator]
            raise fail(where, f"a positive amount of {p.currency} with at most {exponent} "
                              "decimals")
    if p.custom_min and p.custom_max < p.custom_min:
        raise fail(f"{key}.custom_max", "must be at least custom_min")
    for k, pack in p.packs.items():
        if pack.asset not in w.credits.types:
            raise fail(f"{key}.packs.{k}.asset",
                       f"not one of the paywall's credit types {w.credits.types}")
        if pack.credits <= 0:
            raise fail(f"{key}.packs.{k}.credits", "must be more than 0")
    if not (p.amounts or p.custom_min or p.packs):
        raise fail(key, "offers nothing: set amounts, custom_min or packs")
    if p.recharge_max_failures < 1 or p.recharge_retry_seconds <= 0:
        raise fail(f"{key}.recharge_max_failures", "at least 1 (and a positive retry wait)")


def _check_webhooks(s: Settings, wid: str, w: PaywallSettings, fail: Any) -> None:
    for name, hook in w.webhooks.items():
        key = f"paywalls.{wid}.webhooks.{name}"
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", hook.url):
            raise fail(f"{key}.url", "an http:// or https:// URL is required")
        if not hook.events:
            raise fail(f"{key}.events", "name at least one event type (or \"*\")")
        for i, pattern in enumerate(hook.events):
            if not valid_pattern(pattern):
                raise fail(f"{key}.events[{i}]", f"no event type matches {pattern!r}")
        try:
            if not base64.b64decode(hook.secret.removeprefix("whsec_") + "==", validate=True):
                raise ValueError
        except ValueError:
            raise fail(f"{key}.secret", "a whsec_ secret in base64 is required") from None
    for asset, amount in w.low_balance.items():
        if asset not in s.assets:
            raise fail(f"paywalls.{wid}.low_balance.{asset}", f"unknown asset {asset!r}")
        try:
            if units(amount, s.assets[asset].scale) <= 0:
                raise ValueError("must be more than 0")
        except ValueError as e:
            raise fail(f"paywalls.{wid}.low_balance.{asset}", str(e)) from None


def _check_api_providers(s: Settings, fail: Any) -> None:
    for aid, a in s.api_providers.items():
        if not a.url.startswith(("http://", "https://")):
            raise fail(f"api_providers.{aid}.url", "an http:// or https:// URL is required")
        if a.query_type != "free" and (a.query_type not in s.assets
                                       or s.assets[a.query_type].kind != "credits"):
            raise fail(f"api_providers.{aid}.query_type",
                       f"{a.query_type!r} is neither \"free\" nor a credits asset")


def secrets_of(settings: Settings) -> list[str]:
    """Every secret the settings hold, for the log redactor: provider keys and headers,
    the link, metrics and admin secrets, and passwords in the database and Redis URLs."""
    out = [settings.server.link_secret, settings.server.metrics_token, settings.admin.token]
    for p in settings.providers.values():
        out += [p.api_key, *p.headers.values(), *p.query.values()]
    for m in settings.models.values():
        for d in m.deployments:
            out += d.api_keys
    for w in settings.paywalls.values():
        out += [*w.provider_keys.values(), w.auth.hs256_secret,
                w.payments.stripe_secret_key, w.payments.stripe_webhook_secret]
        for hook in w.webhooks.values():
            out += [hook.secret, *hook.headers.values()]
    for a in settings.api_providers.values():
        out += a.headers.values()
    for url in (settings.database_url, settings.redis_url):
        if url:
            password = urllib.parse.urlsplit(url).password
            if password:
                out += [password, urllib.parse.unquote(password)]
    return [s for s in out if s]
