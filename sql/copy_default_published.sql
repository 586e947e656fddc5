-- copy_default_published: copies the next rows of one day from outbox_default into that
-- day's table {table} (created detached, filled, then attached), PUBLISHED ones only:
-- they never change again, so a copy made now stays right; the others move in the
-- final, locked step. Keyset by id: $1 from, $2 to (timestamptz), $3 after this id,
-- $4 at most this many. Returns the ids copied (the caller continues after the last).
INSERT INTO {table}
SELECT d.*
  FROM outbox_default AS d
 WHERE d.created_at >= $1::timestamptz AND d.created_at < $2::timestamptz
   AND d.status = 'PUBLISHED'
   AND d.id > $3::int8
 ORDER BY d.id
 LIMIT $4::int8
ON CONFLICT DO NOTHING
RETURNING id
