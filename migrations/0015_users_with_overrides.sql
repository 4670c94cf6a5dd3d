-- The users of a paywall that have limit overrides or are blocked, found without
-- reading the others: the proxy reads a paywall's overrides whole (most users have
-- none), where it read each user's row on every request it had not seen lately.
CREATE INDEX users_with_overrides ON users (paywall_id)
    WHERE blocked OR limits <> '{}'::jsonb;
