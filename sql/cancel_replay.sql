-- cancel_replay: stops a RUNNING replay; its holder stops after the batch in flight.
-- $1 id, $2 cancelled_by. Returns the id when it was running.
UPDATE outbox_replays
   SET status = 'CANCELLED', finished_at = now(), cancelled_by = $2::text
 WHERE id = $1::int8 AND status = 'RUNNING'
RETURNING id
