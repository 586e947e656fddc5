-- outboxd 0014: replays. A replay sends events that were already PUBLISHED again, to one
-- destination, with their own tracking_id (message_id, webhook-id) and a header naming
-- the replay (outbox-replay-id). It is a stored job, not a loop in the process that asked
-- for it: the running instances execute it under a lease, a batch at a time, advancing
-- `cursor` (the last id done) as destinations acknowledge, so a crash resumes it from
-- there. Who asked, when and why are kept, as for redrives.
CREATE TABLE IF NOT EXISTS outbox_replays (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination     text        NOT NULL,
    -- The filter: ids from/to (inclusive), created_at from (inclusive) / to (exclusive),
    -- an event type pattern (as given; `*` any run of characters), an aggregate.
    from_id         bigint,
    to_id           bigint,
    from_at         timestamptz,
    to_at           timestamptz,
    event_type      text,
    aggregate_type  text,
    aggregate_id    text,
    -- Events a second, at most.
    rate            integer     NOT NULL CHECK (rate > 0),
    reason          text        NOT NULL CHECK (length(btrim(reason)) > 0),
    requested_by    text        NOT NULL CHECK (length(btrim(requested_by)) > 0),
    requested_at    timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'RUNNING'
                    CHECK (status IN ('RUNNING', 'DONE', 'CANCELLED')),
    -- Events matching when it was asked for (what a dry run counts).
    matched         bigint      NOT NULL,
    cursor          bigint      NOT NULL DEFAULT 0,
    sent            bigint      NOT NULL DEFAULT 0,
    -- Rejected by the destination for good (recorded in outbox_attempts; skipped).
    rejected        bigint      NOT NULL DEFAULT 0,
    holder          text,
    lease_until     timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    cancelled_by    text,
    last_error      text
);

CREATE INDEX IF NOT EXISTS outbox_replays_running_idx ON outbox_replays (id)
    WHERE status = 'RUNNING';
