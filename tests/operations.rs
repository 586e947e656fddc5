//! What operators rely on: `/metrics` that promtool accepts and whose counters move by
//! the right amounts, gauges true across instances, `/readyz` naming what is down, alert
//! rules and the dashboard naming only exported metrics, and dead letters that are
//! redriven only with a reason, on the record, through an API that needs the token.

mod support;

use support::eventually;

use outboxd::config::{RouteConfig, WebhookConfig};
use outboxd::relay::Sweep;
use outboxd::{NewEvent, enqueue};
use serde_json::json;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};
use support::webhook::{Endpoint, Hit, Reply};
use support::{TestBroker, TestDb, http_get, http_request, promtool, start};

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The value of one sample line of a Prometheus exposition, e.g.
/// `outbox_events_published_total{destination="rabbitmq"}`.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{exposition}"))
}

/// Metric names in a PromQL expression or a rules file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            current.push(c);
            continue;
        }
        if current.starts_with("outbox_") || current.starts_with("process_") {
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| current.strip_suffix(suffix))
                .unwrap_or(&current)
                .to_string();
            names.insert(name);
        }
        current.clear();
    }
    names
}

fn exported_names() -> BTreeSet<String> {
    outboxd::metrics::Metrics::new()
        .names()
        .iter()
        .cloned()
        .collect()
}

