-- outboxd 0010: per-aggregate ordering.
--
-- With relay.ordering = "per_aggregate", at most one event of an aggregate
-- (aggregate_type, aggregate_id) is in flight at a time and each destination receives
-- an aggregate's events in id order. The claim statements enforce it: an event is
-- claimed only when no earlier event of its aggregate is unfinished; one that is not is
-- held (PENDING, next_attempt_at = 'infinity', out of every due index) until the
-- outcome of the event before it releases it.

-- Settings every instance of this database must share, checked at start: `ordering`
-- holds the ordering rules (the default and each route's override) as JSON.
CREATE TABLE IF NOT EXISTS outbox_settings (
    name   text        PRIMARY KEY,
    value  text        NOT NULL,
    set_at timestamptz NOT NULL DEFAULT now(),
    set_by text        NOT NULL
);

-- A dead letter an operator discarded (`outboxd dead-letters discard --reason`): it
-- stays for the record, no longer counts as a dead letter, and no longer holds back
-- the later events of its aggregate. Adding a nullable column rewrites nothing.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS discarded_at timestamptz;

-- The record of redrives keeps discards too.
ALTER TABLE outbox_redrives ADD COLUMN IF NOT EXISTS action text NOT NULL DEFAULT 'redrive'
    CHECK (action IN ('redrive', 'discard'));

-- An aggregate's unfinished events by id: what the claim asks of each candidate ("is an
-- earlier event of this aggregate unfinished?") is one probe per partition, whatever
-- the aggregate's history, and releasing an aggregate's next held event reads only its
-- unfinished ones. Built as 0007's index is: on the parent alone here (instantly), then
-- on each partition with CREATE INDEX CONCURRENTLY by `outboxd migrate`.
CREATE INDEX IF NOT EXISTS outbox_unfinished_idx ON ONLY outbox (aggregate_type, aggregate_id, id)
    WHERE status <> 'PUBLISHED';

-- Each aggregate's held events by id (PENDING at 'infinity'), for the statements that
-- release them (unhold_*): an aggregate's next held event is one probe of a small index
-- however many events are held or due. Built as the index above.
CREATE INDEX IF NOT EXISTS outbox_held_idx ON ONLY outbox (aggregate_type, aggregate_id, id)
    WHERE status = 'PENDING' AND next_attempt_at = 'infinity';
