-- Sign-in providers name users like "auth0|64f…" or "google-oauth2|1045…": user ids
-- may hold "|" too.
ALTER TABLE users DROP CONSTRAINT users_user_id_check;
ALTER TABLE users ADD CONSTRAINT users_user_id_check
    CHECK (user_id ~ '^[A-Za-z0-9._:@|-]{1,128}$');
