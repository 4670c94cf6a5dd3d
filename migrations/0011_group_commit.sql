-- Group commit: holds, posts and voids of requests in flight at the same moment go to
-- PostgreSQL as one batch (proxy/batcher.py), one pipeline of calls to this function
-- ending in one Sync: one implicit transaction, one commit. One function for the three,
-- so a batch runs its calls in the order they were made, and always exactly one row per
-- call, so the rows map onto the calls. Each operation is the function it always was; a
-- hold placed also answers its account's posted balance (``balance``), so that a charge
-- within the hold knows the balance after it without asking again.
CREATE FUNCTION paywall_apply(
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
BEGIN
    IF p_op = 'hold' THEN
        SELECT h.connected, h.hold_id, h.available, h.cap, h.cap_used, h.cap_resets
        INTO connected, hold_id, available, cap, cap_used, cap_resets
        FROM paywall_hold(p_paywall, p_user, p_asset, p_amount, p_request, p_model,
                          p_require_connect, p_ttl, p_caps, p_tz) h;
        IF hold_id IS NOT NULL THEN
            SELECT a.balance INTO balance FROM holds h JOIN accounts a ON a.id = h.account_id
            WHERE h.id = hold_id;
        END IF;
    ELSIF p_op = 'post' THEN
        SELECT p.charged, p.balance_after, p.uncharged
        INTO charged, balance_after, uncharged
        FROM paywall_post(p_hold, p_cost, p_prompt, p_completion, p_cached, p_reasoning,
                          p_outcome, p_metadata) p;
        resolved := FOUND;
    ELSIF p_op = 'void' THEN
        resolved := paywall_void(p_hold, p_status);
    ELSE
        RAISE EXCEPTION 'not a ledger operation: %', p_op;
    END IF;
    RETURN NEXT;
END $$;
