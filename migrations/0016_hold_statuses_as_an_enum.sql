-- A hold's status as an enum type, not text under a CHECK. Each table this release
-- retypes has a migration (one transaction) of its own (0016-0018): it locks that table
-- alone, so it cannot deadlock with the requests a running proxy keeps sending, which
-- lock the ledger's tables in more than one order.
--
-- PostgreSQL reads a table's CHECK constraints from their stored text and plans them
-- again at every statement that inserts or updates the table, and checks all of them at
-- every update, whatever it changes; the list of statuses was the dearest of the
-- hold's. An enum admits the same names and nothing else, at no cost per statement.
-- (A hold's amount stays a bigint under its CHECK: as a domain, its value in a function
-- compiled before the upgrade, paywall_void's, would no longer match the plans that
-- function keeps, and a void on a connection opened before it would fail.)
--
-- Text is still accepted where a status is written (an assignment cast), and it reads
-- back as the same names. SQL of one's own that compares it with text (a text-typed
-- parameter, LIKE, = ANY(text[])) casts it: status::text. The upgrade rewrites holds
-- once, under an exclusive lock.

CREATE TYPE hold_status AS ENUM ('pending', 'posted', 'voided', 'expired');
CREATE CAST (text AS hold_status) WITH INOUT AS ASSIGNMENT;

-- What reads the status goes while its type changes, and comes back as it was.
DROP INDEX holds_pending_expiry;
DROP TRIGGER holds_resolve_once ON holds;
DROP TRIGGER holds_expired ON holds;
ALTER TABLE holds DROP CONSTRAINT holds_status_check, DROP CONSTRAINT holds_check,
    ALTER COLUMN status DROP DEFAULT;
ALTER TABLE holds ALTER COLUMN status TYPE hold_status USING status::hold_status,
    ALTER COLUMN status SET DEFAULT 'pending',
    ADD CONSTRAINT holds_check CHECK ((status = 'pending') = (resolved_at IS NULL));
CREATE INDEX holds_pending_expiry ON holds (expires_at) WHERE status = 'pending';
CREATE TRIGGER holds_resolve_once BEFORE UPDATE ON holds
    FOR EACH ROW WHEN (OLD.status <> 'pending') EXECUTE FUNCTION holds_resolve_once();
CREATE TRIGGER holds_expired AFTER UPDATE OF status ON holds
    FOR EACH ROW WHEN (NEW.status = 'expired') EXECUTE FUNCTION holds_event();
-- A column's statistics go with its old type: they are gathered again, unless the
-- table is empty (a new database), where a planner told "empty" would scan it whole
-- as it grows, until autovacuum analyzes it.
DO $$ BEGIN IF EXISTS (SELECT FROM holds) THEN ANALYZE holds; END IF; END $$;
