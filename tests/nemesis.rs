//! The nemesis: producers commit at a steady rate through several routes (RabbitMQ, a
//! fast webhook, a slow one, a flaky one, RabbitMQ and the fast one together) to three
//! `outboxd` processes with a 2 s lease, while a seeded random schedule of faults runs:
//! kill -9 and SIGTERM of an instance (restarted), the broker's connections cut, refused
//! or stalled, outboxd's database connections terminated, the slow endpoint going
//! silent, and poison events of every kind committed beside good ones. The flaky
//! endpoint answers 5xx at random throughout, never permanently. Then everything heals
//! and the audit checks what outboxd promises:
//!
//! - every committed good event is delivered to each destination of its route;
//! - no good event is dead-lettered, or carries another event's reason or a crash;
//! - every poison event is a dead letter with its own reason;
//! - events for the fast webhook alone, committed away from the faults that stop every
//!   event for a moment (a killed or stopped instance, terminated database
//!   connections: their events wait for a lease or a reconnect), reach it with p99
//!   under 1 s, whatever the broker and the other endpoints do meanwhile.
//!
//! Run twice: without ordering (every event its own aggregate), and with
//! `relay.ordering = "per_aggregate"`, where the audit also checks that each destination
//! received every aggregate's events in id order.
//!
//! One seed per run, printed: `OUTBOXD_NEMESIS_SEED=N` replays a schedule.

mod support;

use outboxd::NewEvent;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::fleet::Instance;
use support::proxy::CountingProxy;
use support::webhook::{Endpoint, Hit, Reply};
use support::{TestBroker, TestDb};
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const INSTANCES: usize = 3;
/// How long faults are injected; producers go on a little longer.
const FAULTS_FOR: Duration = Duration::from_secs(30);
const PRODUCE_FOR: Duration = Duration::from_secs(33);
/// After healing, how long everything may take to arrive.
const SETTLE_WITHIN: Duration = Duration::from_secs(45);
/// Events committed this long before or after a fault that stops events for a moment
/// (a kill -9: its claims wait for the 2 s lease; a stop; database connections
/// terminated: a reconnect) are not counted in the latency bound.
const STOPS_EVERYTHING_BEFORE: Duration = Duration::from_millis(500);
const STOPS_EVERYTHING_AFTER: Duration = Duration::from_millis(2500);

/// The routes and where each sends.
const ROUTES: &str = "order.*=rabbitmq; fast.*=webhook:fast; slow.*=webhook:slow; flaky.*=webhook:flaky; multi.*=rabbitmq,webhook:fast";

fn destinations(event_type: &str) -> &'static [&'static str] {
    match event_type.split('.').next().unwrap_or("") {
        "order" => &["rabbitmq"],
        "fast" => &["webhook:fast"],
        "slow" => &["webhook:slow"],
        "flaky" => &["webhook:flaky"],
        "multi" => &["rabbitmq", "webhook:fast"],
        other => panic!("no route for {other}"),
    }
}

/// A poison event for RabbitMQ and the words its dead-letter reason must hold.
fn poison(kind: usize, aggregate: String) -> (NewEvent, &'static str) {
    let long = "x".repeat(300);
    match kind % 5 {
        0 => (
            NewEvent::new("order", aggregate, format!("order.{long}"), json!({})),
            "event_type",
        ),
        1 => (
            NewEvent::new("order", aggregate.clone(), "order.created", json!({}))
                .with_metadata(json!({ long: "v" })),
            "metadata key",
        ),
        2 => (
            NewEvent::new("order", long, "order.created", json!({})),
            "routing key",
        ),
        3 => (
            NewEvent::new("order", aggregate.clone(), "order.created", json!({}))
                .with_metadata(json!({ "big": "y".repeat(300_000) })),
            "frame_max",
        ),
        _ => (
            NewEvent::new("order", aggregate.clone(), "order.created", json!({}))
                .with_metadata(json!({ "CC": "order.elsewhere" })),
            "\"CC\"",
        ),
    }
}

