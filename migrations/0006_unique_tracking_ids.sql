-- outboxd 0006: a tracking_id is used once.
--
-- Consumers dedupe on the tracking_id (AMQP message_id, webhook-id). Two rows with the
-- same one would be sent with the same id, and a consumer would drop the second, real
-- event. A unique index on the partitioned outbox must include created_at, which makes
-- it useless here, so every tracking_id is also recorded in this table, keyed by it
-- alone: an INSERT that repeats one fails with SQLSTATE 23505 (unique_violation), as a
-- unique index would, and the producer's transaction rolls back. A producer that
-- retries an INSERT whose commit it did not see may read 23505 as "already there".
-- A redrive keeps its row (and its tracking_id): it is an UPDATE and records nothing.
-- `created_at` lets the rows be removed with their outbox partition.

CREATE TABLE outbox_tracking_ids (
    tracking_id uuid        PRIMARY KEY,
    created_at  timestamptz NOT NULL
);

-- Events already there (a duplicate from before keeps its first row here).
INSERT INTO outbox_tracking_ids (tracking_id, created_at)
SELECT tracking_id, min(created_at) FROM outbox GROUP BY tracking_id;

-- The trigger runs with the producer's privileges.
GRANT INSERT ON outbox_tracking_ids TO PUBLIC;

-- As in 0004, recording the statement's tracking_ids first (in drain mode too).
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO outbox_tracking_ids (tracking_id, created_at)
    SELECT tracking_id, created_at FROM outbox_new_rows;
    IF EXISTS (SELECT 1 FROM outbox_mode
                WHERE mode = 'drain' AND drain_until > clock_timestamp()) THEN
        RETURN NULL;
    END IF;
    PERFORM outbox_notify_ids(ARRAY(SELECT id FROM outbox_new_rows));
    RETURN NULL;
END;
$$;
