-- list_attempts: one event's failed attempts, oldest first. $1 outbox id int8.
SELECT at, destination, attempt, duration_ms, outcome, http_status, error, replay_id
  FROM outbox_attempts
 WHERE outbox_id = $1::int8
 ORDER BY id
