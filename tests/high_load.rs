//! High-load (drain) mode: the exact interleavings that could lose an event when outboxd
//! switches back from drain mode to notify mode, each with the safety sweep off (an hour
//! away), so only the switch itself can deliver the event. In each, a producer P reads
//! drain mode (its trigger skips NOTIFY: asserted by a listener of our own) and commits
//! after outboxd decided to go back to notifications; P's event must still arrive, and
//! outboxd's extra claiming must end afterwards.

mod support;

use outboxd::{NewEvent, Outboxd, enqueue};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::fleet::{Instance, Producer};
use support::private_pg::PrivateCluster;
use support::{TestBroker, TestDb, config, start};
use tokio_postgres::{AsyncMessage, IsolationLevel};

/// The holder name the tests use when they act as another outboxd instance.
const OTHER: &str = "another-instance";
const LEAVE: &str = include_str!("../sql/high_load_leave.sql");

/// Every payload sent on `outbox_events`, heard on a connection of the test's own.
struct Heard {
    payloads: Arc<Mutex<Vec<String>>>,
    _client: tokio_postgres::Client,
}

impl Heard {
    async fn listen(url: &str) -> Heard {
        let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&payloads);
        tokio::spawn(async move {
            while let Some(message) =
                futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let Ok(AsyncMessage::Notification(n)) = message {
                    record.lock().unwrap().push(n.payload().to_string());
                }
            }
        });
        client.batch_execute("LISTEN outbox_events").await.unwrap();
        Heard {
            payloads,
            _client: client,
        }
    }

    fn payloads(&self) -> Vec<String> {
        self.payloads.lock().unwrap().clone()
    }

    /// Whether a notification listed `id`.
    fn listed(&self, id: i64) -> bool {
        self.payloads().iter().any(|p| {
            matches!(
                outboxd::notification::parse_payload(p),
                Ok(outboxd::notification::Notified::Ids(ids, _)) if ids.contains(&id)
            )
        })
    }
}

fn event(name: &str) -> NewEvent {
    NewEvent::new(
        "order",
        name,
        "order.created",
        serde_json::json!({ "p": name }),
    )
}

/// Inserts one event in `tx` and returns (its id, its tracking id).
async fn insert(tx: &tokio_postgres::Transaction<'_>, name: &str) -> (i64, String) {
    let tracking = enqueue(tx, &event(name)).await.unwrap();
    let id: i64 = tx
        .query_one("SELECT id FROM outbox WHERE tracking_id = $1", &[&tracking])
        .await
        .unwrap()
        .get(0);
    // A query over the simple protocol drops the unnamed portal (and the snapshot it
    // held): a READ COMMITTED P now holds no snapshot, only its xid.
    tx.batch_execute("SELECT 1").await.unwrap();
    (id, tracking.to_string())
}

/// A REPEATABLE READ transaction that has taken its snapshot (and no xid yet).
async fn snapshot(client: &mut tokio_postgres::Client) -> tokio_postgres::Transaction<'_> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    tx.query_one("SELECT 1", &[]).await.unwrap();
    tx
}

