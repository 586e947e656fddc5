-- show_event: one event whatever its status, for operators. $1 id int8.
SELECT id, created_at, tracking_id, status, event_type, aggregate_type, aggregate_id,
       payload::text, metadata::text, attempts, max_attempts, next_attempt_at, processed_at,
       last_error, delivered_to
  FROM outbox
 WHERE id = $1::int8
