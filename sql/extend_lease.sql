-- extend_lease: heartbeat for a delivery still running (invariant 7).
-- $1 lock_token uuid, $2 ids int8[], $3 created_at timestamptz[], $4 lease seconds float8.
-- Fenced: only rows this claim still owns.
UPDATE outbox AS o
   SET locked_until = now() + make_interval(secs => $4::float8)
  FROM unnest($2::int8[], $3::timestamptz[]) AS k(id, created_at)
 WHERE o.id = k.id AND o.created_at = k.created_at
   AND o.lock_token = $1::uuid
   AND o.status = 'PROCESSING'
RETURNING o.id
