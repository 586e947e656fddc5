-- create_replay: stores a replay job with the number of events its filter matches now.
-- $1 destination; the filter: $2 from_id, $3 to_id, $4 from_at, $5 to_at, $6 event_type
-- as a LIKE pattern, $7 aggregate_type, $8 aggregate_id (each NULL: any); $9 the
-- event_type pattern as given, $10 rate int4, $11 reason, $12 requested_by. Returns its
-- id and matched.
INSERT INTO outbox_replays (destination, from_id, to_id, from_at, to_at, event_type,
                            aggregate_type, aggregate_id, rate, reason, requested_by,
                            matched)
SELECT $1::text, $2::int8, $3::int8, $4::timestamptz, $5::timestamptz, $9::text,
       $7::text, $8::text, $10::int4, $11::text, $12::text,
       (SELECT count(*) FROM outbox AS o
         WHERE o.status = 'PUBLISHED'
           AND $1::text = ANY (o.delivered_to)
           AND ($2::int8 IS NULL OR o.id >= $2::int8)
           AND ($3::int8 IS NULL OR o.id <= $3::int8)
           AND ($4::timestamptz IS NULL OR o.created_at >= $4::timestamptz)
           AND ($5::timestamptz IS NULL OR o.created_at < $5::timestamptz)
           AND ($6::text IS NULL OR o.event_type LIKE $6::text)
           AND ($7::text IS NULL OR o.aggregate_type = $7::text)
           AND ($8::text IS NULL OR o.aggregate_id = $8::text))
RETURNING id, matched
