-- redrive_candidates: the next undiscarded dead letters a bulk redrive's filter names,
-- in id order, for one step of `outboxd dead-letters redrive` with filters (the redrive
-- itself locks and re-checks each: two redrives of one filter move each dead letter
-- once). $1 after this id, $2 limit, $3 from_id, $4 to_id, $5 from_at, $6 to_at
-- (created_at), $7 event_type LIKE pattern, $8 aggregate_type, $9 aggregate_id (each
-- NULL: any).
SELECT d.id
  FROM outbox_dead_letters AS d
 WHERE d.discarded_at IS NULL
   AND d.id > $1::int8
   AND ($3::int8 IS NULL OR d.id >= $3::int8)
   AND ($4::int8 IS NULL OR d.id <= $4::int8)
   AND ($5::timestamptz IS NULL OR d.created_at >= $5::timestamptz)
   AND ($6::timestamptz IS NULL OR d.created_at < $6::timestamptz)
   AND ($7::text IS NULL OR d.event_type LIKE $7::text)
   AND ($8::text IS NULL OR d.aggregate_type = $8::text)
   AND ($9::text IS NULL OR d.aggregate_id = $9::text)
 ORDER BY d.id
 LIMIT $2::int8
