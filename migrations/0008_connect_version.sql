-- A connect link is issued against the user's connection version; each disconnect moves
-- it on, so a link issued before a disconnect no longer connects the user (a fresh one
-- does). Users start at 0; links issued before this migration count as version 0.
ALTER TABLE users ADD COLUMN connect_version integer NOT NULL DEFAULT 0;
