-- outboxd 0007: an index for the retry claim.
--
-- The retry timer claims only events a failed or deferred attempt rescheduled (they
-- carry last_error). Through the index on every due PENDING row it read the whole due
-- backlog to find them (34-56 ms per claim with 300,000 due new events and 10 due
-- retries, 970 ms under a generic plan). This partial index holds only rescheduled rows.
--
-- A plain CREATE INDEX on the partitioned table would lock out producers while it
-- builds, and PostgreSQL 15 refuses CREATE INDEX CONCURRENTLY on a partitioned table.
-- So this creates the index on the parent alone (invalid, instantly); `outboxd migrate`
-- then builds it on each partition with CREATE INDEX CONCURRENTLY (outside any
-- transaction) and attaches each, after which the parent's index is valid. Partitions
-- attached later get it on ATTACH.
CREATE INDEX IF NOT EXISTS outbox_retry_due_idx ON ONLY outbox (next_attempt_at)
    WHERE status = 'PENDING' AND last_error IS NOT NULL;
