-- Spend caps at less cost per request. A hold's window used to take three statements
-- (an insert that finds the row, a locking read, an update once the account had been
-- held) and a post's two (a locking read, an update): with a user's and the paywall's
-- daily and monthly caps, twenty statements a request. Now a hold's window is one
-- update that checks the cap and holds in one go (the row is inserted only the first
-- time a window is used); should a later cap or the balance refuse, the windows held
-- so far are given back in the same transaction. A post within its hold (the usual
-- case) writes each window once. Locks are still taken windows first, in the caps'
-- order, then the account, as 0003 lays down. Same arguments, same results.

-- 0009's paywall_hold, its windows held as above.
CREATE OR REPLACE FUNCTION paywall_hold(
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
        UPDATE spend_windows w SET held = w.held + p_amount
        WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope' AND w.asset = p_asset
          AND w.period = c->>'period' AND w.starts = v_starts
          AND w.spent + w.held + p_amount <= (c->>'cap')::bigint;
        IF NOT FOUND THEN  -- a window not used yet, or its cap reached
            INSERT INTO spend_windows (paywall_id, scope, asset, period, starts)
            VALUES (p_paywall, c->>'scope', p_asset, c->>'period', v_starts)
            ON CONFLICT DO NOTHING;
            SELECT w.spent + w.held INTO v_used FROM spend_windows w
            WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope' AND w.asset = p_asset
              AND w.period = c->>'period' AND w.starts = v_starts
            FOR UPDATE;
            IF v_used + p_amount > (c->>'cap')::bigint THEN
                PERFORM paywall_unhold(p_paywall, p_asset, p_amount, v_windows);
                cap := CASE WHEN c->>'scope' = '' THEN 'paywall_' ELSE 'user_' END
                       || CASE WHEN c->>'period' = 'day' THEN 'daily' ELSE 'monthly' END;
                cap_used := v_used;
                cap_resets := ((v_starts + CASE WHEN c->>'period' = 'day'
                                                THEN interval '1 day'
                                                ELSE interval '1 month' END)::timestamp
                               AT TIME ZONE p_tz);
                SELECT greatest(a.balance - a.held - a.owed, 0) INTO available
                FROM accounts a
                WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
                RETURN NEXT;
                RETURN;
            END IF;
            UPDATE spend_windows w SET held = w.held + p_amount
            WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope' AND w.asset = p_asset
              AND w.period = c->>'period' AND w.starts = v_starts;
        END IF;
        v_windows := v_windows || jsonb_build_object(
            'scope', c->>'scope', 'period', c->>'period', 'starts', v_starts);
    END LOOP;

    UPDATE accounts a SET held = a.held + p_amount
    WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset
      AND a.balance - a.held - a.owed >= p_amount
    RETURNING a.id, a.balance - a.held - a.owed + p_amount INTO v_account, available;
    IF v_account IS NULL THEN
        PERFORM paywall_unhold(p_paywall, p_asset, p_amount, v_windows);
        SELECT greatest(a.balance - a.held - a.owed, 0) INTO available FROM accounts a
        WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
        RETURN NEXT;
        RETURN;
    END IF;
    INSERT INTO holds (account_id, request_id, amount, model, expires_at, windows)
    VALUES (v_account, p_request, p_amount, p_model,
            now() + make_interval(secs => p_ttl), v_windows)
    RETURNING id INTO hold_id;
    RETURN NEXT;
END $$;

-- What a refused hold had held in the windows before it was refused, given back (in
-- the transaction that held it: as if it had never been).
CREATE FUNCTION paywall_unhold(p_paywall text, p_asset text, p_amount bigint,
                               p_windows jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    x jsonb;
BEGIN
    FOR x IN SELECT value FROM jsonb_array_elements(p_windows) LOOP
        UPDATE spend_windows w SET held = w.held - p_amount
        WHERE w.paywall_id = p_paywall AND w.scope = x->>'scope' AND w.asset = p_asset
          AND w.period = x->>'period' AND w.starts = (x->>'starts')::date;
    END LOOP;
END $$;

-- 0012's paywall_post: within the hold, each window is written once.
CREATE OR REPLACE FUNCTION paywall_post(
    p_hold bigint, p_cost bigint, p_prompt integer, p_completion integer,
    p_cached integer, p_reasoning integer, p_outcome text, p_metadata jsonb
) RETURNS TABLE (charged bigint, balance_after bigint, uncharged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
    x jsonb;
    v_paywall text;
    v_user text;
    v_asset text;
    v_beyond bigint;
    v_metadata jsonb := p_metadata;
    v_entry bigint;
    v_low bigint;
BEGIN
    IF p_cost < 0 THEN
        RAISE EXCEPTION 'a charge cannot be negative: %', p_cost;
    END IF;
    UPDATE holds SET status = 'posted', resolved_at = now()
    WHERE id = p_hold AND status = 'pending' RETURNING * INTO h;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT a.paywall_id, a.user_id, a.asset INTO v_paywall, v_user, v_asset FROM accounts a
    WHERE a.id = h.account_id;
    IF p_cost <= h.amount THEN  -- the usual case: the hold covers it, nothing to read
        charged := p_cost;
        uncharged := 0;
    ELSE
        -- Beyond the hold, what is charged depends on the account: the windows are
        -- locked first, as everywhere (see 0003), and written once it is known.
        FOR x IN SELECT value FROM jsonb_array_elements(h.windows)
                 ORDER BY value->>'scope', value->>'period' LOOP
            PERFORM 1 FROM spend_windows w
            WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope' AND w.asset = v_asset
              AND w.period = x->>'period' AND w.starts = (x->>'starts')::date
            FOR UPDATE;
        END LOOP;
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
            p_prompt, p_completion, p_cached, p_reasoning, p_outcome, v_metadata)
    RETURNING id INTO v_entry;

    PERFORM paywall_emit(v_paywall, v_user, h.request_id, 'charge.created', jsonb_build_object(
        'entry_id', v_entry, 'kind', 'charge', 'asset', v_asset, 'amount', -charged,
        'balance_after', balance_after, 'metadata', v_metadata,
        'cost', charged, 'model', h.model, 'prompt_tokens', p_prompt,
        'completion_tokens', p_completion, 'cached_tokens', p_cached,
        'reasoning_tokens', p_reasoning, 'outcome', p_outcome, 'hold_id', h.id));
    IF p_outcome = 'reaped' THEN
        PERFORM paywall_emit(v_paywall, v_user, h.request_id, 'hold.expired',
                             jsonb_build_object('hold_id', h.id, 'posted', true,
                                                'cost', charged, 'asset', v_asset));
    END IF;
    IF charged > 0 THEN  -- crossing the low-balance threshold, once per crossing
        SELECT b.threshold INTO v_low FROM balance_alerts b
        WHERE b.paywall_id = v_paywall AND b.user_id IN (v_user, '') AND b.asset = v_asset
        ORDER BY b.user_id DESC LIMIT 1;
        IF v_low IS NOT NULL AND balance_after + charged >= v_low AND balance_after < v_low
        THEN
            PERFORM paywall_emit(v_paywall, v_user, h.request_id, 'balance.low',
                                 jsonb_build_object('asset', v_asset, 'threshold', v_low,
                                                    'balance', balance_after));
        END IF;
    END IF;
    RETURN NEXT;
END $$;
