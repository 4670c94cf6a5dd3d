-- A request's ledger work at less cost to PostgreSQL. Measured with
-- bench/ledger_cost.py (backend CPU per hold and its post, batched as in production),
-- these were the parts that cost without doing anything:
--
-- - paywall_apply called paywall_hold or paywall_post through a query (a function scan
--   and a result set for one row), and after a hold read the account's balance again
--   through a join of holds and accounts. Their bodies are now paywall_apply's own; the
--   balance comes back from the account's update (the hold does not change it).
-- - A post read its account's paywall, user and asset in a statement of their own: now
--   from the update that resolves the hold, joined to the account (no lock taken on it:
--   as before, the account is locked only after the windows).
-- - With no caps, a hold still ran the query that orders the caps and a post the query
--   that orders its windows; each ran on an empty array. They are skipped when empty.
-- - holds_resolve_once ran a PL/pgSQL trigger on every resolving update to find the
--   hold pending; it now fires only when the hold is not pending (when it refuses).
--
-- Each operation does what it did, in the same order, and answers the same columns;
-- locks are taken as 0003 lays down (windows in the caps' order, then the account).
-- paywall_hold and paywall_post stay, answering through paywall_apply: one body each.

-- 0011's paywall_apply (same arguments, same results), 0013's hold and post in it.
CREATE OR REPLACE FUNCTION paywall_apply(
    p_op text,
    -- a hold (paywall_hold)
    p_paywall text, p_user text, p_asset text, p_amount bigint, p_request text,
    p_model text, p_require_connect boolean, p_ttl double precision, p_caps jsonb,
    p_tz text,
    -- a post or a void (paywall_post, paywall_void)
    p_hold bigint, p_cost bigint, p_prompt integer, p_completion integer,
    p_cached integer, p_reasoning integer, p_outcome text, p_metadata jsonb,
    p_status text
) RETURNS TABLE (connected boolean, hold_id bigint, available bigint, cap text,
                 cap_used bigint, cap_resets timestamptz,
                 charged bigint, balance_after bigint, uncharged bigint,
                 resolved boolean, balance bigint)
LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
    x jsonb;
    v_starts date;
    v_used bigint;
    v_account bigint;
    v_windows jsonb := '[]';
    v_amount bigint;
    v_request text;
    v_model text;
    v_paywall text;
    v_user text;
    v_asset text;
    v_beyond bigint;
    v_metadata jsonb := p_metadata;
    v_entry bigint;
    v_low bigint;
BEGIN
    IF p_op = 'hold' THEN
        SELECT u.connected_at IS NOT NULL INTO connected
        FROM users u WHERE u.paywall_id = p_paywall AND u.user_id = p_user;
        IF connected IS NULL OR (p_require_connect AND NOT connected) THEN
            SELECT greatest(a.balance - a.held - a.owed, 0) INTO available FROM accounts a
            WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset;
            RETURN NEXT;
            RETURN;
        END IF;
        IF p_caps <> '[]' THEN  -- caps first, in a fixed order: windows before accounts
            FOR c IN SELECT value FROM jsonb_array_elements(p_caps)
                     ORDER BY value->>'scope', value->>'period' LOOP
                v_starts := date_trunc(c->>'period', now() AT TIME ZONE p_tz)::date;
                UPDATE spend_windows w SET held = w.held + p_amount
                WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope' AND w.asset = p_asset
                  AND w.period = c->>'period' AND w.starts = v_starts
                  AND w.spent + w.held + p_amount <= (c->>'cap')::bigint;
                IF NOT FOUND THEN
                    INSERT INTO spend_windows (paywall_id, scope, asset, period, starts)
                    VALUES (p_paywall, c->>'scope', p_asset, c->>'period', v_starts)
                    ON CONFLICT DO NOTHING;
                    SELECT w.spent + w.held INTO v_used FROM spend_windows w
                    WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope'
                      AND w.asset = p_asset AND w.period = c->>'period'
                      AND w.starts = v_starts
                    FOR UPDATE;
                    IF v_used + p_amount > (c->>'cap')::bigint THEN
                        PERFORM paywall_unhold(p_paywall, p_asset, p_amount, v_windows);
                        cap := CASE WHEN c->>'scope' = '' THEN 'paywall_' ELSE 'user_' END
                               || CASE WHEN c->>'period' = 'day' THEN 'daily'
                                       ELSE 'monthly' END;
                        cap_used := v_used;
                        cap_resets := ((v_starts + CASE WHEN c->>'period' = 'day'
                                                        THEN interval '1 day'
                                                        ELSE interval '1 month' END
                                        )::timestamp AT TIME ZONE p_tz);
                        SELECT greatest(a.balance - a.held - a.owed, 0) INTO available
                        FROM accounts a WHERE a.paywall_id = p_paywall
                        AND a.user_id = p_user AND a.asset = p_asset;
                        RETURN NEXT;
                        RETURN;
                    END IF;
                    UPDATE spend_windows w SET held = w.held + p_amount
                    WHERE w.paywall_id = p_paywall AND w.scope = c->>'scope'
                      AND w.asset = p_asset AND w.period = c->>'period'
                      AND w.starts = v_starts;
                END IF;
                v_windows := v_windows || jsonb_build_object(
                    'scope', c->>'scope', 'period', c->>'period', 'starts', v_starts);
            END LOOP;
        END IF;

        UPDATE accounts a SET held = a.held + p_amount
        WHERE a.paywall_id = p_paywall AND a.user_id = p_user AND a.asset = p_asset
          AND a.balance - a.held - a.owed >= p_amount
        RETURNING a.id, a.balance - a.held - a.owed + p_amount, a.balance
        INTO v_account, available, balance;
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
    ELSIF p_op = 'post' THEN
        IF p_cost < 0 THEN
            RAISE EXCEPTION 'a charge cannot be negative: %', p_cost;
        END IF;
        UPDATE holds h SET status = 'posted', resolved_at = now()
        FROM accounts a
        WHERE h.id = p_hold AND h.status = 'pending' AND a.id = h.account_id
        RETURNING h.account_id, h.amount, h.request_id, h.model, h.windows,
                  a.paywall_id, a.user_id, a.asset
        INTO v_account, v_amount, v_request, v_model, v_windows, v_paywall, v_user, v_asset;
        resolved := FOUND;
        IF NOT resolved THEN
            RETURN NEXT;
            RETURN;
        END IF;
        IF p_cost <= v_amount THEN  -- the usual case: the hold covers it, nothing to read
            charged := p_cost;
            uncharged := 0;
        ELSE
            -- Beyond the hold, what is charged depends on the account: the windows are
            -- locked first, as everywhere (see 0003), and written once it is known.
            FOR x IN SELECT value FROM jsonb_array_elements(v_windows)
                     ORDER BY value->>'scope', value->>'period' LOOP
                PERFORM 1 FROM spend_windows w
                WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope' AND w.asset = v_asset
                  AND w.period = x->>'period' AND w.starts = (x->>'starts')::date
                FOR UPDATE;
            END LOOP;
            -- This hold's own amount is part of "held": what lies beyond it is balance -
            -- held, less what is owed.
            SELECT greatest(a.balance - a.held - a.owed, 0) INTO v_beyond FROM accounts a
            WHERE a.id = v_account FOR UPDATE;
            charged := least(p_cost, v_amount + v_beyond);
            uncharged := p_cost - charged;
            IF uncharged > 0 THEN
                v_metadata := v_metadata || jsonb_build_object('uncharged', uncharged);
            END IF;
        END IF;
        IF v_windows <> '[]' THEN
            FOR x IN SELECT value FROM jsonb_array_elements(v_windows)
                     ORDER BY value->>'scope', value->>'period' LOOP
                UPDATE spend_windows w
                SET held = w.held - v_amount, spent = w.spent + charged
                WHERE w.paywall_id = v_paywall AND w.scope = x->>'scope'
                  AND w.asset = v_asset AND w.period = x->>'period'
                  AND w.starts = (x->>'starts')::date;
            END LOOP;
        END IF;
        UPDATE accounts a SET balance = a.balance - charged, held = a.held - v_amount
        WHERE a.id = v_account RETURNING a.balance INTO balance_after;
        INSERT INTO entries (account_id, kind, amount, balance_after, request_id, hold_id,
                             model, prompt_tokens, completion_tokens, cached_tokens,
                             reasoning_tokens, outcome, metadata)
        VALUES (v_account, 'charge', -charged, balance_after, v_request, p_hold, v_model,
                p_prompt, p_completion, p_cached, p_reasoning, p_outcome, v_metadata)
        RETURNING id INTO v_entry;

        PERFORM paywall_emit(v_paywall, v_user, v_request, 'charge.created',
                             jsonb_build_object(
            'entry_id', v_entry, 'kind', 'charge', 'asset', v_asset, 'amount', -charged,
            'balance_after', balance_after, 'metadata', v_metadata,
            'cost', charged, 'model', v_model, 'prompt_tokens', p_prompt,
            'completion_tokens', p_completion, 'cached_tokens', p_cached,
            'reasoning_tokens', p_reasoning, 'outcome', p_outcome, 'hold_id', p_hold));
        IF p_outcome = 'reaped' THEN
            PERFORM paywall_emit(v_paywall, v_user, v_request, 'hold.expired',
                                 jsonb_build_object('hold_id', p_hold, 'posted', true,
                                                    'cost', charged, 'asset', v_asset));
        END IF;
        IF charged > 0 THEN  -- crossing the low-balance threshold, once per crossing
            SELECT b.threshold INTO v_low FROM balance_alerts b
            WHERE b.paywall_id = v_paywall AND b.user_id IN (v_user, '')
              AND b.asset = v_asset
            ORDER BY b.user_id DESC LIMIT 1;
            IF v_low IS NOT NULL AND balance_after + charged >= v_low
               AND balance_after < v_low THEN
                PERFORM paywall_emit(v_paywall, v_user, v_request, 'balance.low',
                                     jsonb_build_object('asset', v_asset, 'threshold', v_low,
                                                        'balance', balance_after));
            END IF;
        END IF;
    ELSIF p_op = 'void' THEN
        resolved := paywall_void(p_hold, p_status);
    ELSE
        RAISE EXCEPTION 'not a ledger operation: %', p_op;
    END IF;
    RETURN NEXT;
END $$;

-- The same rule, checked only where it refuses.
DROP TRIGGER holds_resolve_once ON holds;
CREATE TRIGGER holds_resolve_once BEFORE UPDATE ON holds
    FOR EACH ROW WHEN (OLD.status <> 'pending') EXECUTE FUNCTION holds_resolve_once();

-- 0013's paywall_hold and paywall_post (same arguments, same results): paywall_apply's.
CREATE OR REPLACE FUNCTION paywall_hold(
    p_paywall text, p_user text, p_asset text, p_amount bigint, p_request text,
    p_model text, p_require_connect boolean, p_ttl double precision, p_caps jsonb,
    p_tz text
) RETURNS TABLE (connected boolean, hold_id bigint, available bigint, cap text,
                 cap_used bigint, cap_resets timestamptz)
LANGUAGE sql AS $$
    SELECT r.connected, r.hold_id, r.available, r.cap, r.cap_used, r.cap_resets
    FROM paywall_apply('hold', p_paywall, p_user, p_asset, p_amount, p_request, p_model,
                       p_require_connect, p_ttl, p_caps, p_tz,
                       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL) r
$$;

CREATE OR REPLACE FUNCTION paywall_post(
    p_hold bigint, p_cost bigint, p_prompt integer, p_completion integer,
    p_cached integer, p_reasoning integer, p_outcome text, p_metadata jsonb
) RETURNS TABLE (charged bigint, balance_after bigint, uncharged bigint)
LANGUAGE sql AS $$
    SELECT r.charged, r.balance_after, r.uncharged
    FROM paywall_apply('post', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       p_hold, p_cost, p_prompt, p_completion, p_cached, p_reasoning,
                       p_outcome, p_metadata, NULL) r
    WHERE r.resolved
$$;
