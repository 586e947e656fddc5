-- claim_due: lease due PENDING events whatever their id (the reconnect, safety and
-- drain sweeps). $1 limit int8, $2 grace seconds float8 (only rows due at least that long
-- ago), $3 lease seconds float8, $4 lock_token uuid, and the
-- claim filter (store::ClaimFilter): $5 patterns text[], $6 routes text[], $7 avoid
-- text[], $8 want text; $13 bool[] the aggregate shards to take events of (NULL: every
-- event; see claim_ids.sql). Reads the partial index on due
-- PENDING rows. (The retry timer has its own statement: claim_due_retries.sql.)
WITH picked AS (
    SELECT id, created_at, aggregate_type, aggregate_id, event_type
      FROM outbox AS c
     WHERE status = 'PENDING'
       AND next_attempt_at <= now() - make_interval(secs => $2::float8)
       AND ($13::bool[] IS NULL
            OR ($13::bool[])[1 + (hashtext(c.aggregate_type || '/' || c.aggregate_id) & 255)])
       -- Leave out events that still need a destination the relay is not claiming for
       -- (saturated or parked), and, for a probe, take only events that need that one.
       -- The route is the first pattern the event_type matches (rule order).
       AND ((cardinality($7::text[]) = 0 AND $8::text IS NULL)
            OR EXISTS (
                SELECT 1
                  FROM (SELECT string_to_array(r.route, ',') AS destinations
                          FROM unnest($5::text[], $6::text[])
                               WITH ORDINALITY AS r(pattern, route, rank)
                         WHERE c.event_type LIKE r.pattern
                         ORDER BY r.rank
                         LIMIT 1) AS routed
                 WHERE NOT EXISTS (SELECT 1
                                     FROM unnest(routed.destinations) AS d(name)
                                    WHERE d.name = ANY($7::text[])
                                      AND d.name <> ALL(c.delivered_to))
                   AND ($8::text IS NULL
                        OR ($8::text = ANY(routed.destinations)
                            AND $8::text <> ALL(c.delivered_to)))))
     ORDER BY next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), judged AS MATERIALIZED (
    -- Ordering (src/ordering.rs): an ordered candidate with an unfinished earlier event
    -- of its aggregate is held, not claimed. One probe of outbox_unfinished_idx per
    -- partition; the earlier event may be locked by another claim (SKIP LOCKED skipped
    -- it), it is unfinished all the same, so a later event is never handed out before it.
    SELECT k.id, k.created_at,
           ($9::bool OR cardinality($11::bool[]) > 0)
           AND coalesce((SELECT r.ordered FROM unnest($10::text[], $11::bool[]) WITH ORDINALITY AS r(pattern, ordered, rank) WHERE k.event_type LIKE r.pattern ORDER BY r.rank LIMIT 1), $9::bool)
           AND EXISTS (
               SELECT 1
                 FROM outbox AS e
                WHERE e.aggregate_type = k.aggregate_type
                  AND e.aggregate_id = k.aggregate_id
                  AND e.id < k.id
                  AND e.status <> 'PUBLISHED'
                  AND (e.status <> 'DEAD_LETTER' OR ($12::bool AND e.discarded_at IS NULL))
                  AND coalesce((SELECT r.ordered FROM unnest($10::text[], $11::bool[]) WITH ORDINALITY AS r(pattern, ordered, rank) WHERE e.event_type LIKE r.pattern ORDER BY r.rank LIMIT 1), $9::bool)) AS held
      FROM picked AS k
)
UPDATE outbox AS o
   SET status = CASE WHEN j.held THEN 'PENDING' ELSE 'PROCESSING' END,
       attempts = o.attempts + CASE WHEN j.held THEN 0 ELSE 1 END,
       next_attempt_at = CASE WHEN j.held THEN 'infinity' ELSE o.next_attempt_at END,
       locked_until = CASE WHEN j.held THEN NULL
                           ELSE now() + make_interval(secs => $3::float8) END,
       lock_token = CASE WHEN j.held THEN NULL ELSE $4::uuid END
  FROM judged AS j
 WHERE o.id = j.id AND o.created_at = j.created_at
RETURNING o.id, o.created_at, o.tracking_id, o.aggregate_type, o.aggregate_id,
          o.event_type, o.payload::text, o.metadata::text, o.attempts, o.max_attempts,
          o.delivered_to, j.held
