//! Instances that share a database divide the notified events instead of each trying
//! to claim every one (src/membership.rs): a notified event is claimed by the owner of
//! its shard alone; a member that stalls is dropped once its heartbeat lapses and one
//! that dies at the next heartbeat of another, which then sweeps what it gained, so
//! nothing waits for the safety sweep (off in these tests); a member that wakes joins
//! again.

mod support;

use outboxd::membership::{BLOCK, SHARDS, Shares};
use outboxd::{NewEvent, enqueue};
use std::time::{Duration, Instant};
use support::fleet::{Instance, Producer, audit};
use support::proxy::CountingProxy;
use support::{TestBroker, TestDb};

/// A gauge's value on an instance's `/metrics`.
async fn gauge(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, metrics) = support::http_get(addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn wait_for_gauge(instance: &Instance, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if gauge(instance.http_addr(), name).await == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {value}:\n{}",
            instance.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_published(db: &TestDb, n: i64, within: Duration) -> Duration {
    let started = Instant::now();
    while db.count("PUBLISHED").await < n {
        assert!(
            started.elapsed() < within,
            "{} of {n} published after {within:?}; PENDING: {}",
            db.count("PUBLISHED").await,
            db.count("PENDING").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// `n` events in one statement: one notification, ids over n / 64 blocks.
async fn insert(db: &TestDb, n: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', g::text, 'order.created', '{}' FROM generate_series(1, $1::int8) AS g",
            &[&n],
        )
        .await
        .unwrap();
}

/// Commits `n` events one by one (`enqueue`), with ids from `first` on.
async fn enqueue_from(client: &tokio_postgres::Client, first: i64, n: usize) {
    client
        .execute("SELECT setval('outbox_id_seq', $1, false)", &[&first])
        .await
        .unwrap();
    for n in 0..n {
        let event = NewEvent::new(
            "order",
            n.to_string(),
            "order.created",
            serde_json::json!({}),
        );
        enqueue(client, &event).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notified_event_is_claimed_by_its_shard_s_owner_alone() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // Each instance talks to PostgreSQL through a proxy of its own that counts its
    // statements.
    let mut proxies = Vec::new();
    let mut services = Vec::new();
    for _ in 0..3 {
        let proxy = CountingProxy::start("127.0.0.1:5432".parse().unwrap()).await;
        let mut config = support::config(&db, &broker);
        config.database.url = proxy.url(&db.name);
        services.push(support::start(config).await);
        proxies.push(proxy);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while services.iter().any(|s| s.metrics().instances.get() != 3) {
        assert!(
            Instant::now() < deadline,
            "the instances never saw each other"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let owned: Vec<i64> = services
        .iter()
        .map(|s| s.metrics().shards_owned.get())
        .collect();
    assert_eq!(owned.iter().sum::<i64>(), SHARDS as i64, "{owned:?}");
    assert!(owned.iter().all(|n| *n > 0), "{owned:?}");
    for service in &services {
        support::wait_started(service).await;
    }

    // The next ids fall in one block, owned by one of the three.
    let client = db.client().await;
    let members: Vec<String> = client
        .query("SELECT name FROM outbox_instances", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(members.len(), 3, "{members:?}");
    let shares = Shares::of(&members[0], &members);
    let shard = (0..SHARDS).find(|s| shares.owns_shard(*s)).unwrap() as i64;
    let first = (1_000 * SHARDS as i64 + shard) * BLOCK;
    let before: Vec<u64> = proxies.iter().map(|p| p.statements()).collect();
    enqueue_from(&client, first, 40).await;
    assert_eq!(broker.wait_for(40, Duration::from_secs(20)).await.len(), 40);
    let mut sent: Vec<u64> = proxies
        .iter()
        .zip(&before)
        .map(|(p, b)| p.statements() - b)
        .collect();
    sent.sort_unstable();
    println!("statements per instance while 40 events were delivered: {sent:?}");
    // The owner claimed and completed them; the other two sent only their timers'
    // statements (a heartbeat every 2 s, perhaps a gauge refresh), no claim.
    assert!(sent[2] >= 2, "{sent:?}");
    assert!(sent[0] <= 6 && sent[1] <= 6, "{sent:?}");
    for service in services {
        service.stop().await;
    }
    let left: i64 = client
        .query_one("SELECT count(*) FROM outbox_instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "each instance leaves when it stops");
}

const NO_SAFETY_SWEEP: (&str, &str) = ("OUTBOXD_RELAY_SAFETY_SWEEP_INTERVAL", "1h");

/// Two `outboxd` processes, safety sweep off, heartbeat every `heartbeat`, each seeing
/// the other; then the second is paused (SIGSTOP) and 1,280 events are committed in one
/// statement. Returns (the running one, the paused one, when it was paused).
async fn two_members_one_paused(
    db: &TestDb,
    broker: &TestBroker,
    heartbeat: &str,
) -> (Instance, Instance, Instant) {
    // Alone, an instance beats only every ping_interval (30 s by default): the first
    // learns of the second within 5 s here, not at the edge of wait_for_gauge's 30 s.
    let env = [
        NO_SAFETY_SWEEP,
        ("OUTBOXD_LISTENER_HEARTBEAT_INTERVAL", heartbeat),
        ("OUTBOXD_LISTENER_PING_INTERVAL", "5s"),
    ];
    let running = Instance::start(&db.url, broker, &env);
    running.wait_running().await;
    let paused = Instance::start(&db.url, broker, &env);
    paused.wait_running().await;
    wait_for_gauge(&running, "outbox_instances", 2.0).await;
    wait_for_gauge(&paused, "outbox_instances", 2.0).await;
    paused.pause();
    let paused_at = Instant::now();
    insert(db, 1_280).await;
    (running, paused, paused_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_s_share_is_taken_over_when_its_heartbeat_lapses_and_it_rejoins_on_waking()
 {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let (survivor, stalled, paused_at) = two_members_one_paused(&db, &broker, "1s").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The stalled instance's heartbeat lapses 5 s after its last beat, at least 4 s
    // after the pause: until then its share waits, the survivor's is delivered.
    let (published, pending) = (db.count("PUBLISHED").await, db.count("PENDING").await);
    assert!(
        paused_at.elapsed() < Duration::from_secs(4),
        "the check came too late"
    );
    assert!(
        published > 0 && pending > 0,
        "the survivor claims its own share only: {published} published, {pending} pending"
    );
    let took = wait_published(&db, 1_280, Duration::from_secs(30)).await;
    println!("the stalled instance's share delivered {took:?} after the check");
    wait_for_gauge(&survivor, "outbox_instances", 1.0).await;
    wait_for_gauge(&survivor, "outbox_shards_owned", SHARDS as f64).await;

    // Woken, it joins again and takes its share back.
    stalled.resume();
    wait_for_gauge(&survivor, "outbox_instances", 2.0).await;
    wait_for_gauge(&stalled, "outbox_instances", 2.0).await;
    let owned = gauge(survivor.http_addr(), "outbox_shards_owned")
        .await
        .unwrap()
        + gauge(stalled.http_addr(), "outbox_shards_owned")
            .await
            .unwrap();
    assert_eq!(owned, SHARDS as f64);
    insert(&db, 1_280).await;
    wait_published(&db, 2_560, Duration::from_secs(30)).await;
    assert_eq!(
        broker.wait_for(2_560, Duration::from_secs(30)).await.len(),
        2_560
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_share_is_taken_over_before_its_heartbeat_could_lapse() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // A heartbeat every 3 s: a member lapses 15 s after its last beat.
    let (survivor, mut doomed, paused_at) = two_members_one_paused(&db, &broker, "3s").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        db.count("PENDING").await > 0,
        "its share waits while it stalls"
    );
    // Killed, its listener's backend ends: the survivor's next heartbeat (within 3 s)
    // drops it, long before its row would lapse (at least 12 s after the pause).
    doomed.kill_9();
    wait_published(&db, 1_280, Duration::from_secs(20)).await;
    let after = paused_at.elapsed();
    println!("everything delivered {after:?} after the pause");
    assert!(
        after < Duration::from_secs(11),
        "taken over only when the heartbeat lapsed ({after:?}):\n{}",
        survivor.log()
    );
    assert_eq!(
        broker.wait_for(1_280, Duration::from_secs(30)).await.len(),
        1_280
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_joining_and_leaving_under_load_lose_nothing_without_the_safety_sweep() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // Notifications stay on (no drain mode, whose sweeps are not divided): every
    // event is claimed through the division or the sweep of a gain.
    let env = [
        NO_SAFETY_SWEEP,
        ("OUTBOXD_LISTENER_HEARTBEAT_INTERVAL", "500ms"),
        ("OUTBOXD_HIGH_LOAD_ENABLED", "false"),
    ];
    let first = Instance::start(&db.url, &broker, &env);
    first.wait_running().await;
    let producer = Producer::start(&db.url, 6_000, 5).await;
    let consumed = |n: usize| {
        let broker = &broker;
        async move {
            broker.wait_for(n, Duration::from_secs(30)).await;
        }
    };
    consumed(500).await;
    // Three join while events flow.
    let mut leaving = Instance::start(&db.url, &broker, &env);
    let mut doomed = Instance::start(&db.url, &broker, &env);
    let late = Instance::start(&db.url, &broker, &env);
    for joined in [&leaving, &doomed, &late] {
        joined.wait_running().await;
    }
    wait_for_gauge(&first, "outbox_instances", 4.0).await;
    consumed(1_500).await;
    // One leaves (SIGTERM), one dies (SIGKILL), one stalls for a while; none starts
    // afterwards, so no start-up sweep picks up what a departure left.
    assert_eq!(leaving.terminate().await, Some(0), "{}", leaving.log());
    consumed(2_500).await;
    doomed.kill_9();
    let fault_at = Instant::now();
    late.pause();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    late.resume();
    let committed = producer.finish().await;
    let audit = audit(
        &db.url,
        &broker,
        &committed,
        fault_at,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(audit.lost, 0, "{audit:?}\n{}", first.log());
    assert_eq!(db.count("PUBLISHED").await, committed.len() as i64);
    wait_for_gauge(&first, "outbox_instances", 2.0).await;
    let owned = gauge(first.http_addr(), "outbox_shards_owned")
        .await
        .unwrap()
        + gauge(late.http_addr(), "outbox_shards_owned")
            .await
            .unwrap();
    assert_eq!(owned, SHARDS as f64);
}

/// Two ordered instances on `db` that see each other, each connecting as
/// `instance-N`; a trigger records in `claimed_by` which one leased each event.
async fn two_ordered_instances(
    db: &TestDb,
    broker: &TestBroker,
    high_load: bool,
) -> Vec<outboxd::Outboxd> {
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE claimed_by (id int8, aggregate_id text, instance text);
             CREATE FUNCTION record_claimer() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.status = 'PROCESSING' AND OLD.status = 'PENDING' THEN
                 INSERT INTO claimed_by
                 VALUES (NEW.id, NEW.aggregate_id, current_setting('application_name'));
               END IF;
               RETURN NULL;
             END $$;
             CREATE TRIGGER record_claimer AFTER UPDATE ON outbox
               FOR EACH ROW EXECUTE FUNCTION record_claimer();",
        )
        .await
        .unwrap();
    let mut services = Vec::new();
    for n in 0..2 {
        let mut config = support::config(db, broker);
        let joint = if db.url.contains('?') { '&' } else { '?' };
        config.database.url = format!("{}{joint}application_name=instance-{n}", db.url);
        config.relay.ordering = outboxd::ordering::Ordering::PerAggregate;
        config.high_load.enabled = high_load;
        services.push(support::start(config).await);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while services
        .iter()
        .any(|s| s.metrics().instances.get() != 2 || s.metrics().shards_owned.get() == 256)
    {
        assert!(
            Instant::now() < deadline,
            "the instances never divided the shards"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let owned: i64 = services
        .iter()
        .map(|s| s.metrics().shards_owned.get())
        .sum();
    assert_eq!(owned, SHARDS as i64);
    for service in &services {
        support::wait_started(service).await;
    }
    services
}

/// 40 aggregates, 16 events each, interleaved in id order, in one statement.
async fn insert_aggregates(db: &TestDb) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', (g % 40)::text, 'order.created', jsonb_build_object('n', g)
               FROM generate_series(1, 640) AS g",
            &[],
        )
        .await
        .unwrap();
}

/// Per aggregate: how many of its events each instance leased, most first.
async fn claimers(db: &TestDb) -> Vec<(String, Vec<i64>)> {
    db.client()
        .await
        .query(
            "SELECT aggregate_id, array_agg(n ORDER BY n DESC)
               FROM (SELECT aggregate_id, instance, count(*) AS n
                       FROM claimed_by GROUP BY 1, 2) AS c
              GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// With per-aggregate ordering the instances divide the notified events by aggregate
/// (src/membership.rs): every event of an aggregate is leased by the same instance, so
/// an instance never claims an event whose predecessor another one holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_instances_divide_the_notified_events_by_aggregate() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // Notified claims only: drain mode has its own test below.
    let services = two_ordered_instances(&db, &broker, false).await;
    insert_aggregates(&db).await;
    wait_published(&db, 640, Duration::from_secs(30)).await;
    let claimers = claimers(&db).await;
    assert_eq!(claimers.len(), 40);
    for (aggregate, counts) in &claimers {
        assert_eq!(
            counts.len(),
            1,
            "aggregate {aggregate}: leased by two instances ({counts:?})"
        );
    }
    let instances: i64 = db
        .client()
        .await
        .query_one("SELECT count(DISTINCT instance) FROM claimed_by", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(instances, 2, "both instances claim their aggregates");
    for service in services {
        service.stop().await;
    }
}

/// In drain mode (no notifications, claims by polling) ordered instances poll their own
/// aggregates' events first; a poll ends with a claim of every event, so an aggregate
/// may now and then go to the other instance (an event released between the two), and
/// nothing waits for a member that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_instances_in_drain_mode_poll_their_own_aggregates() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let services = two_ordered_instances(&db, &broker, true).await;
    // Another instance holds drain mode: both follow, notifications are off.
    let config = support::config(&db, &broker);
    support::store(&config)
        .await
        .enter_drain("another-instance", Duration::from_secs(60))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while services
        .iter()
        .any(|s| s.metrics().high_load_mode.get() != 1)
    {
        assert!(
            Instant::now() < deadline,
            "the instances never followed into drain mode"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    insert_aggregates(&db).await;
    wait_published(&db, 640, Duration::from_secs(30)).await;
    let claimers = claimers(&db).await;
    assert_eq!(claimers.len(), 40);
    let by_another: i64 = claimers
        .iter()
        .map(|(_, c)| c[1..].iter().sum::<i64>())
        .sum();
    println!(
        "events leased by another instance than their aggregate's main one: {by_another} of 640"
    );
    assert!(
        by_another <= 32,
        "{by_another} of 640 events leased by another instance than the one that leased most of their aggregate's: {claimers:?}"
    );
    for service in services {
        service.stop().await;
    }
}

/// Instances on one host share its cores, so `relay.max_in_flight_batches` is a host's
/// budget: two instances here, 4 configured, each has 2 batches in flight per destination
/// at most (measured on 2 cores: two instances with 4 each drained 0.98 x of one, with 2
/// each 1.05 x; four with 4 each 0.83 x, with 1 each 0.92 x). With a webhook that never
/// answers and one event per batch, the owner of the events' shard holds two of them,
/// not four; alone again, an instance has the whole budget back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_one_host_split_its_batches_in_flight() {
    use support::webhook::{Endpoint, Hit, Reply};
    let db = TestDb::new().await;
    let broker = TestBroker::new(None).await;
    let silent = Endpoint::start(|_: &Hit| Reply::silent()).await;
    let mut config = support::config(&db, &broker);
    let mut webhook =
        outboxd::config::WebhookConfig::new(silent.url(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    webhook.timeout = Duration::from_secs(30);
    webhook.failures_to_open = 100;
    config.webhooks.insert("silent".into(), webhook);
    config.routing.routes = vec![support::route(&["*"], &["webhook:silent"])];
    config.relay.max_in_flight_batches = 4;
    config.relay.batch_size = 1;
    let first = support::start(config.clone()).await;
    let second = support::start(config).await;
    let services = [&first, &second];
    let deadline = Instant::now() + Duration::from_secs(15);
    while services
        .iter()
        .any(|s| s.metrics().instances.get() != 2 || s.metrics().batches_allowed.get() != 2)
    {
        assert!(
            Instant::now() < deadline,
            "the instances never split the budget: allowed {:?}",
            services.map(|s| s.metrics().batches_allowed.get())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for service in services {
        support::wait_started(service).await;
    }
    // 20 events in one block of ids: one shard, one owner.
    enqueue_from(&db.client().await, 1_000 * SHARDS as i64 * BLOCK, 20).await;
    silent
        .wait_until(Duration::from_secs(10), |hits| hits.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(silent.hits().len(), 2, "two batches in flight, not four");
    assert_eq!(db.count("PROCESSING").await, 2);
    assert_eq!(db.count("PENDING").await, 18, "the rest wait unclaimed");

    second.stop().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while first.metrics().batches_allowed.get() != 4 {
        assert!(
            Instant::now() < deadline,
            "alone, the instance never had its whole budget back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.stop().await;
}
