-- A hold bounds a request's cost, but a provider may still report more (an estimate it
-- bills differently, output beyond the cap). That difference is no longer dropped
-- silently. A charge is the exact cost up to the hold plus what the account has
-- available beyond it (balance - held, which other requests' holds are not part of):
-- so a charge may now exceed its hold, by at most what the balance covered, and
-- balance - held never goes below 0. What even that does not cover is written in the
-- entry's metadata as "uncharged" and returned, for the proxy's metric.
--
-- Replaces 0003's paywall_post (same arguments): the account row is locked and read
-- before the windows are touched, as before windows first then accounts, so the lock
-- order of 0003 is kept.
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
        -- This hold's own amount is part of "held": what lies beyond it is balance - held.
        SELECT greatest(a.balance - a.held, 0) INTO v_beyond FROM accounts a
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
