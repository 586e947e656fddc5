-- heartbeat: this instance's listener renews its row in outbox_instances (inserting it
-- when it joins or rejoins) and reads which instances are live, to divide the notified
-- events among them (src/membership.rs).
-- $1 name text, $2 ttl seconds float8 (the row expires that long from now unless
-- renewed). When the row is new (joining, or rejoining after the others dropped it)
-- and others are live, or a member was dropped, every instance is told to read the
-- members again.
-- Runs on the listener's own connection, so listener_pid is the backend that hears the
-- notifications. Another member whose listener backend is gone (its process died, its
-- connection broke) or whose row expired (it stalled) is no longer live: it is deleted
-- here, by whichever instance notices first, and the others are told at once.
-- Returns the live members' names, this one first.
WITH me AS (
    INSERT INTO outbox_instances AS i (name, listener_pid, expires_at)
    VALUES ($1::text, pg_backend_pid(), now() + make_interval(secs => $2::float8))
    ON CONFLICT (name) DO UPDATE
       SET listener_pid = EXCLUDED.listener_pid,
           expires_at = EXCLUDED.expires_at
    RETURNING i.name, i.xmax = 0 AS joined
), gone AS (
    DELETE FROM outbox_instances AS i
     WHERE i.name <> $1::text
       AND (i.expires_at < now()
            OR NOT EXISTS (SELECT 1
                             FROM pg_stat_activity AS a
                            WHERE a.pid = i.listener_pid
                              AND a.datname = current_database()))
    RETURNING i.name
), others AS (
    SELECT i.name
      FROM outbox_instances AS i
     WHERE i.name <> $1::text
       AND i.name NOT IN (SELECT name FROM gone)
), announced AS (
    -- Nobody to tell when this one joins alone.
    SELECT pg_notify('outbox_events', 'members')
     WHERE (EXISTS (SELECT 1 FROM me WHERE joined) AND EXISTS (SELECT 1 FROM others))
        OR EXISTS (SELECT 1 FROM gone)
)
-- The count reads `announced`, so its NOTIFY runs (an unread CTE is never run); `me`
-- always has its one row, so the count is taken.
SELECT name FROM me WHERE (SELECT count(*) FROM announced) >= 0
UNION ALL
SELECT name FROM others
