-- unhold_aggregates: an event of each of these aggregates has an outcome (published,
-- dead-lettered under `skip`, discarded): the aggregate's lowest held event is due
-- again when nothing earlier holds it back, and is returned to be claimed at once (or
-- announced on outbox_events, for a caller that does not claim: $3).
-- Reads outbox_held_idx (the aggregate's held events), then outbox_unfinished_idx.
-- $1 aggregate_type text[], $2 aggregate_id text[], $3 notify bool, and the order rule:
-- $4 ordered_by_default bool, $5 patterns text[], $6 ordered bool[],
-- $7 dead_letters_block bool.
WITH lowest AS (
    SELECT h.id, h.created_at, h.aggregate_type, h.aggregate_id, h.event_type
      FROM (SELECT DISTINCT t, i FROM unnest($1::text[], $2::text[]) AS a(t, i)) AS a
     CROSS JOIN LATERAL (
           SELECT id, created_at, aggregate_type, aggregate_id, event_type
             FROM outbox
            WHERE aggregate_type = a.t
              AND aggregate_id = a.i
              AND status = 'PENDING'
              AND next_attempt_at = 'infinity'
            ORDER BY id
            LIMIT 1) AS h
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
                  AND (e.status <> 'DEAD_LETTER' OR ($7::bool AND e.discarded_at IS NULL))
                  AND coalesce((SELECT r.ordered FROM unnest($5::text[], $6::bool[]) WITH ORDINALITY AS r(pattern, ordered, rank) WHERE e.event_type LIKE r.pattern ORDER BY r.rank LIMIT 1), $4::bool))
), released AS (
    UPDATE outbox AS o
       SET next_attempt_at = now()
      FROM free
     WHERE o.id = free.id AND o.created_at = free.created_at
       AND o.status = 'PENDING' AND o.next_attempt_at = 'infinity'
    RETURNING o.id, o.created_at
), notified AS (
    SELECT outbox_notify_ids(array_agg(id), min(created_at), max(created_at))
      FROM released HAVING count(*) > 0 AND $3::bool
)
SELECT id, created_at FROM released LEFT JOIN notified ON true
