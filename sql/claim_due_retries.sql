-- claim_due_retries: lease due PENDING events that a failed or deferred attempt
-- rescheduled (they carry last_error), for the retry timer: a new event whose
-- notification is on its way is never taken, and the safety sweep's count stays a true
-- count of lost notifications. $1 limit int8, $2 lease seconds float8, $3 lock_token
-- uuid, and the claim filter (store::ClaimFilter): $4 patterns text[], $5 routes
-- text[], $6 avoid text[], $7 want text. Reads the partial index of rescheduled rows
-- (migration 0007), so its cost does not grow with a backlog of new events.
WITH picked AS (
    SELECT id, created_at
      FROM outbox AS c
     WHERE status = 'PENDING'
       AND last_error IS NOT NULL
       AND next_attempt_at <= now()
       -- Leave out events that still need a destination the relay is not claiming for
       -- (saturated or parked), and, for a probe, take only events that need that one.
       -- The route is the first pattern the event_type matches (rule order).
       AND ((cardinality($6::text[]) = 0 AND $7::text IS NULL)
            OR EXISTS (
                SELECT 1
                  FROM (SELECT string_to_array(r.route, ',') AS destinations
                          FROM unnest($4::text[], $5::text[])
                               WITH ORDINALITY AS r(pattern, route, rank)
                         WHERE c.event_type LIKE r.pattern
                         ORDER BY r.rank
                         LIMIT 1) AS routed
                 WHERE NOT EXISTS (SELECT 1
                                     FROM unnest(routed.destinations) AS d(name)
                                    WHERE d.name = ANY($6::text[])
                                      AND d.name <> ALL(c.delivered_to))
                   AND ($7::text IS NULL
                        OR ($7::text = ANY(routed.destinations)
                            AND $7::text <> ALL(c.delivered_to)))))
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
