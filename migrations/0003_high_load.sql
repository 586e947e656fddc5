-- outboxd 0003: high-load (drain) mode.
--
-- A transaction that issued NOTIFY holds a cluster-wide lock through its commit's WAL
-- flush, so notifying producers commit one at a time. Under sustained load outboxd
-- claims back to back and needs no notifications: it then puts this one-row table in
-- drain mode, and the trigger stops notifying until `drain_until`. Drain mode is a lease
-- the draining instance renews, so a crashed instance cannot switch notifications off
-- for longer than the lease. Leaving drain mode is race-free: outboxd keeps claiming
-- until every transaction that could have read the old mode has ended
-- (docs/performance.md, "High-load mode").

CREATE TABLE outbox_mode (
    only_row    boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    mode        text        NOT NULL DEFAULT 'notify' CHECK (mode IN ('notify', 'drain')),
    -- Notifications are off only while mode = 'drain' AND drain_until > clock_timestamp().
    drain_until timestamptz,
    -- The outboxd instance that last entered or renewed drain mode.
    holder      text,
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (mode = 'notify' OR drain_until IS NOT NULL)
);

INSERT INTO outbox_mode DEFAULT VALUES;

-- The trigger runs with the producer's privileges: every producer must be able to read
-- the mode, or its inserts would fail.
GRANT SELECT ON outbox_mode TO PUBLIC;

-- As in 0001, plus the mode check. clock_timestamp(), not now() (the transaction's
-- start): a transaction that began in drain mode but inserts after the lease ran out
-- notifies. The search_path is fixed at creation so the trigger finds outbox_mode
-- whatever the producer's search_path is.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    ranges text;
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_mode
                WHERE mode = 'drain' AND drain_until > clock_timestamp()) THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(CASE WHEN lo = hi THEN lo::text ELSE lo::text || '-' || hi::text END,
                      ',' ORDER BY lo)
      INTO ranges
      FROM (SELECT min(id) AS lo, max(id) AS hi
              FROM (SELECT id, id - row_number() OVER (ORDER BY id) AS island
                      FROM outbox_new_rows) numbered
             GROUP BY island) islands;
    IF ranges IS NULL THEN
        RETURN NULL;
    END IF;
    IF octet_length(ranges) > 7999 THEN
        ranges := '';
    END IF;
    PERFORM pg_notify('outbox_events', ranges);
    RETURN NULL;
END;
$$;
