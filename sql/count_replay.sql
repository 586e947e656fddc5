-- count_replay: what a replay with this filter would send (a dry run): how many
-- PUBLISHED events acknowledged by the destination match, and their first and last id.
-- $1 destination, $2 from_id, $3 to_id, $4 from_at, $5 to_at, $6 event_type LIKE
-- pattern, $7 aggregate_type, $8 aggregate_id (each NULL: any).
SELECT count(*), min(o.id), max(o.id)
  FROM outbox AS o
 WHERE o.status = 'PUBLISHED'
   AND $1::text = ANY (o.delivered_to)
   AND ($2::int8 IS NULL OR o.id >= $2::int8)
   AND ($3::int8 IS NULL OR o.id <= $3::int8)
   AND ($4::timestamptz IS NULL OR o.created_at >= $4::timestamptz)
   AND ($5::timestamptz IS NULL OR o.created_at < $5::timestamptz)
   AND ($6::text IS NULL OR o.event_type LIKE $6::text)
   AND ($7::text IS NULL OR o.aggregate_type = $7::text)
   AND ($8::text IS NULL OR o.aggregate_id = $8::text)
