-- A new user may be owed grants in several assets: the paywall's starter grant and its
-- trial credits of each type. All are written once, the first time the user is opened.
DROP FUNCTION paywall_open_user(text, text, text[], text, bigint);

CREATE FUNCTION paywall_open_user(
    p_paywall text, p_user text, p_assets text[], p_grant_assets text[], p_grants bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_first boolean;
    v_account bigint;
    v_balance bigint;
    i integer;
BEGIN
    IF coalesce(array_length(p_grant_assets, 1), 0) <> coalesce(array_length(p_grants, 1), 0)
    THEN
        RAISE EXCEPTION 'one amount per grant asset';
    END IF;
    INSERT INTO users (paywall_id, user_id) VALUES (p_paywall, p_user)
    ON CONFLICT DO NOTHING;
    -- Accounts for p_assets, and for each asset actually granted (as before: a grant of
    -- 0 opens no account).
    INSERT INTO accounts (paywall_id, user_id, asset)
    SELECT p_paywall, p_user, a FROM unnest(p_assets || ARRAY(
        SELECT g.asset FROM unnest(p_grant_assets, p_grants) AS g(asset, amount)
        WHERE g.amount > 0)) AS a
    ORDER BY a
    ON CONFLICT (paywall_id, user_id, asset) DO NOTHING;
    UPDATE users SET starter_granted = true
    WHERE paywall_id = p_paywall AND user_id = p_user AND NOT starter_granted
    RETURNING true INTO v_first;
    IF v_first THEN
        FOR i IN 1 .. coalesce(array_length(p_grants, 1), 0) LOOP
            CONTINUE WHEN p_grants[i] <= 0;
            UPDATE accounts SET balance = balance + p_grants[i]
            WHERE paywall_id = p_paywall AND user_id = p_user AND asset = p_grant_assets[i]
            RETURNING id, balance INTO v_account, v_balance;
            INSERT INTO entries (account_id, kind, amount, balance_after, metadata)
            VALUES (v_account, 'grant', p_grants[i], v_balance, '{"reason": "starter grant"}');
        END LOOP;
    END IF;
END $$;
