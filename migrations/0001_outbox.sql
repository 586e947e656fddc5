-- outboxd 0001: the outbox table, partitioned by day from the start, and its NOTIFY trigger.
--
-- Producers INSERT into outbox inside their own transaction; outboxd delivers every
-- committed row. Every column a producer may omit has a default.

CREATE SEQUENCE outbox_id_seq AS bigint;

CREATE TABLE outbox (
    id              bigint      NOT NULL DEFAULT nextval('outbox_id_seq'),
    tracking_id     uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status          text        NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'PROCESSING', 'PUBLISHED', 'DEAD_LETTER')),
    attempts        integer     NOT NULL DEFAULT 0,
    -- NULL: outboxd's configured retry.max_attempts applies.
    max_attempts    integer     CHECK (max_attempts IS NULL OR max_attempts > 0),
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed_at    timestamptz,
    locked_until    timestamptz,
    lock_token      uuid,
    last_error      text,
    delivered_to    text[]      NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

ALTER SEQUENCE outbox_id_seq OWNED BY outbox.id;

-- A producer's insert never fails for want of a partition. outboxd keeps daily
-- partitions created days ahead, so this stays empty; rows here are reported.
CREATE TABLE outbox_default PARTITION OF outbox DEFAULT;

-- Claims and sweeps read only due PENDING rows: O(batch), not O(table).
CREATE INDEX outbox_pending_due_idx ON outbox (next_attempt_at) WHERE status = 'PENDING';
-- The reaper reads only PROCESSING rows.
CREATE INDEX outbox_processing_lease_idx ON outbox (locked_until) WHERE status = 'PROCESSING';
-- Dead letters are listed by operators.
CREATE INDEX outbox_dead_letter_idx ON outbox (created_at) WHERE status = 'DEAD_LETTER';

-- One notification per INSERT statement, not per row: the payload lists the new ids as
-- ranges ("17-5016" for a 5,000-row insert, "17,19-21" when producers interleave).
-- If the list would not fit in a payload (8000 bytes), an empty payload asks outboxd to
-- sweep instead. NOTIFY is a hint; the table stays the truth.
CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ranges text;
BEGIN
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

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS outbox_new_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_notify();
