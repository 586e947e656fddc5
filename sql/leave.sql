-- leave: this instance stops listening (it shuts down): its row in outbox_instances
-- goes, and the other instances are told to read the members again, so they take its
-- share of the notified events over at once (each sweeps what it gains).
-- $1 name text.
WITH gone AS (
    DELETE FROM outbox_instances WHERE name = $1::text RETURNING name
)
SELECT pg_notify('outbox_events', 'members') FROM gone
