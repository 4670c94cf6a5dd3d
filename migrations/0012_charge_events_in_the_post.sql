-- The outbox at less cost per charge. A charge's events (charge.created, hold.expired
-- when the reaper posted it, balance.low on crossing) are written by paywall_post
-- itself, which already holds the account's row, instead of by the entries trigger,
-- which read it again; the trigger now fires for the other kinds only. The events and
-- their data are the same as 0010's. And events_paywall goes: it cost every event an
-- index entry and served only `paywall-proxy events tail`, which reads by id instead.
DROP INDEX events_paywall;

DROP TRIGGER entries_event ON entries;
CREATE TRIGGER entries_event AFTER INSERT ON entries
    FOR EACH ROW WHEN (NEW.kind <> 'charge') EXECUTE FUNCTION entries_event();

-- 0009's paywall_post (same arguments, same result), and its charge's events.
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
