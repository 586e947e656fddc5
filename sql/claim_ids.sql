-- claim_ids: lease the notified events that are still due PENDING.
-- $1 ids int8[], $2 lease seconds float8, $3 lock_token uuid, $4 limit int8.
-- The attempt is counted here, at claim (design.md invariant 4).
WITH picked AS (
    SELECT id, created_at
      FROM outbox
     WHERE id = ANY($1::int8[])
       AND status = 'PENDING'
       AND next_attempt_at <= now()
     ORDER BY id
     LIMIT $4
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
