-- finish_replay: a replay with nothing left to send is DONE. $1 id, $2 holder (fenced).
UPDATE outbox_replays
   SET status = 'DONE', finished_at = now(), holder = NULL, lease_until = NULL
 WHERE id = $1::int8 AND holder = $2::text AND status = 'RUNNING'
RETURNING id
