-- outboxd 0008: notifications say when their events were created.
--
-- `outbox` is partitioned by created_at, and a claim by id alone probed every partition
-- (about 6 ms per 500 ids with 16 partitions). A notification now ends with the
-- statement's created_at bounds in whole epoch seconds, "17-5016@1764583200-1764583201"
-- (lowest, floored; highest, rounded up), so the claim of notified ids reads only the
-- partitions those bounds fall in. A payload without them (an older trigger, a redrive
-- from an older outboxd) is still claimed, from every partition. An older outboxd that
-- reads a bounded payload answers it with a sweep, as it does any payload it cannot read.
--
-- `outbox_notify_ids(ids, since, until)` sends the ranges and the bounds in one
-- notification, or an empty payload (a sweep) when they would not fit in 7,999 bytes.
-- The one-argument form stays for anything that calls it: it announces without bounds,
-- through the new one, so the encoding lives in one function.
CREATE OR REPLACE FUNCTION outbox_notify_ids(ids int8[], since timestamptz, until timestamptz)
RETURNS void
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
    IF since IS NOT NULL AND until IS NOT NULL
       AND since > '-infinity' AND until < 'infinity' THEN
        ranges := ranges || '@' || floor(extract(epoch FROM since))::int8::text
                         || '-' || ceil(extract(epoch FROM until))::int8::text;
    END IF;
    IF octet_length(ranges) > 7999 THEN
        ranges := '';
    END IF;
    PERFORM pg_notify('outbox_events', ranges);
END;
$$;
GRANT EXECUTE ON FUNCTION outbox_notify_ids(int8[], timestamptz, timestamptz) TO PUBLIC;

CREATE OR REPLACE FUNCTION outbox_notify_ids(ids int8[]) RETURNS void
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$ SELECT outbox_notify_ids(ids, NULL::timestamptz, NULL::timestamptz) $$;

-- As in 0006, announcing the statement's created_at bounds with its ids.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    ids int8[];
    since timestamptz;
    until timestamptz;
BEGIN
    INSERT INTO outbox_tracking_ids (tracking_id, created_at)
    SELECT tracking_id, created_at FROM outbox_new_rows;
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
