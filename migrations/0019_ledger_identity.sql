-- The ledger's identity. A settlement kept on disk (a spool file, a journal) is named
-- after the ledger it is owed to, so that a proxy on another database sharing the spool
-- directory leaves it for that database instead of posting its hold ids here, where the
-- same ids are other requests' holds. One row, made once. A copy of the database (a
-- dump restored as staging, a backup restored beside or in place of the original)
-- keeps it: such a copy is given an id of its own with
-- UPDATE ledger_identity SET id = gen_random_uuid(), so that it leaves the files of
-- the original (whose holds it may number again) alone.

CREATE TABLE ledger_identity (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    one boolean NOT NULL DEFAULT true UNIQUE CHECK (one)
);
INSERT INTO ledger_identity DEFAULT VALUES;
