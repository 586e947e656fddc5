-- move_default_rest: in the locked step of emptying DEFAULT, copies the rows of one day
-- not copied yet into {table}: PENDING, PROCESSING and DEAD_LETTER rows, with their
-- status, lease and lock_token as they are (a worker's outcome finds them there once
-- {table} is attached), and rows PUBLISHED since the batches began (processed_at from $3
-- on: the caller passes the time the batches began, less a margin for a completion
-- still in flight then); older PUBLISHED rows were all copied by the batches. Reading
-- only those keeps this step short: the probe into {table} runs for a few rows, not
-- the whole day. $1 from, $2 to, $3 published since (timestamptz).
INSERT INTO {table}
SELECT d.*
  FROM outbox_default AS d
 WHERE d.created_at >= $1::timestamptz AND d.created_at < $2::timestamptz
   AND (d.status <> 'PUBLISHED' OR d.processed_at IS NULL OR d.processed_at >= $3::timestamptz)
   AND NOT EXISTS (SELECT 1 FROM {table} AS t
                    WHERE t.id = d.id AND t.created_at = d.created_at)
