-- bury: to DEAD_LETTER with the reason, for an operator to inspect and redrive.
-- $1 lock_token uuid, $2 ids int8[], $3 created_at timestamptz[], $4 last_error text[],
-- $5 acked destination lists (comma-joined text per event). Fenced by lock_token.
UPDATE outbox AS o
   SET status = 'DEAD_LETTER',
       processed_at = now(),
       last_error = k.last_error,
       locked_until = NULL,
       lock_token = NULL,
       delivered_to = ARRAY(SELECT DISTINCT d
                              FROM unnest(o.delivered_to || string_to_array(nullif(k.acked, ''), ',')) AS d
                             ORDER BY d)
  FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::text[])
       AS k(id, created_at, last_error, acked)
 WHERE o.id = k.id AND o.created_at = k.created_at
   AND o.lock_token = $1::uuid
   AND o.status = 'PROCESSING'
RETURNING o.id
