-- partition_days: today (UTC) and the next $1 days, each with its partition's name suffix,
-- its bounds, and whether that partition is attached already.
SELECT to_char(d, 'YYYYMMDD') AS suffix,
       to_char(d, 'YYYY-MM-DD') AS day_from,
       to_char(d + 1, 'YYYY-MM-DD') AS day_to,
       EXISTS (SELECT 1
                 FROM pg_inherits i
                 JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'outbox'::regclass
                  AND c.relname = 'outbox_p' || to_char(d, 'YYYYMMDD')) AS attached
  FROM (SELECT (now() AT TIME ZONE 'UTC')::date + g AS d
          FROM generate_series(0, $1::int4) AS g) AS days
 ORDER BY d
