-- Post and void lock a hold's spend windows in the same order as paywall_hold (scope,
-- then period) before touching them, so a hold and a settlement sharing two windows
-- (a daily and a monthly paywall cap, say) cannot deadlock.

-- Post: charge p_charge (at most the hold), release the rest, move the windows'
-- held amount to spent. Returns nothing if the hold was already resolved.
CREATE OR REPLACE FUNCTION paywall_post(
    p_hold bigint, p_charge bigint, p_prompt integer, p_completion integer,
    p_cached integer, p_reasoning integer, p_outcome text, p_metadata jsonb
) RETURNS TABLE (charged bigint, balance_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
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
    -- Lock the windows in the order paywall_hold does, before updating them.
    PERFORM 1 FROM spend_windows w JOIN jsonb_array_elements(h.windows) x
        ON w.paywall_id = v_paywall AND w.scope = x.value->>'scope' AND w.asset = v_asset
       AND w.period = x.value->>'period' AND w.starts = (x.value->>'starts')::date
    ORDER BY w.scope, w.period FOR UPDATE OF w;
    UPDATE spend_windows w SET held = w.held - h.amount, spent = w.spent + v_charge
    FROM jsonb_array_elements(h.windows) x
    WHERE w.paywall_id = v_paywall AND w.scope = x.value->>'scope' AND w.asset = v_asset
      AND w.period = x.value->>'period' AND w.starts = (x.value->>'starts')::date;
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
CREATE OR REPLACE FUNCTION paywall_void(p_hold bigint, p_status text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
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
    -- Lock the windows in the order paywall_hold does, before updating them.
    PERFORM 1 FROM spend_windows w JOIN jsonb_array_elements(h.windows) x
        ON w.paywall_id = v_paywall AND w.scope = x.value->>'scope' AND w.asset = v_asset
       AND w.period = x.value->>'period' AND w.starts = (x.value->>'starts')::date
    ORDER BY w.scope, w.period FOR UPDATE OF w;
    UPDATE spend_windows w SET held = w.held - h.amount
    FROM jsonb_array_elements(h.windows) x
    WHERE w.paywall_id = v_paywall AND w.scope = x.value->>'scope' AND w.asset = v_asset
      AND w.period = x.value->>'period' AND w.starts = (x.value->>'starts')::date;
    UPDATE accounts a SET held = a.held - h.amount WHERE a.id = h.account_id;
    RETURN true;
END $$;