/// A committed event, as the producer saw it.
#[derive(Debug, Clone)]
struct Committed {
    tracking_id: Uuid,
    event_type: String,
    at: Instant,
    /// For a poison event: the words its reason must hold.
    poison: Option<&'static str>,
}

/// The first 2xx answer an endpoint gave, per `webhook-id`.
type Answered = Arc<Mutex<HashMap<String, Instant>>>;

/// Every 2xx answer an endpoint gave, in order: the `webhook-id` (the tracking_id).
type Accepted = Arc<Mutex<Vec<String>>>;

/// An endpoint that answers as `script` says (`None`: never) and remembers when it first
/// said 2xx to each event.
async fn endpoint(
    script: impl Fn(&Hit) -> Reply + Send + Sync + 'static,
) -> (Endpoint, Answered, Accepted) {
    let answered: Answered = Arc::default();
    let accepted: Accepted = Arc::default();
    let record = Arc::clone(&answered);
    let in_order = Arc::clone(&accepted);
    let endpoint = Endpoint::start(move |hit: &Hit| {
        let reply = script(hit);
        if (200..300).contains(&reply.status) && reply.delay != Some(None) {
            in_order.lock().unwrap().push(hit.id().to_string());
            let at = Instant::now() + reply.delay.flatten().unwrap_or_default();
            record
                .lock()
                .unwrap()
                .entry(hit.id().to_string())
                .or_insert(at);
        }
        reply
    })
    .await;
    (endpoint, answered, accepted)
}

fn instance_env(
    amqp: &str,
    fast: &str,
    slow: &str,
    flaky: &str,
    ordered: bool,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("OUTBOXD_RABBITMQ_URL", amqp.to_string()),
        (
            "OUTBOXD_RABBITMQ_ROUTING_KEY",
            "{event_type}.{aggregate_id}".into(),
        ),
        ("OUTBOXD_ROUTING_ROUTES", ROUTES.into()),
        ("OUTBOXD_RETRY_MAX_ATTEMPTS", "50".into()),
        ("OUTBOXD_RELAY_SAFETY_SWEEP_INTERVAL", "5s".into()),
        ("OUTBOXD_RELAY_SHUTDOWN_GRACE", "3s".into()),
        ("OUTBOXD_WEBHOOK_FAST_URL", fast.into()),
        ("OUTBOXD_WEBHOOK_SLOW_URL", slow.into()),
        ("OUTBOXD_WEBHOOK_SLOW_TIMEOUT", "2s".into()),
        ("OUTBOXD_WEBHOOK_SLOW_COOL_DOWN", "500ms".into()),
        ("OUTBOXD_WEBHOOK_FLAKY_URL", flaky.into()),
        ("OUTBOXD_WEBHOOK_FLAKY_COOL_DOWN", "300ms".into()),
    ];
    if ordered {
        // Poison events share aggregates with good ones: `skip` lets those go on.
        env.push(("OUTBOXD_RELAY_ORDERING", "per_aggregate".into()));
        env.push(("OUTBOXD_RELAY_ORDERING_DEAD_LETTERS", "skip".into()));
    }
    for secret in [
        "OUTBOXD_WEBHOOK_FAST_SECRET",
        "OUTBOXD_WEBHOOK_SLOW_SECRET",
        "OUTBOXD_WEBHOOK_FLAKY_SECRET",
    ] {
        env.push((secret, SECRET.into()));
    }
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn start_instance(db: &TestDb, broker: &TestBroker, env: &[(String, String)]) -> Instance {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Instance::start(&db.url, broker, &env)
}

/// Terminates outboxd's own connections to the test database (every backend of it
/// whose application_name starts with "outboxd", not the test's own).
async fn kill_database_connections(db: &TestDb) -> usize {
    db.client()
        .await
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND application_name LIKE 'outboxd%'
                AND application_name NOT LIKE 'outboxd-test%'",
            &[],
        )
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_every_good_event_arrives_and_only_poison_is_dead_lettered() {
    nemesis(false).await;
}

