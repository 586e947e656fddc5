-- partitions: outbox's partitions (DEFAULT apart), oldest first, each with its bounds,
-- its size on disk, and what retention asks of it: how many rows are still PENDING or
-- PROCESSING (the partition waits for them), how many undiscarded dead letters it holds
-- (kept apart in outbox_dead_letters, so they survive the drop) and how many of those
-- still hold back a later PENDING or PROCESSING event of their aggregate (the partition
-- waits: dropping the dead letter would let the later event overtake it).
-- Each count reads a partial index of one partition (status PENDING, PROCESSING,
-- DEAD_LETTER), so the cost follows the unfinished rows, not the partition's size.
-- $1 retention in seconds (float8): a partition whose upper bound is that long ago or
-- more has expired. $2 text: that partition alone (NULL: all).
SELECT c.relname::text AS name,
       b.lower,
       b.upper,
       pg_total_relation_size(c.oid) AS bytes,
       greatest(c.reltuples, 0)::int8 AS rows_estimate,
       b.upper <= now() - make_interval(secs => $1::float8) AS expired,
       (SELECT count(*) FROM outbox AS o
         WHERE o.created_at >= b.lower AND o.created_at < b.upper
           AND o.status = 'PENDING')
       + (SELECT count(*) FROM outbox AS o
           WHERE o.created_at >= b.lower AND o.created_at < b.upper
             AND o.status = 'PROCESSING') AS unfinished,
       (SELECT count(*) FROM outbox AS d
         WHERE d.created_at >= b.lower AND d.created_at < b.upper
           AND d.status = 'DEAD_LETTER' AND d.discarded_at IS NULL) AS dead_letters,
       (SELECT count(*) FROM outbox AS d
         WHERE d.created_at >= b.lower AND d.created_at < b.upper
           AND d.status = 'DEAD_LETTER' AND d.discarded_at IS NULL
           AND EXISTS (SELECT 1 FROM outbox AS h
                        WHERE h.aggregate_type = d.aggregate_type
                          AND h.aggregate_id = d.aggregate_id
                          AND h.id > d.id
                          AND h.status IN ('PENDING', 'PROCESSING'))) AS blocking
  FROM pg_inherits AS i
  JOIN pg_class AS c ON c.oid = i.inhrelid
 CROSS JOIN LATERAL (
       SELECT m[1]::timestamptz AS lower, m[2]::timestamptz AS upper
         FROM regexp_match(pg_get_expr(c.relpartbound, c.oid),
                           $re$FROM \('([^']+)'\) TO \('([^']+)'\)$re$) AS m
       ) AS b
 WHERE i.inhparent = 'outbox'::regclass
   AND b.lower IS NOT NULL
   AND ($2::text IS NULL OR c.relname = $2::text)
 ORDER BY b.lower
