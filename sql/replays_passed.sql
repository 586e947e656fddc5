-- replays_passed: replays to one of an event's destinations ($2 text[]) whose cursor
-- passed its id ($1 int8), for the event's story (the caller applies their filters).
SELECT id, destination, from_id, to_id, from_at, to_at, event_type, aggregate_type,
       aggregate_id, rate, reason, requested_by, requested_at, status, matched, cursor,
       sent, rejected, holder, started_at, finished_at, cancelled_by
  FROM outbox_replays
 WHERE cursor >= $1::int8
   AND destination = ANY ($2::text[])
   AND ($1::int8 >= coalesce(from_id, $1::int8))
   AND ($1::int8 <= coalesce(to_id, $1::int8))
 ORDER BY id
