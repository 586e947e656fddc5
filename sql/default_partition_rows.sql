-- default_partition_rows: rows that fell into the DEFAULT partition (no daily partition
-- covered their created_at). Counted up to a cap so a large DEFAULT stays cheap to check.
SELECT count(*) FROM (SELECT 1 FROM outbox_default LIMIT 100000) AS capped
