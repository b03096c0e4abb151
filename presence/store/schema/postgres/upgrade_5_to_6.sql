-- Version 6: applications in sync (issue 15). One row per person who ever changed: the number of
-- their last logged change (an application's state of the person is current at it) and when a
-- device of theirs was last online (last_active; NULL: never seen online). Keyset pages of an
-- application's grants by email need the (app_id, email) index.
-- A fresh database is made with v4.sql and then the upgrades: the full schema is v4.sql plus these.
CREATE TABLE people (
    email        text PRIMARY KEY,
    seq          bigint NOT NULL DEFAULT 0,
    last_active  double precision
);
CREATE INDEX grants_app_email ON grants (app_id, email);
-- A waiting update carries the person's last_active too.
ALTER TABLE pending ADD COLUMN last_active double precision;
