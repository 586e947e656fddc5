-- outboxd 0011: the instances that share this database, so they divide the notified
-- events among them instead of each trying to claim every one.
--
-- Each instance's listener keeps one row here while its LISTEN connection is up: it
-- inserts it when it starts listening, renews it (expires_at) on every heartbeat, and
-- deletes it when it stops. `listener_pid` is that connection's backend, so an instance
-- whose process died is dropped at the next heartbeat of any other (its backend is
-- gone), and one that stalls is dropped once its row expires. Every instance assigns
-- the id blocks to the live rows by the same pure function (src/membership.rs). The
-- rows are a hint for dividing work, never a lock: claims stay fenced by
-- FOR UPDATE SKIP LOCKED and lock_token, so two instances that disagree for a moment
-- only both try an event.
CREATE TABLE IF NOT EXISTS outbox_instances (
    name         text        PRIMARY KEY,
    listener_pid integer     NOT NULL,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
