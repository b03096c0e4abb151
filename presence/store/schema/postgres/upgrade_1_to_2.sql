-- Version 2: several nodes share one database. Devices carry their session and what they show to
-- which application, so any node can compute a person's status; the change log and the node
-- registry carry status changes between nodes and let a surviving node clean up after a dead one.

ALTER TABLE devices ADD COLUMN session text NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN scope text;                          -- JSON list of app ids; NULL: all
ALTER TABLE devices ADD COLUMN overrides text NOT NULL DEFAULT '{}'; -- JSON {app_id: status}

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
