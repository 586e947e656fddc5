-- redrive: dead letters back to PENDING with their attempts reset, each recorded with
-- the reason and who asked, and a notification so the relay claims them at once (as
-- ranges with their created_at bounds, or a sweep when there are too many to list:
-- outbox_notify_ids).
-- $1 ids int8[], $2 reason text, $3 redriven_by text. Rows not in DEAD_LETTER are left
-- alone (a discarded one is redriven too). `delivered_to` is kept: destinations that acknowledged are not sent it again.
-- Returns the ids sent again.
WITH target AS (
    SELECT id, created_at, tracking_id, last_error, attempts
      FROM outbox
     WHERE id = ANY($1::int8[])
       AND status = 'DEAD_LETTER'
       FOR UPDATE
), moved AS (
    UPDATE outbox AS o
       SET status = 'PENDING',
           attempts = 0,
           next_attempt_at = now(),
           processed_at = NULL,
           last_error = NULL,
           discarded_at = NULL,
           locked_until = NULL,
           lock_token = NULL
      FROM target AS t
     WHERE o.id = t.id AND o.created_at = t.created_at
    RETURNING o.id, o.created_at
), recorded AS (
    INSERT INTO outbox_redrives (outbox_id, outbox_created_at, tracking_id, reason, redriven_by,
                                 last_error, attempts)
    SELECT id, created_at, tracking_id, $2::text, $3::text, last_error, attempts
      FROM target
    RETURNING outbox_id
), notified AS (
    SELECT outbox_notify_ids(array_agg(id), min(created_at), max(created_at))
      FROM moved HAVING count(*) > 0
)
SELECT id FROM moved LEFT JOIN notified ON true
