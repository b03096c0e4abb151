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
