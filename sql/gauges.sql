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
                          AND h.next_attempt_at = 'infinity')) AS dead_letters_blocking,
       -- Replays waiting for or being sent (wakes the replayers: no polling of its own).
       (SELECT count(*) FROM outbox_replays WHERE status = 'RUNNING') AS replays_running,
       -- Bloat: dead row versions in outbox's partitions (as of the statistics
       -- collector), and what keeps vacuum from removing them: the oldest snapshot
       -- (backend_xmin) of this database's sessions and prepared transactions, its age
       -- in transactions and the age of the oldest open transaction in seconds. Other
       -- roles' sessions are seen with pg_read_all_stats (pg_monitor).
       (SELECT coalesce(sum(s.n_dead_tup), 0)::int8
          FROM pg_stat_user_tables AS s
          JOIN pg_inherits AS i ON i.inhrelid = s.relid
         WHERE i.inhparent = 'outbox'::regclass) AS partition_dead_tuples,
       greatest(
         (SELECT coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()),
         (SELECT coalesce(max(age(transaction)), 0) FROM pg_prepared_xacts
           WHERE database = current_database()))::int8 AS xmin_horizon_age,
       coalesce((SELECT extract(epoch FROM now() - min(xact_start)) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND xact_start IS NOT NULL), 0)::float8 AS oldest_transaction_age_seconds,
       -- Replication slots of this database (logical) and physical ones (they hold back
       -- every database): the age of the xmin they keep, and the WAL they keep, as JSON
       -- rows [{"slot", "xmin_age", "wal_bytes"}].
       coalesce((SELECT json_agg(json_build_object(
                   'slot', slot_name,
                   'xmin_age', coalesce(age(coalesce(catalog_xmin, xmin)), 0),
                   'wal_bytes', coalesce(pg_wal_lsn_diff(
                       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                            ELSE pg_current_wal_lsn() END, restart_lsn), 0)))
                   FROM pg_replication_slots
                  WHERE database = current_database() OR database IS NULL), '[]')::text
         AS replication_slots
