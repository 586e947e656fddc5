-- outboxd 0012: dead letters kept apart from the partitions retention drops, and the
-- leases that let one instance at a time do a job every instance could do.
--
-- A dead letter is copied, in the transaction that makes it one, into
-- outbox_dead_letters, which retention never drops: every path that sets status to
-- DEAD_LETTER (bury, the reaper at max attempts, an unrouted or too large event, a
-- hand-written UPDATE) goes through the row trigger below, so none can forget to. The
-- copy follows the row while the row exists (a discard is copied; a redrive deletes
-- the copy); once retention dropped the row's partition, the copy is the dead letter:
-- listed, shown and redriven from there (a redrive puts the event back into outbox with
-- its id, tracking_id and aggregate, so it keeps its place in its aggregate's order).
CREATE TABLE IF NOT EXISTS outbox_dead_letters (
    tracking_id    uuid        PRIMARY KEY,
    id             bigint      NOT NULL UNIQUE,
    -- The row's created_at in outbox (its partition), or where it was.
    created_at     timestamptz NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    attempts       integer     NOT NULL,
    max_attempts   integer,
    last_error     text,
    delivered_to   text[]      NOT NULL,
    dead_since     timestamptz NOT NULL,
    discarded_at   timestamptz
);

-- Listed newest first, by id, among the undiscarded ones.
CREATE INDEX IF NOT EXISTS outbox_dead_letters_listed_idx ON outbox_dead_letters (id)
    WHERE discarded_at IS NULL;

CREATE OR REPLACE FUNCTION outbox_keep_dead_letter() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.status = 'DEAD_LETTER' THEN
        INSERT INTO outbox_dead_letters (tracking_id, id, created_at, aggregate_type,
                                         aggregate_id, event_type, payload, metadata,
                                         attempts, max_attempts, last_error, delivered_to,
                                         dead_since, discarded_at)
        VALUES (NEW.tracking_id, NEW.id, NEW.created_at, NEW.aggregate_type,
                NEW.aggregate_id, NEW.event_type, NEW.payload, NEW.metadata, NEW.attempts,
                NEW.max_attempts, NEW.last_error, NEW.delivered_to,
                coalesce(NEW.processed_at, now()), NEW.discarded_at)
        ON CONFLICT (tracking_id) DO UPDATE
           SET id = EXCLUDED.id,
               created_at = EXCLUDED.created_at,
               attempts = EXCLUDED.attempts,
               max_attempts = EXCLUDED.max_attempts,
               last_error = EXCLUDED.last_error,
               delivered_to = EXCLUDED.delivered_to,
               dead_since = EXCLUDED.dead_since,
               discarded_at = EXCLUDED.discarded_at;
    ELSE
        DELETE FROM outbox_dead_letters WHERE tracking_id = OLD.tracking_id;
    END IF;
    RETURN NULL;
END;
$$;

-- Only rows entering, changing in or leaving DEAD_LETTER run the function; every
-- other INSERT or UPDATE (produce, claim, complete, retry) pays one comparison.
DROP TRIGGER IF EXISTS outbox_keep_dead_letter ON outbox;
CREATE TRIGGER outbox_keep_dead_letter
    AFTER UPDATE ON outbox
    FOR EACH ROW
    WHEN (OLD.status = 'DEAD_LETTER' OR NEW.status = 'DEAD_LETTER')
    EXECUTE FUNCTION outbox_keep_dead_letter();
DROP TRIGGER IF EXISTS outbox_keep_inserted_dead_letter ON outbox;
CREATE TRIGGER outbox_keep_inserted_dead_letter
    AFTER INSERT ON outbox
    FOR EACH ROW
    WHEN (NEW.status = 'DEAD_LETTER')
    EXECUTE FUNCTION outbox_keep_dead_letter();

-- The dead letters already there.
INSERT INTO outbox_dead_letters (tracking_id, id, created_at, aggregate_type, aggregate_id,
                                 event_type, payload, metadata, attempts, max_attempts,
                                 last_error, delivered_to, dead_since, discarded_at)
SELECT tracking_id, id, created_at, aggregate_type, aggregate_id, event_type, payload,
       metadata, attempts, max_attempts, last_error, delivered_to,
       coalesce(processed_at, created_at), discarded_at
  FROM outbox
 WHERE status = 'DEAD_LETTER'
ON CONFLICT DO NOTHING;

-- A job one instance at a time does (retention): whoever holds an unexpired row does
-- it; the others skip. A table, not a session advisory lock: database.url may point at
-- a transaction pooler, where a session lock is held by whichever client the pooler
-- hands the server connection to next.
CREATE TABLE IF NOT EXISTS outbox_leases (
    name       text        PRIMARY KEY,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL
);
