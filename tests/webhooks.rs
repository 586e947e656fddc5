//! Webhooks and routing, against real HTTP servers on 127.0.0.1 and the real PostgreSQL
//! and RabbitMQ: signed requests a third-party verifier accepts, retries per destination
//! without re-sending to one that acknowledged, response classes, circuit breaking, and
//! the unrouted policy.

mod support;

use support::route;

use outboxd::config::WebhookConfig;
use outboxd::routing::Unrouted;
use outboxd::{Config, NewEvent, enqueue};
use serde_json::json;
use std::time::{Duration, Instant};
use support::webhook::{Endpoint, Hit, Reply, verify_with_standardwebhooks};
use support::{TestBroker, TestDb, start};
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_c2VjcmV0LWJlZm9yZS1yb3RhdGlvbg==";

fn webhook(endpoint: &Endpoint) -> WebhookConfig {
    let mut config = WebhookConfig::new(endpoint.url(), SECRET);
    config.timeout = Duration::from_secs(2);
    config
}

fn fast_retries(config: &mut Config) {
    config.retry.base_delay = Duration::from_millis(100);
    config.retry.max_delay = Duration::from_secs(5);
}

fn event(event_type: &str, n: usize) -> NewEvent {
    NewEvent::new("order", n.to_string(), event_type, json!({ "n": n }))
}

