-- Presence schema, version 1 (PostgreSQL). Times are epoch seconds (double precision).
-- presence/store/schema/sqlite/v1.sql holds the same tables for SQLite: change both together.

CREATE TABLE developers (
    email       text PRIMARY KEY,
    created_at  double precision NOT NULL
);

CREATE TABLE applications (
    id                bigserial PRIMARY KEY,
    app_id            text UNIQUE,              -- NULL until the domain is verified
    developer         text NOT NULL REFERENCES developers (email),
    domain            text NOT NULL,
    name              text NOT NULL,
    description       text NOT NULL,
    verification_key  text NOT NULL,
    state             text NOT NULL CHECK (state IN ('pending', 'verified', 'active')),
    api_key_hash      text,
    created_at        double precision NOT NULL,
    verified_at       double precision,
    activated_at      double precision
);
CREATE INDEX applications_developer ON applications (developer);

CREATE TABLE grants (
    email       text NOT NULL,
    app_id      text NOT NULL REFERENCES applications (app_id) ON DELETE CASCADE,
    uid         text NOT NULL,
    created_at  double precision NOT NULL,
    PRIMARY KEY (email, app_id),
    UNIQUE (app_id, uid)
);

CREATE TABLE devices (
    email      text NOT NULL,
    device     text NOT NULL,
    node       text NOT NULL,
    status     text NOT NULL,
    last_seen  double precision NOT NULL,
    PRIMARY KEY (email, device)
);
CREATE INDEX devices_node ON devices (node);

CREATE TABLE statuses (
    email       text PRIMARY KEY,
    status      text NOT NULL,
    changed_at  double precision NOT NULL
);

-- The latest change per person waiting for an application that has no connection.
CREATE TABLE pending (
    app_id  text NOT NULL,
    email   text NOT NULL,
    uid     text NOT NULL,
    status  text NOT NULL,
    at      double precision NOT NULL,
    PRIMARY KEY (app_id, email)
);
CREATE INDEX pending_at ON pending (at);
