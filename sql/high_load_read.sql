-- high_load_read: whether drain mode is on now, and for how many more seconds.
SELECT mode = 'drain' AND drain_until > clock_timestamp() AS active,
       COALESCE(EXTRACT(epoch FROM drain_until - clock_timestamp())::float8, 0) AS remaining
  FROM outbox_mode
