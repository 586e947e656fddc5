-- outboxd 0002: the record of dead letters sent again. A redrive needs a reason and
-- names who asked; the event keeps its tracking_id.
CREATE TABLE outbox_redrives (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id         bigint      NOT NULL,
    outbox_created_at timestamptz NOT NULL,
    tracking_id       uuid        NOT NULL,
    reason            text        NOT NULL CHECK (length(btrim(reason)) > 0),
    redriven_by       text        NOT NULL CHECK (length(btrim(redriven_by)) > 0),
    redriven_at       timestamptz NOT NULL DEFAULT now(),
    -- What the event had when it was sent again.
    last_error        text,
    attempts          integer     NOT NULL
);

CREATE INDEX outbox_redrives_outbox_idx ON outbox_redrives (outbox_id);
CREATE INDEX outbox_redrives_tracking_idx ON outbox_redrives (tracking_id);
