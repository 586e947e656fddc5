-- claim_due: lease due PENDING events whatever their id (the reconnect, safety and
-- drain sweeps). $1 limit int8, $2 grace seconds float8 (only rows due at least that long
-- ago), $3 lease seconds float8, $4 lock_token uuid. Reads the partial index on due
-- PENDING rows. (The retry timer has its own statement: claim_due_retries.sql.)
WITH picked AS (
    SELECT id, created_at
      FROM outbox
     WHERE status = 'PENDING'
       AND next_attempt_at <= now() - make_interval(secs => $2::float8)
     ORDER BY next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox AS o
   SET status = 'PROCESSING',
       attempts = o.attempts + 1,
       locked_until = now() + make_interval(secs => $3::float8),
       lock_token = $4::uuid
  FROM picked
 WHERE o.id = picked.id AND o.created_at = picked.created_at
RETURNING o.id, o.created_at, o.tracking_id, o.aggregate_type, o.aggregate_id,
          o.event_type, o.payload::text, o.metadata::text, o.attempts, o.max_attempts,
          o.delivered_to
