-- list_redrives: the redrive history of one event. $1 outbox id int8.
SELECT reason, redriven_by, redriven_at, last_error, attempts
  FROM outbox_redrives
 WHERE outbox_id = $1::int8
 ORDER BY id
