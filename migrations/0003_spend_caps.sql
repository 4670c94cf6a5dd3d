-- Spend caps live with the money. A spend window counts what one user (scope = the
-- user id) or a whole paywall (scope = '') has spent and holds in one asset during one
-- calendar day or month of the paywall's time zone. The hold, the post and the void
-- become functions so that the balance, the caps and the hold change in one statement
-- and one round trip; proxy/ledger.py stays their only caller.
--
-- Windows are always locked in one order (scope, then period), and updated one by one
-- through their primary key: a hold and a settlement sharing two windows cannot
-- deadlock, and no statement leaves the join to the planner (which could scan the
-- whole table for every request).

CREATE TABLE spend_windows (
    paywall_id  text   NOT NULL,
    scope       text   NOT NULL,
    asset       text   NOT NULL,
    period      text   NOT NULL CHECK (period IN ('day', 'month')),
    starts      date   NOT NULL,
    spent       bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
    held        bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    PRIMARY KEY (paywall_id, scope, asset, period, starts)
);

-- The windows a hold counts against: [{"scope", "period", "starts"}].
ALTER TABLE holds ADD COLUMN windows jsonb NOT NULL DEFAULT '[]';

-- p_caps: [{"scope": "<user id or ''>", "period": "day" | "month", "cap": <units>}].
-- Returns the user's state and either a hold id, or which cap refused it.
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
        SELECT a.balance - a.held INTO available FROM accounts a
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
            SELECT a.balance - a.held INTO available FROM accounts a
            WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
            RETURN NEXT;
            RETURN;
        END IF;
        v_windows := v_windows || jsonb_build_object(
            'scope', c->>'scope', 'period', c->>'period', 'starts', v_starts);
    END LOOP;

    UPDATE accounts a SET held = a.held + p_amount
    WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset
      AND a.balance - a.held >= p_amount
    RETURNING a.id, a.balance - a.held + p_amount INTO v_account, available;
    IF v_account IS NULL THEN
        SELECT a.balance - a.held INTO available FROM accounts a
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

-- Post: charge p_charge (at most the hold), release the rest, move the windows'
-- held amount to spent. Returns nothing if the hold was already resolved.
CREATE FUNCTION paywall_post(
    p_hold bigint, p_charge bigint, p_prompt integer, p_completion integer,
    p_cached integer, p_reasoning integer, p_outcome text, p_metadata jsonb
) RETURNS TABLE (charged bigint, balance_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
    x jsonb;
    v_charge bigint;
    v_paywall text;
    v_asset text;
BEGIN
    UPDATE holds SET status = 'posted', resolved_at = now()
    WHERE id = p_hold AND status = 'pending' RETURNING * INTO h;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_charge := least(p_charge, h.amount);
    SELECT a.paywall_id, a.asset INTO v_paywall, v_asset FROM accounts a
    WHERE a.id = h.account_id;
    FOR x IN SELECT value FROM jsonb_array_elements(h.windows)
             ORDER BY value->>'scope', value->>'period' LOOP
        UPDATE spend_windows w SET held = w.held - h.amount, spent = w.spent + v_charge
        WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope' AND w.asset = v_asset
          AND w.period = x->>'period' AND w.starts = (x->>'starts')::date;
    END LOOP;
    UPDATE accounts a SET balance = a.balance - v_charge, held = a.held - h.amount
    WHERE a.id = h.account_id RETURNING a.balance INTO balance_after;
    INSERT INTO entries (account_id, kind, amount, balance_after, request_id, hold_id, model,
                         prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens,
                         outcome, metadata)
    VALUES (h.account_id, 'charge', -v_charge, balance_after, h.request_id, h.id, h.model,
            p_prompt, p_completion, p_cached, p_reasoning, p_outcome, p_metadata);
    charged := v_charge;
    RETURN NEXT;
END $$;

-- Void: release the whole hold (status 'voided', or 'expired' from the reaper).
CREATE FUNCTION paywall_void(p_hold bigint, p_status text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
    x jsonb;
    v_paywall text;
    v_asset text;
BEGIN
    IF p_status NOT IN ('voided', 'expired') THEN
        RAISE EXCEPTION 'a hold is voided or expired, not %', p_status;
    END IF;
    UPDATE holds SET status = p_status, resolved_at = now()
    WHERE id = p_hold AND status = 'pending' RETURNING * INTO h;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT a.paywall_id, a.asset INTO v_paywall, v_asset FROM accounts a
    WHERE a.id = h.account_id;
    FOR x IN SELECT value FROM jsonb_array_elements(h.windows)
             ORDER BY value->>'scope', value->>'period' LOOP
        UPDATE spend_windows w SET held = w.held - h.amount
        WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope' AND w.asset = v_asset
          AND w.period = x->>'period' AND w.starts = (x->>'starts')::date;
    END LOOP;
    UPDATE accounts a SET held = a.held - h.amount WHERE a.id = h.account_id;
    RETURN true;
END $$;
