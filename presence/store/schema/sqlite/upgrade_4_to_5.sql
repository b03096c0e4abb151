-- Version 5: crash safety. A node's rows (devices, subscriptions) are owned by its incarnation,
-- nodes.name, new at every start; nodes.label is the --node name it was started with, so a node
-- restarting under its name reaps its predecessors at once. nodes.last_applied is the last change
-- the node has delivered (or handed to the waiting queue). A waiting update carries the number of the
-- change that made it, and a newer number replaces an older one (never a node's clock).
-- A fresh database is made with v4.sql and then this script: the full schema is v4.sql plus this.
ALTER TABLE nodes ADD COLUMN label TEXT NOT NULL DEFAULT '';
ALTER TABLE pending ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
-- A logged change holds the numbers first..seq: a group commit's changes get one number each.
ALTER TABLE changes ADD COLUMN first INTEGER NOT NULL DEFAULT 0;
UPDATE changes SET first = seq;
