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
