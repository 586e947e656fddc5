-- release: on shutdown, hand back events this instance claimed but did not finish:
-- PENDING again, lease cleared, and the attempt counted at claim returned (stopping
-- outboxd is not the event's fault), announced on outbox_events so another instance
-- claims them at once instead of at its safety sweep. $1 lock_tokens uuid[]. Returns
-- the ids released.
WITH released AS (
    UPDATE outbox
       SET status = 'PENDING',
           locked_until = NULL,
           lock_token = NULL,
           attempts = greatest(attempts - 1, 0),
           next_attempt_at = now()
     WHERE lock_token = ANY($1::uuid[])
       AND status = 'PROCESSING'
    RETURNING id, created_at
), notified AS (
    SELECT outbox_notify_ids(array_agg(id), min(created_at), max(created_at))
      FROM released HAVING count(*) > 0
)
SELECT id FROM released LEFT JOIN notified ON true
