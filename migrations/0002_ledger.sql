-- The ledger. Money is a bigint in an asset's smallest unit. proxy/ledger.py is the
-- only writer of these tables; the constraints below are the backstop.

CREATE TABLE users (
    paywall_id    text        NOT NULL,
    user_id       text        NOT NULL CHECK (user_id ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    connected_at  timestamptz,
    blocked       boolean     NOT NULL DEFAULT false,
    limits        jsonb       NOT NULL DEFAULT '{}',
    metadata      jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (paywall_id, user_id)
);

CREATE TABLE accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    paywall_id  text   NOT NULL,
    user_id     text   NOT NULL,
    asset       text   NOT NULL,
    balance     bigint NOT NULL DEFAULT 0,
    held        bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    CONSTRAINT available_not_negative CHECK (balance - held >= 0),
    UNIQUE (paywall_id, user_id, asset),
    FOREIGN KEY (paywall_id, user_id) REFERENCES users
);

CREATE TABLE holds (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   bigint      NOT NULL REFERENCES accounts,
    request_id   text        NOT NULL,
    amount       bigint      NOT NULL CHECK (amount >= 0),
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    model        text,
    -- Usage seen so far in a live stream: what the reaper posts if the process dies.
    checkpoint   jsonb,
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE INDEX holds_pending_expiry ON holds (expires_at) WHERE status = 'pending';

-- A hold resolves at most once: once it leaves 'pending' it never changes again.
CREATE FUNCTION holds_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'hold % is already %', OLD.id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holds_resolve_once BEFORE UPDATE ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_resolve_once();

CREATE TABLE entries (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id         bigint      NOT NULL REFERENCES accounts,
    kind               text        NOT NULL
                       CHECK (kind IN ('grant', 'topup', 'deposit', 'charge', 'refund',
                                       'adjustment')),
    amount             bigint      NOT NULL,
    balance_after      bigint      NOT NULL,
    request_id         text,
    -- At most one entry per hold: a hold is charged once or not at all.
    hold_id            bigint      UNIQUE REFERENCES holds,
    model              text,
    prompt_tokens      integer,
    completion_tokens  integer,
    cached_tokens      integer,
    reasoning_tokens   integer,
    -- completed | aborted (client left) | partial (provider failed mid-way) | reaped
    outcome            text,
    idempotency_key    text,
    metadata           jsonb       NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (kind <> 'charge' OR amount <= 0),
    CHECK (kind NOT IN ('grant', 'topup', 'deposit', 'refund') OR amount >= 0)
);
CREATE INDEX entries_account_idx ON entries (account_id, id);
CREATE INDEX entries_request_idx ON entries (request_id);

-- Entries are append-only.
CREATE FUNCTION entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER entries_no_update BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_append_only();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_append_only();

-- Idempotent writes: the first response to (paywall, key) is kept and replayed.
CREATE TABLE idempotency (
    paywall_id    text        NOT NULL,
    key           text        NOT NULL,
    request_hash  bytea       NOT NULL,
    status        integer     NOT NULL,
    response      bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (paywall_id, key)
);
CREATE INDEX idempotency_created_idx ON idempotency (created_at);
