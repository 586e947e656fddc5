-- record_attempts: failed attempts into the delivery history, one row each.
-- $1 outbox ids int8[], $2 tracking_ids uuid[], $3 destinations text[], $4 attempt
-- numbers int4[], $5 durations in ms float8[], $6 outcomes text[] ('retry' or
-- 'rejected'), $7 HTTP statuses int4[] (NULL: none), $8 errors text[] (cut by the
-- caller), $9 replay ids int8[] (NULL: a delivery).
INSERT INTO outbox_attempts (outbox_id, tracking_id, destination, attempt, duration_ms,
                             outcome, http_status, error, replay_id)
SELECT *
  FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::int4[], $5::float8[], $6::text[],
              $7::int4[], $8::text[], $9::int8[])
