-- claim_due_retries: lease due PENDING events that a failed or deferred attempt
-- rescheduled (they carry last_error), for the retry timer: a new event whose
-- notification is on its way is never taken, and the safety sweep's count stays a true
-- count of lost notifications. $1 limit int8, $2 lease seconds float8, $3 lock_token
-- uuid. Reads the partial index of rescheduled rows (migration 0007), so its cost does
-- not grow with a backlog of new events.
WITH picked AS (
    SELECT id, created_at
      FROM outbox
     WHERE status = 'PENDING'
       AND last_error IS NOT NULL
       AND next_attempt_at <= now()
     ORDER BY next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox AS o
   SET status = 'PROCESSING',
       attempts = o.attempts + 1,
       locked_until = now() + make_interval(secs => $2::float8),
       lock_token = $3::uuid
  FROM picked
 WHERE o.id = picked.id AND o.created_at = picked.created_at
RETURNING o.id, o.created_at, o.tracking_id, o.aggregate_type, o.aggregate_id,
          o.event_type, o.payload::text, o.metadata::text, o.attempts, o.max_attempts,
          o.delivered_to
