-- delete_default_day: in the locked step of emptying DEFAULT, removes one day's rows
-- from outbox_default once they are in that day's table. $1 from, $2 to (timestamptz).
DELETE FROM outbox_default WHERE created_at >= $1::timestamptz AND created_at < $2::timestamptz
