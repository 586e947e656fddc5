-- outboxd 0009: events found without SQL, by tracking_id and by aggregate.
--
-- `outboxd events show TRACKING_ID` and `outboxd events list --aggregate TYPE:ID` (and
-- the same under /api/events) read one event by the id consumers see, and one
-- aggregate's events newest first, a page at a time.
--
-- A tracking_id is recorded in outbox_tracking_ids (0006) with its created_at; the row
-- now keeps the event's id too, so a lookup reads that row, then the event by its
-- primary key. Rows recorded before this migration have no id: their event is found
-- by tracking_id within the one partition their created_at names.
ALTER TABLE outbox_tracking_ids ADD COLUMN IF NOT EXISTS id bigint;

-- As in 0008, with the id recorded beside the tracking_id.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    ids int8[];
    since timestamptz;
    until timestamptz;
BEGIN
    INSERT INTO outbox_tracking_ids (tracking_id, created_at, id)
    SELECT tracking_id, created_at, id FROM outbox_new_rows;
    IF EXISTS (SELECT 1 FROM outbox_mode
                WHERE mode = 'drain' AND drain_until > clock_timestamp()) THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(id), min(created_at), max(created_at)
      INTO ids, since, until
      FROM outbox_new_rows;
    PERFORM outbox_notify_ids(ids, since, until);
    RETURN NULL;
END;
$$;

-- An aggregate's events by id, so a page of them is read from the index whatever the
-- table's size. Built as 0007's index is: on the parent alone here (instantly), then on
-- each partition with CREATE INDEX CONCURRENTLY by `outboxd migrate`, so producers are
-- never locked out while it builds.
CREATE INDEX IF NOT EXISTS outbox_aggregate_idx ON ONLY outbox (aggregate_type, aggregate_id, id);
