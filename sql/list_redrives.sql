-- list_redrives: the redrive (and discard) history of one event. $1 outbox id int8.
SELECT reason, redriven_by, redriven_at, last_error, attempts, action
  FROM outbox_redrives
 WHERE outbox_id = $1::int8
 ORDER BY id
