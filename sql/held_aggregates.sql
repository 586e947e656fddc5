-- held_aggregates: the aggregates of held events (ordering), for the safety sweep,
-- which releases those nothing holds back any more (unhold_aggregates). Reads the end
-- of the due index (held events are due at 'infinity'), at most $1 rows. $1 limit int8.
SELECT DISTINCT aggregate_type, aggregate_id
  FROM (SELECT aggregate_type, aggregate_id
          FROM outbox
         WHERE status = 'PENDING'
           AND next_attempt_at = 'infinity'
         LIMIT $1::int8) AS held
