-- redrive: dead letters back to PENDING with their attempts reset, each recorded with
-- the reason and who asked, and a notification so the relay claims them at once (as
-- ranges with their created_at bounds, or a sweep when there are too many to list:
-- outbox_notify_ids).
-- $1 ids int8[], $2 reason text, $3 redriven_by text. Rows not in DEAD_LETTER are left
-- alone (a discarded one is redriven too). `delivered_to` is kept: destinations that
-- acknowledged are not sent it again.
-- A dead letter whose partition retention dropped lives on in outbox_dead_letters
-- alone: it is put back into outbox (today's partition) with its id, tracking_id,
-- aggregate and delivered_to, so it keeps its place in its aggregate's order, and its
-- tracking_id is recorded again (outbox_tracking_ids) by the insert trigger, which
-- also notifies. Either way the copy goes (the row trigger deletes it for a row
-- redriven in place). Two redrives of one dead letter move it once: both lock it, the
-- second finds it gone or no longer DEAD_LETTER.
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
), kept AS (
    SELECT d.id, d.created_at, d.tracking_id, d.aggregate_type, d.aggregate_id,
           d.event_type, d.payload, d.metadata, d.max_attempts, d.last_error, d.attempts,
           d.delivered_to
      FROM outbox_dead_letters AS d
     WHERE d.id = ANY($1::int8[])
       AND NOT EXISTS (SELECT 1 FROM outbox AS o
                        WHERE o.id = d.id AND o.created_at = d.created_at)
       FOR UPDATE
), freed AS (
    DELETE FROM outbox_tracking_ids AS t
     USING kept AS k
     WHERE t.tracking_id = k.tracking_id
    RETURNING t.tracking_id
), restored AS (
    INSERT INTO outbox (id, tracking_id, aggregate_type, aggregate_id, event_type, payload,
                        metadata, max_attempts, delivered_to)
    SELECT id, tracking_id, aggregate_type, aggregate_id, event_type, payload, metadata,
           max_attempts, delivered_to
      FROM kept
    RETURNING id
), unkept AS (
    DELETE FROM outbox_dead_letters AS d
     USING kept AS k
     WHERE d.tracking_id = k.tracking_id
    RETURNING d.id
), recorded AS (
    INSERT INTO outbox_redrives (outbox_id, outbox_created_at, tracking_id, reason, redriven_by,
                                 last_error, attempts)
    SELECT id, created_at, tracking_id, $2::text, $3::text, last_error, attempts
      FROM target
    UNION ALL
    SELECT id, created_at, tracking_id, $2::text, $3::text, last_error, attempts
      FROM kept
    RETURNING outbox_id
), notified AS (
    SELECT outbox_notify_ids(array_agg(id), min(created_at), max(created_at))
      FROM moved HAVING count(*) > 0
)
SELECT id FROM moved LEFT JOIN notified ON true
UNION ALL
SELECT id FROM restored
