-- Presence schema, version 4 (SQLite). Times are epoch seconds (REAL).
-- presence/store/schema/postgres/v4.sql holds the same tables for PostgreSQL: change both together.

CREATE TABLE developers (
    email       TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
);

CREATE TABLE applications (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id            TEXT UNIQUE,              -- NULL until the domain is verified
    developer         TEXT NOT NULL REFERENCES developers (email),
    domain            TEXT NOT NULL,
    name              TEXT NOT NULL,
    description       TEXT NOT NULL,
    verification_key  TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('pending', 'verified', 'active')),
    api_key_hash      TEXT,
    created_at        REAL NOT NULL,
    verified_at       REAL,
    activated_at      REAL
);
CREATE INDEX applications_developer ON applications (developer);

CREATE TABLE grants (
    email       TEXT NOT NULL,
    app_id      TEXT NOT NULL REFERENCES applications (app_id) ON DELETE CASCADE,
    uid         TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (email, app_id),
    UNIQUE (app_id, uid)
);

CREATE TABLE devices (
    email      TEXT NOT NULL,
    device     TEXT NOT NULL,
    node       TEXT NOT NULL,
    status     TEXT NOT NULL,
    last_seen  REAL NOT NULL,
    session    TEXT NOT NULL DEFAULT '',
    scope      TEXT,                 -- JSON list of app ids; NULL: all
    overrides  TEXT NOT NULL DEFAULT '{}',  -- JSON {app_id: status}
    PRIMARY KEY (email, device)
);
CREATE INDEX devices_node ON devices (node);

CREATE TABLE statuses (
    email       TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    changed_at  REAL NOT NULL
);

-- The latest change per person waiting for an application that has no connection.
CREATE TABLE pending (
    app_id  TEXT NOT NULL,
    email   TEXT NOT NULL,
    uid     TEXT NOT NULL,
    status  TEXT NOT NULL,
    at      REAL NOT NULL,
    PRIMARY KEY (app_id, email)
);
CREATE INDEX pending_at ON pending (at);

-- The nodes sharing this database, their heartbeat, and the last change each applied.
CREATE TABLE nodes (
    name          TEXT PRIMARY KEY,
    started_at    REAL NOT NULL,
    heartbeat_at  REAL NOT NULL,
    last_applied  INTEGER NOT NULL DEFAULT 0
);

-- Which node holds connections of which application (so changes for absent ones wait in pending).
CREATE TABLE subscriptions (
    node    TEXT NOT NULL,
    app_id  TEXT NOT NULL,
    PRIMARY KEY (node, app_id)
);
CREATE INDEX subscriptions_app ON subscriptions (app_id);

-- The change log: one row per status change, numbered in commit order by the bus counter.
CREATE TABLE bus (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL
);
INSERT INTO bus (id, seq) VALUES (1, 0);

CREATE TABLE changes (
    seq      INTEGER PRIMARY KEY,
    origin   TEXT NOT NULL,
    at       REAL NOT NULL,
    payload  TEXT NOT NULL
);
CREATE INDEX changes_at ON changes (at);

-- Version 3: live notifications. One FIFO queue per (person, application), in id order; an item
-- lives until a device of the person acknowledges it or it expires.

CREATE TABLE notifications (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    email    TEXT NOT NULL,
    app_id   TEXT NOT NULL REFERENCES applications (app_id) ON DELETE CASCADE,
    message  TEXT NOT NULL,
    action   TEXT,
    at       REAL NOT NULL
);
CREATE INDEX notifications_queue ON notifications (email, app_id, id);
CREATE INDEX notifications_at ON notifications (at);

-- Version 4: the web pages. One-time login links (only their hash), browser sessions (only the hash
-- of the session id), secrets every node must share (the cookie signing secret, the identity key)
-- and where each application's domain verification polling stands.
CREATE TABLE login_tokens (
    token_hash  TEXT PRIMARY KEY,          -- sha256 of the token in the link; the token is never stored
    email       TEXT NOT NULL,
    next_path   TEXT NOT NULL,             -- the local page to go to once signed in
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX login_tokens_email ON login_tokens (email, created_at);

CREATE TABLE web_sessions (
    id_hash     TEXT PRIMARY KEY,          -- sha256 of the session id in the cookie
    email       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);

CREATE TABLE web_secrets (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    created_at  REAL NOT NULL
);

CREATE TABLE verifications (
    app         INTEGER PRIMARY KEY REFERENCES applications (id) ON DELETE CASCADE,
    node        TEXT NOT NULL,             -- the node that polls
    attempts    INTEGER NOT NULL,
    last_error  TEXT NOT NULL,
    checked_at  REAL NOT NULL,
    next_at     REAL,                      -- NULL: polling stopped
    poll_until  REAL NOT NULL
);
