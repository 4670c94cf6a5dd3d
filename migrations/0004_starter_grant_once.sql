-- The starter grant is owed to every user once, however the user was first seen: by a
-- completion, a deposit, a connect link or a limits change. A flag on the user records
-- that it was written; existing users count as granted when they have a grant entry.
ALTER TABLE users ADD COLUMN starter_granted boolean NOT NULL DEFAULT false;
UPDATE users u SET starter_granted = EXISTS (
    SELECT 1 FROM entries e JOIN accounts a ON a.id = e.account_id
    WHERE a.paywall_id = u.paywall_id AND a.user_id = u.user_id AND e.kind = 'grant');

-- Create the user if needed, with accounts for p_assets, and write the starter grant
-- the first time this runs for the user.
CREATE FUNCTION paywall_open_user(
    p_paywall text, p_user text, p_assets text[], p_grant_asset text, p_grant bigint
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_first boolean;
    v_account bigint;
    v_balance bigint;
BEGIN
    INSERT INTO users (paywall_id, user_id) VALUES (p_paywall, p_user)
    ON CONFLICT DO NOTHING;
    INSERT INTO accounts (paywall_id, user_id, asset)
    SELECT p_paywall, p_user, a
    FROM unnest(CASE WHEN p_grant > 0 THEN p_assets || p_grant_asset ELSE p_assets END) AS a
    ON CONFLICT (paywall_id, user_id, asset) DO NOTHING;
    UPDATE users SET starter_granted = true
    WHERE paywall_id = p_paywall AND user_id = p_user AND NOT starter_granted
    RETURNING true INTO v_first;
    IF v_first AND p_grant > 0 THEN
        UPDATE accounts SET balance = balance + p_grant
        WHERE paywall_id = p_paywall AND user_id = p_user AND asset = p_grant_asset
        RETURNING id, balance INTO v_account, v_balance;
        INSERT INTO entries (account_id, kind, amount, balance_after, metadata)
        VALUES (v_account, 'grant', p_grant, v_balance, '{"reason": "starter grant"}');
    END IF;
END $$;
