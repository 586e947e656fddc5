-- move_default_rest: in the locked step of emptying DEFAULT, copies the rows of one day
-- not copied yet (PENDING, PROCESSING, DEAD_LETTER, and rows PUBLISHED since the
-- batches ran) into {table}, with their status, lease and lock_token as they are, so a
-- worker's outcome finds them there once {table} is attached. $1 from, $2 to.
INSERT INTO {table}
SELECT d.*
  FROM outbox_default AS d
 WHERE d.created_at >= $1::timestamptz AND d.created_at < $2::timestamptz
   AND NOT EXISTS (SELECT 1 FROM {table} AS t
                    WHERE t.id = d.id AND t.created_at = d.created_at)