fn docs(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_counters_move_by_the_right_amounts() {
    const DELIVERED: usize = 5;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    // retry once (503), then fine; 400 for "order.invalid"
    let hook = Endpoint::start(|hit: &Hit| match (hit.event_type(), hit.earlier_tries) {
        ("order.invalid", _) => Reply::status(400).with_body("invalid"),
        ("order.flaky", 0) => Reply::status(503),
        _ => Reply::ok(),
    })
    .await;
    // An endpoint nobody listens on: its circuit opens and its events are deferred.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = support::config(&db, &broker);
    config.retry.base_delay = Duration::from_millis(100);
    config.relay.lease = Duration::from_secs(2);
    config.relay.safety_sweep_interval = Duration::from_secs(1);
    config.relay.safety_sweep_grace = Duration::from_millis(300);
    config.http.gauge_refresh_interval = Duration::from_millis(200);
    config
        .webhooks
        .insert("hook".into(), WebhookConfig::new(hook.url(), SECRET));
    let mut unreachable = WebhookConfig::new(format!("http://{gone}/"), SECRET);
    unreachable.failures_to_open = 1;
    config.webhooks.insert("gone".into(), unreachable);
    config.routing.routes = vec![
        RouteConfig {
            event_types: vec!["order.created".into()],
            destinations: vec!["rabbitmq".into()],
            ordering: None,
        },
        RouteConfig {
            event_types: vec!["order.invalid".into(), "order.flaky".into()],
            destinations: vec!["webhook:hook".into()],
            ordering: None,
        },
        RouteConfig {
            event_types: vec!["order.lost".into()],
            destinations: vec!["webhook:gone".into()],
            ordering: None,
        },
    ];
    // A crashed worker's claim, for the reaper.
    let producer = db.client().await;
    enqueue(
        &producer,
        &NewEvent::new("order", "0", "order.created", json!({})),
    )
    .await
    .unwrap();
    let worker = support::store(&config).await;
    assert_eq!(
        worker
            .claim_due(
                10,
                Duration::ZERO,
                Duration::from_secs(1),
                &outboxd::store::ClaimFilter::ALL
            )
            .await
            .unwrap()
            .events
            .len(),
        1
    );

    let service = start(config).await;
    support::wait_started(&service).await;
    let metrics = service.metrics().clone();
    for n in 1..DELIVERED {
        enqueue(
            &producer,
            &NewEvent::new("order", n.to_string(), "order.created", json!({})),
        )
        .await
        .unwrap();
    }
    enqueue(
        &producer,
        &NewEvent::new("order", "i", "order.invalid", json!({})),
    )
    .await
    .unwrap();
    enqueue(
        &producer,
        &NewEvent::new("order", "f", "order.flaky", json!({})),
    )
    .await
    .unwrap();
    enqueue(
        &producer,
        &NewEvent::new("order", "l", "order.lost", json!({})),
    )
    .await
    .unwrap();
    enqueue(
        &producer,
        &NewEvent::new("user", "u", "user.created", json!({})),
    )
    .await
    .unwrap();
    // The rest settles first: a sweep of another kind (one that follows a destination
    // freeing a batch slot claims every due event) must not take the unannounced one
    // before the safety sweep does.
    let announced_settled = eventually(Duration::from_secs(20), async || {
        metrics.published.with_label_values(&["rabbitmq"]).get() == DELIVERED as u64
            && metrics.published.with_label_values(&["webhook:hook"]).get() == 1
            && metrics.events_dead_letter.get() == 2
    })
    .await;
    assert!(announced_settled, "the announced events did not settle");
    producer
        .batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    enqueue(
        &producer,
        &NewEvent::new("order", "s", "order.flaky", json!({})),
    )
    .await
    .unwrap();
    producer
        .batch_execute("SET session_replication_role = origin")
        .await
        .unwrap();

    let settled = eventually(Duration::from_secs(20), async || {
        let published = metrics.published.with_label_values(&["rabbitmq"]).get();
        let deferred = metrics
            .delivery_failures
            .with_label_values(&["webhook:gone", "deferred"])
            .get();
        published == DELIVERED as u64
            && metrics.published.with_label_values(&["webhook:hook"]).get() == 2
            && deferred > 0
            && metrics.recovered(Sweep::Safety) == 1
            && metrics.events_dead_letter.get() == 2
    })
    .await;
    let (status, exposition) = http_get(service.http_addr().unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(settled, "traffic did not settle:\n{exposition}");

    println!("{exposition}");
    let s = |series: &str| sample(&exposition, series);
    assert_eq!(
        s("outbox_events_published_total{destination=\"rabbitmq\"}"),
        DELIVERED as f64
    );
    assert_eq!(
        s("outbox_events_published_total{destination=\"webhook:hook\"}"),
        2.0
    );
    assert_eq!(
        s("outbox_delivery_failures_total{destination=\"webhook:hook\",kind=\"retry\"}"),
        2.0
    );
    assert_eq!(
        s("outbox_delivery_failures_total{destination=\"webhook:hook\",kind=\"rejected\"}"),
        1.0
    );
    assert!(
        s("outbox_delivery_failures_total{destination=\"webhook:gone\",kind=\"retry\"}") >= 1.0
    );
    assert!(
        s("outbox_delivery_failures_total{destination=\"webhook:gone\",kind=\"deferred\"}") >= 1.0
    );
    assert_eq!(
        s("outbox_destination_circuit_open{destination=\"webhook:gone\"}"),
        1.0
    );
    // Webhook answers by class: two 503s and two 200s (order.flaky, twice), one 400; the
    // endpoint nobody listens on answers nothing.
    for (class, expected) in [("2xx", 2.0), ("3xx", 0.0), ("4xx", 1.0), ("5xx", 2.0)] {
        assert_eq!(
            s(&format!(
                "outbox_webhook_responses_total{{class=\"{class}\",destination=\"webhook:hook\"}}"
            )),
            expected,
            "webhook:hook {class}"
        );
    }
    assert!(
        s("outbox_webhook_responses_total{class=\"error\",destination=\"webhook:gone\"}") >= 1.0
    );
    assert_eq!(
        s("outbox_webhook_responses_total{class=\"2xx\",destination=\"webhook:gone\"}"),
        0.0
    );
    assert!(
        !exposition
            .contains("outbox_webhook_responses_total{class=\"2xx\",destination=\"rabbitmq\"}"),
        "webhook series only for webhooks"
    );
    assert_eq!(s("outbox_events_reaped_total"), 1.0);
    assert_eq!(s("outbox_sweep_recovered_total{sweep=\"safety\"}"), 1.0);
    assert_eq!(s("outbox_events_unrouted_total"), 1.0);
    assert_eq!(
        s("outbox_events_dead_letter"),
        2.0,
        "the 400 and the unrouted one"
    );
    assert!(s("outbox_events_pending") >= 1.0, "the deferred one");
    assert!(s("outbox_oldest_pending_age_seconds") > 0.0);
    assert_eq!(
        s("outbox_delivery_latency_seconds_count"),
        (DELIVERED + 2) as f64
    );
    // Per destination: one observation per acknowledgement, as published counts them.
    for destination in ["rabbitmq", "webhook:hook"] {
        assert_eq!(
            s(&format!(
                "outbox_destination_latency_seconds_count{{destination=\"{destination}\"}}"
            )),
            s(&format!(
                "outbox_events_published_total{{destination=\"{destination}\"}}"
            )),
            "{destination}"
        );
    }
    assert_eq!(s("outbox_listener_connected"), 1.0);
    assert!(s("outbox_notifications_total") >= 8.0);
    // Cluster-wide (every database's listeners share one queue): it must equal what the
    // database reports, whatever other databases do; never a constant.
    let reported = async || -> f64 {
        producer
            .query_one("SELECT pg_notification_queue_usage()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let same_as_database = eventually(Duration::from_secs(10), async || {
        let before = reported().await;
        // Two refreshes (every 200 ms) inside the window.
        tokio::time::sleep(Duration::from_millis(450)).await;
        let gauge = metrics.notification_queue_usage.get();
        let after = reported().await;
        before == after && gauge == after
    })
    .await;
    assert!(
        same_as_database,
        "outbox_notification_queue_usage_ratio = {} never matched pg_notification_queue_usage() = {}",
        metrics.notification_queue_usage.get(),
        reported().await
    );
    assert_eq!(s("outbox_default_partition_rows"), 0.0);
    assert!(s("process_resident_memory_bytes") > 0.0);
    assert!(
        exposition.contains(&format!(
            "outbox_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "the build-info gauge names the version"
    );
    // One series per replication slot: none while the cluster has no slot (tests/bloat.rs
    // makes one on a cluster of its own).
    let per_slot = [
        "outbox_replication_slot_xmin_age_transactions",
        "outbox_replication_slot_retained_wal_bytes",
    ];
    for name in exported_names() {
        assert!(
            exposition.contains(&format!("# TYPE {name} ")) || per_slot.contains(&name.as_str()),
            "{name} is exported"
        );
    }

    let dir = std::env::temp_dir().join(format!("outboxd-metrics-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics.txt");
    std::fs::write(&path, &exposition).unwrap();
    let checked = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    service.stop().await;
}

#[test]
fn alert_rules_pass_promtool_and_name_only_exported_metrics() {
    let docs_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = Command::new(promtool())
            .args(args)
            .current_dir(&docs_dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rules = docs("alerts.yml");
    let named = metric_names(&rules);
    assert!(named.len() >= 8, "{named:?}");
    let exported = exported_names();
    let unknown: Vec<&String> = named.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "alerts name metrics /metrics does not export: {unknown:?}"
    );
    // Every alert points at a runbook that exists.
    let operations = docs("operations.md").to_lowercase();
    for line in rules.lines().filter(|l| l.contains("runbook_url")) {
        let anchor = line
            .rsplit('#')
            .next()
            .unwrap()
            .trim()
            .trim_matches(['"', '\'']);
        let heading_words = anchor.replace('-', " ");
        assert!(
            operations.lines().any(|l| l.starts_with('#') && {
                let text: String = l
                    .trim_start_matches('#')
                    .trim()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                    .collect();
                text.replace('-', " ") == heading_words
            }),
            "no heading for runbook anchor {anchor}"
        );
    }
}

#[test]
fn grafana_dashboard_references_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&docs("grafana-dashboard.json")).unwrap();
    let mut expressions = Vec::new();
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    if key == "expr"
                        && let Some(expr) = value.as_str()
                    {
                        out.push(expr.to_string());
                    }
                    walk(value, out);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut expressions);
    assert!(expressions.len() >= 8, "{expressions:?}");
    let exported = exported_names();
    for expr in &expressions {
        let named = metric_names(expr);
        assert!(!named.is_empty(), "{expr} names no outbox metric");
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(unknown.is_empty(), "{expr}: {unknown:?} not exported");
    }
}

/// A dashboard panel or an `absent()` alert must not show "no data" on a healthy system:
/// every series of a known label set is exported, at zero, before anything happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_known_series_is_exported_at_zero_before_anything_happens() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let hook = Endpoint::start(|_: &Hit| Reply::ok()).await;
    let mut config = support::config(&db, &broker);
    config
        .webhooks
        .insert("hook".into(), WebhookConfig::new(hook.url(), SECRET));
    config.routing.routes = vec![RouteConfig {
        event_types: vec!["*".into()],
        destinations: vec!["rabbitmq".into(), "webhook:hook".into()],
        ordering: None,
    }];
    let service = start(config).await;
    let (status, exposition) = http_get(service.http_addr().unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let s = |series: &str| sample(&exposition, series);
    for destination in ["rabbitmq", "webhook:hook"] {
        assert_eq!(
            s(&format!(
                "outbox_events_published_total{{destination=\"{destination}\"}}"
            )),
            0.0
        );
        for kind in ["deferred", "rejected", "retry"] {
            assert_eq!(
                s(&format!(
                    "outbox_delivery_failures_total{{destination=\"{destination}\",kind=\"{kind}\"}}"
                )),
                0.0,
                "{destination} {kind}"
            );
        }
        assert_eq!(
            s(&format!(
                "outbox_destination_circuit_open{{destination=\"{destination}\"}}"
            )),
            0.0
        );
    }
    for class in ["2xx", "3xx", "4xx", "5xx", "timeout", "error"] {
        assert_eq!(
            s(&format!(
                "outbox_webhook_responses_total{{class=\"{class}\",destination=\"webhook:hook\"}}"
            )),
            0.0,
            "{class}"
        );
    }
    for sweep in ["reconnect", "safety"] {
        s(&format!(
            "outbox_sweep_recovered_total{{sweep=\"{sweep}\"}}"
        ));
    }
    for to in ["drain", "notify"] {
        assert_eq!(
            s(&format!("outbox_high_load_switches_total{{to=\"{to}\"}}")),
            0.0
        );
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_listener_while_it_is_down() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let service = start(support::config(&db, &broker)).await;
    let addr = service.http_addr().unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || http_get(addr, "/readyz")
            .await
            .0
            == 200)
        .await,
        "ready at start: {:?}",
        http_get(addr, "/readyz").await
    );

    assert_eq!(db.cut_listener().await, 1);
    let mut not_ready = (0, String::new());
    assert!(
        eventually(Duration::from_secs(10), async || {
            not_ready = http_get(addr, "/readyz").await;
            not_ready.0 == 503
        })
        .await
    );
    let body: serde_json::Value = serde_json::from_str(&not_ready.1).unwrap();
    assert_eq!(body["down"][0]["part"], "listener", "{body}");

    db.allow_connections().await;
    assert!(
        eventually(Duration::from_secs(10), async || http_get(addr, "/readyz")
            .await
            .0
            == 200)
        .await
    );
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_gauges_agree_across_instances_and_count_events_another_holds() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = support::config(&db, &broker);
    config.http.gauge_refresh_interval = Duration::from_millis(200);
    let producer = db.client().await;
    // Held by another instance (a long lease), scheduled for later, and dead.
    producer
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at, next_attempt_at)
             VALUES ('order', '1', 'order.created', '{}', now() - interval '10 minutes', now() + interval '1 hour'),
                    ('order', '2', 'order.created', '{}', now(), now() + interval '1 hour');
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, last_error)
             VALUES ('order', '3', 'order.created', '{}', 'DEAD_LETTER', 'x');",
        )
        .await
        .unwrap();
    enqueue(
        &producer,
        &NewEvent::new("order", "4", "order.created", json!({})),
    )
    .await
    .unwrap();
    let other = support::store(&config).await;
    let held = other
        .claim_due(
            10,
            Duration::ZERO,
            Duration::from_secs(600),
            &outboxd::store::ClaimFilter::ALL,
        )
        .await
        .unwrap();
    assert_eq!(held.events.len(), 1, "the other instance holds one event");

    let first = start(config.clone()).await;
    let second = start(config).await;
    for service in [&first, &second] {
        let m = service.metrics().clone();
        assert!(
            eventually(Duration::from_secs(5), async || m.events_pending.get() == 3).await,
            "pending {}",
            m.events_pending.get()
        );
        assert_eq!(m.events_dead_letter.get(), 1);
        let oldest = m.oldest_pending_age.get();
        assert!(
            (599.0..700.0).contains(&oldest),
            "oldest pending age {oldest}"
        );
    }
    first.stop().await;
    second.stop().await;
}

