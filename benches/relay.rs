//! End-to-end relay benchmarks against the local PostgreSQL and RabbitMQ: how fast a
//! backlog drains and how long an event takes from commit to a consumer at a steady
//! rate, for outboxd and, in the same run, for a polling relay as users write one
//! without it. Each run uses a fresh database and its own exchange and queue.
//!
//!   cargo bench --bench relay              # 3 runs a scenario, medians
//!   cargo bench --bench relay -- --quick   # 1 short run a scenario
//!
//! Prints a plain-text table; exits non-zero if any produced event was not consumed.

#[path = "../tests/support/mod.rs"]
mod support;

use outboxd::{NewEvent, Outboxd, enqueue};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};
use support::{TestBroker, TestDb};

struct Settings {
    runs: usize,
    backlog: i64,
    rate_per_second: u64,
    steady_for: Duration,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            runs: 1,
            backlog: 5_000,
            rate_per_second: 200,
            steady_for: Duration::from_secs(3),
        }
    } else {
        Settings {
            runs: 3,
            backlog: 50_000,
            rate_per_second: 500,
            steady_for: Duration::from_secs(10),
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = runtime.block_on(run(settings));
    if !ok {
        eprintln!("some produced events were not consumed");
        std::process::exit(1);
    }
}

/// Which relay a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayKind {
    Outboxd,
    /// A polling relay as users write one without outboxd: poll every second for up to
    /// 50 PENDING rows (at once again when the batch was full), publish each and wait for
    /// its confirm, then mark it.
    Baseline,
}

/// A relay running for one scenario.
enum Running {
    Outboxd(Box<Outboxd>),
    Baseline(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ),
}

impl Running {
    async fn start(kind: RelayKind, db: &TestDb, broker: &TestBroker) -> Running {
        match kind {
            RelayKind::Outboxd => {
                let service = Outboxd::start(config(db, broker)).await.expect("start");
                while service.metrics().listener_connected.get() != 1 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Running::Outboxd(Box::new(service))
            }
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
            Running::Outboxd(service) => service.stop().await,
            Running::Baseline(stop, task) => {
                stop.cancel();
                let _ = task.await;
            }
        }
    }
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

async fn run(settings: Settings) -> bool {
    let mut ok = true;
    let mut rates = Vec::new();
    let mut baseline_rates = Vec::new();
    for _ in 0..settings.runs {
        let (rate, complete) = backlog_drain(RelayKind::Outboxd, settings.backlog).await;
        ok &= complete;
        rates.push(rate);
        let (rate, complete) = backlog_drain(RelayKind::Baseline, settings.backlog / 10).await;
        ok &= complete;
        baseline_rates.push(rate);
    }
    let mut webhook_rates = Vec::new();
    for _ in 0..settings.runs {
        let (rate, complete) = webhook_drain(settings.backlog / 5).await;
        ok &= complete;
        webhook_rates.push(rate);
    }
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut maxes = Vec::new();
    let mut baseline_p50s = Vec::new();
    let mut baseline_p99s = Vec::new();
    for _ in 0..settings.runs {
        let (latencies, complete) = steady_latency(
            RelayKind::Outboxd,
            settings.rate_per_second,
            settings.steady_for,
        )
        .await;
        ok &= complete;
        p50s.push(quantile(&latencies, 0.50));
        p99s.push(quantile(&latencies, 0.99));
        maxes.push(quantile(&latencies, 1.0));
        let (latencies, complete) = steady_latency(
            RelayKind::Baseline,
            settings.rate_per_second,
            settings.steady_for,
        )
        .await;
        ok &= complete;
        baseline_p50s.push(quantile(&latencies, 0.50));
        baseline_p99s.push(quantile(&latencies, 0.99));
    }
    println!();
    println!("{:<52} {:>6} {:>14}", "scenario", "runs", "median");
    println!(
        "{:<52} {:>6} {:>10.0} ev/s",
        format!("backlog drain ({} PENDING events)", settings.backlog),
        settings.runs,
        median(&rates)
    );
    println!(
        "{:<52} {:>6} {:>10.0} ev/s",
        format!(
            "webhook drain ({} PENDING events, 1 endpoint)",
            settings.backlog / 5
        ),
        settings.runs,
        median(&webhook_rates)
    );
    for (name, values) in [("p50", &p50s), ("p99", &p99s), ("max", &maxes)] {
        println!(
            "{:<52} {:>6} {:>11.2} ms",
            format!(
                "commit-to-consume {name} at {} ev/s",
                settings.rate_per_second
            ),
            settings.runs,
            median(values) * 1000.0
        );
    }
    println!(
        "{:<52} {:>6} {:>10.0} ev/s",
        format!("baseline: backlog drain ({} events)", settings.backlog / 10),
        settings.runs,
        median(&baseline_rates)
    );
    for (name, values) in [("p50", &baseline_p50s), ("p99", &baseline_p99s)] {
        println!(
            "{:<52} {:>6} {:>11.2} ms",
            format!(
                "baseline: commit-to-consume {name} at {} ev/s",
                settings.rate_per_second
            ),
            settings.runs,
            median(values) * 1000.0
        );
    }
    println!(
        "{:<52} {:>6} {:>11.1} x",
        "ratio: drain outboxd / baseline",
        settings.runs,
        median(&rates) / median(&baseline_rates)
    );
    println!(
        "{:<52} {:>6} {:>11.1} x",
        "ratio: p99 baseline / outboxd",
        settings.runs,
        median(&baseline_p99s) / median(&p99s)
    );
    ok
}

fn config(db: &TestDb, broker: &TestBroker) -> outboxd::Config {
    let mut config = support::config(db, broker);
    config.database.pool_size = 8;
    config
}

/// `n` events committed while no outboxd runs, then one starts: events/s until the last
/// one is consumed.
async fn backlog_drain(kind: RelayKind, n: i64) -> (f64, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    db.insert_backlog(n).await;
    let started = Instant::now();
    let relay = Running::start(kind, &db, &broker).await;
    let received = broker.wait_for(n as usize, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    relay.stop().await;
    let complete = received.len() >= n as usize;
    (n as f64 / elapsed.as_secs_f64(), complete)
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

/// One producer committing single-event transactions at `rate` for `duration`: the
/// latency from each commit to its arrival at a consumer, in seconds.
async fn steady_latency(kind: RelayKind, rate: u64, duration: Duration) -> (Vec<f64>, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let relay = Running::start(kind, &db, &broker).await;
    let producer = db.client().await;
    let mut committed: HashMap<String, SystemTime> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let total = rate * duration.as_secs();
    for i in 0..total {
        tick.tick().await;
        let event = NewEvent::new(
            "order",
            i.to_string(),
            "order.created",
            serde_json::json!({ "n": i }),
        );
        let id = enqueue(&producer, &event).await.expect("enqueue");
        committed.insert(id.to_string(), SystemTime::now());
    }
    let received = broker
        .wait_for(total as usize, Duration::from_secs(30))
        .await;
    relay.stop().await;
    let latencies: Vec<f64> = received
        .iter()
        .filter_map(|m| {
            let at = committed.get(&m.message_id)?;
            Some(
                m.received_at
                    .duration_since(*at)
                    .unwrap_or_default()
                    .as_secs_f64(),
            )
        })
        .collect();
    let complete = latencies.len() >= total as usize;
    (latencies, complete)
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
