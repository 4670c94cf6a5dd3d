-- Paywall API keys. Only the SHA-256 digest of a key is stored; the key itself is
-- shown once, when it is created. The prefix (its first characters) lets an operator
-- tell keys apart in listings.
CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    paywall_id  text        NOT NULL CHECK (paywall_id <> ''),
    prefix      text        NOT NULL,
    digest      bytea       NOT NULL UNIQUE CHECK (length(digest) = 32),
    name        text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_paywall_idx ON api_keys (paywall_id);
