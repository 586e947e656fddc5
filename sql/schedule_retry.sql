-- schedule_retry: back to PENDING, due after a per-event delay.
-- $1 lock_token uuid, $2 ids int8[], $3 created_at timestamptz[], $4 delay seconds float8[],
-- $5 last_error text[], $6 give_back_attempt bool[] (a Deferred outcome: the destination
-- was not tried, so the attempt counted at claim is returned, invariant 4),
-- $7 acked destination lists, one comma-joined text per event (invariant 5: a retry goes
-- only to destinations missing from delivered_to). Fenced by lock_token.
UPDATE outbox AS o
   SET status = 'PENDING',
       next_attempt_at = now() + make_interval(secs => k.delay),
       attempts = CASE WHEN k.give_back THEN greatest(o.attempts - 1, 0) ELSE o.attempts END,
       last_error = k.last_error,
       locked_until = NULL,
       lock_token = NULL,
       delivered_to = ARRAY(SELECT DISTINCT d
                              FROM unnest(o.delivered_to || string_to_array(nullif(k.acked, ''), ',')) AS d
                             ORDER BY d)
  FROM unnest($2::int8[], $3::timestamptz[], $4::float8[], $5::text[], $6::bool[], $7::text[])
       AS k(id, created_at, delay, last_error, give_back, acked)
 WHERE o.id = k.id AND o.created_at = k.created_at
   AND o.lock_token = $1::uuid
   AND o.status = 'PROCESSING'
RETURNING o.id, o.next_attempt_at
