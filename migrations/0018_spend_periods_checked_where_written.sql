-- A spend window's period checked where it is written (a domain, see 0016): a capped
-- request updates each of its windows twice (its hold, its post) and writes a window's
-- period once, when the window opens. It reads as text, as before. The upgrade rewrites
-- spend_windows once, under an exclusive lock.

CREATE DOMAIN spend_period AS text CHECK (VALUE IN ('day', 'month'));

ALTER TABLE spend_windows DROP CONSTRAINT spend_windows_period_check,
    ALTER COLUMN period TYPE spend_period;
-- Statistics gathered again, unless the table is empty (see 0016).
DO $$ BEGIN IF EXISTS (SELECT FROM spend_windows) THEN ANALYZE spend_windows; END IF; END $$;
