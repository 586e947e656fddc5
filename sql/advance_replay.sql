-- advance_replay: a replay's progress after a batch (or a renewal of its lease with
-- nothing done: $3 NULL, $4 and $5 0), fenced by its holder: a replay cancelled, or
-- taken over after this holder's lease ran out, changes nothing and returns no row.
-- $1 id, $2 holder, $3 new cursor int8, $4 sent int8, $5 rejected int8, $6 lease
-- seconds float8.
UPDATE outbox_replays
   SET cursor = greatest(cursor, coalesce($3::int8, cursor)),
       sent = sent + $4::int8,
       rejected = rejected + $5::int8,
       lease_until = now() + make_interval(secs => $6::float8)
 WHERE id = $1::int8 AND holder = $2::text AND status = 'RUNNING'
RETURNING id
