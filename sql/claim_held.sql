-- claim_held: of the events a claim just held (ordering, src/ordering.rs), claim those
-- that no earlier event of their aggregate holds back any more, under the same
-- lock_token: they join the claim's batch. Run once the claim has committed: an outcome
-- that committed meanwhile could not see the hold, and this statement, with a newer
-- snapshot, sees that outcome, so no release is lost between the two. An event the
-- outcome's own release made due meanwhile is claimed the same (so whichever statement
-- gets it claims it: a release never leaves it for a claim that passed it by). Due is
-- read on the clock, not now(): a release that committed after this statement began
-- set next_attempt_at to its own, later, now().
-- Only an aggregate's lowest held event can be free (it holds back the later ones).
-- $1 ids int8[], $2 lease seconds float8, $3 lock_token uuid, and the order rule:
-- $4 ordered_by_default bool, $5 patterns text[], $6 ordered bool[],
-- $7 dead_letters_block bool.
WITH lowest AS (
    SELECT DISTINCT ON (aggregate_type, aggregate_id)
           id, created_at, aggregate_type, aggregate_id, event_type
      FROM outbox
     WHERE id = ANY($1::int8[])
       AND status = 'PENDING'
       AND (next_attempt_at = 'infinity' OR next_attempt_at <= clock_timestamp())
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
                  AND (e.status <> 'DEAD_LETTER' OR ($7::bool AND e.discarded_at IS NULL))
                  AND coalesce((SELECT r.ordered FROM unnest($5::text[], $6::bool[]) WITH ORDINALITY AS r(pattern, ordered, rank) WHERE e.event_type LIKE r.pattern ORDER BY r.rank LIMIT 1), $4::bool))
)
UPDATE outbox AS o
   SET status = 'PROCESSING',
       attempts = o.attempts + 1,
       next_attempt_at = CASE WHEN o.next_attempt_at = 'infinity' THEN now()
                              ELSE o.next_attempt_at END,
       locked_until = now() + make_interval(secs => $2::float8),
       lock_token = $3::uuid
  FROM free
 WHERE o.id = free.id AND o.created_at = free.created_at
   AND o.status = 'PENDING'
   AND (o.next_attempt_at = 'infinity' OR o.next_attempt_at <= clock_timestamp())
RETURNING o.id, o.created_at, o.tracking_id, o.aggregate_type, o.aggregate_id,
          o.event_type, o.payload::text, o.metadata::text, o.attempts, o.max_attempts,
          o.delivered_to
