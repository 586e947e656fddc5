-- trim_tracking_ids: forgets the tracking_ids of a range of created_at whose partition
-- retention dropped ($1 from, $2 to, timestamptz), in one pass over the table (run
-- after the drop, outside its lock; no other statement touches these rows). A dead
-- letter's stays: its copy in outbox_dead_letters may be redriven, which records it
-- again.
DELETE FROM outbox_tracking_ids AS t
 WHERE t.created_at >= $1::timestamptz AND t.created_at < $2::timestamptz
   AND NOT EXISTS (SELECT 1 FROM outbox_dead_letters AS d WHERE d.tracking_id = t.tracking_id)
