//! Running unattended: expired partitions are dropped once their rows are finished and
//! never while one is unfinished, dead letters survive the drop of their day (kept apart
//! in outbox_dead_letters on every path that makes one), rows stranded in the DEFAULT
//! partition move to their day's partition and are still delivered once, producers see
//! no error while partitions are dropped, and one instance at a time maintains them.
//! Partitions are back-dated (created for days long past) rather than waiting for a
//! clock.

mod support;

use support::eventually;

use outboxd::config::{OnExpiry, WebhookConfig};
use outboxd::routing::Unrouted;
use outboxd::store::Store;
use outboxd::store::retention::{PARTITIONS_LEASE, Verdict};
use outboxd::{NewEvent, enqueue};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::webhook::{Endpoint, Hit, Reply};
use support::{TestBroker, TestDb, route, start};
use uuid::Uuid;

const WEEK: Duration = Duration::from_secs(7 * 86400);

/// Creates the partition of the UTC day `days_ago` days before today and returns its
/// name; rows for it are inserted at noon of that day.
async fn old_partition(db: &TestDb, days_ago: i32) -> String {
    let client = db.client().await;
    let name: String = client
        .query_one(
            "SELECT 'outbox_p' || to_char((now() AT TIME ZONE 'UTC')::date - $1::int4, 'YYYYMMDD')",
            &[&days_ago],
        )
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!(
            "DO $$
             DECLARE d date := (now() AT TIME ZONE 'UTC')::date - {days_ago};
             BEGIN
               EXECUTE format('CREATE TABLE {name} PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)',
                              d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
             END $$;"
        ))
        .await
        .unwrap();
    name
}

