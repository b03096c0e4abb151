-- Version 2: several nodes share one database. Devices carry their session and what they show to
-- which application, so any node can compute a person's status; the change log and the node
-- registry carry status changes between nodes and let a surviving node clean up after a dead one.

ALTER TABLE devices ADD COLUMN session TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN scope TEXT;                          -- JSON list of app ids; NULL: all
ALTER TABLE devices ADD COLUMN overrides TEXT NOT NULL DEFAULT '{}'; -- JSON {app_id: status}

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
