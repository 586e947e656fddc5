-- replay_batch: the next events of a replay after its cursor, in id order (commit order
-- for the events of one aggregate written through `enqueue`): PUBLISHED events the
-- destination acknowledged that match the filter. $1 destination, $2 after this id,
-- $3 limit, $4 from_id, $5 to_id, $6 from_at, $7 to_at, $8 event_type LIKE pattern,
-- $9 aggregate_type, $10 aggregate_id (each NULL: any). Columns as the claims return.
SELECT o.id, o.created_at, o.tracking_id, o.aggregate_type, o.aggregate_id, o.event_type,
       o.payload::text, o.metadata::text, o.attempts, o.max_attempts, o.delivered_to
  FROM outbox AS o
 WHERE o.status = 'PUBLISHED'
   AND $1::text = ANY (o.delivered_to)
   AND o.id > $2::int8
   AND ($4::int8 IS NULL OR o.id >= $4::int8)
   AND ($5::int8 IS NULL OR o.id <= $5::int8)
   AND ($6::timestamptz IS NULL OR o.created_at >= $6::timestamptz)
   AND ($7::timestamptz IS NULL OR o.created_at < $7::timestamptz)
   AND ($8::text IS NULL OR o.event_type LIKE $8::text)
   AND ($9::text IS NULL OR o.aggregate_type = $9::text)
   AND ($10::text IS NULL OR o.aggregate_id = $10::text)
 ORDER BY o.id
 LIMIT $3::int8
