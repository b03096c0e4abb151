-- Presence schema, version 4 (PostgreSQL). Times are epoch seconds (double precision).
-- presence/store/schema/sqlite/v4.sql holds the same tables for SQLite: change both together.

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
    session    text NOT NULL DEFAULT '',
    scope      text,                 -- JSON list of app ids; NULL: all
    overrides  text NOT NULL DEFAULT '{}',  -- JSON {app_id: status}
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

-- The nodes sharing this database, their heartbeat, and the last change each applied.
CREATE TABLE nodes (
    name          text PRIMARY KEY,
    started_at    double precision NOT NULL,
    heartbeat_at  double precision NOT NULL,
    last_applied  bigint NOT NULL DEFAULT 0
);

-- Which node holds connections of which application (so changes for absent ones wait in pending).
CREATE TABLE subscriptions (
    node    text NOT NULL,
    app_id  text NOT NULL,
    PRIMARY KEY (node, app_id)
);
CREATE INDEX subscriptions_app ON subscriptions (app_id);

-- The change log: one row per status change, numbered in commit order by the bus counter.
CREATE TABLE bus (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL
);
INSERT INTO bus (id, seq) VALUES (1, 0);

CREATE TABLE changes (
    seq      bigint PRIMARY KEY,
    origin   text NOT NULL,
    at       double precision NOT NULL,
    payload  text NOT NULL
);
CREATE INDEX changes_at ON changes (at);

-- Version 3: live notifications. One FIFO queue per (person, application), in id order; an item
-- lives until a device of the person acknowledges it or it expires.

CREATE TABLE notifications (
    id       bigserial PRIMARY KEY,
    email    text NOT NULL,
    app_id   text NOT NULL REFERENCES applications (app_id) ON DELETE CASCADE,
    message  text NOT NULL,
    action   text,
    at       double precision NOT NULL
);
CREATE INDEX notifications_queue ON notifications (email, app_id, id);
CREATE INDEX notifications_at ON notifications (at);

-- Version 4: the web pages. One-time login links (only their hash), browser sessions (only the hash
-- of the session id), secrets every node must share (the cookie signing secret, the identity key)
-- and where each application's domain verification polling stands.
CREATE TABLE login_tokens (
    token_hash  text PRIMARY KEY,          -- sha256 of the token in the link; the token is never stored
    email       text NOT NULL,
    next_path   text NOT NULL,             -- the local page to go to once signed in
    created_at  double precision NOT NULL,
    expires_at  double precision NOT NULL
);
CREATE INDEX login_tokens_email ON login_tokens (email, created_at);

CREATE TABLE web_sessions (
    id_hash     text PRIMARY KEY,          -- sha256 of the session id in the cookie
    email       text NOT NULL,
    created_at  double precision NOT NULL,
    expires_at  double precision NOT NULL
);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);

CREATE TABLE web_secrets (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    created_at  double precision NOT NULL
);

CREATE TABLE verifications (
    app         bigint PRIMARY KEY REFERENCES applications (id) ON DELETE CASCADE,
    node        text NOT NULL,             -- the node that polls
    attempts    integer NOT NULL,
    last_error  text NOT NULL,
    checked_at  double precision NOT NULL,
    next_at     double precision,          -- NULL: polling stopped
    poll_until  double precision NOT NULL
);
