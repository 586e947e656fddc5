-- list_aggregate_events: one aggregate's events, newest first, keyset-paginated by id,
-- read from outbox_aggregate_idx. $1 aggregate_type, $2 aggregate_id, $3 only ids below
-- this one (the previous page's last id; NULL: first page), $4 limit.
SELECT id, created_at, tracking_id, status, event_type, attempts, next_attempt_at,
       processed_at, last_error, delivered_to
  FROM outbox
 WHERE aggregate_type = $1::text
   AND aggregate_id = $2::text
   AND id < coalesce($3::int8, 9223372036854775807)
 ORDER BY id DESC
 LIMIT $4::int8
