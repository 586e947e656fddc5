-- high_load_horizon: true once no transaction that could have read drain mode can still
-- commit an event: every xid up to N ($1, xid8 as text) has ended, no other backend of
-- this database holds a snapshot older than N (a REPEATABLE READ producer reads the
-- mode from its snapshot, and may get its xid after N), and this database has no
-- prepared transaction (it holds no snapshot, so it cannot be judged).
SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8
   AND NOT EXISTS (SELECT 1
                     FROM pg_stat_activity
                    WHERE datname = current_database()
                      AND pid <> pg_backend_pid()
                      AND backend_xmin IS NOT NULL
                      AND age(backend_xmin) > age($1::text::xid8::xid))
   AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE database = current_database())