/// Inserts `n` rows at noon of the UTC day `days_ago` days before today, with `status`;
/// returns their tracking ids.
async fn insert_on_day(db: &TestDb, days_ago: i32, n: i64, status: &str) -> Vec<Uuid> {
    db.client()
        .await
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at)
             SELECT 'order', g::text, 'order.created', jsonb_build_object('n', g), $3::text,
                    ((now() AT TIME ZONE 'UTC')::date - $1::int4)::timestamp AT TIME ZONE 'UTC'
                      + interval '12 hours' + g * interval '1 ms'
               FROM generate_series(1, $2::int8) AS g
             RETURNING tracking_id",
            &[&days_ago, &n, &status],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn is_partition(db: &TestDb, name: &str) -> bool {
    db.client()
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                             WHERE i.inhparent = 'outbox'::regclass AND c.relname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

async fn store(db: &TestDb) -> Store {
    Store::connect(&outboxd::config::DatabaseConfig {
        url: db.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The running instance's own partition keeper keeps every day: the test applies the
/// retention itself, when it means to (else the keeper's first pass, at start, may drop
/// a back-dated day before the test looks).
fn keeping_everything(mut config: outboxd::Config) -> outboxd::Config {
    config.partitions.retention = Duration::from_secs(3650 * 86400);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_partitions_go_once_finished_and_wait_while_an_event_is_pending() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let published_only = old_partition(&db, 30).await;
    let with_pending = old_partition(&db, 20).await;
    let recent = old_partition(&db, 3).await;
    insert_on_day(&db, 30, 500, "PUBLISHED").await;
    insert_on_day(&db, 20, 300, "PUBLISHED").await;
    insert_on_day(&db, 3, 10, "PUBLISHED").await;
    // Not due for an hour: nothing delivers it until the test says so.
    let pending = insert_on_day(&db, 20, 1, "PENDING").await[0];
    db.client()
        .await
        .execute(
            "UPDATE outbox SET next_attempt_at = now() + interval '1 hour' WHERE tracking_id = $1",
            &[&pending],
        )
        .await
        .unwrap();
    let store = store(&db).await;

    let states: HashMap<String, Verdict> = store
        .partitions(WEEK)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.name.clone(), p.verdict()))
        .collect();
    assert_eq!(states[&published_only], Verdict::Expire);
    assert!(
        matches!(&states[&with_pending], Verdict::Wait(why) if why.contains("1 event(s) still PENDING")),
        "{:?}",
        states[&with_pending]
    );
    assert_eq!(states[&recent], Verdict::Keep);

    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert_eq!(report.expired, vec![published_only.clone()]);
    assert_eq!(report.waiting.len(), 1, "{report:?}");
    assert_eq!(report.waiting[0].0, with_pending);
    assert_eq!(
        report.tracking_ids_trimmed, 500,
        "its tracking ids go with it"
    );
    assert!(!is_partition(&db, &published_only).await);
    assert!(is_partition(&db, &with_pending).await);
    assert!(is_partition(&db, &recent).await);
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 311);

    // Delivered: the partition goes at the next pass.
    db.client()
        .await
        .execute(
            "UPDATE outbox SET next_attempt_at = now() WHERE tracking_id = $1",
            &[&pending],
        )
        .await
        .unwrap();
    let service = start(keeping_everything(support::config(&db, &broker))).await;
    broker.wait_for(1, Duration::from_secs(20)).await;
    assert!(
        eventually(Duration::from_secs(10), async || db.count("PENDING").await
            == 0)
        .await,
        "the pending event was delivered"
    );
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert_eq!(report.expired, vec![with_pending.clone()], "{report:?}");
    assert!(!is_partition(&db, &with_pending).await);
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 10);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_keeps_the_expired_table_outside_outbox() {
    let db = TestDb::new().await;
    let name = old_partition(&db, 15).await;
    insert_on_day(&db, 15, 100, "PUBLISHED").await;
    let report = store(&db)
        .await
        .maintain_partitions(WEEK, OnExpiry::Detach, "test")
        .await
        .unwrap();
    assert_eq!(report.expired, vec![name.clone()]);
    assert!(!is_partition(&db, &name).await);
    assert_eq!(
        scalar(&db, &format!("SELECT count(*) FROM {name}")).await,
        100,
        "the detached table keeps its rows for archiving"
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_from_a_dropped_day_is_still_listed_shown_and_redrivable() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let endpoint = Endpoint::start(|_: &Hit| Reply::status(422).with_body("bad field")).await;
    let mut config = support::config(&db, &broker);
    config.webhooks.insert(
        "billing".into(),
        WebhookConfig::new(endpoint.url(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    );
    config.routing.routes = vec![route(&["*"], &["webhook:billing"])];
    config.http.gauge_refresh_interval = Duration::from_millis(200);
    let day = old_partition(&db, 12).await;
    insert_on_day(&db, 12, 20, "PUBLISHED").await;
    // Committed on that day, buried now by the relay (a permanent 422).
    let dead = insert_on_day(&db, 12, 1, "PENDING").await[0];
    let service = start(keeping_everything(config)).await;
    assert!(
        eventually(Duration::from_secs(20), async || db
            .count("DEAD_LETTER")
            .await
            == 1)
        .await,
        "the 422 buried it"
    );
    let store = store(&db).await;
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert_eq!(report.expired, vec![day.clone()], "{report:?}");
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 0);

    let page = outboxd::dead_letters::list(&store, &Default::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let listed = &page.items[0];
    assert_eq!(listed.tracking_id, dead);
    assert!(
        listed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("422")),
        "{listed:?}"
    );
    let shown = outboxd::events::show(&store, outboxd::events::EventKey::TrackingId(dead))
        .await
        .unwrap();
    assert_eq!(shown.status, "DEAD_LETTER");
    assert_eq!(shown.attempts, 1);
    let metrics = service.metrics().clone();
    assert!(
        eventually(Duration::from_secs(5), async || metrics
            .events_dead_letter
            .get()
            == 1)
        .await,
        "the gauge still counts it"
    );

    endpoint.answer(|_: &Hit| Reply::ok());
    let redriven = outboxd::dead_letters::redrive(&store, &[listed.id], "fixed the field", "ops")
        .await
        .unwrap();
    assert_eq!(redriven.redriven, vec![listed.id]);
    let hits = endpoint
        .wait_until(Duration::from_secs(20), |hits| {
            hits.iter().any(|h| {
                h.headers.get("webhook-id").map(String::as_str) == Some(&dead.to_string())
                    && h.earlier_tries > 0
            })
        })
        .await;
    assert!(
        hits.iter()
            .any(|h| h.id() == dead.to_string() && h.earlier_tries > 0),
        "sent again with its tracking_id"
    );
    assert!(
        eventually(Duration::from_secs(10), async || db
            .count("PUBLISHED")
            .await
            == 1)
        .await,
        "published once redriven"
    );
    let (id, aggregate): (i64, String) = {
        let row = db
            .client()
            .await
            .query_one(
                "SELECT id, aggregate_id FROM outbox WHERE tracking_id = $1",
                &[&dead],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        id, listed.id,
        "the event keeps its id (its place in its aggregate's order)"
    );
    assert_eq!(aggregate, listed.aggregate_id);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM outbox_dead_letters").await,
        0
    );
    let story = outboxd::events::show(&store, outboxd::events::EventKey::TrackingId(dead))
        .await
        .unwrap();
    assert_eq!(story.redrives.len(), 1, "the redrive is on the record");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_to_dead_letter_keeps_a_copy_in_the_same_transaction() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let client = db.client().await;
    let copies = async || scalar(&db, "SELECT count(*) FROM outbox_dead_letters").await;

    // The reaper at max attempts: a worker died holding the event's last attempt.
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status,
                                 attempts, max_attempts, locked_until, lock_token)
             VALUES ('order', '1', 'order.created', '{}', 'PROCESSING', 1, 1,
                     now() - interval '1 minute', gen_random_uuid())",
        )
        .await
        .unwrap();
    let store = store(&db).await;
    let reaped = store.reap(10).await.unwrap();
    assert_eq!(reaped.buried.len(), 1);
    assert_eq!(copies().await, 1, "reaper");

    // A hand-written UPDATE, and a row inserted as a dead letter.
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', '2', 'order.created', '{}');
             UPDATE outbox SET status = 'DEAD_LETTER', last_error = 'by hand' WHERE aggregate_id = '2';
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, last_error)
             VALUES ('order', '3', 'order.created', '{}', 'DEAD_LETTER', 'inserted');",
        )
        .await
        .unwrap();
    assert_eq!(copies().await, 3, "update and insert");

    // Unrouted, with the dead_letter policy, through the running relay.
    let mut config = support::config(&db, &broker);
    config.routing.unrouted = Unrouted::DeadLetter;
    config.routing.routes = vec![route(&["order.*"], &["rabbitmq"])];
    let service = start(config).await;
    enqueue(
        &client,
        &NewEvent::new("cart", "4", "cart.opened", json!({})),
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || copies().await == 4).await,
        "unrouted"
    );
    // A copy is made only if the burial commits, and follows a discard.
    let unrouted: i64 = client
        .query_one("SELECT id FROM outbox WHERE aggregate_id = '4'", &[])
        .await
        .unwrap()
        .get(0);
    outboxd::dead_letters::discard(&store, &[unrouted], "not ours", "ops")
        .await
        .unwrap();
    let discarded: Option<std::time::SystemTime> = client
        .query_one(
            "SELECT discarded_at FROM outbox_dead_letters WHERE id = $1",
            &[&unrouted],
        )
        .await
        .unwrap()
        .get(0);
    assert!(discarded.is_some(), "the copy follows the discard");
    {
        let mut rollback = db.client().await;
        let tx = rollback.transaction().await.unwrap();
        tx.batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status)
             VALUES ('order', '5', 'order.created', '{}', 'DEAD_LETTER')",
        )
        .await
        .unwrap();
        tx.rollback().await.unwrap();
    }
    assert_eq!(copies().await, 4, "a rolled back burial leaves no copy");
    // Every copy matches its row.
    let mismatched = scalar(
        &db,
        "SELECT count(*) FROM outbox o JOIN outbox_dead_letters d USING (tracking_id)
          WHERE o.id <> d.id OR o.created_at <> d.created_at OR o.attempts <> d.attempts
             OR o.last_error IS DISTINCT FROM d.last_error
             OR o.discarded_at IS DISTINCT FROM d.discarded_at",
    )
    .await;
    assert_eq!(mismatched, 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_from_before_the_upgrade_are_kept_apart() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    // As a database migrated by a version without 0012 left it.
    client
        .batch_execute(
            "DROP TRIGGER outbox_keep_dead_letter ON outbox;
             DROP TRIGGER outbox_keep_inserted_dead_letter ON outbox;
             DROP TABLE outbox_dead_letters, outbox_leases;
             DROP FUNCTION outbox_keep_dead_letter();
             DELETE FROM outboxd_schema_migrations WHERE version >= 12;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, last_error, processed_at)
             SELECT 'order', g::text, 'order.created', '{}', 'DEAD_LETTER', 'old', now()
               FROM generate_series(1, 3) AS g;",
        )
        .await
        .unwrap();
    outboxd::store::migrate::run(&mut client).await.unwrap();
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM outbox_dead_letters WHERE last_error = 'old'"
        )
        .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_holding_back_its_aggregate_keeps_its_partition_until_discarded() {
    let db = TestDb::new().await;
    let day = old_partition(&db, 10).await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at)
             VALUES ('order', '7', 'order.created', '{{}}', 'DEAD_LETTER',
                     (SELECT lower FROM (SELECT now() - interval '10 days' AS lower) x));
             -- The next event of the aggregate waits behind it (held, ordering).
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, next_attempt_at)
             VALUES ('order', '7', 'order.paid', '{{}}', 'infinity');
             SELECT 1 FROM {day} LIMIT 1;"
        ))
        .await
        .unwrap();
    let store = store(&db).await;
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert!(report.expired.is_empty());
    assert!(
        report.waiting[0].1.contains("hold back later events"),
        "{report:?}"
    );
    let dead: i64 = client
        .query_one("SELECT id FROM outbox WHERE status = 'DEAD_LETTER'", &[])
        .await
        .unwrap()
        .get(0);
    outboxd::dead_letters::discard(&store, &[dead], "superseded", "ops")
        .await
        .unwrap();
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert_eq!(report.expired, vec![day]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_in_flight_when_the_drop_comes_keeps_the_partition() {
    let db = TestDb::new().await;
    let day = old_partition(&db, 9).await;
    insert_on_day(&db, 9, 50, "PUBLISHED").await;
    let dead = insert_on_day(&db, 9, 1, "DEAD_LETTER").await[0];
    let id = db.id_of(dead).await;
    let store = store(&db).await;
    // The redrive has run but not committed when retention looks.
    let mut operator = db.client().await;
    let tx = operator.transaction().await.unwrap();
    tx.query(
        include_str!("../sql/redrive.sql"),
        &[&vec![id], &"fixed", &"ops"],
    )
    .await
    .unwrap();
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert!(report.expired.is_empty(), "{report:?}");
    assert_eq!(
        report.failed.len(),
        1,
        "the lock was not granted: {report:?}"
    );
    tx.commit().await.unwrap();
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert!(report.expired.is_empty(), "{report:?}");
    assert_eq!(report.waiting[0].0, day);
    assert_eq!(
        db.statuses().await[&dead],
        "PENDING",
        "the redriven event is there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_inserting_at_full_speed_during_drops_see_no_error() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut producers = Vec::new();
    for p in 0..2 {
        let client = db.client().await;
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            let (mut inserted, mut slowest) = (0u64, Duration::ZERO);
            while !stop.is_cancelled() {
                let started = Instant::now();
                enqueue(
                    &client,
                    &NewEvent::new(
                        "order",
                        format!("{p}-{inserted}"),
                        "order.created",
                        json!({}),
                    ),
                )
                .await
                .expect("a producer's insert failed during a drop");
                slowest = slowest.max(started.elapsed());
                inserted += 1;
            }
            (inserted, slowest)
        }));
    }
    let mut dropped = 0;
    for round in 0..8 {
        let days_ago = 20 + round;
        old_partition(&db, days_ago).await;
        insert_on_day(&db, days_ago, 2_000, "PUBLISHED").await;
        let report = store
            .maintain_partitions(WEEK, OnExpiry::Drop, "test")
            .await
            .unwrap();
        assert!(report.failed.is_empty(), "{report:?}");
        dropped += report.expired.len();
    }
    stop.cancel();
    let mut total = 0;
    for producer in producers {
        let (inserted, slowest) = producer.await.unwrap();
        eprintln!("producer: {inserted} inserts, slowest {slowest:?}");
        total += inserted;
    }
    assert_eq!(dropped, 8);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM outbox").await as u64,
        total,
        "every producer's insert is there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_at_a_time_maintains_the_partitions() {
    let db = TestDb::new().await;
    let day = old_partition(&db, 11).await;
    insert_on_day(&db, 11, 10, "PUBLISHED").await;
    let store = store(&db).await;
    let other = store
        .take_lease(PARTITIONS_LEASE, "host-b/42/other", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(other, "host-b/42/other");
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "host-a/7/me")
        .await
        .unwrap();
    assert_eq!(report.lease_held_by.as_deref(), Some("host-b/42/other"));
    assert!(report.expired.is_empty());
    assert!(is_partition(&db, &day).await);

    // The holder died: its lease expires and the next pass goes ahead.
    db.client()
        .await
        .batch_execute("UPDATE outbox_leases SET expires_at = now() - interval '1 second'")
        .await
        .unwrap();
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "host-a/7/me")
        .await
        .unwrap();
    assert_eq!(report.lease_held_by, None);
    assert_eq!(report.expired, vec![day]);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM outbox_leases").await,
        0,
        "released after the pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_in_default_move_to_their_partition_and_are_delivered_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // Slow enough that events are in flight while their rows move.
    let endpoint = Endpoint::start(|_: &Hit| Reply {
        delay: Some(Some(Duration::from_millis(20))),
        ..Reply::ok()
    })
    .await;
    let mut config = support::config(&db, &broker);
    config.webhooks.insert(
        "billing".into(),
        WebhookConfig::new(endpoint.url(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    );
    config.routing.routes = vec![route(&["*"], &["webhook:billing"])];
    let service = start(keeping_everything(config)).await;
    let store = store(&db).await;
    // A day 40 days ahead has no partition: its rows land in DEFAULT.
    let client = db.client().await;
    let ids: Vec<Uuid> = client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at)
             SELECT 'order', g::text, 'order.created', '{}',
                    CASE WHEN g <= 12000 THEN 'PUBLISHED' ELSE 'PENDING' END,
                    now() + interval '40 days' + g * interval '1 ms'
               FROM generate_series(1, 12300) AS g
             RETURNING tracking_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pending: Vec<String> = ids[12000..].iter().map(Uuid::to_string).collect();
    // And a second day: the first moves while another is left (its rows are deleted
    // from DEFAULT one by one), the last alone (DEFAULT is truncated).
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at)
             SELECT 'order', g::text, 'order.created', '{}', 'PUBLISHED',
                    now() + interval '42 days' + g * interval '1 ms'
               FROM generate_series(1, 50) AS g",
        )
        .await
        .unwrap();
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM outbox_default").await,
        12350
    );
    // Some are in flight now.
    endpoint
        .wait_until(Duration::from_secs(10), |hits| hits.len() >= 20)
        .await;
    let report = store
        .maintain_partitions(WEEK, OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert_eq!(report.default.moved.len(), 2, "{report:?}");
    let moved = &report.default.moved[0];
    eprintln!(
        "moved {} rows in batches, {} in the locked step of {:.1} ms",
        moved.copied, moved.moved_locked, moved.locked_ms
    );
    assert_eq!(moved.copied + moved.moved_locked, 12300);
    let second = &report.default.moved[1];
    assert_eq!(second.copied + second.moved_locked, 50);
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox_default").await, 0);
    assert!(is_partition(&db, &moved.partition).await);
    assert!(is_partition(&db, &second.partition).await);
    assert_eq!(
        scalar(&db, &format!("SELECT count(*) FROM {}", second.partition)).await,
        50
    );

    let hits = endpoint
        .wait_until(Duration::from_secs(60), |hits| hits.len() >= 300)
        .await;
    assert!(
        db.wait_settled(Duration::from_secs(30)).await,
        "every moved event finished"
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for hit in endpoint.hits() {
        *seen.entry(hit.id().to_string()).or_default() += 1;
    }
    assert!(hits.len() >= 300);
    for id in &pending {
        assert_eq!(seen.get(id), Some(&1), "{id} delivered once");
    }
    assert_eq!(seen.len(), 300, "the PUBLISHED rows were not sent");
    assert_eq!(db.count("PUBLISHED").await, 12350);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_racing_for_a_lease_agree_on_one_holder() {
    let db = TestDb::new().await;
    let (a, b) = (store(&db).await, store(&db).await);
    for round in 0..30 {
        let name = format!("race-{round}");
        let (first, second) = tokio::join!(
            a.take_lease(&name, "a", Duration::from_secs(60)),
            b.take_lease(&name, "b", Duration::from_secs(60)),
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first, second, "round {round}: both see one holder");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_status_and_maintain_from_the_command_line() {
    let db = TestDb::new().await;
    let gone = old_partition(&db, 14).await;
    let waits = old_partition(&db, 13).await;
    insert_on_day(&db, 14, 30, "PUBLISHED").await;
    insert_on_day(&db, 13, 1, "PENDING").await;
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
        )
    };
    let (code, text) = cli(&["partitions", "status", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["retention_seconds"], 7 * 86400);
    let verdict = |name: &str| {
        value["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["verdict"].as_str().unwrap().to_string())
    };
    assert_eq!(verdict(&gone).as_deref(), Some("expire"));
    assert_eq!(verdict(&waits).as_deref(), Some("wait"));

    let (code, text) = cli(&["partitions", "maintain"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("{gone}: dropped")), "{text}");
    assert!(text.contains(&format!("{waits}: expired, waits")), "{text}");
    assert!(!is_partition(&db, &gone).await);

    // While an instance holds the lease, the command says so and does nothing.
    store(&db)
        .await
        .take_lease(PARTITIONS_LEASE, "host-b/42/x", Duration::from_secs(60))
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["partitions", "maintain"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("host-b/42/x is maintaining"), "{said}");
}
