-- Events: an outbox written with the money. Every entry, every new user, every connect
-- and disconnect and every hold that expires writes its event from a trigger, in the
-- statement (so the transaction) that made the change: an event is committed exactly
-- when its change is. Workers fan events out to webhook subscriptions and deliver them
-- (proxy/events.py).

CREATE SEQUENCE events_seq;
CREATE TABLE events (
    -- "evt_" + the creation time in milliseconds (12 hex digits) + seq (12 hex digits):
    -- unique, and sortable by time (then seq) as text.
    id          text        PRIMARY KEY,
    seq         bigint      NOT NULL,  -- from events_seq: unique by construction
    type        text        NOT NULL,
    version     integer     NOT NULL DEFAULT 1,
    paywall_id  text        NOT NULL,
    user_id     text,
    request_id  text,
    data        jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Not yet turned into deliveries for the subscriptions of its paywall. An event of a
    -- paywall without subscriptions is born fanned: nothing to do for it later.
    fanned      boolean     NOT NULL DEFAULT false
);
CREATE INDEX events_unfanned ON events (seq) WHERE NOT fanned;
CREATE INDEX events_paywall ON events (paywall_id, seq);

-- Webhook subscriptions of a paywall: from the settings (source 'settings', kept in
-- step at start) or created through the API with the paywall key.
CREATE TABLE webhook_subscriptions (
    id              text        PRIMARY KEY,
    paywall_id      text        NOT NULL,
    name            text,
    source          text        NOT NULL CHECK (source IN ('settings', 'api')),
    url             text        NOT NULL,
    types           text[]      NOT NULL,
    secret          text        NOT NULL,
    -- After a rotation, the secret before it also signs until old_secret_until.
    old_secret      text,
    old_secret_until timestamptz,
    headers         jsonb       NOT NULL DEFAULT '{}',
    allow_private   boolean     NOT NULL DEFAULT false,
    enabled         boolean     NOT NULL DEFAULT true,
    disabled_reason text,
    last_success_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (paywall_id, name)
);

-- PL/pgSQL, not SQL: its statements' plans are kept for the session (an SQL function's
-- INSERT is planned again at every call before PostgreSQL 18).
CREATE FUNCTION paywall_emit(p_paywall text, p_user text, p_request text, p_type text,
                             p_data jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint := nextval('events_seq');
    v_id text := 'evt_' || lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint),
                                12, '0') || lpad(to_hex(v_seq), 12, '0');
BEGIN
    INSERT INTO events (id, seq, type, paywall_id, user_id, request_id, data, fanned)
    VALUES (v_id, v_seq, p_type, p_paywall, p_user, p_request, p_data,
            NOT EXISTS (SELECT 1 FROM webhook_subscriptions s WHERE s.paywall_id = p_paywall
                        AND s.enabled));
    RETURN v_id;
END $$;

