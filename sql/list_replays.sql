-- list_replays: replays, newest first. $1 only this id (NULL: the newest $2).
SELECT id, destination, from_id, to_id, from_at, to_at, event_type, aggregate_type,
       aggregate_id, rate, reason, requested_by, requested_at, status, matched, cursor,
       sent, rejected, holder, started_at, finished_at, cancelled_by
  FROM outbox_replays
 WHERE $1::int8 IS NULL OR id = $1::int8
 ORDER BY id DESC
 LIMIT $2::int8
