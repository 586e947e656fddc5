-- complete: every routed destination acknowledged: PUBLISHED.
-- $1 lock_token uuid, $2 ids int8[], $3 created_at timestamptz[], $4 destinations acked
-- in this attempt, one comma-joined text per event. Fenced by lock_token (invariant 3):
-- a worker whose lease was reaped changes nothing. Returns the ids it completed.
UPDATE outbox AS o
   SET status = 'PUBLISHED',
       processed_at = now(),
       locked_until = NULL,
       lock_token = NULL,
       last_error = NULL,
       delivered_to = ARRAY(SELECT DISTINCT d
                              FROM unnest(o.delivered_to || string_to_array(nullif(k.acked, ''), ',')) AS d
                             ORDER BY d)
  FROM unnest($2::int8[], $3::timestamptz[], $4::text[]) AS k(id, created_at, acked)
 WHERE o.id = k.id AND o.created_at = k.created_at
   AND o.lock_token = $1::uuid
   AND o.status = 'PROCESSING'
RETURNING o.id