-- Whether a subscription choosing ``p_types`` (names, "prefix.*", "*") wants ``p_type``;
-- proxy/event_types.py matches() is the same rule.
CREATE FUNCTION paywall_wants(p_types text[], p_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT EXISTS (SELECT 1 FROM unnest(p_types) t WHERE t = '*' OR t = p_type
                   OR (right(t, 2) = '.*' AND starts_with(p_type, left(t, -1))))
$$;

-- Events that must be written once per key although what reports them may come again
-- (a failed payment's webhook, retried): the key's row and the event, one statement.
CREATE TABLE event_keys (
    paywall_id  text        NOT NULL,
    key         text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (paywall_id, key)
);

-- A paywall's low-balance thresholds by asset (user_id '': every user of the paywall, a
-- user's own row overrides it), kept in step with the settings at start.
CREATE TABLE balance_alerts (
    paywall_id  text   NOT NULL,
    user_id     text   NOT NULL DEFAULT '',
    asset       text   NOT NULL,
    threshold   bigint NOT NULL CHECK (threshold > 0),
    PRIMARY KEY (paywall_id, user_id, asset)
);

-- When the user was last refused for want of balance; cleared by their next deposit, so
-- balance.depleted is written once per running out.
ALTER TABLE users ADD COLUMN depleted_at timestamptz;

CREATE FUNCTION entries_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    a accounts%ROWTYPE;
    v_data jsonb;
    v_type text;
    v_before bigint := NEW.balance_after - NEW.amount;
    v_low bigint;
BEGIN
    SELECT * INTO a FROM accounts WHERE id = NEW.account_id;
    v_data := jsonb_build_object('entry_id', NEW.id, 'kind', NEW.kind, 'asset', a.asset,
                                 'amount', NEW.amount, 'balance_after', NEW.balance_after,
                                 'metadata', NEW.metadata);
    v_type := CASE NEW.kind WHEN 'charge' THEN 'charge.created'
                            WHEN 'deposit' THEN 'balance.deposit.created'
                            WHEN 'topup' THEN 'balance.deposit.created'
                            WHEN 'grant' THEN 'credits.granted'
                            WHEN 'refund' THEN 'charge.refunded'
                            ELSE 'balance.adjusted' END;
    IF NEW.kind = 'charge' THEN
        v_data := v_data || jsonb_build_object(
            'cost', -NEW.amount, 'model', NEW.model, 'prompt_tokens', NEW.prompt_tokens,
            'completion_tokens', NEW.completion_tokens, 'cached_tokens', NEW.cached_tokens,
            'reasoning_tokens', NEW.reasoning_tokens, 'outcome', NEW.outcome,
            'hold_id', NEW.hold_id);
    ELSIF NEW.kind = 'adjustment' AND (NEW.metadata->>'reversed')::bigint > 0 THEN
        v_type := 'charge.refunded';  -- a top-up refunded or disputed at Stripe (a won
                                      -- dispute giving it back is balance.adjusted)
    END IF;
    PERFORM paywall_emit(a.paywall_id, a.user_id, NEW.request_id, v_type, v_data);
    IF NEW.kind = 'deposit' AND NEW.metadata ? 'payment' THEN
        PERFORM paywall_emit(a.paywall_id, a.user_id, NEW.request_id,
                             'topup.checkout.completed', jsonb_build_object(
                                 'payment', NEW.metadata->'payment',
                                 'item', NEW.metadata->'item', 'paid', NEW.metadata->'paid',
                                 'currency', NEW.metadata->'currency', 'asset', a.asset,
                                 'amount', NEW.amount, 'balance_after', NEW.balance_after));
    END IF;
    IF NEW.kind IN ('deposit', 'topup', 'grant') AND NEW.amount > 0 THEN
        UPDATE users SET depleted_at = NULL
        WHERE paywall_id = a.paywall_id AND user_id = a.user_id AND depleted_at IS NOT NULL;
    END IF;
    IF NEW.outcome = 'reaped' THEN
        PERFORM paywall_emit(a.paywall_id, a.user_id, NEW.request_id, 'hold.expired',
                             jsonb_build_object('hold_id', NEW.hold_id, 'posted', true,
                                                'cost', -NEW.amount, 'asset', a.asset));
    END IF;
    IF NEW.amount < 0 THEN  -- crossing the low-balance threshold, once per crossing
        SELECT b.threshold INTO v_low FROM balance_alerts b
        WHERE b.paywall_id = a.paywall_id AND b.user_id IN (a.user_id, '')
          AND b.asset = a.asset
        ORDER BY b.user_id DESC LIMIT 1;
        IF v_low IS NOT NULL AND v_before >= v_low AND NEW.balance_after < v_low THEN
            PERFORM paywall_emit(a.paywall_id, a.user_id, NEW.request_id, 'balance.low',
                                 jsonb_build_object('asset', a.asset, 'threshold', v_low,
                                                    'balance', NEW.balance_after));
        END IF;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER entries_event AFTER INSERT ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_event();

CREATE FUNCTION users_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM paywall_emit(NEW.paywall_id, NEW.user_id, NULL, 'user.created', '{}');
        IF NEW.connected_at IS NOT NULL THEN
            PERFORM paywall_emit(NEW.paywall_id, NEW.user_id, NULL, 'user.connected', '{}');
        END IF;
    ELSIF OLD.connected_at IS NULL AND NEW.connected_at IS NOT NULL THEN
        PERFORM paywall_emit(NEW.paywall_id, NEW.user_id, NULL, 'user.connected', '{}');
    ELSIF OLD.connected_at IS NOT NULL AND NEW.connected_at IS NULL THEN
        PERFORM paywall_emit(NEW.paywall_id, NEW.user_id, NULL, 'user.disconnected', '{}');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER users_created AFTER INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION users_event();
CREATE TRIGGER users_connected AFTER UPDATE OF connected_at ON users
    FOR EACH ROW WHEN (OLD.connected_at IS DISTINCT FROM NEW.connected_at)
    EXECUTE FUNCTION users_event();

CREATE FUNCTION holds_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    a accounts%ROWTYPE;
BEGIN
    SELECT * INTO a FROM accounts WHERE id = NEW.account_id;
    PERFORM paywall_emit(a.paywall_id, a.user_id, NEW.request_id, 'hold.expired',
                         jsonb_build_object('hold_id', NEW.id, 'posted', false, 'cost', 0,
                                            'asset', a.asset, 'held', NEW.amount));
    RETURN NULL;
END $$;
CREATE TRIGGER holds_expired AFTER UPDATE OF status ON holds
    FOR EACH ROW WHEN (NEW.status = 'expired') EXECUTE FUNCTION holds_event();

-- One event for one subscription: pending until delivered (2xx) or given up (failed).
CREATE TABLE webhook_deliveries (
    subscription_id text        NOT NULL REFERENCES webhook_subscriptions ON DELETE CASCADE,
    event_id        text        NOT NULL REFERENCES events ON DELETE CASCADE,
    seq             bigint      NOT NULL,
    user_key        text        NOT NULL,  -- the event's user ('' for none): order is per user
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Claimed by a worker until then: no other sends it meanwhile.
    lease_until     timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    PRIMARY KEY (subscription_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (subscription_id, user_key, seq)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
