-- Version 7: pairing devices that have no browser (issue 17), in the manner of RFC 8628.
-- A pairing request lives until the person decides and the device takes the answer, or until it
-- expires; only the hashes of its two codes are kept. A paired device is listed on /me and named in
-- its certificate; deleting its row revokes it.
-- A fresh database is made with v4.sql and then the upgrades: the full schema is v4.sql plus these.
CREATE TABLE pairing_requests (
    device_hash  text PRIMARY KEY,          -- sha256 of the device code (the device's secret)
    user_hash    text NOT NULL UNIQUE,      -- sha256 of the user code (what the person enters)
    public_key   text NOT NULL,             -- the device's key, JSON in BrowserID's form
    name         text NOT NULL,             -- the name the device suggested
    created_at   double precision NOT NULL,
    expires_at   double precision NOT NULL,
    polled_at    double precision NOT NULL DEFAULT 0,
    state        text NOT NULL DEFAULT 'pending',   -- pending, approved or denied
    email        text,                      -- once approved: whose device
    pairing      text                       -- once approved: the paired device's id
);
CREATE INDEX pairing_requests_expires ON pairing_requests (expires_at);

CREATE TABLE paired_devices (
    id           text PRIMARY KEY,
    email        text NOT NULL,
    name         text NOT NULL,             -- unique per person: the device id it connects with
    public_key   text NOT NULL,
    created_at   double precision NOT NULL,
    last_seen    double precision                       -- its last connect, disconnect or renewal; NULL: never
);
CREATE UNIQUE INDEX paired_devices_name ON paired_devices (email, name);
