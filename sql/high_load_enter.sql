-- high_load_enter: enter or renew drain mode for $2 seconds as holder $1 (text), and tell
-- every listening instance ("drain" on the channel) so they claim back to back too.
-- Affects one row.
WITH entered AS (
    UPDATE outbox_mode
       SET changed_at = CASE WHEN mode = 'drain' AND drain_until > clock_timestamp()
                             THEN changed_at ELSE clock_timestamp() END,
           mode = 'drain',
           drain_until = clock_timestamp() + make_interval(secs => $2::float8),
           holder = $1::text
    RETURNING 1
)
SELECT pg_notify('outbox_events', 'drain') FROM entered
