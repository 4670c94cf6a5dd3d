-- Payments taken through Stripe, deposited exactly once, and what a refund or dispute
-- takes back. proxy/ledger.py is the only writer of these tables.

-- What a refund or dispute took back beyond the available balance. The available
-- balance itself never goes below 0 (available_not_negative stays): the rest is owed,
-- and the account's next deposits settle it before anything else.
ALTER TABLE accounts ADD COLUMN owed bigint NOT NULL DEFAULT 0 CHECK (owed >= 0);

-- What is owed is not spendable: a hold needs balance - held - owed to cover it (money
-- that holds in flight at the reversal release later stays owed). Replaces 0003's
-- paywall_hold (same arguments), changed only there.
DROP FUNCTION paywall_hold(text, text, text, bigint, text, text, boolean, double precision,
                           jsonb, text);

CREATE FUNCTION paywall_hold(
    p_paywall text, p_user text, p_asset text, p_amount bigint, p_request text,
    p_model text, p_require_connect boolean, p_ttl double precision, p_caps jsonb,
    p_tz text
) RETURNS TABLE (connected boolean, hold_id bigint, available bigint, cap text,
                 cap_used bigint, cap_resets timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
    v_starts date;
    v_used bigint;
    v_account bigint;
    v_windows jsonb := '[]';
BEGIN
    SELECT u.connected_at IS NOT NULL INTO connected
    FROM users u WHERE u.paywall_id = p_paywall AND u.user_id = p_user;
    IF connected IS NULL OR (p_require_connect AND NOT connected) THEN
        SELECT greatest(a.balance - a.held - a.owed, 0) INTO available FROM accounts a
        WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
        RETURN NEXT;
        RETURN;
    END IF;
    -- Caps first, in a fixed order: windows are always locked before accounts.
    FOR c IN SELECT value FROM jsonb_array_elements(p_caps)
             ORDER BY value->>'scope', value->>'period' LOOP
        v_starts := date_trunc(c->>'period', now() AT TIME ZONE p_tz)::date;
        INSERT INTO spend_windows (paywall_id, scope, asset, period, starts)
        VALUES (p_paywall, c->>'scope', p_asset, c->>'period', v_starts)
        ON CONFLICT DO NOTHING;
        SELECT w.spent + w.held INTO v_used FROM spend_windows w
        WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope' AND w.asset = p_asset
          AND w.period = c->>'period' AND w.starts = v_starts
        FOR UPDATE;
        IF v_used + p_amount > (c->>'cap')::bigint THEN
            cap := CASE WHEN c->>'scope' = '' THEN 'paywall_' ELSE 'user_' END
                   || CASE WHEN c->>'period' = 'day' THEN 'daily' ELSE 'monthly' END;
            cap_used := v_used;
            cap_resets := ((v_starts + CASE WHEN c->>'period' = 'day' THEN interval '1 day'
                                            ELSE interval '1 month' END)::timestamp
                           AT TIME ZONE p_tz);
            SELECT greatest(a.balance - a.held - a.owed, 0) INTO available FROM accounts a
            WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
            RETURN NEXT;
            RETURN;
        END IF;
        v_windows := v_windows || jsonb_build_object(
            'scope', c->>'scope', 'period', c->>'period', 'starts', v_starts);
    END LOOP;

    UPDATE accounts a SET held = a.held + p_amount
    WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset
      AND a.balance - a.held - a.owed >= p_amount
    RETURNING a.id, a.balance - a.held - a.owed + p_amount INTO v_account, available;
    IF v_account IS NULL THEN
        SELECT greatest(a.balance - a.held - a.owed, 0) INTO available FROM accounts a
        WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
        RETURN NEXT;
        RETURN;
    END IF;
    FOR c IN SELECT value FROM jsonb_array_elements(v_windows) LOOP
        UPDATE spend_windows w SET held = w.held + p_amount
        WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope' AND w.asset = p_asset
          AND w.period = c->>'period' AND w.starts = (c->>'starts')::date;
    END LOOP;
    INSERT INTO holds (account_id, request_id, amount, model, expires_at, windows)
    VALUES (v_account, p_request, p_amount, p_model,
            now() + make_interval(secs => p_ttl), v_windows)
    RETURNING id INTO hold_id;
    RETURN NEXT;
END $$;

-- Nor may a charge beyond its hold take what is owed. Replaces 0007's paywall_post (same
-- arguments), changed only in what lies beyond the hold.
DROP FUNCTION paywall_post(bigint, bigint, integer, integer, integer, integer, text, jsonb);

