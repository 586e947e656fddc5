//! End-to-end benchmarks against the local PostgreSQL and RabbitMQ, each scenario in a
//! fresh database with its own exchange and queue: the producers' ceilings (no trigger,
//! a per-row NOTIFY trigger, outboxd's trigger in both modes, RabbitMQ alone), latency
//! at a fixed rate, what outboxd costs the producers, backlog drains, idle cost and
//! scale-out; and, in the same run, a polling relay as users write one without outboxd.
//!
//!   cargo bench --bench relay              # full run (about 6 minutes), medians
//!   cargo bench --bench relay -- --quick   # short run (under a minute)
//!
//! Started without `--bench` (as `cargo test --all-targets` does) it runs a smoke mode,
//! smaller still: every scenario once, to prove each delivers all it produced, not to
//! measure. Prints a plain-text table; exits non-zero if any event a scenario produced
//! was not consumed.

#[path = "../tests/support/mod.rs"]
mod support;

use outboxd::Outboxd;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};
use support::proxy::CountingProxy;
use support::{TestBroker, TestDb};

struct Settings {
    /// full, quick or smoke.
    mode: &'static str,
    /// `--only NAME`: run only the sections whose title starts with NAME.
    only: Option<String>,
    /// Runs of the short scenarios (drains, ceilings, scale-out); medians are reported.
    runs: usize,
    /// Rounds of the scale-out and ordered drains (each round runs every instance count).
    scale_runs: usize,
    ceiling_for: Duration,
    broker_messages: usize,
    latency_rate: f64,
    latency_for: Duration,
    impact_for: Duration,
    backlog: i64,
    baseline_backlog: i64,
    webhook_backlog: i64,
    scale_backlog: i64,
    /// Ordering rows: a backlog over 10,000 aggregates, and one on a single aggregate.
    ordered_backlog: i64,
    hot_backlog: i64,
    idle_for: Duration,
    outage_backlog: usize,
    outage_for: Duration,
    /// Retention: rows in each dropped partition and in DEFAULT; five times as many
    /// for the disk measure.
    retention_rows: i64,
    /// Expired partitions dropped while producers insert.
    retention_drops: i32,
}

impl Settings {
    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| section.starts_with(only.as_str()))
    }

    fn full() -> Settings {
        Settings {
            mode: "full",
            only: None,
            runs: 3,
            scale_runs: 5,
            ceiling_for: Duration::from_secs(8),
            broker_messages: 50_000,
            latency_rate: 1000.0,
            latency_for: Duration::from_secs(20),
            impact_for: Duration::from_secs(20),
            backlog: 200_000,
            baseline_backlog: 10_000,
            webhook_backlog: 20_000,
            scale_backlog: 60_000,
            ordered_backlog: 100_000,
            hot_backlog: 5_000,
            idle_for: Duration::from_secs(60),
            outage_backlog: 20_000,
            outage_for: Duration::from_secs(60),
            retention_rows: 200_000,
            retention_drops: 5,
        }
    }

    fn quick() -> Settings {
        Settings {
            mode: "quick",
            only: None,
            runs: 1,
            scale_runs: 1,
            ceiling_for: Duration::from_secs(2),
            broker_messages: 5_000,
            latency_rate: 1000.0,
            latency_for: Duration::from_secs(3),
            impact_for: Duration::from_secs(3),
            backlog: 20_000,
            baseline_backlog: 1_000,
            webhook_backlog: 2_000,
            scale_backlog: 10_000,
            ordered_backlog: 20_000,
            hot_backlog: 1_000,
            idle_for: Duration::from_secs(5),
            outage_backlog: 2_000,
            outage_for: Duration::from_secs(5),
            retention_rows: 20_000,
            retention_drops: 3,
        }
    }

    /// `cargo test --all-targets`: each scenario small, once (a test build, not a measure).
    fn smoke() -> Settings {
        Settings {
            mode: "smoke",
            ceiling_for: Duration::from_secs(1),
            broker_messages: 2_000,
            latency_for: Duration::from_secs(2),
            impact_for: Duration::from_secs(2),
            backlog: 4_000,
            baseline_backlog: 500,
            webhook_backlog: 500,
            scale_backlog: 2_000,
            ordered_backlog: 2_000,
            hot_backlog: 200,
            idle_for: Duration::from_secs(2),
            outage_backlog: 500,
            outage_for: Duration::from_secs(2),
            retention_rows: 2_000,
            retention_drops: 2,
            ..Settings::quick()
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    let mut settings = if args.iter().any(|a| a == "--quick") {
        Settings::quick()
    } else if args.iter().any(|a| a == "--bench") {
        Settings::full()
    } else {
        Settings::smoke()
    };
    settings.only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let (table, ok) = runtime.block_on(run(&settings));
    println!();
    println!(
        "outboxd relay benchmark ({} mode, {} cores, {:.0} s)",
        settings.mode,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    table.print();
    if !ok {
        eprintln!("FAILED: some produced events were not consumed (see above)");
        std::process::exit(1);
    }
}

/// The rows of the table, in order.
#[derive(Default)]
struct Table {
    rows: Vec<(String, usize, f64, &'static str)>,
}

impl Table {
    fn add(&mut self, name: impl Into<String>, runs: usize, value: f64, unit: &'static str) {
        let name = name.into();
        eprintln!("  {name}: {}", format_value(value, unit));
        self.rows.push((name, runs, value, unit));
    }

    fn section(&mut self, title: &str) {
        eprintln!("{title}");
        self.rows.push((title.to_string(), 0, f64::NAN, ""));
    }

    fn print(&self) {
        println!("{:<66} {:>4} {:>16}", "scenario", "runs", "median");
        for (name, runs, value, unit) in &self.rows {
            if *runs == 0 {
                println!("-- {name}");
            } else {
                println!("{name:<66} {runs:>4} {:>16}", format_value(*value, unit));
            }
        }
    }
}

fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{value:.2} ms"),
        "x" => format!("{value:.2} x"),
        "rows/event" => format!("{value:.2} rows/event"),
        "%" => format!("{value:.1} %"),
        "s" => format!("{value:.2} s"),
        "" => format!("{value:.0}"),
        _ => format!("{value:.0} {unit}"),
    }
}

/// Which relay a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RelayKind {
    Outboxd,
    /// A polling relay as users write one without outboxd: poll every second for up to
    /// 50 PENDING rows (at once again when the batch was full), publish each and wait for
    /// its confirm, then mark it.
    Baseline,
}

/// A relay running for one scenario.
enum Running {
    Outboxd(Vec<Outboxd>),
    Baseline(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ),
}

