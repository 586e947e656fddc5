//! Replays and bulk redrives: already published events are sent again to one destination
//! only, with their own ids and the replay's header; a dry run sends nothing; a replay
//! killed half way is resumed by another instance and every event arrives at least once;
//! with ordering each aggregate's events arrive in order; a replay is refused without a
//! reason or the admin token; two bulk redrives of one filter move each dead letter once.

mod support;

use outboxd::config::WebhookConfig;
use outboxd::replay::{ReplayRequest, Started};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};
use support::fleet::Instance;
use support::webhook::{Endpoint, Hit, Reply};
use support::{TestBroker, TestDb, route, start};
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TOKEN: &str = "replay-admin-token-0123456789";

fn outboxd(database_url: &str, config: Option<&std::path::Path>, args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn");
    if let Some(config) = config {
        command.env("OUTBOXD_CONFIG", config);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// A config file of the test's own, removed on drop.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A config file routing every event to `webhook:billing` and RabbitMQ.
fn config_file(endpoint: &Endpoint, broker: &TestBroker, extra: &str) -> ConfigFile {
    let file =
        ConfigFile(std::env::temp_dir().join(format!("outboxd-replay-{}.toml", Uuid::new_v4())));
    std::fs::write(
        file.path(),
        format!(
            "[rabbitmq]\nexchange = \"{}\"\ndeclare_exchange = false\n\n\
             [webhooks.billing]\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\n\n\
             [[routing.routes]]\nevent_types = [\"*\"]\ndestinations = [\"webhook:billing\", \"rabbitmq\"]\n{extra}",
            broker.exchange,
            endpoint.url()
        ),
    )
    .unwrap();
    file
}

/// `n` events already published to both destinations (as the relay leaves them).
async fn published(db: &TestDb, n: i64, aggregates: i64) -> Vec<Uuid> {
    db.client()
        .await
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status,
                                 processed_at, delivered_to)
             SELECT 'order', (g % $2::int8)::text, 'order.created', jsonb_build_object('n', g),
                    'PUBLISHED', now(), '{rabbitmq,webhook:billing}'
               FROM generate_series(1, $1::int8) AS g
             RETURNING tracking_id",
            &[&n, &aggregates],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn replayed(hits: &[Hit]) -> Vec<&Hit> {
    hits.iter()
        .filter(|h| h.headers.contains_key("outbox-replay-id"))
        .collect()
}

async fn replay_status(db: &TestDb, id: i64) -> (String, i64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, sent, cursor FROM outbox_replays WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn wait_done(db: &TestDb, id: i64, timeout: Duration) -> (String, i64, i64) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = replay_status(db, id).await;
        if status.0 != "RUNNING" || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_resends_exactly_the_published_events_to_one_webhook_with_their_ids() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let endpoint = Endpoint::start(|_: &Hit| Reply::ok()).await;
    let mut config = support::config(&db, &broker);
    config
        .webhooks
        .insert("billing".into(), WebhookConfig::new(endpoint.url(), SECRET));
    config.routing.routes = vec![route(&["*"], &["webhook:billing", "rabbitmq"])];
    config.http.gauge_refresh_interval = Duration::from_millis(200);
    let service = start(config).await;
    db.insert_backlog(1000).await;
    broker.wait_for(1000, Duration::from_secs(60)).await;
    endpoint
        .wait_until(Duration::from_secs(60), |h| h.len() >= 1000)
        .await;
    assert!(db.wait_settled(Duration::from_secs(30)).await);
    let original: HashSet<String> = endpoint.hits().iter().map(|h| h.id().to_string()).collect();
    assert_eq!(original.len(), 1000);
    // One more event, not published yet (its destination is away): never replayed.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, next_attempt_at)
             VALUES ('order', 'x', 'order.created', '{}', now() + interval '1 hour')",
        )
        .await
        .unwrap();

    let config_path = config_file(&endpoint, &broker, "");
    let (code, text) = outboxd(
        &db.url,
        Some(config_path.path()),
        &["replay", "--destination", "webhook:billing", "--dry-run"],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1000 event(s) would be sent again"), "{text}");
    let (code, text) = outboxd(
        &db.url,
        Some(config_path.path()),
        &[
            "replay",
            "--destination",
            "webhook:billing",
            "--rate",
            "5000",
        ],
    );
    assert_eq!(code, 2, "refused without a reason: {text}");
    assert!(text.contains("needs a reason"), "{text}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        endpoint.hits().len(),
        1000,
        "a dry run and a refusal send nothing"
    );
    assert_eq!(
        db.client()
            .await
            .query_one("SELECT count(*) FROM outbox_replays", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );

    let (code, text) = outboxd(
        &db.url,
        Some(config_path.path()),
        &[
            "replay",
            "--destination",
            "webhook:billing",
            "--rate",
            "5000",
            "--reason",
            "billing lost a day of invoices",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1000 event(s)"), "{text}");
    let id: i64 = db
        .client()
        .await
        .query_one("SELECT id FROM outbox_replays", &[])
        .await
        .unwrap()
        .get(0);
    let (status, sent, _) = wait_done(&db, id, Duration::from_secs(60)).await;
    assert_eq!((status.as_str(), sent), ("DONE", 1000));
    let hits = endpoint.hits();
    let again = replayed(&hits);
    assert_eq!(again.len(), 1000, "each once");
    let ids: HashSet<String> = again.iter().map(|h| h.id().to_string()).collect();
    assert_eq!(ids, original, "the same events, with their own webhook-id");
    assert!(
        again
            .iter()
            .all(|h| h.headers["outbox-replay-id"] == id.to_string())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.count(), 1000, "RabbitMQ received nothing again");

    // The story of one of them names the replay.
    let store = support::store(&support::config(&db, &broker)).await;
    let tracking: Uuid = original.iter().next().unwrap().parse().unwrap();
    let event = outboxd::events::show(&store, outboxd::events::EventKey::TrackingId(tracking))
        .await
        .unwrap();
    assert!(
        event.story.iter().any(|s| s.step == "replayed"),
        "{:?}",
        event.story
    );
    let (code, text) = outboxd(
        &db.url,
        None,
        &["replay", "status", "--id", &id.to_string()],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("DONE") && text.contains("1000 of 1000 sent"),
        "{text}"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_half_way_is_resumed_and_every_event_arrives_at_least_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let endpoint = Endpoint::start(|_: &Hit| Reply::ok()).await;
    let config = config_file(
        &endpoint,
        &broker,
        "\n[http]\ngauge_refresh_interval = \"200ms\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let events = published(&db, 1000, 50).await;
    let env = [("OUTBOXD_CONFIG", config.path().to_str().unwrap())];
    let mut first = Instance::start(&db.url, &broker, &env);
    first.wait_running().await;
    let (code, text) = outboxd(
        &db.url,
        Some(config.path()),
        &[
            "replay",
            "--destination",
            "webhook:billing",
            "--rate",
            "250",
            "--reason",
            "consumer restored from a backup",
        ],
    );
    assert_eq!(code, 0, "{text}");
    endpoint
        .wait_until(Duration::from_secs(30), |h| h.len() >= 300)
        .await;
    first.kill_9();
    let at_kill = endpoint.hits().len();
    assert!(at_kill < 1000, "killed half way ({at_kill} sent)");

    let mut second = Instance::start(&db.url, &broker, &env);
    second.wait_running().await;
    let (status, sent, cursor) = wait_done(&db, 1, Duration::from_secs(60)).await;
    assert_eq!(
        status, "DONE",
        "resumed and finished (sent {sent}, cursor {cursor})"
    );
    let hits = endpoint.hits();
    let seen: HashSet<String> = replayed(&hits).iter().map(|h| h.id().to_string()).collect();
    for event in &events {
        assert!(seen.contains(&event.to_string()), "{event} re-sent");
    }
    assert_eq!(seen.len(), 1000);
    println!(
        "{} sends for 1000 events: {} sent twice (the batch in flight at the kill)",
        hits.len(),
        hits.len() - 1000
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.count(), 0, "never to another destination");
    second.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ordering_a_replay_keeps_each_aggregates_order() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // Answers take 0 to 15 ms, at random: concurrent sends would overtake each other.
    let endpoint = Endpoint::start(|hit: &Hit| Reply {
        delay: Some(Some(Duration::from_millis(
            (hit.id().as_bytes()[35] as u64 * 7) % 16,
        ))),
        ..Reply::ok()
    })
    .await;
    let mut config = support::config(&db, &broker);
    config
        .webhooks
        .insert("billing".into(), WebhookConfig::new(endpoint.url(), SECRET));
    config.routing.routes = vec![route(&["*"], &["webhook:billing", "rabbitmq"])];
    config.relay.ordering = outboxd::ordering::Ordering::PerAggregate;
    config.http.gauge_refresh_interval = Duration::from_millis(200);
    let service = start(config).await;
    let events = published(&db, 300, 10).await;
    let store = support::store(&support::config(&db, &broker))
        .await
        .with_recorded_order()
        .await
        .unwrap();
    let started = outboxd::replay::start(
        &store,
        &["rabbitmq".into(), "webhook:billing".into()],
        &ReplayRequest {
            destination: "webhook:billing".into(),
            reason: "ordered consumer rebuilt".into(),
            rate: Some(10_000),
            by: Some("test".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let Started::Stored { id, matched, .. } = started else {
        panic!("stored")
    };
    assert_eq!(matched, 300);
    let (status, sent, _) = wait_done(&db, id, Duration::from_secs(60)).await;
    assert_eq!((status.as_str(), sent), ("DONE", 300));
    // Each aggregate's events arrived in id order.
    let client = db.client().await;
    let order: HashMap<String, (String, i64)> = client
        .query(
            "SELECT tracking_id::text, aggregate_id, id FROM outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut last: HashMap<String, i64> = HashMap::new();
    for hit in replayed(&endpoint.hits()) {
        let (aggregate, id) = &order[hit.id()];
        let before = last.insert(aggregate.clone(), *id).unwrap_or(0);
        assert!(before < *id, "aggregate {aggregate}: {id} after {before}");
    }
    assert_eq!(events.len(), 300);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_a_replay_without_the_admin_token_or_a_reason() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = support::config(&db, &broker);
    config.http.listen = "127.0.0.1:0".into();
    config.http.admin_token = outboxd::config::Secret::new(TOKEN);
    let service = start(config).await;
    let addr = service.http_addr().unwrap();
    let body = r#"{"destination": "rabbitmq", "reason": "consumer lost its queue"}"#;
    let (status, text) = support::http_request(addr, "POST", "/api/replays", &[], Some(body)).await;
    assert_eq!(status, 401, "{text}");
    let auth = format!("Bearer {TOKEN}");
    let (status, text) = support::http_request(
        addr,
        "POST",
        "/api/replays",
        &[("Authorization", &auth)],
        Some(r#"{"destination": "rabbitmq"}"#),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("needs a reason"), "{text}");
    let (status, text) = support::http_request(
        addr,
        "POST",
        "/api/replays",
        &[("Authorization", &auth)],
        Some(r#"{"destination": "webhook:nowhere", "reason": "x"}"#),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not defined here"), "{text}");
    let (status, text) = support::http_request(
        addr,
        "POST",
        "/api/replays",
        &[("Authorization", &auth)],
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["result"], "stored");
    let id = value["id"].as_i64().unwrap();
    let (status, text) = support::http_request(
        addr,
        "GET",
        &format!("/api/replays/{id}"),
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = support::http_request(
        addr,
        "POST",
        &format!("/api/replays/{id}/cancel"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 401, "cancel needs the token too");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bulk_redrives_of_one_filter_move_each_dead_letter_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, last_error)
             SELECT 'order', g::text, CASE WHEN g % 4 = 0 THEN 'cart.opened' ELSE 'order.created' END,
                    '{}', 'DEAD_LETTER', 'consumer down'
               FROM generate_series(1, 400) AS g",
        )
        .await
        .unwrap();
    let store = support::store(&support::config_for(
        &db.url,
        &TestBroker::new(Some("#")).await,
    ))
    .await;
    let filter = outboxd::replay::parse_filter(None, None, Some("order.*"), None).unwrap();
    let dry = outboxd::dead_letters::redrive_matching(&store, &filter, "", "ops", 10_000, true)
        .await
        .unwrap();
    assert_eq!(dry.redriven, 300, "a dry run counts");
    assert_eq!(db.count("DEAD_LETTER").await, 400, "and moves nothing");
    let refused =
        outboxd::dead_letters::redrive_matching(&store, &filter, " ", "ops", 10_000, false).await;
    assert!(refused.is_err(), "a redrive needs a reason");
    let (a, b) = tokio::join!(
        outboxd::dead_letters::redrive_matching(&store, &filter, "fixed", "ops-a", 100_000, false),
        outboxd::dead_letters::redrive_matching(&store, &filter, "fixed", "ops-b", 100_000, false),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.redriven + b.redriven, 300, "{a:?} {b:?}");
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM outbox_redrives", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 300, "each recorded once");
    assert_eq!(db.count("PENDING").await, 300);
    assert_eq!(db.count("DEAD_LETTER").await, 100, "cart.opened left alone");
}
