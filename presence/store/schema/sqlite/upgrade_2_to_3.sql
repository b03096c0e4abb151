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
