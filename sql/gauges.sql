-- gauges: the database-wide numbers operators alert on, in one cheap statement (every
-- 15 s, not per scrape). Each count reads a partial index, so the cost follows the
-- number of pending and dead events, not the size of the table.
SELECT (SELECT count(*) FROM outbox WHERE status = 'PENDING')
         + (SELECT count(*) FROM outbox WHERE status = 'PROCESSING') AS pending,
       coalesce(extract(epoch FROM now() - least(
           (SELECT min(created_at) FROM outbox WHERE status = 'PENDING'),
           (SELECT min(created_at) FROM outbox WHERE status = 'PROCESSING'))), 0)::float8
         AS oldest_pending_age_seconds,
       -- Dead letters are kept apart (outbox_dead_letters), past retention too.
       (SELECT count(*) FROM outbox_dead_letters
         WHERE discarded_at IS NULL) AS dead_letters,
       pg_notification_queue_usage()::float8 AS notification_queue_usage,
       (SELECT count(*) FROM (SELECT 1 FROM outbox_default LIMIT 100000) AS capped)
         AS default_partition_rows,
       -- Ordering: events held behind an earlier event of their aggregate (the end of
       -- the due index), and the dead letters that hold some back.
       (SELECT count(*) FROM outbox
         WHERE status = 'PENDING' AND next_attempt_at = 'infinity') AS held,
       (SELECT count(*) FROM outbox AS d
         WHERE d.status = 'DEAD_LETTER' AND d.discarded_at IS NULL
           AND EXISTS (SELECT 1 FROM outbox AS h
                        WHERE h.aggregate_type = d.aggregate_type
                          AND h.aggregate_id = d.aggregate_id
                          AND h.id > d.id
                          AND h.status = 'PENDING'
                          AND h.next_attempt_at = 'infinity')) AS dead_letters_blocking
