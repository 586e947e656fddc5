//! The core guarantees, end to end against the real PostgreSQL and RabbitMQ: committed
//! events are delivered (confirmed) and never lost, rolled-back ones never; the push path
//! alone delivers; the reconnect sweep covers what was committed while nobody listened;
//! crashed workers' events come back; failures retry and then dead-letter; several
//! instances share the work without duplicates.

mod support;

use outboxd::relay::Sweep;
use outboxd::store::{BuryItem, CompleteItem, RetryItem};
use outboxd::{NewEvent, enqueue, enqueue_many};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};
use support::{TestBroker, TestDb, config, start, store};
use uuid::Uuid;

async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

fn order_event(i: usize) -> NewEvent {
    NewEvent::new(
        "order",
        i.to_string(),
        "order.created",
        json!({ "order": i, "total": 12.5 }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_event_is_consumed_once_and_rolled_back_event_never() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(config(&db, &broker)).await;
    let mut producer = db.client().await;

    let tx = producer.transaction().await.unwrap();
    let event = order_event(1).with_metadata(json!({
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    }));
    let tracking_id = enqueue(&tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let committed_at = SystemTime::now();

    let tx = producer.transaction().await.unwrap();
    let rolled_back = enqueue(&tx, &order_event(2)).await.unwrap();
    tx.rollback().await.unwrap();

    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1, "the committed event arrives");
    let latency = received[0]
        .received_at
        .duration_since(committed_at)
        .unwrap_or_default();
    println!(
        "commit-to-consume latency: {:.2} ms",
        latency.as_secs_f64() * 1000.0
    );

    // Give a duplicate or the rolled-back event every chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = broker.received();
    assert_eq!(received.len(), 1, "consumed exactly once");
    let message = &received[0];
    assert_eq!(message.message_id, tracking_id.to_string());
    assert_ne!(message.message_id, rolled_back.to_string());
    assert_eq!(message.event_type, "order.created");
    assert_eq!(message.routing_key, "order.created");
    let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body, json!({ "order": 1, "total": 12.5 }));
    let header = |name: &str| {
        message
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header("aggregate_id"), "1", "{:?}", message.headers);
    assert_eq!(header("aggregate_type"), "order");
    assert_eq!(
        header("traceparent"),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );

    let statuses = db.statuses().await;
    assert_eq!(statuses.len(), 1, "the rolled-back row does not exist");
    assert_eq!(statuses[&tracking_id], "PUBLISHED");
    let delivered_to: Vec<String> = producer
        .query_one(
            "SELECT delivered_to FROM outbox WHERE tracking_id = $1",
            &[&tracking_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(delivered_to, vec!["rabbitmq".to_string()]);
    assert_eq!(service.metrics().recovered(Sweep::Safety), 0);

    let (status, metrics) = support::http_get(service.http_addr().unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("outbox_events_published_total{destination=\"rabbitmq\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outbox_listener_connected 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outbox_delivery_latency_seconds_count 1\n"),
        "{metrics}"
    );
    let (status, _) = support::http_get(service.http_addr().unwrap(), "/healthz").await;
    assert_eq!(status, 200);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_from_eight_producers_all_arrive_by_push_alone() {
    const PER_PRODUCER: usize = 1250;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(config(&db, &broker)).await;

    let started_at = Instant::now();
    let mut producers = Vec::new();
    for p in 0..8 {
        let client = db.client().await;
        producers.push(tokio::spawn(async move {
            let mut client = client;
            let mut ids = Vec::with_capacity(PER_PRODUCER);
            match p % 4 {
                // Single-row transactions.
                0 | 1 => {
                    for i in 0..PER_PRODUCER {
                        ids.push(
                            enqueue(&client, &order_event(p * PER_PRODUCER + i))
                                .await
                                .unwrap(),
                        );
                    }
                }
                // 100-row transactions, one multi-row INSERT each.
                2 => {
                    for chunk in (0..PER_PRODUCER).collect::<Vec<_>>().chunks(100) {
                        let events: Vec<NewEvent> = chunk
                            .iter()
                            .map(|i| order_event(p * PER_PRODUCER + i))
                            .collect();
                        let tx = client.transaction().await.unwrap();
                        ids.extend(enqueue_many(&tx, &events).await.unwrap());
                        tx.commit().await.unwrap();
                    }
                }
                // 100-row transactions, one INSERT per row.
                _ => {
                    for chunk in (0..PER_PRODUCER).collect::<Vec<_>>().chunks(100) {
                        let tx = client.transaction().await.unwrap();
                        for i in chunk {
                            ids.push(
                                enqueue(&tx, &order_event(p * PER_PRODUCER + i))
                                    .await
                                    .unwrap(),
                            );
                        }
                        tx.commit().await.unwrap();
                    }
                }
            }
            ids
        }));
    }
    let mut inserted = HashSet::new();
    for producer in producers {
        inserted.extend(producer.await.unwrap().into_iter().map(|id| id.to_string()));
    }
    let committed_in = started_at.elapsed();
    assert_eq!(inserted.len(), 8 * PER_PRODUCER);

    let received = broker
        .wait_for(inserted.len(), Duration::from_secs(60))
        .await;
    let delivered_in = started_at.elapsed();
    println!(
        "{} events committed in {:.2}s, all consumed after {:.2}s: {:.0} events/s",
        inserted.len(),
        committed_in.as_secs_f64(),
        delivered_in.as_secs_f64(),
        inserted.len() as f64 / delivered_in.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = {
        let later = broker.received();
        if later.len() > received.len() {
            later
        } else {
            received
        }
    };
    let consumed: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(
        consumed, inserted,
        "the consumed set equals the inserted set"
    );
    assert_eq!(
        received.len(),
        inserted.len(),
        "no duplicates in a fault-free run"
    );
    assert!(db.wait_settled(Duration::from_secs(10)).await);
    assert_eq!(db.count("PUBLISHED").await, inserted.len() as i64);
    assert_eq!(
        service.metrics().recovered(Sweep::Safety),
        0,
        "the push path alone delivered"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_lost_when_listener_reconnects() {
    const K: usize = 40;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(config(&db, &broker)).await;
    let metrics = service.metrics().clone();
    let reconnect_before = metrics.recovered(Sweep::Reconnect);
    // Opened before the database refuses new connections.
    let producer = db.client().await;
    let killed = db.cut_listener().await;
    assert_eq!(killed, 1, "one listener backend");
    assert!(
        wait_until(Duration::from_secs(10), || metrics.listener_connected.get()
            == 0)
        .await
    );

    let mut inserted = HashSet::new();
    for i in 0..K {
        inserted.insert(
            enqueue(&producer, &order_event(i))
                .await
                .unwrap()
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        broker.received().is_empty(),
        "nothing is delivered while nobody listens"
    );

    db.allow_connections().await;
    let received = broker.wait_for(K, Duration::from_secs(20)).await;
    let consumed: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(consumed, inserted);
    assert_eq!(metrics.listener_connected.get(), 1);
    assert_eq!(
        metrics.recovered(Sweep::Reconnect) - reconnect_before,
        K as u64
    );
    assert_eq!(metrics.recovered(Sweep::Safety), 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_reaped_and_stale_token_is_fenced() {
    const K: usize = 5;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    config.relay.lease = Duration::from_secs(2);
    // A worker that claims and then dies: it never completes.
    let crashed = store(&config).await;
    let producer = db.client().await;
    let mut inserted = HashSet::new();
    for i in 0..K {
        inserted.insert(
            enqueue(&producer, &order_event(i))
                .await
                .unwrap()
                .to_string(),
        );
    }
    let stale = crashed
        .claim_due(
            100,
            Duration::ZERO,
            Duration::from_secs(2),
            &outboxd::store::ClaimFilter::ALL,
        )
        .await
        .unwrap();
    assert_eq!(stale.events.len(), K);

    let service = start(config).await;
    let received = broker.wait_for(K, Duration::from_secs(15)).await;
    let consumed: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(consumed, inserted, "the reaped events are delivered");
    assert!(db.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(service.metrics().reaped.get(), K as u64);
    let attempts: Vec<i32> = producer
        .query("SELECT attempts FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        attempts.iter().all(|a| *a == 2),
        "the crashed attempt counts: {attempts:?}"
    );

    // The dead worker wakes up: none of its outcomes may land.
    let token = stale.lock_token;
    let complete: Vec<CompleteItem> = stale
        .events
        .iter()
        .map(|e| CompleteItem {
            id: e.id,
            created_at: e.created_at,
            acked: vec!["rabbitmq".into()],
        })
        .collect();
    let retry: Vec<RetryItem> = stale
        .events
        .iter()
        .map(|e| RetryItem {
            id: e.id,
            created_at: e.created_at,
            delay: Duration::from_secs(1),
            last_error: "late".into(),
            give_back_attempt: false,
            acked: vec![],
        })
        .collect();
    let bury: Vec<BuryItem> = stale
        .events
        .iter()
        .map(|e| BuryItem {
            id: e.id,
            created_at: e.created_at,
            last_error: "late".into(),
            acked: vec![],
        })
        .collect();
    assert!(crashed.complete(token, &complete).await.unwrap().is_empty());
    assert!(
        crashed
            .schedule_retry(token, &retry)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(crashed.bury(token, &bury).await.unwrap().is_empty());
    assert_eq!(
        crashed
            .extend_lease(token, &stale.events, Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        db.count("PUBLISHED").await,
        K as i64,
        "the new owner's outcome stands"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_event_retries_with_growing_delays_then_dead_letters() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(None).await; // no queue bound: every publish is returned
    let mut config = config(&db, &broker);
    config.retry.max_attempts = 3;
    config.retry.base_delay = Duration::from_millis(400);
    config.retry.max_delay = Duration::from_secs(10);
    let service = start(config).await;
    let producer = db.client().await;
    let tracking_id = enqueue(&producer, &order_event(1)).await.unwrap();

    // Watch the row: the next_attempt_at set after each failed attempt.
    let mut scheduled: HashMap<i32, SystemTime> = HashMap::new();
    let created_at: SystemTime;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = producer
            .query_one(
                "SELECT status, attempts, next_attempt_at, created_at, last_error FROM outbox WHERE tracking_id = $1",
                &[&tracking_id],
            )
            .await
            .unwrap();
        let status: String = row.get(0);
        let attempts: i32 = row.get(1);
        if status == "PENDING" && attempts > 0 {
            scheduled.entry(attempts).or_insert(row.get(2));
        }
        if status == "DEAD_LETTER" {
            created_at = row.get(3);
            let last_error: String = row.get(4);
            assert_eq!(attempts, 3);
            assert!(
                last_error.contains("gave up after 3 attempts"),
                "{last_error}"
            );
            assert!(last_error.contains("unroutable"), "{last_error}");
            assert!(last_error.contains("bind a queue"), "{last_error}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not dead-lettered in time: {status} after {attempts}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = scheduled[&1].duration_since(created_at).unwrap();
    let second = scheduled[&2].duration_since(scheduled[&1]).unwrap();
    println!("retry delays: {first:?} then {second:?}");
    assert!(first >= Duration::from_millis(200), "{first:?}");
    assert!(second > first, "delays grow: {first:?} then {second:?}");
    assert_eq!(
        service
            .metrics()
            .delivery_failures
            .with_label_values(&["rabbitmq", "retry"])
            .get(),
        3
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_work_without_duplicates() {
    const N: usize = 2000;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let first = start(config(&db, &broker)).await;
    let second = start(config(&db, &broker)).await;

    let mut producers = Vec::new();
    for p in 0..4 {
        let mut client = db.client().await;
        producers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for chunk in (0..N / 4)
                .collect::<Vec<_>>()
                .chunks(if p % 2 == 0 { 1 } else { 50 })
            {
                let events: Vec<NewEvent> = chunk.iter().map(|i| order_event(p * N + i)).collect();
                let tx = client.transaction().await.unwrap();
                ids.extend(enqueue_many(&tx, &events).await.unwrap());
                tx.commit().await.unwrap();
            }
            ids
        }));
    }
    let mut inserted: HashSet<String> = HashSet::new();
    for producer in producers {
        inserted.extend(
            producer
                .await
                .unwrap()
                .into_iter()
                .map(|id: Uuid| id.to_string()),
        );
    }
    broker.wait_for(N, Duration::from_secs(30)).await;
    assert!(db.wait_settled(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = broker.received();
    let consumed: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(consumed, inserted);
    assert_eq!(received.len(), N, "no tracking_id delivered twice");
    let by_first = first
        .metrics()
        .published
        .with_label_values(&["rabbitmq"])
        .get();
    let by_second = second
        .metrics()
        .published
        .with_label_values(&["rabbitmq"])
        .get();
    println!("first relay published {by_first}, second {by_second}");
    assert_eq!(by_first + by_second, N as u64);
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bulk_insert_sends_one_notification_not_one_per_row() {
    const N: i64 = 5000;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(config(&db, &broker)).await;
    let producer = db.client().await;
    let inserted = producer
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', g::text, 'order.created', jsonb_build_object('n', g)
               FROM generate_series(1, $1::int8) AS g",
            &[&N],
        )
        .await
        .unwrap();
    assert_eq!(inserted, N as u64);
    let received = broker.wait_for(N as usize, Duration::from_secs(30)).await;
    let consumed: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(consumed.len(), N as usize);
    assert!(db.wait_settled(Duration::from_secs(10)).await);
    assert_eq!(db.count("PUBLISHED").await, N);
    let notifications = service.metrics().notifications.get();
    println!("{N} rows, {notifications} notification(s)");
    assert!(
        notifications <= 5,
        "{notifications} notifications for one INSERT"
    );
    assert_eq!(service.metrics().recovered(Sweep::Safety), 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_exist_a_week_ahead_and_rows_beyond_them_are_still_delivered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(config(&db, &broker)).await;
    let producer = db.client().await;
    let missing: Vec<String> = producer
        .query(
            "SELECT 'outbox_p' || to_char((now() AT TIME ZONE 'UTC')::date + g, 'YYYYMMDD')
               FROM generate_series(0, 7) AS g
             EXCEPT
             SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'outbox'::regclass",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(missing.is_empty(), "missing partitions: {missing:?}");

    let far = producer
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
             VALUES ('order', '1', 'order.created', '{}', now() + interval '30 days')
             RETURNING tracking_id, tableoid::regclass::text",
            &[],
        )
        .await
        .unwrap();
    let tracking_id: Uuid = far.get(0);
    let partition: String = far.get(1);
    assert_eq!(partition, "outbox_default");
    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].message_id, tracking_id.to_string());
    assert!(db.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(db.statuses().await[&tracking_id], "PUBLISHED");
    let report = service.store().ensure_partitions(7).await.unwrap();
    assert_eq!(report.default_rows, 1, "rows in DEFAULT are counted");
    assert!(report.created.is_empty());
    service.stop().await;
}

/// Inserts an event without firing the NOTIFY trigger, as if its notification was lost.
async fn insert_unannounced(producer: &tokio_postgres::Client) -> Uuid {
    producer
        .batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    let tracking_id = enqueue(producer, &order_event(1)).await.unwrap();
    producer
        .batch_execute("SET session_replication_role = origin")
        .await
        .unwrap();
    tracking_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_sweep_recovers_an_event_whose_notification_was_lost() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    config.relay.safety_sweep_interval = Duration::from_secs(1);
    config.relay.safety_sweep_grace = Duration::from_millis(500);
    let service = start(config).await;
    support::wait_started(&service).await;
    let producer = db.client().await;
    let tracking_id = insert_unannounced(&producer).await;

    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].message_id, tracking_id.to_string());
    assert_eq!(
        service.metrics().notifications.get(),
        0,
        "no notification was sent"
    );
    assert_eq!(
        service.metrics().recovered(Sweep::Safety),
        1,
        "the safety sweep counted it"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_notification_is_answered_with_a_sweep() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(config(&db, &broker)).await;
    let producer = db.client().await;
    let tracking_id = insert_unannounced(&producer).await;
    producer
        .batch_execute("NOTIFY outbox_events, 'not-an-id'")
        .await
        .unwrap();

    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1, "the sweep found the event");
    assert_eq!(received[0].message_id, tracking_id.to_string());
    assert_eq!(service.metrics().malformed_notifications.get(), 1);
    assert_eq!(
        service.metrics().listener_connected.get(),
        1,
        "the listener carried on"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_events_failing_at_different_times_each_fire_on_time() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(None).await; // unroutable: every attempt fails
    let mut config = config(&db, &broker);
    config.retry.max_attempts = 2;
    config.retry.base_delay = Duration::from_millis(400);
    let service = start(config).await;
    let producer = db.client().await;
    enqueue(&producer, &order_event(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    enqueue(&producer, &order_event(2)).await.unwrap();

    // The safety sweep is an hour away: only the retry timers can bring both back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.count("DEAD_LETTER").await < 2 {
        assert!(
            Instant::now() < deadline,
            "a retry waited for the safety sweep"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(service.metrics().recovered(Sweep::Safety), 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_is_renewed_while_a_delivery_runs() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    // A broker that accepts connections and never answers: the delivery hangs.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.rabbitmq.url = format!(
        "amqp://guest:guest@{}/%2f",
        black_hole.local_addr().unwrap()
    );
    config.rabbitmq.confirm_timeout = Duration::from_secs(60);
    config.relay.lease = Duration::from_secs(2);
    config.relay.shutdown_grace = Duration::from_millis(200);
    let service = start(config).await;
    let producer = db.client().await;
    let tracking_id = enqueue(&producer, &order_event(1)).await.unwrap();

    let lease = |row: tokio_postgres::Row| -> (String, Option<Uuid>, Option<SystemTime>) {
        (row.get(0), row.get(1), row.get(2))
    };
    let sql = "SELECT status, lock_token, locked_until FROM outbox WHERE tracking_id = $1";
    let deadline = Instant::now() + Duration::from_secs(5);
    let (_, token, first_until) = loop {
        let current = lease(producer.query_one(sql, &[&tracking_id]).await.unwrap());
        if current.0 == "PROCESSING" {
            break current;
        }
        assert!(Instant::now() < deadline, "not claimed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Three leases later the same claim still owns it, and the reaper left it alone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, later_token, later_until) =
        lease(producer.query_one(sql, &[&tracking_id]).await.unwrap());
    assert_eq!(status, "PROCESSING");
    assert_eq!(later_token, token);
    let renewed_by = later_until
        .unwrap()
        .duration_since(first_until.unwrap())
        .unwrap();
    assert!(
        renewed_by >= Duration::from_secs(4),
        "lease extended by {renewed_by:?}"
    );
    assert_eq!(service.metrics().reaped.get(), 0);
    service.stop().await;
    assert_eq!(db.count("PENDING").await, 1, "released on stop");
    drop(black_hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_listener_pings_and_keeps_its_connection() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    config.listener.ping_interval = Duration::from_millis(100);
    let service = start(config).await;
    let admin = db.client().await;
    let listener_pid = || async {
        admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                   AND application_name = 'outboxd-listener'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };
    let before = listener_pid().await;
    assert_eq!(before.len(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        listener_pid().await,
        before,
        "ten pings later, the same connection"
    );
    assert_eq!(service.metrics().listener_connected.get(), 1);
    // And it still hears notifications.
    let tracking_id = enqueue(&admin, &order_event(1)).await.unwrap();
    let received = broker.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(received[0].message_id, tracking_id.to_string());
    assert_eq!(service.metrics().recovered(Sweep::Reconnect), 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_defers_events_without_charging_attempts() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    // A port where nothing listens yet: the broker is "down".
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    config.rabbitmq.url = format!("amqp://guest:guest@{port}/%2f");
    config.rabbitmq.reconnect_min_delay = Duration::from_millis(100);
    config.rabbitmq.reconnect_max_delay = Duration::from_millis(300);
    config.retry.max_attempts = 2;
    config.retry.base_delay = Duration::from_millis(100);
    let service = start(config).await;
    let metrics = service.metrics().clone();
    let producer = db.client().await;
    let mut inserted = HashSet::new();
    for i in 0..3 {
        inserted.insert(
            enqueue(&producer, &order_event(i))
                .await
                .unwrap()
                .to_string(),
        );
    }
    let deferred = || {
        metrics
            .delivery_failures
            .with_label_values(&["rabbitmq", "deferred"])
            .get()
    };
    assert!(
        wait_until(Duration::from_secs(10), || deferred() >= 9).await,
        "events were deferred again and again"
    );
    assert_eq!(
        db.count("DEAD_LETTER").await,
        0,
        "an outage dead-letters nothing"
    );
    // A row being deferred right now holds the attempt its claim counted, briefly.
    let charged: i64 = producer
        .query_one(
            "SELECT count(*) FROM outbox WHERE attempts > 1 OR (status = 'PENDING' AND attempts > 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(charged, 0, "no attempt charged while the broker was down");
    assert_eq!(
        metrics
            .destination_circuit_open
            .with_label_values(&["rabbitmq"])
            .get(),
        1
    );

    // The broker comes back on that port.
    let _back =
        support::proxy::CountingProxy::start_on(port, "127.0.0.1:5672".parse().unwrap()).await;
    let received = broker.wait_for(3, Duration::from_secs(15)).await;
    let consumed: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(consumed, inserted);
    assert!(db.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(db.count("PUBLISHED").await, 3);
    assert_eq!(
        metrics
            .destination_circuit_open
            .with_label_values(&["rabbitmq"])
            .get(),
        0
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_is_dead_lettered_and_the_rest_of_its_batch_is_delivered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    config.rabbitmq.max_payload_bytes = 1000;
    let service = start(config).await;
    let mut producer = db.client().await;
    let mut events: Vec<NewEvent> = (0..5).map(order_event).collect();
    events.insert(
        2,
        NewEvent::new(
            "order",
            "big",
            "order.created",
            json!({ "blob": "x".repeat(2000) }),
        ),
    );
    let tx = producer.transaction().await.unwrap();
    let ids = enqueue_many(&tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let poison = ids[2];

    let received = broker.wait_for(5, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 5);
    assert!(received.iter().all(|m| m.message_id != poison.to_string()));
    assert!(db.wait_settled(Duration::from_secs(5)).await);
    let row = producer
        .query_one(
            "SELECT status, attempts, last_error FROM outbox WHERE tracking_id = $1",
            &[&poison],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "DEAD_LETTER");
    assert_eq!(row.get::<_, i32>(1), 1);
    let error: String = row.get(2);
    assert!(error.contains("max_payload_bytes"), "{error}");
    let charged: i64 = producer
        .query_one(
            "SELECT max(attempts)::int8 FROM outbox WHERE status = 'PUBLISHED'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        charged, 1,
        "the rest of the batch went through on the first attempt"
    );
    service.stop().await;
}

/// The ids of aggregate `order:<key>` a reader sees now, oldest first.
async fn committed_ids(db: &TestDb, key: &str) -> Vec<i64> {
    db.client()
        .await
        .query(
            "SELECT id FROM outbox WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY id",
            &[&key],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_an_aggregate_enqueue_makes_id_order_commit_order() {
    let db = TestDb::new().await;
    let event = |key: &str, n: i32| NewEvent::new("order", key, "order.updated", json!({ "n": n }));
    let mut a = db.client().await;
    let mut b = db.client().await;

    // The trap, with a plain INSERT: A inserts, B inserts, B commits, A commits. A reader
    // in between sees B's event and not A's, which has the lower id and commits later.
    let plain = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('order', $1, 'order.updated', '{}') RETURNING id";
    let ta = a.transaction().await.unwrap();
    let a_id: i64 = ta.query_one(plain, &[&"7"]).await.unwrap().get(0);
    let tb = b.transaction().await.unwrap();
    let b_id: i64 = tb.query_one(plain, &[&"7"]).await.unwrap().get(0);
    tb.commit().await.unwrap();
    assert!(a_id < b_id);
    assert_eq!(
        committed_ids(&db, "7").await,
        vec![b_id],
        "B visible before A"
    );
    ta.commit().await.unwrap();

    // Through enqueue: B waits at its INSERT until A has committed, then draws a later id.
    let ta = a.transaction().await.unwrap();
    let first = enqueue(&ta, &event("42", 1)).await.unwrap();
    let second = tokio::spawn(async move {
        let tb = b.transaction().await.unwrap();
        let id = enqueue(&tb, &event("42", 2)).await.unwrap();
        tb.commit().await.unwrap();
        (b, id)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "B waits for A's aggregate");
    // Another aggregate does not wait.
    let other = db.client().await;
    tokio::time::timeout(Duration::from_secs(2), enqueue(&other, &event("43", 1)))
        .await
        .expect("an aggregate nobody holds is written at once")
        .unwrap();
    assert_eq!(committed_ids(&db, "42").await, Vec::<i64>::new());
    ta.commit().await.unwrap();
    let (b, second) = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("B goes on once A committed")
        .unwrap();
    let (first_id, second_id) = (db.id_of(first).await, db.id_of(second).await);
    assert!(first_id < second_id, "{first_id} committed first");
    assert_eq!(committed_ids(&db, "42").await, vec![first_id, second_id]);

    // The one line other producers run takes the same lock.
    let ta = a.transaction().await.unwrap();
    ta.batch_execute("SELECT pg_advisory_xact_lock(hashtext('order'), hashtext('42'))")
        .await
        .unwrap();
    let sql_id: i64 = ta.query_one(plain, &[&"42"]).await.unwrap().get(0);
    let third = tokio::spawn(async move {
        let id = enqueue(&b, &event("42", 3)).await.unwrap();
        (b, id)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "enqueue waits for the SQL producer's lock"
    );
    ta.commit().await.unwrap();
    let (b, third) = third.await.unwrap();
    assert!(sql_id < db.id_of(third).await);

    // Several aggregates per statement, in opposite orders: the locks are taken in one
    // order, so the second waits instead of deadlocking.
    let ta = a.transaction().await.unwrap();
    enqueue_many(&ta, &[event("k2", 1), event("k1", 1)])
        .await
        .unwrap();
    let crossed = tokio::spawn(async move {
        let mut b = b;
        let tb = b.transaction().await.unwrap();
        let written = enqueue_many(&tb, &[event("k1", 2), event("k2", 2)]).await;
        let committed = tb.commit().await;
        written.and(committed)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !crossed.is_finished(),
        "the second statement waits for the first"
    );
    ta.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), crossed)
        .await
        .unwrap()
        .unwrap()
        .expect("no deadlock");
    for key in ["k1", "k2"] {
        assert_eq!(committed_ids(&db, key).await.len(), 2);
    }
}
