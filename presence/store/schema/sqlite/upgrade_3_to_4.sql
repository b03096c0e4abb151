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
