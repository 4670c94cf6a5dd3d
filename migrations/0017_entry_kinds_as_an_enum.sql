-- An entry's kind as an enum type, not text under a CHECK listing the kinds (why: see
-- 0016). A request's post inserts one entry. Text is still accepted where a kind is
-- written (an assignment cast), and it reads back as the same names; SQL of one's own
-- that compares it with text casts it (kind::text), and it sorts in the order listed
-- here. The upgrade rewrites entries once, under an exclusive lock.

CREATE TYPE entry_kind AS ENUM ('grant', 'topup', 'deposit', 'charge', 'refund',
                                'adjustment');
CREATE CAST (text AS entry_kind) WITH INOUT AS ASSIGNMENT;

DROP TRIGGER entries_event ON entries;
ALTER TABLE entries DROP CONSTRAINT entries_kind_check, DROP CONSTRAINT entries_check,
    DROP CONSTRAINT entries_check1;
ALTER TABLE entries ALTER COLUMN kind TYPE entry_kind USING kind::entry_kind,
    ADD CONSTRAINT entries_check CHECK (kind <> 'charge' OR amount <= 0),
    ADD CONSTRAINT entries_check1
        CHECK (kind NOT IN ('grant', 'topup', 'deposit', 'refund') OR amount >= 0);
CREATE TRIGGER entries_event AFTER INSERT ON entries
    FOR EACH ROW WHEN (NEW.kind <> 'charge') EXECUTE FUNCTION entries_event();
-- Statistics gathered again, unless the table is empty (see 0016).
DO $$ BEGIN IF EXISTS (SELECT FROM entries) THEN ANALYZE entries; END IF; END $$;
