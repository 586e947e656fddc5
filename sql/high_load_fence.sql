-- high_load_fence: N, the current transaction id (xid8 as text), taken only when drain
-- mode is off. Every producer whose trigger read drain mode got its xid before it read
-- the mode, so before this one: it is below N. Runs in its own transaction, after the
-- switch to notify committed (or the lease lapsed). No row: drain mode is on again.
SELECT pg_current_xact_id()::text
  FROM outbox_mode
 WHERE NOT (mode = 'drain' AND drain_until > clock_timestamp())
