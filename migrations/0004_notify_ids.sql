-- outboxd 0004: one way to announce ids on outbox_events.
--
-- `outbox_notify_ids(ids)` sends the ids as ranges ("17-5016", "17,19-21") in one
-- notification, or an empty payload ("sweep: too many to list") when they would not fit
-- in 7,999 bytes (PostgreSQL refuses a longer payload, and with it the whole statement).
-- The insert trigger, a redrive and a release on shutdown all announce through it, so
-- none of them can fail for the size of its payload.

CREATE FUNCTION outbox_notify_ids(ids int8[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    ranges text;
BEGIN
    SELECT string_agg(CASE WHEN lo = hi THEN lo::text ELSE lo::text || '-' || hi::text END,
                      ',' ORDER BY lo)
      INTO ranges
      FROM (SELECT min(id) AS lo, max(id) AS hi
              FROM (SELECT id, id - row_number() OVER (ORDER BY id) AS island
                      FROM (SELECT DISTINCT unnest(ids) AS id) given) numbered
             GROUP BY island) islands;
    IF ranges IS NULL THEN
        RETURN;
    END IF;
    IF octet_length(ranges) > 7999 THEN
        ranges := '';
    END IF;
    PERFORM pg_notify('outbox_events', ranges);
END;
$$;

-- Producers call it through the trigger, with their own privileges.
GRANT EXECUTE ON FUNCTION outbox_notify_ids(int8[]) TO PUBLIC;

-- As in 0003, announcing through outbox_notify_ids.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_mode
                WHERE mode = 'drain' AND drain_until > clock_timestamp()) THEN
        RETURN NULL;
    END IF;
    PERFORM outbox_notify_ids(ARRAY(SELECT id FROM outbox_new_rows));
    RETURN NULL;
END;
$$;