async fn wait_mode(service: &Outboxd, mode: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while service.metrics().high_load_mode.get() != mode {
        assert!(
            Instant::now() < deadline,
            "mode stayed {} (waiting for {mode})",
            service.metrics().high_load_mode.get()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Acts as another instance entering drain mode, and waits until outboxd follows.
async fn other_instance_enters_drain(db_config: &outboxd::Config, service: &Outboxd) {
    let store = support::store(db_config).await;
    store
        .enter_drain(OTHER, Duration::from_secs(60))
        .await
        .unwrap();
    wait_mode(service, 1, Duration::from_secs(5)).await;
}

/// Waits until outboxd has taken its fence N: it claims while leaving, and the first
/// claim of leaving comes after the fence.
async fn wait_fenced(service: &Outboxd) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while service.metrics().high_load_mode.get() != 2 {
        assert_ne!(
            service.metrics().high_load_mode.get(),
            0,
            "outboxd went back to notify mode while P, which read drain mode, was open"
        );
        assert!(
            Instant::now() < deadline,
            "outboxd did not leave drain mode"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let claims = service.metrics().high_load_claims.get();
    let deadline = Instant::now() + Duration::from_secs(5);
    while service.metrics().high_load_claims.get() < claims + 1 {
        assert!(Instant::now() < deadline, "no claim while leaving");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Outboxd is back in notify mode and claims nothing more on its own.
async fn assert_claiming_ends(service: &Outboxd) {
    wait_mode(service, 0, Duration::from_secs(10)).await;
    let claims = service.metrics().high_load_claims.get();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        service.metrics().high_load_claims.get(),
        claims,
        "claims went on in notify mode"
    );
    assert_eq!(service.metrics().high_load_mode.get(), 0);
}

async fn assert_delivered(broker: &TestBroker, tracking: &str) {
    let received = broker.wait_for(1, Duration::from_secs(5)).await;
    assert!(
        received.iter().any(|m| m.message_id == tracking),
        "P's event was not delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_committed_producer_that_read_drain_before_the_switch_is_delivered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let config = config(&db, &broker);
    let service = start(config.clone()).await;
    let heard = Heard::listen(&db.url).await;
    other_instance_enters_drain(&config, &service).await;

    // S updates the mode (not committed yet).
    let mut s = db.client().await;
    let s_tx = s.transaction().await.unwrap();
    assert_eq!(s_tx.execute(LEAVE, &[&OTHER]).await.unwrap(), 1);
    // P inserts: READ COMMITTED, its trigger reads the committed mode: drain.
    let mut p = db.client().await;
    let p_tx = p.transaction().await.unwrap();
    let (id, tracking) = insert(&p_tx, "a").await;
    // S commits; outboxd hears it and decides (takes N) while P is still open.
    s_tx.commit().await.unwrap();
    wait_fenced(&service).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        service.metrics().high_load_mode.get(),
        2,
        "left drain mode while P, which read it, was still open"
    );
    p_tx.commit().await.unwrap();

    assert_delivered(&broker, &tracking).await;
    assert!(
        !heard.listed(id),
        "P's trigger notified: {:?}",
        heard.payloads()
    );
    assert!(heard.payloads().contains(&"notify".to_string()));
    assert_claiming_ends(&service).await;
    assert!(db.wait_settled(Duration::from_secs(5)).await);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_repeatable_read_producer_whose_snapshot_predates_the_switch_is_delivered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let config = config(&db, &broker);
    let service = start(config.clone()).await;
    let heard = Heard::listen(&db.url).await;
    other_instance_enters_drain(&config, &service).await;

    // P takes its snapshot while drain mode is on.
    let mut p = db.client().await;
    let p_tx = snapshot(&mut p).await;
    // S commits, outboxd takes N.
    let store = support::store(&config).await;
    assert!(store.leave_drain(OTHER).await.unwrap());
    wait_fenced(&service).await;
    // P inserts (its xid is now above N; its snapshot still says drain) and commits.
    let (id, tracking) = insert(&p_tx, "b").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        service.metrics().high_load_mode.get(),
        2,
        "left drain mode while P's snapshot, older than N, was open"
    );
    p_tx.commit().await.unwrap();

    assert_delivered(&broker, &tracking).await;
    assert!(
        !heard.listed(id),
        "P's trigger notified: {:?}",
        heard.payloads()
    );
    assert_claiming_ends(&service).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_prepared_transaction_holding_an_insert_across_the_switch_is_delivered() {
    // Prepared transactions need max_prepared_transactions > 0: a cluster of our own.
    let cluster = tokio::task::spawn_blocking(|| {
        PrivateCluster::start_with(None, |_| vec!["max_prepared_transactions=4".into()])
    })
    .await
    .unwrap();
    let url = cluster.migrated_database("app").await;
    let broker = TestBroker::new(Some("#")).await;
    let config = support::config_for(&url, &broker);
    let service = start(config.clone()).await;
    let heard = Heard::listen(&url).await;
    other_instance_enters_drain(&config, &service).await;

    // P: REPEATABLE READ, snapshot in drain mode; S commits; outboxd takes N; P inserts
    // (xid above N) and PREPAREs, so it holds no snapshot any more.
    let mut p = outboxd::store::connect_once(&url, Duration::from_secs(5), "producer")
        .await
        .unwrap();
    let p_tx = snapshot(&mut p).await;
    let store = support::store(&config).await;
    assert!(store.leave_drain(OTHER).await.unwrap());
    wait_fenced(&service).await;
    let (id, tracking) = insert(&p_tx, "c").await;
    p_tx.batch_execute("PREPARE TRANSACTION 'p_across_the_switch'")
        .await
        .unwrap();
    drop(p_tx);
    // Neither an open xid below N nor a snapshot holds outboxd now: only the prepared
    // transaction does.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        service.metrics().high_load_mode.get(),
        2,
        "left drain mode while a prepared transaction that read it could still commit"
    );
    p.batch_execute("COMMIT PREPARED 'p_across_the_switch'")
        .await
        .unwrap();

    assert_delivered(&broker, &tracking).await;
    assert!(
        !heard.listed(id),
        "P's trigger notified: {:?}",
        heard.payloads()
    );
    assert_claiming_ends(&service).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_crash_in_drain_mode_turns_notifications_back_on_when_the_lease_lapses() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    // This instance never enters drain mode itself; its reaper returns what the crashed
    // one held.
    config.relay.lease = Duration::from_secs(2);
    config.high_load.enter_rate = 1_000_000;
    let service = start(config.clone()).await;
    let heard = Heard::listen(&db.url).await;
    // The other instance enters drain mode at 20 events/s, with a 3 s drain lease.
    let mut doomed = Instance::start(
        &db.url,
        &broker,
        &[
            ("OUTBOXD_HIGH_LOAD_ENTER_RATE", "20"),
            ("OUTBOXD_HIGH_LOAD_EXIT_RATE", "10"),
            ("OUTBOXD_HIGH_LOAD_LEASE", "3s"),
        ],
    );
    doomed.wait_running().await;
    let load = Producer::start(&db.url, 100_000, 1).await;
    let client = db.client().await;
    let pid = doomed.pid().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let holder: Option<String> = client
            .query_one(
                "SELECT holder FROM outbox_mode WHERE mode = 'drain' AND drain_until > clock_timestamp()",
                &[],
            )
            .await
            .ok()
            .and_then(|row| row.get(0));
        if holder.is_some_and(|h| h.split('/').nth(1) == Some(pid.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other instance did not enter drain mode\n{}",
            doomed.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_mode(&service, 1, Duration::from_secs(5)).await;
    doomed.kill_9();
    load.abort();

    // Drain mode outlives the instance by its lease: P's trigger skips NOTIFY.
    let mut p = db.client().await;
    let p_tx = p.transaction().await.unwrap();
    let (p_id, p_tracking) = insert(&p_tx, "d").await;
    p_tx.commit().await.unwrap();
    let draining: bool = client
        .query_one(
            "SELECT mode = 'drain' AND drain_until > clock_timestamp() FROM outbox_mode",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(draining, "the drain lease lapsed before P committed");

    // The surviving instance sees the lease lapse, leaves race-free and delivers P.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !broker.received().iter().any(|m| m.message_id == p_tracking) {
        assert!(Instant::now() < deadline, "P's event was not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!heard.listed(p_id), "P's trigger notified");
    assert_claiming_ends(&service).await;

    // Notifications are back: Q's trigger notifies, and Q arrives by push.
    let mut q = db.client().await;
    let q_tx = q.transaction().await.unwrap();
    let (q_id, q_tracking) = insert(&q_tx, "q").await;
    q_tx.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(heard.listed(q_id) && broker.received().iter().any(|m| m.message_id == q_tracking)) {
        assert!(
            Instant::now() < deadline,
            "Q was not notified and delivered: {:?}",
            heard.payloads().last()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything the crashed instance held comes back through the reaper.
    assert!(db.wait_settled(Duration::from_secs(20)).await);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_outboxd_enters_drain_mode_and_leaves_it_without_losing_an_event() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    config.high_load.enter_rate = 100;
    config.high_load.exit_rate = 50;
    let service = start(config).await;
    let heard = Heard::listen(&db.url).await;
    let load = Producer::start(&db.url, 3000, 1).await;
    wait_mode(&service, 1, Duration::from_secs(10)).await;
    let committed = load.finish().await;
    let received = broker
        .wait_for(committed.len(), Duration::from_secs(30))
        .await;
    let ids: std::collections::HashSet<String> =
        received.iter().map(|m| m.message_id.clone()).collect();
    for tracking in &committed {
        assert!(ids.contains(&tracking.to_string()), "{tracking} lost");
    }
    assert_claiming_ends(&service).await;
    assert!(
        heard.payloads().iter().any(|p| p == "drain"),
        "no drain broadcast"
    );
    let switches = |to: &str| {
        service
            .metrics()
            .high_load_switches
            .with_label_values(&[to])
            .get()
    };
    assert!(
        switches("drain") >= 1 && switches("notify") >= 1,
        "switched to drain {} times, back to notify {} times",
        switches("drain"),
        switches("notify")
    );
    assert!(db.wait_settled(Duration::from_secs(5)).await);
    service.stop().await;
}

/// Found: an instance that started (or restarted after SIGTERM or kill -9) and found
/// notify mode never waited for the horizon: a producer that read drain mode before the
/// restart and committed after it was delivered only by the safety sweep (27.9 s). Every
/// start now runs one horizon wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_producer_that_read_drain_before_a_restart_is_delivered_after_it() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let config = config(&db, &broker);
    let heard = Heard::listen(&db.url).await;
    // Drain mode held by an instance that is gone by the time the new one starts.
    let store = support::store(&config).await;
    store
        .enter_drain(OTHER, Duration::from_secs(60))
        .await
        .unwrap();
    let mut p = db.client().await;
    let p_tx = p.transaction().await.unwrap();
    let (id, tracking) = insert(&p_tx, "e").await;
    let s = db.client().await;
    assert_eq!(s.execute(LEAVE, &[&OTHER]).await.unwrap(), 1);

    let service = start(config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        service.metrics().high_load_mode.get(),
        2,
        "the new instance went to notify mode while P, which read drain mode, was open"
    );
    p_tx.commit().await.unwrap();
    assert_delivered(&broker, &tracking).await;
    assert!(
        !heard.listed(id),
        "P's trigger notified: {:?}",
        heard.payloads()
    );
    assert_claiming_ends(&service).await;
    service.stop().await;
}

/// Found (with e): `stop()` committed notify mode and exited without the horizon wait,
/// so a producer that read drain mode before a SIGTERM and committed after it waited for
/// whichever instance started next. Now a stopping instance that leaves drain mode keeps
/// claiming, within `relay.shutdown_grace`, until no such producer can still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_an_instance_stopping_in_drain_mode_delivers_what_producers_commit_meanwhile() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = config(&db, &broker);
    config.high_load.enter_rate = 100;
    config.high_load.exit_rate = 50;
    config.relay.shutdown_grace = Duration::from_secs(5);
    let service = start(config).await;
    support::wait_started(&service).await;
    let load = Producer::start(&db.url, 20_000, 1).await;
    wait_mode(&service, 1, Duration::from_secs(10)).await;
    // P reads drain mode (its trigger skips NOTIFY) and stays open.
    let mut p = db.client().await;
    let p_tx = p.transaction().await.unwrap();
    let (_, tracking) = insert(&p_tx, "f").await;
    let drain: bool = db
        .client()
        .await
        .query_one("SELECT mode = 'drain' FROM outbox_mode", &[])
        .await
        .unwrap()
        .get(0);
    assert!(drain, "P inserted in drain mode");
    let stopping = tokio::spawn(service.stop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !stopping.is_finished(),
        "the instance exited while P, which read drain mode, was open"
    );
    p_tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the stop ends within the grace")
        .unwrap();
    let status: String = db
        .client()
        .await
        .query_one(
            "SELECT status FROM outbox WHERE tracking_id::text = $1",
            &[&tracking],
        )
        .await
        .unwrap()
        .get(0);
    load.abort();
    assert_eq!(
        status, "PUBLISHED",
        "P's event was delivered before the instance exited"
    );
    assert_delivered(&broker, &tracking).await;
}
