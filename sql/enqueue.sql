-- enqueue: the producer API's insert, one statement for any number of events, so the
-- statement-level trigger sends one notification for all of them.
-- $1 tracking_id uuid[], $2 aggregate_type text[], $3 aggregate_id text[],
-- $4 event_type text[], $5 payload jsonb[], $6 metadata jsonb[], $7 max_attempts int4[].
INSERT INTO outbox (tracking_id, aggregate_type, aggregate_id, event_type, payload,
                    metadata, max_attempts)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                     $6::jsonb[], $7::int4[])
