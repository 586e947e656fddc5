-- take_lease: the named job (outbox_leases) for $2 holder text for $3 seconds (float8),
-- taken when nobody holds it or its holder's lease expired, renewed when $2 holds it
-- already, left alone otherwise. $1 name text. Returns the holder afterwards: $2 when
-- taken, the other holder when not. Always one row: the conflicting row is locked and
-- rewritten as it was (a lease taken by a concurrent transaction is seen, not missed
-- by this statement's snapshot).
INSERT INTO outbox_leases AS l (name, holder, expires_at)
VALUES ($1::text, $2::text, now() + make_interval(secs => $3::float8))
ON CONFLICT (name) DO UPDATE
   SET holder = CASE WHEN l.holder = EXCLUDED.holder OR l.expires_at < now()
                     THEN EXCLUDED.holder ELSE l.holder END,
       expires_at = CASE WHEN l.holder = EXCLUDED.holder OR l.expires_at < now()
                         THEN EXCLUDED.expires_at ELSE l.expires_at END
RETURNING holder