async fn row(db: &TestDb, tracking_id: Uuid) -> (String, i32, Option<String>, Vec<String>) {
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT status, attempts, last_error, delivered_to FROM outbox WHERE tracking_id = $1",
            &[&tracking_id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

async fn wait_status(db: &TestDb, tracking_id: Uuid, status: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (current, attempts, error, _) = row(db, tracking_id).await;
        if current == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{tracking_id} is {current} after {attempts} attempts ({error:?}), not {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_reaches_rabbitmq_and_two_webhooks_with_signatures_a_third_party_verifies() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let billing = Endpoint::start(|_| Reply::ok()).await;
    let crm = Endpoint::start(|_| Reply::status(204)).await;
    let mut config = support::config(&db, &broker);
    config.webhooks.insert("billing".into(), webhook(&billing));
    // The CRM endpoint is mid-rotation: it holds the old and the new secret.
    let mut rotating = webhook(&crm);
    rotating
        .secrets
        .push(outboxd::config::Secret::new(OLD_SECRET));
    rotating.headers.insert("x-tenant".into(), "acme".into());
    config.webhooks.insert("crm".into(), rotating);
    config.routing.routes = vec![route(
        &["order.*"],
        &["rabbitmq", "webhook:billing", "webhook:crm"],
    )];
    let service = start(config).await;

    let producer = db.client().await;
    let tracking_id = enqueue(
        &producer,
        &event("order.created", 7).with_metadata(json!({ "traceparent": "00-abc-def-01" })),
    )
    .await
    .unwrap();
    let billed = billing
        .wait_until(Duration::from_secs(10), |h| !h.is_empty())
        .await;
    let crmed = crm
        .wait_until(Duration::from_secs(10), |h| !h.is_empty())
        .await;
    let consumed = broker.wait_for(1, Duration::from_secs(10)).await;
    wait_status(&db, tracking_id, "PUBLISHED", Duration::from_secs(10)).await;

    assert_eq!(consumed.len(), 1);
    assert_eq!(consumed[0].message_id, tracking_id.to_string());
    assert_eq!((billed.len(), crmed.len()), (1, 1));
    let hit = &billed[0];
    assert_eq!(hit.id(), tracking_id.to_string());
    assert_eq!(hit.headers["content-type"], "application/json");
    assert_eq!(hit.json["event_type"], "order.created");
    assert_eq!(hit.json["aggregate_id"], "7");
    // The event's position, the same to both kinds of consumer.
    let outbox_id = db.id_of(tracking_id).await;
    assert_eq!(hit.json["outbox_id"], outbox_id);
    assert!(
        consumed[0]
            .headers
            .contains(&("outbox_id".to_string(), format!("LongLongInt({outbox_id})"))),
        "{:?}",
        consumed[0].headers
    );
    assert_eq!(hit.json["payload"], json!({ "n": 7 }));
    assert_eq!(hit.json["metadata"]["traceparent"], "00-abc-def-01");
    assert_eq!(crmed[0].headers["x-tenant"], "acme");
    assert_eq!(
        crmed[0].headers["webhook-signature"].split(' ').count(),
        2,
        "one signature per secret"
    );

    let verified = verify_with_standardwebhooks(&[
        (SECRET, &billed[0]),
        (SECRET, &crmed[0]),
        (OLD_SECRET, &crmed[0]),
    ])
    .unwrap();
    assert_eq!(verified, "verified 3 request(s)");
    // And a tampered body is refused by the same verifier.
    let mut tampered = billed[0].clone();
    tampered.body = br#"{"tampered":true}"#.to_vec();
    assert!(verify_with_standardwebhooks(&[(SECRET, &tampered)]).is_err());

    let (_, _, _, delivered_to) = row(&db, tracking_id).await;
    assert_eq!(
        delivered_to,
        vec!["rabbitmq", "webhook:billing", "webhook:crm"]
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_failing_twice_gets_the_event_on_the_third_attempt_and_rabbitmq_only_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let flaky = Endpoint::start(|hit: &Hit| {
        if hit.earlier_tries < 2 {
            Reply::status(503).with_body("busy")
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut config = support::config(&db, &broker);
    fast_retries(&mut config);
    config.webhooks.insert("flaky".into(), webhook(&flaky));
    config.routing.routes = vec![route(&["*"], &["rabbitmq", "webhook:flaky"])];
    let service = start(config).await;

    let producer = db.client().await;
    let tracking_id = enqueue(&producer, &event("order.created", 1))
        .await
        .unwrap();
    wait_status(&db, tracking_id, "PUBLISHED", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let hits = flaky.hits();
    assert_eq!(hits.len(), 3, "503, 503, then 200");
    assert_eq!(
        broker.received().len(),
        1,
        "RabbitMQ acked the first time and was not sent it again"
    );
    let (_, attempts, last_error, delivered_to) = row(&db, tracking_id).await;
    assert_eq!(attempts, 3);
    assert_eq!(last_error, None);
    assert_eq!(delivered_to, vec!["rabbitmq", "webhook:flaky"]);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_earliest_next_attempt() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let limited = Endpoint::start(|hit: &Hit| {
        if hit.earlier_tries == 0 {
            Reply::status(429).with_header("retry-after", "2")
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut config = support::config(&db, &broker);
    fast_retries(&mut config); // the backoff alone would retry after ~100 ms
    config.webhooks.insert("limited".into(), webhook(&limited));
    config.routing.routes = vec![route(&["*"], &["webhook:limited"])];
    let service = start(config).await;

    let producer = db.client().await;
    let tracking_id = enqueue(&producer, &event("order.created", 1))
        .await
        .unwrap();
    wait_status(&db, tracking_id, "PUBLISHED", Duration::from_secs(15)).await;
    let hits = limited.hits();
    assert_eq!(hits.len(), 2);
    let waited = hits[1].at.duration_since(hits[0].at);
    println!("second attempt {waited:?} after the 429");
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After: 2 honoured, waited {waited:?}"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_dead_letter_after_one_attempt_with_status_and_body() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let strict = Endpoint::start(|hit: &Hit| match hit.event_type() {
        "order.invalid" => Reply::status(400).with_body("{\"error\":\"total must be positive\"}"),
        _ => Reply::status(404).with_body("no such hook"),
    })
    .await;
    let mut config = support::config(&db, &broker);
    fast_retries(&mut config);
    config.webhooks.insert("strict".into(), webhook(&strict));
    config.routing.routes = vec![route(&["*"], &["webhook:strict"])];
    let service = start(config).await;

    let producer = db.client().await;
    let invalid = enqueue(&producer, &event("order.invalid", 1))
        .await
        .unwrap();
    let missing = enqueue(&producer, &event("order.created", 2))
        .await
        .unwrap();
    wait_status(&db, invalid, "DEAD_LETTER", Duration::from_secs(10)).await;
    wait_status(&db, missing, "DEAD_LETTER", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(strict.hits().len(), 2, "one attempt each");

    let (_, attempts, error, _) = row(&db, invalid).await;
    assert_eq!(attempts, 1);
    let error = error.unwrap();
    assert!(
        error.contains("HTTP 400") && error.contains("total must be positive"),
        "{error}"
    );
    let (_, attempts, error, _) = row(&db, missing).await;
    assert_eq!(attempts, 1);
    let error = error.unwrap();
    assert!(
        error.contains("HTTP 404") && error.contains("no such hook"),
        "{error}"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_endpoint_opens_its_circuit_while_other_endpoints_keep_flowing() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let silent = Endpoint::start(|_| Reply::silent()).await;
    let healthy = Endpoint::start(|_| Reply::ok()).await;
    let mut config = support::config(&db, &broker);
    fast_retries(&mut config);
    config.retry.max_attempts = 3;
    let mut slow = webhook(&silent);
    slow.timeout = Duration::from_millis(300);
    slow.failures_to_open = 3;
    slow.cool_down = Duration::from_millis(500);
    config.webhooks.insert("silent".into(), slow);
    config.webhooks.insert("healthy".into(), webhook(&healthy));
    config.routing.routes = vec![
        route(&["slow.*"], &["webhook:silent"]),
        route(&["fast.*"], &["webhook:healthy"]),
    ];
    let service = start(config).await;
    let metrics = service.metrics().clone();
    let producer = db.client().await;

    let mut slow_ids = Vec::new();
    for n in 0..10 {
        slow_ids.push(enqueue(&producer, &event("slow.created", n)).await.unwrap());
    }
    // Healthy traffic keeps flowing while the silent endpoint times out.
    let started = Instant::now();
    let mut fast_ids = Vec::new();
    while started.elapsed() < Duration::from_secs(4) {
        fast_ids.push(
            enqueue(&producer, &event("fast.created", fast_ids.len()))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = healthy
        .wait_until(Duration::from_secs(5), |h| h.len() >= fast_ids.len())
        .await;
    assert_eq!(
        delivered.len(),
        fast_ids.len(),
        "every healthy event arrived"
    );
    let open = metrics
        .destination_circuit_open
        .with_label_values(&["webhook:silent"])
        .get();
    assert_eq!(open, 1, "the silent endpoint's circuit is open");
    let responses = |class: &str| {
        metrics
            .webhook_responses
            .with_label_values(&["webhook:silent", class])
            .get()
    };
    assert!(responses("timeout") >= 3, "timeouts are counted as such");
    assert_eq!(responses("2xx") + responses("5xx") + responses("error"), 0);
    assert_eq!(
        db.count("DEAD_LETTER").await,
        0,
        "an outage dead-letters nothing"
    );
    let charged: i64 = producer
        .query_one(
            "SELECT max(attempts)::int8 FROM outbox WHERE event_type = 'slow.created'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        charged < 3,
        "attempts stopped counting once the circuit opened ({charged})"
    );

    // The endpoint answers again: a probe closes the circuit and everything follows.
    silent.answer(|_| Reply::ok());
    for id in &slow_ids {
        wait_status(&db, *id, "PUBLISHED", Duration::from_secs(20)).await;
    }
    assert_eq!(
        metrics
            .destination_circuit_open
            .with_label_values(&["webhook:silent"])
            .get(),
        0
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_one_event_type_dead_letter_while_the_circuit_stays_closed() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let picky = Endpoint::start(|hit: &Hit| match hit.event_type() {
        "order.poison" => Reply::status(500).with_body("boom"),
        _ => Reply::ok(),
    })
    .await;
    let mut config = support::config(&db, &broker);
    fast_retries(&mut config);
    config.retry.max_attempts = 3;
    let mut hook = webhook(&picky);
    hook.failures_to_open = 3;
    config.webhooks.insert("picky".into(), hook);
    config.routing.routes = vec![route(&["*"], &["webhook:picky"])];
    let service = start(config).await;
    let producer = db.client().await;

    let poison = enqueue(&producer, &event("order.poison", 0)).await.unwrap();
    // Good events in between keep resetting the consecutive-failure count.
    let started = Instant::now();
    let mut good = 0;
    while row(&db, poison).await.0 != "DEAD_LETTER" {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "poison event not dead-lettered"
        );
        enqueue(&producer, &event("order.created", good))
            .await
            .unwrap();
        good += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let (_, attempts, error, _) = row(&db, poison).await;
    assert_eq!(attempts, 3);
    assert!(error.unwrap().contains("HTTP 500: boom"));
    assert_eq!(
        service
            .metrics()
            .destination_circuit_open
            .with_label_values(&["webhook:picky"])
            .get(),
        0,
        "successes in between kept the circuit closed"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_events_follow_the_policy_and_are_counted() {
    for policy in [Unrouted::DeadLetter, Unrouted::Skip] {
        let db = TestDb::new().await;
        let broker = TestBroker::new(Some("#")).await;
        let mut config = support::config(&db, &broker);
        config.routing.routes = vec![route(&["order.*"], &["rabbitmq"])];
        config.routing.unrouted = policy;
        let service = start(config).await;
        let producer = db.client().await;
        let routed = enqueue(&producer, &event("order.created", 1))
            .await
            .unwrap();
        let unrouted = enqueue(&producer, &event("user.created", 2)).await.unwrap();
        wait_status(&db, routed, "PUBLISHED", Duration::from_secs(10)).await;
        let expected = match policy {
            Unrouted::DeadLetter => "DEAD_LETTER",
            Unrouted::Skip => "PUBLISHED",
        };
        wait_status(&db, unrouted, expected, Duration::from_secs(10)).await;
        let (_, _, error, delivered_to) = row(&db, unrouted).await;
        assert!(delivered_to.is_empty(), "{policy:?}: sent nowhere");
        if policy == Unrouted::DeadLetter {
            let error = error.unwrap();
            assert!(
                error.contains("unrouted") && error.contains("user.created"),
                "{error}"
            );
        }
        assert_eq!(service.metrics().unrouted.get(), 1, "{policy:?} is counted");
        let consumed = broker.wait_for(1, Duration::from_secs(5)).await;
        assert_eq!(consumed.len(), 1);
        assert_eq!(consumed[0].message_id, routed.to_string());
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_down_for_fifteen_cool_downs_gets_few_probes_and_everything_afterwards() {
    // 15 cool-downs: probes back off 0.8, 1.6, 3.2, then every 4.8 s (6 x the cool-down).
    const COOL_DOWN: Duration = Duration::from_millis(800);
    const DOWN_FOR: Duration = Duration::from_secs(12);
    const WINDOW: u64 = 2;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let down = Endpoint::start(|_| Reply::status(503).with_body("maintenance")).await;
    let healthy = Endpoint::start(|_| Reply::ok()).await;
    let mut config = support::config(&db, &broker);
    fast_retries(&mut config);
    config.retry.max_attempts = 3;
    let mut hook = webhook(&down);
    hook.failures_to_open = 3;
    hook.cool_down = COOL_DOWN;
    config.webhooks.insert("down".into(), hook);
    config.webhooks.insert("healthy".into(), webhook(&healthy));
    config.routing.routes = vec![
        route(&["order.*"], &["webhook:down"]),
        route(&["audit.*"], &["webhook:healthy"]),
    ];
    let service = start(config).await;
    let metrics = service.metrics().clone();
    let producer = db.client().await;

    let mut orders = Vec::new();
    for n in 0..20 {
        orders.push(
            enqueue(&producer, &event("order.created", n))
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics
        .destination_circuit_open
        .with_label_values(&["webhook:down"])
        .get()
        != 1
    {
        assert!(Instant::now() < deadline, "the circuit did not open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened_at = Instant::now();
    let before_open = down.hits().len();
    // The healthy endpoint keeps receiving throughout the outage.
    let mut audits = 0;
    let mut seconds_with_delivery = std::collections::BTreeSet::new();
    while opened_at.elapsed() < DOWN_FOR {
        enqueue(&producer, &event("audit.logged", audits))
            .await
            .unwrap();
        audits += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        for hit in healthy.hits() {
            if hit.at >= opened_at {
                seconds_with_delivery.insert(hit.at.duration_since(opened_at).as_secs() / WINDOW);
            }
        }
    }
    let probes = down.hits().len() - before_open;
    println!("{before_open} requests before the circuit opened, {probes} probes in {DOWN_FOR:?}");
    assert!(probes <= 6, "{probes} probes while down");
    assert_eq!(
        seconds_with_delivery.len() as u64,
        DOWN_FOR.as_secs() / WINDOW,
        "healthy deliveries in every {WINDOW} s of the outage"
    );
    assert_eq!(
        db.count("DEAD_LETTER").await,
        0,
        "the outage dead-lettered nothing"
    );

    down.answer(|_| Reply::ok());
    for id in &orders {
        wait_status(&db, *id, "PUBLISHED", Duration::from_secs(40)).await;
    }
    let delivered = healthy
        .wait_until(Duration::from_secs(5), |h| h.len() >= audits)
        .await;
    assert_eq!(delivered.len(), audits);
    service.stop().await;
}
