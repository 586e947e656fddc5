-- list_aggregate_events: one aggregate's events, newest first, keyset-paginated by id,
-- Shown as status HELD: PENDING behind an earlier event of its aggregate (ordering);
-- DISCARDED: a dead letter an operator discarded.
-- read from outbox_aggregate_idx. $1 aggregate_type, $2 aggregate_id, $3 only ids below
-- this one (the previous page's last id; NULL: first page), $4 limit.
SELECT id, created_at, tracking_id,
       CASE WHEN status = 'PENDING' AND next_attempt_at = 'infinity' THEN 'HELD'
            WHEN status = 'DEAD_LETTER' AND discarded_at IS NOT NULL THEN 'DISCARDED'
            ELSE status END AS status, event_type, attempts, CASE WHEN next_attempt_at = 'infinity' THEN now() ELSE next_attempt_at END AS next_attempt_at,
       processed_at, last_error, delivered_to
  FROM outbox
 WHERE aggregate_type = $1::text
   AND aggregate_id = $2::text
   AND id < coalesce($3::int8, 9223372036854775807)
 ORDER BY id DESC
 LIMIT $4::int8
