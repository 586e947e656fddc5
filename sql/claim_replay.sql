-- claim_replay: takes the oldest RUNNING replay to one of this instance's destinations
-- ($2 text[]) that nobody runs: no holder, a lease that expired, or a holder that is no
-- longer a live instance (outbox_instances; a killed one is dropped there within a
-- heartbeat). $1 holder text, $3 lease seconds float8. Returns the job.
UPDATE outbox_replays AS r
   SET holder = $1::text,
       lease_until = now() + make_interval(secs => $3::float8),
       started_at = coalesce(r.started_at, now())
 WHERE r.id = (SELECT c.id FROM outbox_replays AS c
                WHERE c.status = 'RUNNING'
                  AND c.destination = ANY ($2::text[])
                  AND (c.holder IS NULL OR c.holder = $1::text OR c.lease_until < now()
                       OR NOT EXISTS (SELECT 1 FROM outbox_instances AS i
                                       WHERE i.name = c.holder))
                ORDER BY c.id
                LIMIT 1
                  FOR UPDATE SKIP LOCKED)
RETURNING r.id, r.destination, r.from_id, r.to_id, r.from_at, r.to_at, r.event_type,
          r.aggregate_type, r.aggregate_id, r.rate, r.cursor
