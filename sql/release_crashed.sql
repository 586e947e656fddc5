-- release_crashed: a delivery crashed (its task panicked) while holding these events.
-- They go back to PENDING at once, not after their lease, to be claimed one at a time,
-- so whatever crashed can only take its own event down. A crashed batch of several
-- events gives the attempt back (the crash need not be theirs); a crashed event alone
-- keeps it, and once it used all its attempts it is a dead letter with the crash as its
-- reason. Fenced by the claim's lock_token (invariant 3).
-- $1 lock_token uuid, $2 ids int8[], $3 created_at timestamptz[], $4 reason text,
-- $5 default max_attempts int4. Returns each id, its new status, its aggregate and type.
UPDATE outbox AS o
   SET status = CASE WHEN cardinality($2::int8[]) = 1
                          AND o.attempts >= coalesce(o.max_attempts, $5::int4)
                     THEN 'DEAD_LETTER' ELSE 'PENDING' END,
       processed_at = CASE WHEN cardinality($2::int8[]) = 1
                                AND o.attempts >= coalesce(o.max_attempts, $5::int4)
                           THEN now() END,
       attempts = CASE WHEN cardinality($2::int8[]) > 1
                       THEN greatest(o.attempts - 1, 0) ELSE o.attempts END,
       last_error = $4::text,
       next_attempt_at = now(),
       locked_until = NULL,
       lock_token = NULL
  FROM unnest($2::int8[], $3::timestamptz[]) AS t(id, created_at)
 WHERE o.id = t.id AND o.created_at = t.created_at
   AND o.lock_token = $1::uuid
   AND o.status = 'PROCESSING'
RETURNING o.id, o.status, o.aggregate_type, o.aggregate_id, o.event_type
