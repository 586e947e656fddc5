-- trim_attempts: forgets failed attempts older than the retention ($1 seconds,
-- float8), at most $2 int8 rows a statement (called until it removes fewer); those of
-- events that are dead letters now stay with them.
DELETE FROM outbox_attempts
 WHERE id IN (SELECT a.id FROM outbox_attempts AS a
               WHERE a.at < now() - make_interval(secs => $1::float8)
                 AND NOT EXISTS (SELECT 1 FROM outbox_dead_letters AS d
                                  WHERE d.tracking_id = a.tracking_id)
               ORDER BY a.at
               LIMIT $2::int8)