/// `outboxd` with `args` against `database_url`.
fn outboxd_cli(database_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_found_by_tracking_id_and_by_aggregate_through_the_cli_and_the_api() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = support::config(&db, &broker);
    config.http.admin_token = outboxd::config::Secret::new(TOKEN);
    let service = start(config).await;
    let addr = service.http_addr().unwrap();
    let producer = db.client().await;
    // Five events of order 42 (oldest first), one of tenant "eu:7" (an id with a colon).
    let mut order = Vec::new();
    for n in 0..5 {
        let event = NewEvent::new("order", "42", "order.updated", json!({ "n": n }));
        order.push(enqueue(&producer, &event).await.unwrap());
    }
    let tenant = enqueue(
        &producer,
        &NewEvent::new("tenant", "eu:7", "tenant.created", json!({})),
    )
    .await
    .unwrap();
    assert_eq!(broker.wait_for(6, Duration::from_secs(10)).await.len(), 6);
    assert!(
        eventually(Duration::from_secs(10), async || {
            let row = producer
                .query_one(
                    "SELECT count(*) FROM outbox WHERE status = 'PUBLISHED'",
                    &[],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) == 6
        })
        .await,
        "all six published"
    );
    let mut ids = Vec::new();
    for tracking_id in &order {
        ids.push(db.id_of(*tracking_id).await);
    }

    // One event by the tracking_id consumers see, and by its id.
    let shown = outboxd_cli(
        &db.url,
        &["events", "show", &order[2].to_string(), "--json"],
    );
    assert!(shown.status.success(), "{shown:?}");
    let event: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(event["id"], ids[2]);
    assert_eq!(event["status"], "PUBLISHED");
    assert_eq!(event["payload"], json!({ "n": 2 }));
    assert_eq!(event["tracking_id"], order[2].to_string());
    let text = outboxd_cli(&db.url, &["events", "show", &ids[2].to_string()]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains(&order[2].to_string()) && text.contains("order:42"),
        "{text}"
    );
    // A tracking_id recorded before its id was (migration 0009) is found all the same.
    producer
        .execute(
            "UPDATE outbox_tracking_ids SET id = NULL WHERE tracking_id = $1",
            &[&order[3]],
        )
        .await
        .unwrap();
    let shown = outboxd_cli(
        &db.url,
        &["events", "show", &order[3].to_string(), "--json"],
    );
    let event: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(event["id"], ids[3], "{shown:?}");
    // Unknown: exit 1, naming what was looked for.
    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = outboxd_cli(&db.url, &["events", "show", &unknown]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains(&format!("no event with tracking_id {unknown}")),
        "{said}"
    );
    // Malformed arguments: exit 2, said before any connection is tried.
    let nowhere = "postgres://postgres@127.0.0.1:1/nowhere?connect_timeout=1";
    for (args, words) in [
        (vec!["events", "show", "order-42"], "tracking_id"),
        (vec!["events", "list", "--aggregate", "order"], "TYPE:ID"),
        (vec!["events", "list", "--aggregate", ":42"], "TYPE:ID"),
    ] {
        let refused = outboxd_cli(nowhere, &args);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains(words), "{args:?}: {said}");
    }

    // An aggregate's history, newest first, two per page, to the end.
    let mut listed = Vec::new();
    let mut before: Option<i64> = None;
    for _ in 0..5 {
        let mut args = vec!["events", "list", "--aggregate", "order:42", "--limit", "2"];
        let cursor = before.map(|b| b.to_string());
        if let Some(cursor) = &cursor {
            args.extend(["--before-id", cursor.as_str()]);
        }
        let page = outboxd_cli(&db.url, &[args.as_slice(), &["--json"]].concat());
        assert!(page.status.success(), "{page:?}");
        let page: serde_json::Value = serde_json::from_slice(&page.stdout).unwrap();
        for item in page["items"].as_array().unwrap() {
            listed.push(item["id"].as_i64().unwrap());
            assert_eq!(item["status"], "PUBLISHED");
        }
        // The text form prints the next page's command, with the same page size.
        let text = outboxd_cli(&db.url, &args);
        let text = String::from_utf8_lossy(&text.stdout).to_string();
        match page["next_before_id"].as_i64() {
            Some(next) => {
                assert!(
                    text.contains(&format!(
                        "more: outboxd events list --aggregate 'order:42' --limit 2 --before-id {next}"
                    )),
                    "{text}"
                );
                before = Some(next);
            }
            None => {
                assert!(!text.contains("more:"), "the last page: {text}");
                break;
            }
        }
    }
    let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
    assert_eq!(listed, newest_first);
    let page = outboxd_cli(
        &db.url,
        &["events", "list", "--aggregate", "tenant:eu:7", "--json"],
    );
    let page: serde_json::Value = serde_json::from_slice(&page.stdout).unwrap();
    assert_eq!(page["aggregate_id"], "eu:7");
    assert_eq!(page["items"][0]["tracking_id"], tenant.to_string());
    assert_eq!(page["items"].as_array().unwrap().len(), 1);

    // The same through the API, behind the token.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let path = format!("/api/events/{}", order[1]);
    assert_eq!(http_get(addr, &path).await.0, 401);
    let (status, body) = http_request(addr, "GET", &path, &auth, None).await;
    assert_eq!(status, 200, "{body}");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["id"], ids[1]);
    let (_, body) =
        http_request(addr, "GET", &format!("/api/events/{}", ids[4]), &auth, None).await;
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["tracking_id"], order[4].to_string());
    let (status, body) = http_request(
        addr,
        "GET",
        "/api/events?aggregate=order:42&limit=3",
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let first: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(first, newest_first[..3]);
    assert_eq!(page["next_before_id"], newest_first[2]);
    let (_, body) = http_request(
        addr,
        "GET",
        "/api/events?aggregate_type=tenant&aggregate_id=eu:7",
        &auth,
        None,
    )
    .await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        page["items"][0]["tracking_id"],
        tenant.to_string(),
        "{body}"
    );
    for (path, expected) in [
        ("/api/events/order-42".to_string(), 400),
        (format!("/api/events/{unknown}"), 404),
        ("/api/events".to_string(), 400),
        ("/api/events?aggregate=order".to_string(), 400),
        ("/api/events?aggregate=order:42&limit=0".to_string(), 400),
        (
            "/api/events?aggregate=order:42&before_id=x".to_string(),
            400,
        ),
        // PostgreSQL text cannot hold NUL: a request naming one is the caller's error.
        ("/api/events?aggregate=order:4%002".to_string(), 400),
        (
            "/api/events?aggregate_type=or%00der&aggregate_id=42".to_string(),
            400,
        ),
    ] {
        let (status, text) = http_request(addr, "GET", &path, &auth, None).await;
        assert_eq!(status, expected, "{path}: {text}");
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path} answered no JSON: {text}"));
        assert!(parsed["error"].is_string(), "{path}: {text}");
    }

    // The aggregate index is on every partition, so the parent's is valid.
    let valid: bool = producer
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'outbox_aggregate_idx'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid, "outbox_aggregate_idx is built on every partition");

    // A database that cannot answer: 503, and the error says what PostgreSQL said.
    producer
        .batch_execute("ALTER TABLE outbox_tracking_ids RENAME TO outbox_tracking_ids_gone")
        .await
        .unwrap();
    let (status, body) = http_request(addr, "GET", &path, &auth, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("does not exist") && body.contains("42P01"),
        "the database's own words: {body}"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_only_with_a_reason_on_the_record() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let hook = Endpoint::start(|_| Reply::status(422).with_body("unknown customer")).await;
    let mut config = support::config(&db, &broker);
    config.http.admin_token = outboxd::config::Secret::new(TOKEN);
    config
        .webhooks
        .insert("crm".into(), WebhookConfig::new(hook.url(), SECRET));
    config.routing.routes = vec![RouteConfig {
        event_types: vec!["*".into()],
        destinations: vec!["rabbitmq".into(), "webhook:crm".into()],
        ordering: None,
    }];
    let service = start(config).await;
    let addr = service.http_addr().unwrap();
    let producer = db.client().await;
    let mut ids = Vec::new();
    for n in 0..2 {
        let tracking_id = enqueue(
            &producer,
            &NewEvent::new("order", n.to_string(), "order.created", json!({})),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = producer
                .query_one(
                    "SELECT id, status FROM outbox WHERE tracking_id = $1",
                    &[&tracking_id],
                )
                .await
                .unwrap();
            if row.get::<_, String>(1) == "DEAD_LETTER" {
                ids.push(row.get::<_, i64>(0));
                break;
            }
            assert!(Instant::now() < deadline, "not dead-lettered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        broker.wait_for(2, Duration::from_secs(5)).await.len(),
        2,
        "RabbitMQ acked both"
    );

    // The API needs the token.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    assert_eq!(http_get(addr, "/api/dead-letters").await.0, 401);
    let wrong = [("Authorization", "Bearer not-the-token-at-all-00000")];
    assert_eq!(
        http_request(addr, "GET", "/api/dead-letters", &wrong, None)
            .await
            .0,
        401
    );
    let redrive_body =
        json!({ "ids": [ids[0]], "reason": "crm knows the customer now", "by": "alice" })
            .to_string();
    assert_eq!(
        http_request(
            addr,
            "POST",
            "/api/dead-letters/redrive",
            &[],
            Some(&redrive_body)
        )
        .await
        .0,
        401
    );
    let (status, listing) = http_request(
        addr,
        "GET",
        "/api/dead-letters?event_type=order.*&limit=1",
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200, "{listing}");
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["items"].as_array().unwrap().len(), 1);
    assert_eq!(listing["items"][0]["id"], ids[1], "newest first");
    assert!(
        listing["items"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 422: unknown customer")
    );
    let next = listing["next_before_id"].as_i64().unwrap();
    let (_, page) = http_request(
        addr,
        "GET",
        &format!("/api/dead-letters?before_id={next}"),
        &auth,
        None,
    )
    .await;
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["items"][0]["id"], ids[0], "keyset pagination");

    // Without a reason: refused, by the API and by the CLI.
    let no_reason = json!({ "ids": [ids[0]], "reason": "  " }).to_string();
    let (status, body) = http_request(
        addr,
        "POST",
        "/api/dead-letters/redrive",
        &auth,
        Some(&no_reason),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("needs a reason"), "{body}");
    assert!(
        body.contains("\\\"reason\\\" is required") && !body.contains("--reason"),
        "the API's words, not the CLI's: {body}"
    );
    // Every API error is JSON, also what axum would answer in plain text.
    for (method, path, body, expected) in [
        ("GET", "/api/dead-letters/abc", None, 400),
        ("GET", "/api/dead-letters?limit=many", None, 400),
        ("GET", "/api/dead-letters?limit=0", None, 400),
        ("GET", "/api/dead-letters?event_type=order.%00", None, 400),
        ("GET", "/api/no-such-thing", None, 404),
        ("POST", "/api/dead-letters/redrive", Some("{not json"), 400),
        (
            "POST",
            "/api/dead-letters/redrive",
            Some(r#"{"ids": [1], "reason": "fixed\u0000", "by": "alice"}"#),
            400,
        ),
    ] {
        let (status, text) = http_request(addr, method, path, &auth, body).await;
        assert_eq!(status, expected, "{method} {path}: {text}");
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path} answered no JSON: {text}"));
        assert!(parsed["error"].is_string(), "{method} {path}: {text}");
    }
    let cli = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "dead-letters",
            "redrive",
            "--id",
            &ids[1].to_string(),
            "--reason",
            "",
        ])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(cli.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&cli.stderr).contains("needs a reason"));
    assert_eq!(db.count("DEAD_LETTER").await, 2, "nothing moved");

    // The endpoint is fixed; redrive with a reason: delivered, to the webhook only.
    hook.answer(|_| Reply::ok());
    let (status, body) = http_request(
        addr,
        "POST",
        "/api/dead-letters/redrive",
        &auth,
        Some(&redrive_body),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["redriven"],
        json!([ids[0]])
    );
    let cli = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "dead-letters",
            "redrive",
            "--id",
            &ids[1].to_string(),
            "--reason",
            "crm fixed",
            "--by",
            "bob",
        ])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(db.wait_settled(Duration::from_secs(10)).await);
    assert_eq!(db.count("PUBLISHED").await, 2);
    assert_eq!(
        hook.hits().iter().filter(|h| h.earlier_tries > 0).count(),
        2,
        "each sent once more"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        broker.received().len(),
        2,
        "RabbitMQ had acked: not sent again"
    );

    let (status, shown) = http_request(
        addr,
        "GET",
        &format!("/api/dead-letters/{}", ids[0]),
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["status"], "PUBLISHED");
    assert_eq!(shown["redrives"][0]["reason"], "crm knows the customer now");
    assert_eq!(shown["redrives"][0]["by"], "alice");
    assert!(
        shown["redrives"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 422")
    );
    let cli = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["dead-letters", "show", &ids[1].to_string()])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains("by bob: crm fixed"), "{text}");
    service.stop().await;
}

/// `outboxd alert-rules --runbook-base URL` prints the shipped rules with every
/// runbook_url absolute under that base; promtool accepts the result; a base that is not
/// an absolute URL is refused.
#[test]
fn alert_rules_point_their_runbooks_at_the_given_base() {
    let base = "https://wiki.example.com/outboxd/docs";
    let printed = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["alert-rules", "--runbook-base", &format!("{base}/")])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let rules = String::from_utf8(printed.stdout).unwrap();
    let urls: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert!(urls.len() >= 8, "{rules}");
    for url in &urls {
        assert!(
            url.trim_matches('"')
                .starts_with(&format!("{base}/operations.md#")),
            "{url}"
        );
    }
    let dir = std::env::temp_dir().join(format!("outboxd-rules-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outboxd.yml");
    std::fs::write(&path, &rules).unwrap();
    let checked = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["alert-rules", "--runbook-base", "wiki/outboxd"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
}
