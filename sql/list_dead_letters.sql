-- list_dead_letters: newest first, keyset-paginated by id, read from
-- outbox_dead_letters (which keeps them past retention). $1 event_type LIKE pattern
-- (NULL: any), $2 created at or after (NULL: any), $3 created before (NULL: any),
-- $4 only ids below this one (the previous page's last id; NULL: first page), $5 limit.
SELECT id, created_at, tracking_id, event_type, aggregate_type, aggregate_id, attempts,
       dead_since, last_error, delivered_to
  FROM outbox_dead_letters
 WHERE discarded_at IS NULL
   AND ($1::text IS NULL OR event_type LIKE $1::text)
   AND ($2::timestamptz IS NULL OR created_at >= $2::timestamptz)
   AND ($3::timestamptz IS NULL OR created_at < $3::timestamptz)
   AND ($4::int8 IS NULL OR id < $4::int8)
 ORDER BY id DESC
 LIMIT $5
