-- Checks on columns that a request's statements do not write, made where they are
-- written: a domain's CHECK runs when a value is stored in a column of its type, a
-- table's CHECK at every insert and update of the row, whatever the update changes,
-- and PostgreSQL plans a table's CHECKs again at every statement (see 0016).
--
-- - spend_windows.period: a capped request updates each of its windows twice (hold,
--   post) and writes a window's period once, when the window opens.
-- - accounts.owed: neither the hold nor the post writes it.
-- - holds.amount: written when the hold is placed; the post updates the hold.
--
-- The same values are admitted as before; the columns read as text and bigint as
-- before. bench/ledger_cost.py --upto 16 --upto all (backend CPU per hold+post, median
-- of 5): with the four spend caps 437 → 402 µs; without caps 211 → 206 µs (median of 7).
-- The upgrade rewrites spend_windows, accounts and holds once, under an exclusive lock.

CREATE DOMAIN spend_period AS text CHECK (VALUE IN ('day', 'month'));
CREATE DOMAIN ledger_amount AS bigint CHECK (VALUE >= 0);

ALTER TABLE spend_windows DROP CONSTRAINT spend_windows_period_check,
    ALTER COLUMN period TYPE spend_period;
ALTER TABLE accounts DROP CONSTRAINT accounts_owed_check,
    ALTER COLUMN owed TYPE ledger_amount;
ALTER TABLE holds DROP CONSTRAINT holds_amount_check,
    ALTER COLUMN amount TYPE ledger_amount;
