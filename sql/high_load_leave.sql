-- high_load_leave: back to notify mode, if $1 (text) is still the holder; tells the
-- other instances ("notify" on the channel), which then leave the way this one does.
-- Affects no row when another instance renewed drain mode since.
WITH left_drain AS (
    UPDATE outbox_mode
       SET mode = 'notify', drain_until = NULL, holder = NULL, changed_at = clock_timestamp()
     WHERE mode = 'drain' AND holder = $1::text
    RETURNING 1
)
SELECT pg_notify('outbox_events', 'notify') FROM left_drain
