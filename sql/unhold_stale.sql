-- unhold_stale: the safety net of ordering, run with the safety sweep: held events that
-- nothing holds back any more (the event before them ended in a way no outcome
-- announced: a row deleted by hand, a dead letter the reaper buried under `skip`) are
-- due again and announced. Reads the held events (the end of the due index), at most
-- $1 of them. $2 ordered_by_default bool, $3 patterns text[], $4 ordered bool[],
-- $5 dead_letters_block bool.
WITH lowest AS (
    SELECT DISTINCT ON (aggregate_type, aggregate_id)
           id, created_at, aggregate_type, aggregate_id, event_type
      FROM (SELECT id, created_at, aggregate_type, aggregate_id, event_type
              FROM outbox
             WHERE status = 'PENDING'
               AND next_attempt_at = 'infinity'
             LIMIT $1) AS held
     ORDER BY aggregate_type, aggregate_id, id
), free AS (
    SELECT k.id, k.created_at
      FROM lowest AS k
     WHERE NOT EXISTS (
               SELECT 1
                 FROM outbox AS e
                WHERE e.aggregate_type = k.aggregate_type
                  AND e.aggregate_id = k.aggregate_id
                  AND e.id < k.id
                  AND e.status <> 'PUBLISHED'
                  AND (e.status <> 'DEAD_LETTER' OR ($5::bool AND e.discarded_at IS NULL))
                  AND coalesce((SELECT r.ordered FROM unnest($3::text[], $4::bool[]) WITH ORDINALITY AS r(pattern, ordered, rank) WHERE e.event_type LIKE r.pattern ORDER BY r.rank LIMIT 1), $2::bool))
), released AS (
    UPDATE outbox AS o
       SET next_attempt_at = now()
      FROM free
     WHERE o.id = free.id AND o.created_at = free.created_at
       AND o.status = 'PENDING' AND o.next_attempt_at = 'infinity'
    RETURNING o.id, o.created_at
), notified AS (
    SELECT outbox_notify_ids(array_agg(id), min(created_at), max(created_at))
      FROM released HAVING count(*) > 0 AND true::bool
)
SELECT id, created_at FROM released LEFT JOIN notified ON true
