//! End-to-end relay benchmarks against the local PostgreSQL and RabbitMQ: how fast a
//! backlog drains and how long an event takes from commit to a consumer at a steady
//! rate. Each run uses a fresh database and its own exchange and queue.
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

async fn run(settings: Settings) -> bool {
    let mut ok = true;
    let mut rates = Vec::new();
    for _ in 0..settings.runs {
        let (rate, complete) = backlog_drain(settings.backlog).await;
        ok &= complete;
        rates.push(rate);
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
    for _ in 0..settings.runs {
        let (latencies, complete) =
            steady_latency(settings.rate_per_second, settings.steady_for).await;
        ok &= complete;
        p50s.push(quantile(&latencies, 0.50));
        p99s.push(quantile(&latencies, 0.99));
        maxes.push(quantile(&latencies, 1.0));
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
    ok
}

fn config(db: &TestDb, broker: &TestBroker) -> outboxd::Config {
    let mut config = support::config(db, broker);
    config.database.pool_size = 8;
    config
}

/// `n` events committed while no outboxd runs, then one starts: events/s until the last
/// one is consumed.
async fn backlog_drain(n: i64) -> (f64, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    db.insert_backlog(n).await;
    let started = Instant::now();
    let service = Outboxd::start(config(&db, &broker)).await.expect("start");
    let received = broker.wait_for(n as usize, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    service.stop().await;
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
async fn steady_latency(rate: u64, duration: Duration) -> (Vec<f64>, bool) {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = Outboxd::start(config(&db, &broker)).await.expect("start");
    while service.metrics().listener_connected.get() != 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    service.stop().await;
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
