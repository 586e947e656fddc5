-- show_event: one event whatever its status, for operators. $1 id int8.
-- Shown as status HELD: PENDING behind an earlier event of its aggregate (ordering);
-- DISCARDED: a dead letter an operator discarded. A dead letter whose partition
-- retention dropped is read from outbox_dead_letters.
SELECT id, created_at, tracking_id,
       CASE WHEN status = 'PENDING' AND next_attempt_at = 'infinity' THEN 'HELD'
            WHEN status = 'DEAD_LETTER' AND discarded_at IS NOT NULL THEN 'DISCARDED'
            ELSE status END AS status, event_type, aggregate_type, aggregate_id,
       payload::text, metadata::text, attempts, max_attempts,
       CASE WHEN next_attempt_at = 'infinity' THEN now() ELSE next_attempt_at END
         AS next_attempt_at,
       processed_at, last_error, delivered_to
  FROM outbox
 WHERE id = $1::int8
UNION ALL
SELECT id, created_at, tracking_id,
       CASE WHEN discarded_at IS NOT NULL THEN 'DISCARDED' ELSE 'DEAD_LETTER' END,
       event_type, aggregate_type, aggregate_id, payload::text, metadata::text, attempts,
       max_attempts, dead_since, dead_since, last_error, delivered_to
  FROM outbox_dead_letters AS d
 WHERE d.id = $1::int8
   AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.id = d.id AND o.created_at = d.created_at)
LIMIT 1
