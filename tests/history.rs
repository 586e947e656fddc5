//! The delivery history: every failed attempt is recorded with its destination, attempt,
//! duration and HTTP status; `outboxd events show` and the API tell an event's whole
//! story; retention trims the history but keeps a dead letter's.

mod support;

use support::eventually;

use outboxd::config::{OnExpiry, WebhookConfig};
use outboxd::{NewEvent, enqueue};
use serde_json::json;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::webhook::{Endpoint, Hit, Reply};
use support::{TestBroker, TestDb, route, start};

const TOKEN: &str = "history-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_failed_twice_then_passed_shows_both_failures_with_their_statuses() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let endpoint = Endpoint::start(move |_: &Hit| match seen.fetch_add(1, Ordering::SeqCst) {
        0 => Reply::status(503).with_body("maintenance"),
        1 => Reply::status(429).with_body("slow down"),
        _ => Reply::ok(),
    })
    .await;
    let mut config = support::config(&db, &broker);
    config.webhooks.insert(
        "billing".into(),
        WebhookConfig::new(endpoint.url(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    );
    config.routing.routes = vec![route(&["*"], &["webhook:billing", "rabbitmq"])];
    config.retry.base_delay = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(200);
    config.http.listen = "127.0.0.1:0".into();
    config.http.admin_token = outboxd::config::Secret::new(TOKEN);
    let service = start(config).await;
    let client = db.client().await;
    let tracking_id = enqueue(
        &client,
        &NewEvent::new("order", "9", "order.created", json!({ "n": 9 })),
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), async || db
            .count("PUBLISHED")
            .await
            == 1)
        .await,
        "published on the third try"
    );

    let store = support::store(&support::config(&db, &broker)).await;
    let event = outboxd::events::show(&store, outboxd::events::EventKey::TrackingId(tracking_id))
        .await
        .unwrap();
    let failures: Vec<(String, i32, Option<i32>, String)> = event
        .failed_attempts
        .iter()
        .map(|a| {
            (
                a.destination.clone(),
                a.attempt,
                a.http_status,
                a.outcome.clone(),
            )
        })
        .collect();
    assert_eq!(
        failures,
        vec![
            (
                "webhook:billing".to_string(),
                1,
                Some(503),
                "retry".to_string()
            ),
            (
                "webhook:billing".to_string(),
                2,
                Some(429),
                "retry".to_string()
            ),
        ],
        "RabbitMQ acknowledged the first time: no failure recorded for it"
    );
    assert!(event.failed_attempts[0].error.contains("maintenance"));
    assert!(event.failed_attempts.iter().all(|a| a.duration_ms >= 0.0));
    let steps: Vec<&str> = event.story.iter().map(|s| s.step).collect();
    assert_eq!(
        steps,
        vec!["committed", "attempt_failed", "attempt_failed", "published"]
    );

    // The same through the CLI and the API.
    let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["events", "show", &tracking_id.to_string()])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("attempt_failed"), "{text}");
    assert!(text.contains("HTTP 503"), "{text}");
    assert!(text.contains("HTTP 429"), "{text}");
    let addr = service.http_addr().unwrap();
    let (status, body) = support::http_request(
        addr,
        "GET",
        &format!("/api/events/{tracking_id}"),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["failed_attempts"][1]["http_status"], 429);
    assert_eq!(value["story"].as_array().unwrap().len(), 4);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_the_history_but_keeps_a_dead_letters() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status)
             VALUES ('order', '1', 'order.created', '{}', 'PUBLISHED'),
                    ('order', '2', 'order.created', '{}', 'DEAD_LETTER');
             INSERT INTO outbox_attempts (outbox_id, tracking_id, destination, attempt, at,
                                          duration_ms, outcome, error)
             SELECT id, tracking_id, 'rabbitmq', g, now() - interval '10 days', 1, 'retry', 'down'
               FROM outbox, generate_series(1, 3) AS g;
             INSERT INTO outbox_attempts (outbox_id, tracking_id, destination, attempt,
                                          duration_ms, outcome, error)
             SELECT id, tracking_id, 'rabbitmq', 4, 1, 'retry', 'down' FROM outbox;",
        )
        .await
        .unwrap();
    let store = support::store(&support::config_for(
        &db.url,
        &TestBroker::new(Some("#")).await,
    ))
    .await;
    let report = store
        .maintain_partitions(Duration::from_secs(7 * 86400), OnExpiry::Drop, "test")
        .await
        .unwrap();
    assert_eq!(
        report.attempts_trimmed, 3,
        "the published event's old attempts"
    );
    let left: i64 = client
        .query_one("SELECT count(*) FROM outbox_attempts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 5, "the recent ones, and the dead letter's old ones");
}
