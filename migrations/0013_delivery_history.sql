-- outboxd 0013: the delivery history. Every failed attempt of an event at a destination
-- (a retry or a rejection, not a deferral: a circuit that is open tries nothing) is
-- recorded with its time, how long the destination took, the HTTP status when one came
-- back and the error (cut to 2,000 characters). Successes are on the row already
-- (delivered_to, processed_at). `outboxd events show` tells an event's story from it;
-- retention trims it with the partitions (a dead letter's stays).
CREATE TABLE IF NOT EXISTS outbox_attempts (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id    bigint      NOT NULL,
    tracking_id  uuid        NOT NULL,
    destination  text        NOT NULL,
    attempt      integer     NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    duration_ms  float8      NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('retry', 'rejected')),
    http_status  integer,
    error        text        NOT NULL,
    -- The replay whose send failed (NULL: a delivery).
    replay_id    bigint
);

CREATE INDEX IF NOT EXISTS outbox_attempts_event_idx ON outbox_attempts (outbox_id, id);
CREATE INDEX IF NOT EXISTS outbox_attempts_at_idx ON outbox_attempts (at);
