-- discard: dead letters an operator gives up on. Each stays in the table for the record
-- (still DEAD_LETTER, with discarded_at set), no longer counts as a dead letter, and
-- no longer holds back the later events of its aggregate (ordering: the caller then
-- releases them, unhold_aggregates). Recorded in outbox_redrives as action 'discard'
-- with the reason and who asked; a discarded event can still be redriven.
-- $1 ids int8[], $2 reason text, $3 discarded_by text. Rows that are not undiscarded
-- dead letters are left alone. Returns the ids discarded and their aggregates.
WITH target AS (
    SELECT id, created_at, tracking_id, last_error, attempts, aggregate_type, aggregate_id
      FROM outbox
     WHERE id = ANY($1::int8[])
       AND status = 'DEAD_LETTER'
       AND discarded_at IS NULL
       FOR UPDATE
), marked AS (
    UPDATE outbox AS o
       SET discarded_at = now()
      FROM target AS t
     WHERE o.id = t.id AND o.created_at = t.created_at
    RETURNING o.id
), recorded AS (
    INSERT INTO outbox_redrives (outbox_id, outbox_created_at, tracking_id, reason, redriven_by,
                                 last_error, attempts, action)
    SELECT id, created_at, tracking_id, $2::text, $3::text, last_error, attempts, 'discard'
      FROM target
    RETURNING outbox_id
)
SELECT t.id, t.aggregate_type, t.aggregate_id
  FROM target AS t
  JOIN marked AS m ON m.id = t.id
