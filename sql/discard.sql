-- discard: dead letters an operator gives up on. Each stays for the record (still
-- DEAD_LETTER, with discarded_at set), no longer counts as a dead letter, and no longer
-- holds back the later events of its aggregate (ordering: the caller then releases
-- them, unhold_aggregates). Recorded in outbox_redrives as action 'discard' with the
-- reason and who asked; a discarded event can still be redriven.
-- $1 ids int8[], $2 reason text, $3 discarded_by text. Read from outbox_dead_letters
-- (a dead letter whose partition retention dropped is there alone); the row in outbox,
-- when there is one, is marked too (its trigger keeps the copy in step). Ids that are
-- not undiscarded dead letters are left alone. Returns the ids discarded and their
-- aggregates.
WITH target AS (
    SELECT id, created_at, tracking_id, last_error, attempts, aggregate_type, aggregate_id
      FROM outbox_dead_letters
     WHERE id = ANY($1::int8[])
       AND discarded_at IS NULL
       FOR UPDATE
), marked AS (
    UPDATE outbox AS o
       SET discarded_at = now()
      FROM target AS t
     WHERE o.id = t.id AND o.created_at = t.created_at
       AND o.status = 'DEAD_LETTER'
    RETURNING o.id
), kept AS (
    UPDATE outbox_dead_letters AS d
       SET discarded_at = now()
      FROM target AS t
     WHERE d.tracking_id = t.tracking_id
    RETURNING d.id
), recorded AS (
    INSERT INTO outbox_redrives (outbox_id, outbox_created_at, tracking_id, reason, redriven_by,
                                 last_error, attempts, action)
    SELECT id, created_at, tracking_id, $2::text, $3::text, last_error, attempts, 'discard'
      FROM target
    RETURNING outbox_id
)
SELECT t.id, t.aggregate_type, t.aggregate_id
  FROM target AS t
  JOIN kept AS k ON k.id = t.id
