-- reap: events whose lease expired (their worker died or stalled) go back to PENDING, or
-- to DEAD_LETTER once they used all their attempts, so an event that crashes every
-- worker cannot loop forever (invariant 4). $1 default max_attempts int4.
-- Returns the ids returned to PENDING, so the relay can claim them at once, and each
-- event's aggregate and type (a dead letter under ordering_dead_letters = skip releases
-- its aggregate).
UPDATE outbox
   SET status = CASE WHEN attempts >= coalesce(max_attempts, $1::int4)
                     THEN 'DEAD_LETTER' ELSE 'PENDING' END,
       processed_at = CASE WHEN attempts >= coalesce(max_attempts, $1::int4)
                           THEN now() END,
       last_error = 'lease expired at ' || locked_until::text
                    || ' while delivering (worker crashed or stalled)',
       next_attempt_at = now(),
       locked_until = NULL,
       lock_token = NULL
 WHERE status = 'PROCESSING'
   AND locked_until < now()
RETURNING id, status, aggregate_type, aggregate_id, event_type
