-- status: counts per status and the age of the oldest event of each, for
-- `outboxd status`; held events (ordering) are counted as PENDING, discarded dead
-- letters as DEAD_LETTER. Scans the table: an operator's command, not a hot path.
SELECT s.status,
       coalesce(c.n, 0) AS events,
       c.oldest_age_seconds
  FROM unnest(ARRAY['PENDING', 'PROCESSING', 'PUBLISHED', 'DEAD_LETTER']) WITH ORDINALITY AS s(status, position)
  LEFT JOIN (SELECT status,
                    count(*) AS n,
                    extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds
               FROM outbox
              GROUP BY status) c ON c.status = s.status
 ORDER BY s.position