impl Running {
    async fn start(kind: RelayKind, db: &TestDb, broker: &TestBroker) -> Running {
        match kind {
            RelayKind::Outboxd => Running::Outboxd(start_instances(db, broker, 1).await),
            RelayKind::Baseline => {
                let stop = tokio_util::sync::CancellationToken::new();
                let task = tokio::spawn(baseline_relay(
                    db.url.clone(),
                    broker.exchange.clone(),
                    stop.clone(),
                ));
                Running::Baseline(stop, task)
            }
        }
    }

    async fn stop(self) {
        match self {
            Running::Outboxd(services) => {
                for service in services {
                    service.stop().await;
                }
            }
            Running::Baseline(stop, task) => {
                stop.cancel();
                let _ = task.await;
            }
        }
    }
}

/// Off for the comparison row: notifications stay on whatever the load.
static HIGH_LOAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// On for the ordered rows: `relay.ordering = "per_aggregate"`.
static ORDERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn config(db: &TestDb, broker: &TestBroker) -> outboxd::Config {
    let mut config = support::config(db, broker);
    config.database.pool_size = 8;
    config.high_load.enabled = HIGH_LOAD.load(std::sync::atomic::Ordering::SeqCst);
    if ORDERED.load(std::sync::atomic::Ordering::SeqCst) {
        config.relay.ordering = outboxd::ordering::Ordering::PerAggregate;
    }
    config
}

/// Runs `scenario` with ordering on (`ordered`) or off.
async fn with_ordering<F, Fut, T>(ordered: bool, scenario: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    ORDERED.store(ordered, std::sync::atomic::Ordering::SeqCst);
    let result = scenario().await;
    ORDERED.store(false, std::sync::atomic::Ordering::SeqCst);
    result
}

/// `n` outboxd instances on `db`, started together, each with its listener up.
async fn start_instances(db: &TestDb, broker: &TestBroker, n: usize) -> Vec<Outboxd> {
    futures_util::future::join_all((0..n).map(|_| support::start(config(db, broker)))).await
}

/// `runs` rounds of every case in turn (so a machine that slows down for a while slows
/// every case alike): each case's results, in round order.
async fn interleaved<K, F, Fut>(
    runs: usize,
    ok: &mut bool,
    cases: &[K],
    mut scenario: F,
) -> HashMap<K, Vec<f64>>
where
    K: Copy + Eq + std::hash::Hash,
    F: FnMut(K) -> Fut,
    Fut: std::future::Future<Output = (f64, bool)>,
{
    let mut results: HashMap<K, Vec<f64>> = HashMap::new();
    for _ in 0..runs {
        for case in cases {
            let (value, complete) = scenario(*case).await;
            eprintln!("    {value:.0}");
            *ok &= complete;
            results.entry(*case).or_default().push(value);
        }
    }
    results
}

/// The median of `a[i] / b[i]`: rounds measured side by side, compared within a round.
fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    median(&ratios)
}

/// `runs` results of a scenario that reports (value, every event consumed).
async fn repeat<F, Fut>(runs: usize, ok: &mut bool, mut scenario: F) -> Vec<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (f64, bool)>,
{
    let mut values = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (value, complete) = scenario().await;
        *ok &= complete;
        values.push(value);
    }
    values
}

