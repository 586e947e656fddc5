-- default_holds_other_days: whether outbox_default holds rows outside one day ($1 from,
-- $2 to, timestamptz), in the locked step of emptying it: when it does not, the day's
-- rows are removed by TRUNCATE (instant) rather than DELETE (a pass over every row).
SELECT EXISTS (SELECT 1 FROM outbox_default
                WHERE created_at < $1::timestamptz OR created_at >= $2::timestamptz)