CREATE FUNCTION paywall_post(
    p_hold bigint, p_cost bigint, p_prompt integer, p_completion integer,
    p_cached integer, p_reasoning integer, p_outcome text, p_metadata jsonb
) RETURNS TABLE (charged bigint, balance_after bigint, uncharged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
    x jsonb;
    v_paywall text;
    v_asset text;
    v_beyond bigint;
    v_metadata jsonb := p_metadata;
BEGIN
    IF p_cost < 0 THEN
        RAISE EXCEPTION 'a charge cannot be negative: %', p_cost;
    END IF;
    UPDATE holds SET status = 'posted', resolved_at = now()
    WHERE id = p_hold AND status = 'pending' RETURNING * INTO h;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT a.paywall_id, a.asset INTO v_paywall, v_asset FROM accounts a
    WHERE a.id = h.account_id;
    FOR x IN SELECT value FROM jsonb_array_elements(h.windows)
             ORDER BY value->>'scope', value->>'period' LOOP
        -- Windows are locked first, as everywhere (see 0003); what is spent is only
        -- known once the account is, so they are written after it.
        PERFORM 1 FROM spend_windows w
        WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope' AND w.asset = v_asset
          AND w.period = x->>'period' AND w.starts = (x->>'starts')::date
        FOR UPDATE;
    END LOOP;
    IF p_cost <= h.amount THEN  -- the usual case: the hold covers it, nothing to read
        charged := p_cost;
        uncharged := 0;
    ELSE
        -- This hold's own amount is part of "held": what lies beyond it is balance -
        -- held, less what is owed.
        SELECT greatest(a.balance - a.held - a.owed, 0) INTO v_beyond FROM accounts a
        WHERE a.id = h.account_id FOR UPDATE;
        charged := least(p_cost, h.amount + v_beyond);
        uncharged := p_cost - charged;
        IF uncharged > 0 THEN
            v_metadata := v_metadata || jsonb_build_object('uncharged', uncharged);
        END IF;
    END IF;
    FOR x IN SELECT value FROM jsonb_array_elements(h.windows)
             ORDER BY value->>'scope', value->>'period' LOOP
        UPDATE spend_windows w SET held = w.held - h.amount, spent = w.spent + charged
        WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope' AND w.asset = v_asset
          AND w.period = x->>'period' AND w.starts = (x->>'starts')::date;
    END LOOP;
    UPDATE accounts a SET balance = a.balance - charged, held = a.held - h.amount
    WHERE a.id = h.account_id RETURNING a.balance INTO balance_after;
    INSERT INTO entries (account_id, kind, amount, balance_after, request_id, hold_id, model,
                         prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens,
                         outcome, metadata)
    VALUES (h.account_id, 'charge', -charged, balance_after, h.request_id, h.id, h.model,
            p_prompt, p_completion, p_cached, p_reasoning, p_outcome, v_metadata);
    RETURN NEXT;
END $$;

-- One row per payment, written in the transaction of its deposit: its key (the Checkout
-- Session's id, or an automatic recharge's PaymentIntent id) is what makes a second
-- delivery of the same event deposit nothing.
CREATE TABLE payments (
    paywall_id      text        NOT NULL,
    id              text        NOT NULL,
    user_id         text        NOT NULL,
    asset           text        NOT NULL,
    -- Deposited, in the asset's smallest unit; and paid, in the currency's minor unit.
    amount          bigint      NOT NULL CHECK (amount > 0),
    paid            bigint      NOT NULL CHECK (paid > 0),
    currency        text        NOT NULL,
    payment_intent  text,
    customer        text,
    item            text        NOT NULL,   -- "amount", "pack:<id>" or "recharge"
    -- The deposit's entry (no foreign key: entries refuse TRUNCATE by their own trigger).
    entry_id        bigint,
    -- What Stripe reports taken back, in minor units: refunded in all, and each dispute
    -- that is open or lost (id -> amount; a won dispute is 0).
    refunded        bigint      NOT NULL DEFAULT 0 CHECK (refunded BETWEEN 0 AND paid),
    disputes        jsonb       NOT NULL DEFAULT '{}',
    -- Of ``amount``: what reversals have taken back (from the balance, or as owed).
    reversed        bigint      NOT NULL DEFAULT 0 CHECK (reversed BETWEEN 0 AND amount),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (paywall_id, id),
    FOREIGN KEY (paywall_id, user_id) REFERENCES users
);
CREATE UNIQUE INDEX payments_intent ON payments (paywall_id, payment_intent);
CREATE INDEX payments_user ON payments (paywall_id, user_id, created_at);

-- Automatic recharge, one per user who turned it on: charge ``amount`` (minor units of
-- ``currency``) to the saved payment method when the available balance of ``asset``
-- falls under ``threshold`` (its smallest unit). ``triggers`` counts recharges started;
-- the current one is pending until its deposit or its failure is written.
CREATE TABLE recharges (
    paywall_id      text        NOT NULL,
    user_id         text        NOT NULL,
    asset           text        NOT NULL,
    threshold       bigint      NOT NULL CHECK (threshold > 0),
    amount          bigint      NOT NULL CHECK (amount > 0),
    currency        text        NOT NULL,
    customer        text        NOT NULL,
    payment_method  text        NOT NULL,
    enabled         boolean     NOT NULL DEFAULT true,
    triggers        bigint      NOT NULL DEFAULT 0,
    pending_since   timestamptz,
    -- The pending recharge's PaymentIntent, once created: looked up, not created again.
    payment_intent  text,
    failures        integer     NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error      text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (paywall_id, user_id),
    FOREIGN KEY (paywall_id, user_id) REFERENCES users
);
