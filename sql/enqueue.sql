-- enqueue: the producer API's insert, one statement for any number of events, so the
-- statement-level trigger sends one notification for all of them.
-- $1 tracking_id uuid[], $2 aggregate_type text[], $3 aggregate_id text[],
-- $4 event_type text[], $5 payload jsonb[], $6 metadata jsonb[], $7 max_attempts int4[].
--
-- Producers of one aggregate are serialised: before any id is drawn, the statement
-- takes a transaction-scoped advisory lock per (aggregate_type, aggregate_id) it
-- writes, held until the transaction ends. So a second transaction writing the same
-- aggregate waits at its INSERT until the first commits or rolls back, and only then
-- draws its ids: within an aggregate, id order is commit order. The locks are taken in
-- one fixed order (by their two hashes), so two statements writing the same aggregates
-- cannot deadlock over them. Other producers take the same lock with
--   SELECT pg_advisory_xact_lock(hashtext(aggregate_type), hashtext(aggregate_id));
-- before their INSERT, in the same transaction.
WITH locked AS MATERIALIZED (
    SELECT count(*) AS keys
      FROM (SELECT pg_advisory_xact_lock(k.type_hash, k.id_hash)
              FROM (SELECT DISTINCT hashtext(t) AS type_hash, hashtext(i) AS id_hash
                      FROM unnest($2::text[], $3::text[]) AS u(t, i)
                     ORDER BY 1, 2) AS k) AS taken
)
INSERT INTO outbox (tracking_id, aggregate_type, aggregate_id, event_type, payload,
                    metadata, max_attempts)
SELECT e.*
  FROM locked,
       unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
              $6::jsonb[], $7::int4[]) AS e
