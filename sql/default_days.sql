-- default_days: the days (UTC) whose rows sit in outbox_default (their partition was
-- missing when they were inserted), each with its partition's name suffix and bounds,
-- and whether a table of that name exists outside outbox already (one this pass began
-- filling, marked by its comment, or another: a partition retention detached), and the
-- database's time now (the batches that copy published rows begin after it).
SELECT to_char(d, 'YYYYMMDD') AS suffix,
       (d::timestamp AT TIME ZONE 'UTC') AS day_from,
       ((d + 1)::timestamp AT TIME ZONE 'UTC') AS day_to,
       obj_description(to_regclass('outbox_p' || to_char(d, 'YYYYMMDD')), 'pg_class') AS comment,
       to_regclass('outbox_p' || to_char(d, 'YYYYMMDD')) IS NOT NULL AS exists,
       now() AS read_at
  FROM (SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS d FROM outbox_default) AS days
 ORDER BY d