async fn baseline_relay(url: String, exchange: String, stop: tokio_util::sync::CancellationToken) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let mut client = outboxd::store::connect_once(&url, Duration::from_secs(5), "baseline-relay")
        .await
        .expect("database");
    let connection =
        lapin::Connection::connect(support::AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    while !stop.is_cancelled() {
        let tx = client.transaction().await.expect("begin");
        let rows = tx
            .query(
                "SELECT id, created_at, tracking_id, event_type, payload::text FROM outbox
                  WHERE status = 'PENDING' ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .expect("poll");
        for row in &rows {
            let id: i64 = row.get(0);
            let created_at: SystemTime = row.get(1);
            let tracking_id: uuid::Uuid = row.get(2);
            let event_type: String = row.get(3);
            let payload: String = row.get(4);
            let properties = lapin::BasicProperties::default()
                .with_message_id(tracking_id.to_string().into())
                .with_delivery_mode(2);
            let _confirmation = channel
                .basic_publish(
                    exchange.as_str().into(),
                    event_type.as_str().into(),
                    BasicPublishOptions::default(),
                    payload.as_bytes(),
                    properties,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            tx.execute(
                "UPDATE outbox SET status = 'PUBLISHED', processed_at = now() WHERE id = $1 AND created_at = $2",
                &[&id, &created_at],
            )
            .await
            .expect("mark");
        }
        tx.commit().await.expect("commit");
        if rows.len() < 50 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

/// What producers committed: each event's tracking id and commit time.
struct Produced {
    commits: Vec<(String, SystemTime)>,
    /// From the first producer's start to the last one's stop.
    elapsed: Duration,
    /// When the producers stopped.
    stopped_at: SystemTime,
}

impl Produced {
    fn rate(&self) -> f64 {
        self.commits.len() as f64 / self.elapsed.as_secs_f64()
    }
}

const INSERT: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                      VALUES ('order', $1, $3, $2) RETURNING tracking_id";

/// `connections` producers committing one event per transaction for `duration`: at full
/// speed, or together at `rate` events/s (a producer that falls behind commits back to
/// back, so the share of the offered load it sustains shows).
async fn produce(
    db: &TestDb,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> Produced {
    produce_typed(db, connections, rate, duration, "order.created").await
}

/// How the producers write.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Writes {
    /// A plain INSERT, each event its own aggregate.
    Insert,
    /// `outboxd::enqueue` (which serialises producers of one aggregate), each event its
    /// own aggregate, or all on one (`hot`).
    Enqueue { hot: bool },
    /// `outboxd::enqueue`, producers taking turns over this many aggregates.
    Keys(usize),
}

/// [`produce`], with events of `event_type`.
async fn produce_typed(
    db: &TestDb,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
    event_type: &'static str,
) -> Produced {
    produce_with(db, connections, rate, duration, event_type, Writes::Insert).await
}

/// [`produce_typed`], writing as `writes` says.
async fn produce_with(
    db: &TestDb,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
    event_type: &'static str,
    writes: Writes,
) -> Produced {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let client = db.client().await;
        let insert = client.prepare(INSERT).await.expect("prepare");
        clients.push((client, insert));
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let deadline = start + duration;
    let tasks = clients
        .into_iter()
        .enumerate()
        .map(|(k, (client, insert))| {
            tokio::spawn(async move {
                let mut commits = Vec::new();
                let period = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
                let offset = period.map_or(Duration::ZERO, |p| p * k as u32 / connections as u32);
                let mut i: u32 = 0;
                tokio::time::sleep_until(start).await;
                loop {
                    if let Some(period) = period {
                        let due = start + offset + period * i;
                        if due >= deadline || tokio::time::Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(due).await;
                    } else if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let n = format!("{k}-{i}");
                    let payload = serde_json::json!({ "n": n, "total": 12.5 });
                    let tracking: uuid::Uuid = match writes {
                        Writes::Insert => client
                            .query_one(&insert, &[&n, &payload, &event_type])
                            .await
                            .expect("insert")
                            .get(0),
                        Writes::Keys(aggregates) => {
                            let aggregate =
                                ((i as usize * connections + k) % aggregates).to_string();
                            let event =
                                outboxd::NewEvent::new("order", aggregate, event_type, payload);
                            outboxd::enqueue(&client, &event).await.expect("enqueue")
                        }
                        Writes::Enqueue { hot } => {
                            let aggregate = if hot { "hot".to_string() } else { n.clone() };
                            let event =
                                outboxd::NewEvent::new("order", aggregate, event_type, payload);
                            outboxd::enqueue(&client, &event).await.expect("enqueue")
                        }
                    };
                    commits.push((tracking.to_string(), SystemTime::now()));
                    i += 1;
                }
                commits
            })
        });
    let mut commits = Vec::new();
    for task in futures_util::future::join_all(tasks).await {
        commits.extend(task.expect("producer"));
    }
    let elapsed = tokio::time::Instant::now().duration_since(start);
    Produced {
        commits,
        elapsed: elapsed.max(duration),
        stopped_at: SystemTime::now(),
    }
}

/// Where the produced events ended up at the consumer.
struct Consumed {
    complete: bool,
    latencies: Vec<f64>,
    /// From the producers' stop to the last event's arrival, in seconds.
    lag: f64,
    /// Events that arrived before the producers stopped.
    during: usize,
}

async fn consume(broker: &TestBroker, produced: &Produced, timeout: Duration) -> Consumed {
    let received = broker.wait_for(produced.commits.len(), timeout).await;
    let at: HashMap<&str, SystemTime> = received
        .iter()
        .map(|m| (m.message_id.as_str(), m.received_at))
        .collect();
    let mut latencies = Vec::with_capacity(produced.commits.len());
    let mut missing = 0;
    let mut last = produced.stopped_at;
    for (tracking, committed) in &produced.commits {
        match at.get(tracking.as_str()) {
            Some(arrived) => {
                latencies.push(
                    arrived
                        .duration_since(*committed)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
                last = last.max(*arrived);
            }
            None => missing += 1,
        }
    }
    if missing > 0 {
        eprintln!(
            "  {missing} of {} committed events were not consumed",
            produced.commits.len()
        );
    }
    Consumed {
        complete: missing == 0,
        latencies,
        lag: last
            .duration_since(produced.stopped_at)
            .unwrap_or_default()
            .as_secs_f64(),
        during: received
            .iter()
            .filter(|m| m.received_at <= produced.stopped_at)
            .count(),
    }
}

/// The trigger on `outbox` while producers measure their ceiling.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    None,
    /// `pg_notify(id)` for each row, as most hand-written outboxes do.
    PerRowNotify,
    /// outboxd's own statement-level trigger in notify mode.
    Outboxd,
    /// outboxd's trigger in drain mode (reads the mode, does not notify).
    OutboxdDrain,
    /// outboxd's trigger in notify mode, without the index of events by aggregate (what
    /// `outboxd events list --aggregate` costs producers, by difference).
    OutboxdNoAggregateIndex,
    /// The same in drain mode, where the commit lock of NOTIFY does not hide it.
    OutboxdDrainNoAggregateIndex,
    /// outboxd's trigger in drain mode without the indexes ordering reads (what the
    /// ordered schema costs producers, by difference).
    OutboxdDrainNoOrderingIndexes,
}

async fn set_trigger(db: &TestDb, trigger: Trigger) {
    let client = db.client().await;
    let sql = match trigger {
        Trigger::None => "DROP TRIGGER outbox_notify ON outbox",
        Trigger::PerRowNotify => {
            "DROP TRIGGER outbox_notify ON outbox;
             CREATE FUNCTION bench_per_row_notify() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_notify('outbox_events', NEW.id::text); RETURN NULL; END $$;
             CREATE TRIGGER bench_per_row_notify AFTER INSERT ON outbox
                FOR EACH ROW EXECUTE FUNCTION bench_per_row_notify()"
        }
        Trigger::Outboxd => "",
        Trigger::OutboxdNoAggregateIndex => "DROP INDEX outbox_aggregate_idx",
        Trigger::OutboxdDrainNoAggregateIndex => {
            "DROP INDEX outbox_aggregate_idx;
             UPDATE outbox_mode SET mode = 'drain', drain_until = now() + interval '1 hour',
                    holder = 'bench'"
        }
        Trigger::OutboxdDrain => {
            "UPDATE outbox_mode SET mode = 'drain', drain_until = now() + interval '1 hour',
                    holder = 'bench'"
        }
        Trigger::OutboxdDrainNoOrderingIndexes => {
            "DROP INDEX outbox_unfinished_idx;
             DROP INDEX outbox_held_idx;
             UPDATE outbox_mode SET mode = 'drain', drain_until = now() + interval '1 hour',
                    holder = 'bench'"
        }
    };
    client.batch_execute(sql).await.expect("trigger");
}

/// Producers alone (16 connections, full speed, no relay): commits/s.
async fn producer_ceiling(trigger: Trigger, duration: Duration) -> f64 {
    enqueue_ceiling(trigger, Writes::Insert, duration).await
}

/// [`producer_ceiling`], writing as `writes` says.
async fn enqueue_ceiling(trigger: Trigger, writes: Writes, duration: Duration) -> f64 {
    let db = TestDb::new().await;
    set_trigger(&db, trigger).await;
    produce_with(&db, 16, None, duration, "order.created", writes)
        .await
        .rate()
}

/// RabbitMQ alone: confirmed persistent publishes with up to 100 confirms outstanding.
async fn broker_ceiling(messages: usize) -> (f64, bool) {
    use futures_util::StreamExt;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let broker = TestBroker::new(Some("#")).await;
    let connection =
        lapin::Connection::connect(support::AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = br#"{"n":"0-0","total":12.5}"#;
    let started = Instant::now();
    let mut outstanding = futures_util::stream::FuturesUnordered::new();
    let mut acked = 0;
    for i in 0..messages {
        if outstanding.len() >= 100
            && let Some(confirm) = outstanding.next().await
        {
            let confirm: lapin::Result<lapin::Confirmation> = confirm;
            acked += usize::from(confirm.expect("confirm").is_ack());
        }
        let properties = lapin::BasicProperties::default()
            .with_message_id(format!("m{i}").into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                broker.exchange.as_str().into(),
                "order.created".into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish");
        outstanding.push(confirm);
    }
    while let Some(confirm) = outstanding.next().await {
        acked += usize::from(confirm.expect("confirm").is_ack());
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    let consumed = broker
        .wait_for(messages, Duration::from_secs(60))
        .await
        .len();
    let _ = connection.close(200, "done".into()).await;
    (rate, acked == messages && consumed >= messages)
}

/// `connections` producers at `rate` (or full speed) for `duration` with a relay
/// running: what the producers and the consumer saw.
async fn relayed_load(
    kind: RelayKind,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> (Produced, Consumed) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let relay = Running::start(kind, &db, &broker).await;
    let produced = produce(&db, connections, rate, duration).await;
    let consumed = consume(&broker, &produced, Duration::from_secs(120)).await;
    relay.stop().await;
    (produced, consumed)
}

/// [`relayed_load`] through `enqueue` over `aggregates` aggregates.
async fn keyed_load(
    aggregates: usize,
    connections: usize,
    rate: f64,
    duration: Duration,
) -> (Produced, Consumed) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let relay = Running::start(RelayKind::Outboxd, &db, &broker).await;
    let produced = produce_with(
        &db,
        connections,
        Some(rate),
        duration,
        "order.created",
        Writes::Keys(aggregates),
    )
    .await;
    let consumed = consume(&broker, &produced, Duration::from_secs(120)).await;
    relay.stop().await;
    (produced, consumed)
}

/// `n` events committed while no relay runs, then `instances` start: events/s until the
/// last one is consumed.
async fn backlog_drain(kind: RelayKind, n: i64, instances: usize) -> (f64, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    db.insert_backlog(n).await;
    let started = Instant::now();
    let relay = match kind {
        RelayKind::Outboxd => Running::Outboxd(start_instances(&db, &broker, instances).await),
        RelayKind::Baseline => Running::start(kind, &db, &broker).await,
    };
    let received = broker.wait_for(n as usize, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    relay.stop().await;
    let complete = received.len() >= n as usize;
    if !complete {
        eprintln!("  drain: {} of {n} consumed", received.len());
    }
    (n as f64 / elapsed.as_secs_f64(), complete)
}

/// `instances` instances started and idle first, then `n` events committed in one
/// statement, spread over `aggregates` aggregates (event g belongs to aggregate g mod
/// `aggregates`: each aggregate's events interleave with the others' in id order):
/// events/s from that commit to the last one consumed. Start-up is left out, so adding
/// instances is measured on the drain alone (starting four instances at once takes
/// about 0.4 s here, a third of a 20,000-event drain).
async fn keyed_drain(n: i64, aggregates: i64, instances: usize) -> (f64, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let relay = start_instances(&db, &broker, instances).await;
    for service in &relay {
        support::wait_started(service).await;
    }
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', (g % $2::int8)::text, 'order.created', jsonb_build_object('n', g)
               FROM generate_series(1, $1::int8) AS g",
            &[&n, &aggregates],
        )
        .await
        .expect("backlog");
    let committed = Instant::now();
    let received = broker.wait_for(n as usize, Duration::from_secs(600)).await;
    let elapsed = committed.elapsed();
    Running::Outboxd(relay).stop().await;
    let complete = received.len() >= n as usize;
    if !complete {
        eprintln!("  keyed drain: {} of {n} consumed", received.len());
    }
    (n as f64 / elapsed.as_secs_f64(), complete)
}

/// Two events of one aggregate routed to RabbitMQ and a webhook that fails the first
/// one's first `failures` requests (503; `retry.base_delay` 200 ms): how long after its
/// commit the second event reaches RabbitMQ.
async fn behind_a_failing_webhook(failures: usize) -> (f64, bool) {
    use support::webhook::{Endpoint, Hit, Reply};
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let endpoint = Endpoint::start(move |hit: &Hit| {
        if hit.json["payload"]["n"] == serde_json::json!(1) && hit.earlier_tries < failures {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut config = config(&db, &broker);
    config.retry.base_delay = Duration::from_millis(200);
    config.webhooks.insert(
        "bench".into(),
        outboxd::config::WebhookConfig::new(
            endpoint.url(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    );
    config.routing.routes = vec![outboxd::config::RouteConfig {
        event_types: vec!["*".into()],
        destinations: vec!["rabbitmq".into(), "webhook:bench".into()],
        ordering: None,
    }];
    let service = support::start(config).await;
    let client = db.client().await;
    for n in [1, 2] {
        let event = outboxd::NewEvent::new(
            "order",
            "42",
            "order.created",
            serde_json::json!({ "n": n }),
        );
        outboxd::enqueue(&client, &event).await.expect("enqueue");
    }
    let committed = SystemTime::now();
    let received = broker.wait_for(2, Duration::from_secs(60)).await;
    service.stop().await;
    let second = received
        .iter()
        .find(|m| serde_json::from_slice::<serde_json::Value>(&m.body).is_ok_and(|b| b["n"] == 2));
    match second {
        Some(m) => (
            m.received_at
                .duration_since(committed)
                .unwrap_or_default()
                .as_secs_f64(),
            true,
        ),
        None => (f64::NAN, false),
    }
}

/// `n` events routed to one local webhook endpoint (answering 200 at once), committed
/// while no outboxd runs: events/s until the endpoint has them all.
async fn webhook_drain(n: i64) -> (f64, bool) {
    use support::webhook::{Endpoint, Reply};
    let db = TestDb::new().await;
    let broker = TestBroker::new(None).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    db.insert_backlog(n).await;
    let mut config = config(&db, &broker);
    let mut hook = outboxd::config::WebhookConfig::new(
        endpoint.url(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    hook.max_in_flight = 64;
    config.webhooks.insert("bench".into(), hook);
    config.routing.routes = vec![outboxd::config::RouteConfig {
        event_types: vec!["*".into()],
        destinations: vec!["webhook:bench".into()],
        ordering: None,
    }];
    let started = Instant::now();
    let service = Outboxd::start(config).await.expect("start");
    let hits = endpoint
        .wait_until(Duration::from_secs(300), |h| h.len() >= n as usize)
        .await;
    let elapsed = started.elapsed();
    service.stop().await;
    (n as f64 / elapsed.as_secs_f64(), hits.len() >= n as usize)
}

/// The webhook beside RabbitMQ in the isolation scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Beside {
    /// No webhook events at all.
    Nothing,
    /// A webhook that answers every request after this long.
    Slow(Duration),
    /// A webhook that never answers (each request ends at its 10 s timeout).
    Silent,
}

/// RabbitMQ-only events at `rate` for `duration`, beside webhook events (a tenth of the
/// rate) to an endpoint that answers as `beside` says: commit-to-consumer latencies of
/// the RabbitMQ events.
async fn isolated_latency(beside: Beside, rate: f64, duration: Duration) -> Consumed {
    use support::webhook::{Endpoint, Reply};
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let endpoint = Endpoint::start(move |_| match beside {
        Beside::Nothing => Reply::ok(),
        Beside::Slow(after) => Reply {
            delay: Some(Some(after)),
            ..Reply::ok()
        },
        Beside::Silent => Reply::silent(),
    })
    .await;
    let mut config = config(&db, &broker);
    let hook = outboxd::config::WebhookConfig::new(
        endpoint.url(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    config.webhooks.insert("slow".into(), hook);
    config.routing.routes = vec![
        outboxd::config::RouteConfig {
            event_types: vec!["slow.*".into()],
            destinations: vec!["webhook:slow".into()],
            ordering: None,
        },
        outboxd::config::RouteConfig {
            event_types: vec!["*".into()],
            destinations: vec!["rabbitmq".into()],
            ordering: None,
        },
    ];
    config.relay.shutdown_grace = Duration::from_secs(1);
    let service = support::start(config).await;
    support::wait_started(&service).await;
    let rabbitmq = produce_typed(&db, 4, Some(rate), duration, "order.created");
    let webhook = async {
        if beside != Beside::Nothing {
            produce_typed(&db, 1, Some(rate / 10.0), duration, "slow.created").await;
        }
    };
    let (produced, ()) = tokio::join!(rabbitmq, webhook);
    let consumed = consume(&broker, &produced, Duration::from_secs(60)).await;
    service.stop().await;
    consumed
}

/// `backlog` events committed while RabbitMQ is down (refused, connections cut) for
/// `down`: outbox rows rewritten per event meanwhile, counted exactly by a statement
/// trigger; then the broker is back and every event must arrive.
async fn outage_rewrites(backlog: usize, down: Duration) -> (f64, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let proxy = CountingProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut config = config(&db, &broker);
    config.rabbitmq.url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let service = support::start(config).await;
    support::wait_started(&service).await;
    let updates = support::RowUpdates::install(&db).await;
    proxy.refuse(true);
    proxy.cut();
    db.insert_backlog(backlog as i64).await;
    tokio::time::sleep(down).await;
    let rewritten = updates.total(&db).await;
    proxy.refuse(false);
    let received = broker.wait_for(backlog, Duration::from_secs(120)).await;
    service.stop().await;
    (rewritten as f64 / backlog as f64, received.len() >= backlog)
}

/// Default settings, no events: statements outboxd sends per minute, counted on the
/// wire by a proxy in front of PostgreSQL (every connection goes through it).
async fn idle_cost(duration: Duration) -> (f64, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let proxy = CountingProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut config = outboxd::Config::default();
    config.database.url = proxy.url(&db.name);
    config.rabbitmq.exchange = broker.exchange.clone();
    config.rabbitmq.declare_exchange = false;
    config.http.listen = "127.0.0.1:0".into();
    let service = Outboxd::start(config).await.expect("start");
    while service.metrics().listener_connected.get() != 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Start-up work (partitions, LISTEN, reconnect sweep, first gauges) first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = proxy.statements();
    tokio::time::sleep(duration).await;
    let idle = proxy.statements() - before;
    // Still alive: an event goes through at once.
    let producer = db.client().await;
    outboxd::enqueue(
        &producer,
        &outboxd::NewEvent::new("order", "1", "order.created", serde_json::json!({})),
    )
    .await
    .expect("enqueue");
    let alive = broker.wait_for(1, Duration::from_secs(10)).await.len() == 1;
    service.stop().await;
    (idle as f64 * 60.0 / duration.as_secs_f64(), alive)
}

async fn run(s: &Settings) -> (Table, bool) {
    let mut ok = true;
    let mut t = Table::default();
    let runs = s.runs;
    let secs = |d: Duration| d.as_secs();

    let mut per_row_ceiling = f64::NAN;
    if s.wants("ceilings") {
        t.section("ceilings: 16 producers, one event per transaction, no relay");
        for (name, trigger) in [
            ("no trigger", Trigger::None),
            ("per-row pg_notify trigger", Trigger::PerRowNotify),
            ("outboxd trigger, notify mode", Trigger::Outboxd),
            ("outboxd trigger, drain mode", Trigger::OutboxdDrain),
            (
                "outboxd trigger, notify mode, no aggregate index",
                Trigger::OutboxdNoAggregateIndex,
            ),
            (
                "outboxd trigger, drain mode, no aggregate index",
                Trigger::OutboxdDrainNoAggregateIndex,
            ),
            (
                "outboxd trigger, drain mode, no ordering indexes",
                Trigger::OutboxdDrainNoOrderingIndexes,
            ),
        ] {
            let mut rates = Vec::new();
            for _ in 0..runs {
                rates.push(producer_ceiling(trigger, s.ceiling_for).await);
            }
            if matches!(trigger, Trigger::PerRowNotify) {
                per_row_ceiling = median(&rates);
            }
            t.add(
                format!("producers, {name} ({} s)", secs(s.ceiling_for)),
                runs,
                median(&rates),
                "commits/s",
            );
        }
        for (name, writes) in [
            (
                "enqueue, an aggregate per event, notify mode",
                Writes::Enqueue { hot: false },
            ),
            (
                "enqueue, all 16 producers on one aggregate, notify mode",
                Writes::Enqueue { hot: true },
            ),
        ] {
            let mut rates = Vec::new();
            for _ in 0..runs {
                rates.push(enqueue_ceiling(Trigger::Outboxd, writes, s.ceiling_for).await);
            }
            t.add(
                format!("producers, {name} ({} s)", secs(s.ceiling_for)),
                runs,
                median(&rates),
                "commits/s",
            );
        }
        let rates = repeat(runs, &mut ok, || broker_ceiling(s.broker_messages)).await;
        t.add(
            format!(
                "RabbitMQ alone: {} confirmed publishes, 100 outstanding",
                s.broker_messages
            ),
            runs,
            median(&rates),
            "msg/s",
        );
    }

    let mut p99s = HashMap::new();
    if s.wants("latency") {
        t.section(&format!(
            "latency: 4 producers at {:.0} events/s for {} s, commit to consumer",
            s.latency_rate,
            secs(s.latency_for)
        ));
        for kind in [RelayKind::Outboxd, RelayKind::Baseline] {
            let (_, consumed) = relayed_load(kind, 4, Some(s.latency_rate), s.latency_for).await;
            ok &= consumed.complete;
            let who = if kind == RelayKind::Outboxd {
                "outboxd"
            } else {
                "baseline"
            };
            for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
                let value = quantile(&consumed.latencies, q) * 1000.0;
                if name == "p99" {
                    p99s.insert(kind, value);
                }
                t.add(format!("{who}: {name}"), 1, value, "ms");
            }
        }
    }

    if s.wants("producer") {
        if per_row_ceiling.is_nan() {
            per_row_ceiling = producer_ceiling(Trigger::PerRowNotify, s.ceiling_for).await;
        }

        t.section(&format!(
            "producer impact: 16 producers for {} s, outboxd relaying everything",
            secs(s.impact_for)
        ));
        let (produced, consumed) = relayed_load(RelayKind::Outboxd, 16, None, s.impact_for).await;
        ok &= consumed.complete;
        t.add(
            "full speed: producers' commit rate",
            1,
            produced.rate(),
            "commits/s",
        );
        t.add(
            "full speed: ratio to the per-row NOTIFY ceiling",
            1,
            produced.rate() / per_row_ceiling,
            "x",
        );
        t.add(
            "full speed: delivered while producing",
            1,
            consumed.during as f64 / produced.elapsed.as_secs_f64(),
            "ev/s",
        );
        t.add("full speed: lag after producers stop", 1, consumed.lag, "s");
        t.add(
            "full speed: p99 commit to consumer",
            1,
            quantile(&consumed.latencies, 0.99) * 1000.0,
            "ms",
        );
        HIGH_LOAD.store(false, std::sync::atomic::Ordering::SeqCst);
        let (produced_off, consumed_off) =
            relayed_load(RelayKind::Outboxd, 16, None, s.impact_for).await;
        HIGH_LOAD.store(true, std::sync::atomic::Ordering::SeqCst);
        ok &= consumed_off.complete;
        t.add(
            "full speed, high-load mode off: producers' commit rate",
            1,
            produced_off.rate(),
            "commits/s",
        );
        t.add(
            "full speed, high-load mode off: p99 commit to consumer",
            1,
            quantile(&consumed_off.latencies, 0.99) * 1000.0,
            "ms",
        );
        let offered = 2.0 * per_row_ceiling;
        let (produced, consumed) =
            relayed_load(RelayKind::Outboxd, 16, Some(offered), s.impact_for).await;
        ok &= consumed.complete;
        t.add(
            format!("offered 2x per-row NOTIFY ceiling ({offered:.0} ev/s): share sustained"),
            1,
            100.0 * produced.commits.len() as f64 / (offered * s.impact_for.as_secs_f64()),
            "%",
        );
        t.add(
            "offered 2x ceiling: p99 commit to consumer",
            1,
            quantile(&consumed.latencies, 0.99) * 1000.0,
            "ms",
        );
        t.add(
            "offered 2x ceiling: lag after producers stop",
            1,
            consumed.lag,
            "s",
        );
    }

    let mut drains: Vec<f64> = Vec::new();
    let mut baseline_drains: Vec<f64> = Vec::new();
    if s.wants("backlog") {
        t.section("backlog drain: PENDING events committed first, then the relay starts");
        drains = repeat(runs, &mut ok, || {
            backlog_drain(RelayKind::Outboxd, s.backlog, 1)
        })
        .await;
        baseline_drains = repeat(runs, &mut ok, || {
            backlog_drain(RelayKind::Baseline, s.baseline_backlog, 1)
        })
        .await;
        t.add(
            format!("outboxd: {} events", s.backlog),
            runs,
            median(&drains),
            "ev/s",
        );
        t.add(
            format!("baseline: {} events", s.baseline_backlog),
            runs,
            median(&baseline_drains),
            "ev/s",
        );
        let webhook = repeat(runs, &mut ok, || webhook_drain(s.webhook_backlog)).await;
        t.add(
            format!(
                "outboxd to one webhook endpoint: {} events",
                s.webhook_backlog
            ),
            runs,
            median(&webhook),
            "ev/s",
        );
    }

    if s.wants("scale") {
        t.section(&format!(
            "scale-out: instances on one database, started first, then {} events committed at once; instance counts interleaved run by run, ratios paired within a run",
            s.scale_backlog
        ));
        let drains = interleaved(
            s.scale_runs,
            &mut ok,
            &[(false, 1), (false, 2), (false, 4)],
            |(_, n)| keyed_drain(s.scale_backlog, s.scale_backlog, n),
        )
        .await;
        for n in [1, 2, 4] {
            t.add(
                format!("{n} instance(s)"),
                s.scale_runs,
                median(&drains[&(false, n)]),
                "ev/s",
            );
        }
        for n in [2, 4] {
            t.add(
                format!("{n} instances / 1 (median of paired ratios)"),
                s.scale_runs,
                paired_ratio(&drains[&(false, n)], &drains[&(false, 1)]),
                "x",
            );
        }
    }

    if s.wants("ordering") {
        t.section(&format!(
            "ordering: instances started, then {} events on 10,000 aggregates committed at once; same run, unordered vs relay.ordering = per_aggregate",
            s.ordered_backlog
        ));
        let cases: Vec<(bool, usize)> = [1, 2, 4]
            .into_iter()
            .flat_map(|n| [(false, n), (true, n)])
            .collect();
        let drains = interleaved(s.scale_runs, &mut ok, &cases, |(ordered, n)| {
            with_ordering(ordered, move || keyed_drain(s.ordered_backlog, 10_000, n))
        })
        .await;
        for (ordered, n) in &cases {
            let mode = if *ordered { "ordered" } else { "unordered" };
            t.add(
                format!("{mode}, {n} instance(s)"),
                s.scale_runs,
                median(&drains[&(*ordered, *n)]),
                "ev/s",
            );
        }
        t.add(
            "ordered / unordered drain, 1 instance (median of paired ratios)",
            s.scale_runs,
            paired_ratio(&drains[&(true, 1)], &drains[&(false, 1)]),
            "x",
        );
        for ordered in [false, true] {
            let mode = if ordered { "ordered" } else { "unordered" };
            for n in [2, 4] {
                t.add(
                    format!("{mode}: {n} instances / 1 (median of paired ratios)"),
                    s.scale_runs,
                    paired_ratio(&drains[&(ordered, n)], &drains[&(ordered, 1)]),
                    "x",
                );
            }
        }
        for ordered in [false, true] {
            let delays = repeat(runs, &mut ok, || {
                with_ordering(ordered, || behind_a_failing_webhook(2))
            })
            .await;
            let mode = if ordered { "ordered" } else { "unordered" };
            t.add(
                format!(
                    "{mode}: an aggregate's next event at RabbitMQ while the webhook fails the event before it twice (retry.base_delay 200 ms)"
                ),
                runs,
                median(&delays) * 1000.0,
                "ms",
            );
        }
        let rates = repeat(runs, &mut ok, || {
            with_ordering(true, || keyed_drain(s.hot_backlog, 1, 1))
        })
        .await;
        t.add(
            format!("ordered, one hot aggregate: {} events", s.hot_backlog),
            runs,
            median(&rates),
            "ev/s",
        );
        for ordered in [false, true] {
            let (_, consumed) = with_ordering(ordered, || {
                keyed_load(1_000, 4, s.latency_rate, s.latency_for)
            })
            .await;
            ok &= consumed.complete;
            let mode = if ordered { "ordered" } else { "unordered" };
            for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
                t.add(
                    format!(
                        "{mode}: {name} at {:.0} events/s over 1,000 aggregates (enqueue), commit to consumer",
                        s.latency_rate
                    ),
                    1,
                    quantile(&consumed.latencies, q) * 1000.0,
                    "ms",
                );
            }
        }
    }

    if s.wants("isolation") {
        t.section(&format!(
            "isolation: RabbitMQ-only events at {} events/s for {} s beside webhook events at a tenth of that, commit to consumer",
            s.latency_rate / 2.0,
            secs(s.latency_for)
        ));
        let mut p99 = Vec::new();
        for (name, beside) in [
            ("no webhook events", Beside::Nothing),
            (
                "beside a webhook answering in 5 s",
                Beside::Slow(Duration::from_secs(5)),
            ),
            ("beside a webhook that never answers", Beside::Silent),
        ] {
            let consumed = isolated_latency(beside, s.latency_rate / 2.0, s.latency_for).await;
            ok &= consumed.complete;
            t.add(
                format!("RabbitMQ p50, {name}"),
                1,
                quantile(&consumed.latencies, 0.5) * 1000.0,
                "ms",
            );
            t.add(
                format!("RabbitMQ p99, {name}"),
                1,
                quantile(&consumed.latencies, 0.99) * 1000.0,
                "ms",
            );
            p99.push(quantile(&consumed.latencies, 0.99));
        }
        t.add("p99 beside a 5 s webhook / alone", 1, p99[1] / p99[0], "x");
        t.add(
            "p99 beside a silent webhook / alone",
            1,
            p99[2] / p99[0],
            "x",
        );
    }

    if s.wants("outage") {
        t.section(&format!(
            "outage: RabbitMQ down for {} s with {} events pending",
            secs(s.outage_for),
            s.outage_backlog
        ));
        let (per_event, complete) = outage_rewrites(s.outage_backlog, s.outage_for).await;
        ok &= complete;
        t.add(
            "outbox rows rewritten per pending event while it is down",
            1,
            per_event,
            "rows/event",
        );
    }

    if s.wants("idle") {
        t.section(&format!(
            "idle cost: default settings, no events, {} s",
            secs(s.idle_for)
        ));
        let (per_minute, alive) = idle_cost(s.idle_for).await;
        ok &= alive;
        t.add("statements sent to PostgreSQL", 1, per_minute, "per minute");
    }

    if !drains.is_empty() && p99s.len() == 2 {
        t.section("outboxd / baseline");
        t.add(
            "drain rate: outboxd / baseline",
            runs,
            median(&drains) / median(&baseline_drains),
            "x",
        );
        t.add(
            "p99 latency: baseline / outboxd",
            1,
            p99s[&RelayKind::Baseline] / p99s[&RelayKind::Outboxd],
            "x",
        );
    }
    if s.wants("retention") {
        t.section(&format!(
            "retention: two producers commit one event a transaction back to back; first alone, then while {} expired partitions of {} PUBLISHED rows each are dropped (partitions.retention); insert latency",
            s.retention_drops, s.retention_rows
        ));
        let (alone, dropping, held) = retention_impact(s.retention_rows, s.retention_drops).await;
        for (label, values) in [("alone", &alone), ("during the drops", &dropping)] {
            t.add(
                format!("insert p50, {label}"),
                values.len(),
                quantile(values, 0.5),
                "ms",
            );
            t.add(
                format!("insert p99, {label}"),
                values.len(),
                quantile(values, 0.99),
                "ms",
            );
            t.add(
                format!("insert max, {label}"),
                values.len(),
                quantile(values, 1.0),
                "ms",
            );
        }
        t.add(
            "lock on outbox held per drop (median)",
            held.len(),
            median(&held),
            "ms",
        );
        t.add(
            "lock on outbox held per drop (max)",
            held.len(),
            quantile(&held, 1.0),
            "ms",
        );

        t.section(&format!(
            "DEFAULT emptied: {} rows of a day without a partition (3% still PENDING) moved into their own while a claimer claims back to back; claim latency",
            s.retention_rows
        ));
        let (before, during, locked, copied) = default_move(s.retention_rows).await;
        t.add(
            "claim p99, before",
            before.len(),
            quantile(&before, 0.99),
            "ms",
        );
        t.add(
            "claim max, before",
            before.len(),
            quantile(&before, 1.0),
            "ms",
        );
        t.add(
            "claim p99, while moving",
            during.len(),
            quantile(&during, 0.99),
            "ms",
        );
        t.add(
            "claim max, while moving",
            during.len(),
            quantile(&during, 1.0),
            "ms",
        );
        t.add("rows copied in batches (unlocked)", 1, copied, "rows");
        t.add("locked step (claims of DEFAULT wait)", 1, locked, "ms");

        t.section(&format!(
            "disk: {} events of the benchmark's payload in one day's partition, with their tracking_id records",
            s.retention_rows * 5
        ));
        let (inserted, relayed) = disk_per_event(s.retention_rows * 5).await;
        t.add(
            "per million events, inserted as PUBLISHED",
            1,
            inserted,
            "MB",
        );
        t.add(
            "per million events, after claim and complete, vacuumed",
            1,
            relayed,
            "MB",
        );
    }
    (t, ok)
}

/// Partitions of the UTC days `first..first + n` days ago, each filled with `rows`
/// PUBLISHED events.
async fn old_partitions(db: &TestDb, first: i32, n: i32, rows: i64) {
    let client = db.client().await;
    for days_ago in first..first + n {
        client
            .batch_execute(&format!(
                "DO $$
                 DECLARE d date := (now() AT TIME ZONE 'UTC')::date - {days_ago};
                 BEGIN
                   EXECUTE format('CREATE TABLE %I PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)',
                                  'outbox_p' || to_char(d, 'YYYYMMDD'),
                                  d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
                 END $$;
                 INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at,
                                     processed_at, delivered_to)
                 SELECT 'order', g::text, 'order.created', jsonb_build_object('n', g, 'total', 12.5),
                        'PUBLISHED',
                        ((now() AT TIME ZONE 'UTC')::date - {days_ago})::timestamp AT TIME ZONE 'UTC'
                          + interval '1 hour' + g * interval '10 ms',
                        now(), '{{rabbitmq}}'
                   FROM generate_series(1, {rows}) AS g;"
            ))
            .await
            .expect("old partition");
    }
}

/// Insert latencies (ms) of two producers alone and while `drops` expired partitions of
/// `rows` rows are dropped, and how long each drop held the lock (ms).
async fn retention_impact(rows: i64, drops: i32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let db = TestDb::new().await;
    old_partitions(&db, 30, drops, rows).await;
    let store = support::store(&support::config_for(&db.url, &TestBroker::new(None).await)).await;
    let phase = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let mut producers = Vec::new();
    for p in 0..2 {
        let client = db.client().await;
        let phase = phase.clone();
        producers.push(tokio::spawn(async move {
            let mut seen: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut n = 0u64;
            loop {
                let now = phase.load(std::sync::atomic::Ordering::SeqCst);
                if now > 1 {
                    return seen;
                }
                let started = Instant::now();
                outboxd::enqueue(
                    &client,
                    &outboxd::NewEvent::new(
                        "order",
                        format!("{p}-{n}"),
                        "order.created",
                        serde_json::json!({ "n": n, "total": 12.5 }),
                    ),
                )
                .await
                .expect("insert during a drop");
                seen[now as usize].push(started.elapsed().as_secs_f64() * 1000.0);
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase.store(1, std::sync::atomic::Ordering::SeqCst);
    let report = store
        .maintain_partitions(
            Duration::from_secs(7 * 86400),
            outboxd::config::OnExpiry::Drop,
            "bench",
        )
        .await
        .expect("retention pass");
    assert_eq!(report.expired.len(), drops as usize, "{report:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    phase.store(2, std::sync::atomic::Ordering::SeqCst);
    let (mut alone, mut dropping) = (Vec::new(), Vec::new());
    for producer in producers {
        let [a, d] = producer.await.expect("producer");
        alone.extend(a);
        dropping.extend(d);
    }
    (alone, dropping, report.lock_held_ms)
}

/// Claim latencies (ms) before and while `rows` rows of one day move out of DEFAULT,
/// how long the locked step took (ms) and how many rows were copied unlocked.
async fn default_move(rows: i64) -> (Vec<f64>, Vec<f64>, f64, f64) {
    let db = TestDb::new().await;
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status,
                                 created_at, next_attempt_at, processed_at, delivered_to)
             SELECT 'order', g::text, 'order.created', jsonb_build_object('n', g, 'total', 12.5),
                    CASE WHEN g % 33 = 0 THEN 'PENDING' ELSE 'PUBLISHED' END,
                    now() + interval '40 days' + g * interval '1 ms', now() + interval '1 day',
                    CASE WHEN g % 33 = 0 THEN NULL ELSE now() - interval '1 hour' END,
                    CASE WHEN g % 33 = 0 THEN '{}'::text[] ELSE '{rabbitmq}' END
               FROM generate_series(1, $1::int8) AS g",
            &[&rows],
        )
        .await
        .expect("rows in DEFAULT");
    let config = support::config_for(&db.url, &TestBroker::new(None).await);
    let store = support::store(&config).await;
    let claimer_store = support::store(&config).await;
    let phase = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let seen_phase = phase.clone();
    let claimer = tokio::spawn(async move {
        let mut seen: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        loop {
            let now = seen_phase.load(std::sync::atomic::Ordering::SeqCst);
            if now > 1 {
                return seen;
            }
            let started = Instant::now();
            claimer_store
                .claim_due(
                    100,
                    Duration::ZERO,
                    Duration::from_secs(60),
                    &outboxd::store::ClaimFilter::ALL,
                )
                .await
                .expect("claim");
            seen[now as usize].push(started.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase.store(1, std::sync::atomic::Ordering::SeqCst);
    let report = store.empty_default().await.expect("empty DEFAULT");
    phase.store(2, std::sync::atomic::Ordering::SeqCst);
    let [before, during] = claimer.await.expect("claimer");
    let moved = report.moved.first().expect("a day moved");
    (before, during, moved.locked_ms, moved.copied as f64)
}

/// Bytes per event (= MB per million events) in one day's partition (indexes included) and its share of
/// outbox_tracking_ids: inserted as PUBLISHED, and after the relay's two updates per
/// event (claim, complete) and a VACUUM.
async fn disk_per_event(n: i64) -> (f64, f64) {
    let db = TestDb::new().await;
    let client = db.client().await;
    let size = async || -> f64 {
        let bytes: i64 = client
            .query_one(
                "SELECT pg_total_relation_size('outbox_p' || to_char((now() AT TIME ZONE 'UTC')::date - 20, 'YYYYMMDD'))
                      + pg_total_relation_size('outbox_tracking_ids')",
                &[],
            )
            .await
            .expect("sizes")
            .get(0);
        bytes as f64 / n as f64
    };
    old_partitions(&db, 20, 1, n).await;
    client
        .batch_execute("VACUUM ANALYZE outbox_tracking_ids")
        .await
        .expect("vacuum");
    let inserted = size().await;
    // One statement each: VACUUM runs outside a transaction block.
    for statement in [
        "UPDATE outbox SET status = 'PENDING', processed_at = NULL",
        "VACUUM outbox",
        "UPDATE outbox SET status = 'PROCESSING', locked_until = now() + interval '1 minute',
                          lock_token = gen_random_uuid(), attempts = 1",
        "UPDATE outbox SET status = 'PUBLISHED', processed_at = now(), locked_until = NULL,
                          lock_token = NULL",
        "VACUUM outbox",
    ] {
        client
            .batch_execute(statement)
            .await
            .expect("relay's updates");
    }
    (inserted, size().await)
}

fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