/// The same with `relay.ordering = "per_aggregate"` (and `skip`): events share 25
/// aggregates per route, poison ones among the RabbitMQ route's, and the audit checks as
/// well that every destination received each aggregate's events in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_with_ordering_delivers_each_aggregate_in_order() {
    nemesis(true).await;
}

async fn nemesis(ordered: bool) {
    let seed: u64 = std::env::var("OUTBOXD_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("nemesis seed {seed} (replay: OUTBOXD_NEMESIS_SEED={seed})");
    eprintln!("nemesis seed {seed} (replay: OUTBOXD_NEMESIS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let amqp = CountingProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let (fast, fast_answered, fast_accepted) = endpoint(|_| Reply::ok()).await;
    let slow_silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let silent = Arc::clone(&slow_silent);
    let (slow, slow_answered, slow_accepted) = endpoint(move |_| {
        if silent.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::silent()
        } else {
            Reply {
                delay: Some(Some(Duration::from_millis(300))),
                ..Reply::ok()
            }
        }
    })
    .await;
    let flaky_seed: u64 = rng.random();
    let flaky_rng = Mutex::new(StdRng::seed_from_u64(flaky_seed));
    let (flaky, flaky_answered, flaky_accepted) = endpoint(move |_| {
        if flaky_rng.lock().unwrap().random_bool(0.3) {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    })
    .await;
    let env = instance_env(
        &format!("amqp://guest:guest@{}/%2f", amqp.addr),
        &fast.url(),
        &slow.url(),
        &flaky.url(),
        ordered,
    );
    let mut instances: Vec<Instance> = (0..INSTANCES)
        .map(|_| start_instance(&db, &broker, &env))
        .collect();
    for instance in &instances {
        instance.wait_running().await;
    }

    // Without ordering every event is its own aggregate; with it, 25 aggregates a route.
    let aggregate = move |event_type: &str, n: u64| -> String {
        if ordered {
            format!("{}-{}", event_type.split('.').next().unwrap_or(""), n % 25)
        } else {
            n.to_string()
        }
    };
    // Producers: a transaction every 20 ms with 1-3 events, now and then a poison one
    // among them.
    let started = Instant::now();
    let committed: Arc<Mutex<Vec<Committed>>> = Arc::default();
    let producing = {
        let committed = Arc::clone(&committed);
        let client = db.client().await;
        let mut rng = StdRng::seed_from_u64(rng.random());
        tokio::spawn(async move {
            let mut n: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while started.elapsed() < PRODUCE_FOR {
                tick.tick().await;
                let mut events = Vec::new();
                let mut kinds = Vec::new();
                for _ in 0..rng.random_range(1..=3) {
                    n += 1;
                    let event_type = match rng.random_range(0..100) {
                        0..40 => "order.created",
                        40..65 => "fast.created",
                        65..75 => "slow.created",
                        75..90 => "flaky.created",
                        _ => "multi.created",
                    };
                    events.push(NewEvent::new(
                        "order",
                        aggregate(event_type, n),
                        event_type,
                        json!({ "n": n }),
                    ));
                    kinds.push(None);
                }
                if rng.random_bool(0.03) {
                    n += 1;
                    let (bad, reason) =
                        poison(rng.random_range(0..5), aggregate("order.created", n));
                    let at = rng.random_range(0..=events.len());
                    events.insert(at, bad);
                    kinds.insert(at, Some(reason));
                }
                let ids = outboxd::enqueue_many(&client, &events)
                    .await
                    .expect("the producer's commit");
                let at = Instant::now();
                let mut committed = committed.lock().unwrap();
                for ((tracking_id, event), poison) in ids.into_iter().zip(&events).zip(kinds) {
                    committed.push(Committed {
                        tracking_id,
                        event_type: event.event_type.clone(),
                        at,
                        poison,
                    });
                }
            }
        })
    };

    // The schedule: one fault at a time, each healed before the next.
    let mut stops_everything: Vec<Instant> = Vec::new();
    while started.elapsed() < FAULTS_FOR {
        let pause = Duration::from_millis(rng.random_range(500..2000));
        tokio::time::sleep(pause).await;
        let at = started.elapsed().as_secs_f64();
        let hold = Duration::from_millis(rng.random_range(500..3000));
        match rng.random_range(0..7) {
            0 => {
                let k = rng.random_range(0..INSTANCES);
                println!("nemesis +{at:.1}s: kill -9 instance {k}, restarted after {hold:?}");
                stops_everything.push(Instant::now());
                instances[k].kill_9();
                tokio::time::sleep(hold).await;
                instances[k] = start_instance(&db, &broker, &env);
            }
            1 => {
                let k = rng.random_range(0..INSTANCES);
                println!("nemesis +{at:.1}s: SIGTERM instance {k}, restarted after {hold:?}");
                stops_everything.push(Instant::now());
                let code = instances[k].terminate().await;
                assert_eq!(code, Some(0), "{}", instances[k].log());
                tokio::time::sleep(hold).await;
                instances[k] = start_instance(&db, &broker, &env);
            }
            2 => {
                println!("nemesis +{at:.1}s: broker connections cut");
                amqp.cut();
            }
            3 => {
                println!("nemesis +{at:.1}s: broker refuses connections for {hold:?}");
                amqp.refuse(true);
                amqp.cut();
                tokio::time::sleep(hold).await;
                amqp.refuse(false);
            }
            4 => {
                println!("nemesis +{at:.1}s: broker stalls for {hold:?}");
                amqp.stall(true);
                tokio::time::sleep(hold).await;
                amqp.stall(false);
            }
            5 => {
                stops_everything.push(Instant::now());
                let killed = kill_database_connections(&db).await;
                println!("nemesis +{at:.1}s: {killed} database connections terminated");
            }
            _ => {
                println!("nemesis +{at:.1}s: the slow endpoint goes silent for {hold:?}");
                slow_silent.store(true, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                slow_silent.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    producing.await.unwrap();
    let committed = committed.lock().unwrap().clone();
    println!(
        "nemesis: {} events committed ({} poison) in {:?}; healing",
        committed.len(),
        committed.iter().filter(|c| c.poison.is_some()).count(),
        started.elapsed()
    );

    // Heal, then wait until every good event reached each of its destinations and no
    // row is open.
    let delivered_to = |event: &Committed, destination: &str| -> bool {
        let id = event.tracking_id.to_string();
        match destination {
            "rabbitmq" => false, // checked against the broker below
            "webhook:fast" => fast_answered.lock().unwrap().contains_key(&id),
            "webhook:slow" => slow_answered.lock().unwrap().contains_key(&id),
            "webhook:flaky" => flaky_answered.lock().unwrap().contains_key(&id),
            other => panic!("{other}"),
        }
    };
    let missing = |received: &HashSet<String>| -> Vec<(String, &'static str)> {
        committed
            .iter()
            .filter(|c| c.poison.is_none())
            .flat_map(|c| {
                destinations(&c.event_type)
                    .iter()
                    .filter(|d| {
                        if **d == "rabbitmq" {
                            !received.contains(&c.tracking_id.to_string())
                        } else {
                            !delivered_to(c, d)
                        }
                    })
                    .map(|d| (c.tracking_id.to_string(), *d))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let audit_client = db.client().await;
    let deadline = Instant::now() + SETTLE_WITHIN;
    let mut lacking;
    loop {
        let received: HashSet<String> = broker
            .received()
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        lacking = missing(&received);
        let open = support::open_events(&audit_client).await;
        if (lacking.is_empty() && open == 0) || Instant::now() > deadline {
            if !lacking.is_empty() || open > 0 {
                println!("nemesis: {open} rows still open");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = || {
        instances
            .iter()
            .enumerate()
            .map(|(k, i)| {
                let log = i.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- instance {k} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut by_destination: HashMap<&str, usize> = HashMap::new();
    for (_, destination) in &lacking {
        *by_destination.entry(destination).or_default() += 1;
    }
    assert!(
        lacking.is_empty(),
        "seed {seed}: good events not delivered, by destination: {by_destination:?}\n{}",
        logs()
    );

    // The database's view: good events PUBLISHED with no foreign reason, poison ones
    // dead letters with their own.
    let rows: HashMap<Uuid, (String, Option<String>, i32)> = audit_client
        .query(
            "SELECT tracking_id, status, last_error, attempts FROM outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    for event in &committed {
        let (status, last_error, attempts) = rows
            .get(&event.tracking_id)
            .unwrap_or_else(|| panic!("seed {seed}: {} has no row", event.tracking_id));
        let last_error = last_error.clone().unwrap_or_default();
        match event.poison {
            Some(reason) => {
                assert_eq!(
                    status, "DEAD_LETTER",
                    "seed {seed}: poison ({reason}) {} is {status}: {last_error}",
                    event.tracking_id
                );
                assert!(
                    last_error.contains(reason) && last_error.starts_with("rejected"),
                    "seed {seed}: poison ({reason}) dead-lettered for another reason: {last_error}"
                );
            }
            None => {
                assert_eq!(
                    status, "PUBLISHED",
                    "seed {seed}: good event {} ({}) is {status} after {attempts} attempts: {last_error}",
                    event.tracking_id, event.event_type
                );
                assert!(
                    !last_error.contains("rejected")
                        && !last_error.contains("crashed")
                        && !last_error.contains("AMQP allows")
                        && !last_error.contains("metadata key"),
                    "seed {seed}: good event {} ({}) carries another's failure: {last_error}",
                    event.tracking_id,
                    event.event_type
                );
            }
        }
    }

    if ordered {
        // Each destination received every aggregate's good events in id order.
        let positions: HashMap<String, (String, i64)> = audit_client
            .query(
                "SELECT tracking_id::text, aggregate_id, id FROM outbox",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let rabbit: Vec<String> = broker
            .received()
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        for (destination, arrivals) in [
            ("rabbitmq", rabbit),
            ("webhook:fast", fast_accepted.lock().unwrap().clone()),
            ("webhook:slow", slow_accepted.lock().unwrap().clone()),
            ("webhook:flaky", flaky_accepted.lock().unwrap().clone()),
        ] {
            let mut expected: HashMap<String, Vec<i64>> = HashMap::new();
            for event in committed.iter().filter(|c| {
                c.poison.is_none() && destinations(&c.event_type).contains(&destination)
            }) {
                let (key, id) = &positions[&event.tracking_id.to_string()];
                expected.entry(key.clone()).or_default().push(*id);
            }
            for ids in expected.values_mut() {
                ids.sort();
            }
            let arrivals: Vec<(String, i64)> = arrivals
                .iter()
                .map(|tracking_id| positions[tracking_id].clone())
                .collect();
            let duplicates = support::fleet::audit_order(destination, &arrivals, &expected);
            println!(
                "nemesis: {destination}: {} aggregates in id order, {duplicates} duplicates",
                expected.len()
            );
        }
    }

    // Latency of the fast webhook's own events, away from the faults that stop everyone.
    let answered = fast_answered.lock().unwrap().clone();
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter(|c| c.poison.is_none() && c.event_type == "fast.created")
        .filter(|c| {
            !stops_everything.iter().any(|f| {
                c.at + STOPS_EVERYTHING_BEFORE >= *f && c.at <= *f + STOPS_EVERYTHING_AFTER
            })
        })
        .filter_map(|c| {
            let arrived = answered.get(&c.tracking_id.to_string())?;
            Some(arrived.saturating_duration_since(c.at).as_secs_f64())
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    assert!(
        latencies.len() >= 50,
        "seed {seed}: only {} fast events counted",
        latencies.len()
    );
    let p99 = latencies[(latencies.len() - 1) * 99 / 100];
    let p50 = latencies[(latencies.len() - 1) / 2];
    println!(
        "nemesis: fast webhook events p50 {:.1} ms, p99 {:.1} ms over {}; everything settled {:?} after the start",
        p50 * 1000.0,
        p99 * 1000.0,
        latencies.len(),
        started.elapsed()
    );
    assert!(
        p99 <= 1.0,
        "seed {seed}: the fast webhook's events p99 {p99:.3} s while other destinations failed\n{}",
        logs()
    );
}
