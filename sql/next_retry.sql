-- next_retry: how long until the earliest rescheduled event (PENDING, due in the future:
-- a retry or a deferral, whichever instance scheduled it) falls due, in seconds; NULL
-- when none is waiting. Read after each sweep, so retries scheduled by an instance that
-- stopped or crashed are claimed when they fall due, not at a safety sweep. One probe of
-- the partial index on due PENDING rows per partition. Held events (ordering: due at
-- 'infinity', until the event before them has its outcome) are not retries.
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
  FROM outbox
 WHERE status = 'PENDING'
   AND next_attempt_at > now()
   AND next_attempt_at < 'infinity'
