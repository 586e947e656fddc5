-- gauges: the database-wide numbers operators alert on, in one cheap statement (every
-- 15 s, not per scrape). Each count reads a partial index, so the cost follows the
-- number of pending and dead events, not the size of the table.
SELECT (SELECT count(*) FROM outbox WHERE status = 'PENDING')
         + (SELECT count(*) FROM outbox WHERE status = 'PROCESSING') AS pending,
       coalesce(extract(epoch FROM now() - least(
           (SELECT min(created_at) FROM outbox WHERE status = 'PENDING'),
           (SELECT min(created_at) FROM outbox WHERE status = 'PROCESSING'))), 0)::float8
         AS oldest_pending_age_seconds,
       (SELECT count(*) FROM outbox WHERE status = 'DEAD_LETTER') AS dead_letters,
       pg_notification_queue_usage()::float8 AS notification_queue_usage,
       (SELECT count(*) FROM (SELECT 1 FROM outbox_default LIMIT 100000) AS capped)
         AS default_partition_rows
