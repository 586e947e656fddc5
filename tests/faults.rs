//! Faults, with the real `outboxd` binary: each scenario commits events while it
//! injects one fault, then audits that every committed event was consumed (none lost),
//! every row ended PUBLISHED, and reports the duplicates at-least-once allowed.

mod support;

use std::time::{Duration, Instant};
use support::fleet::{Instance, Producer, audit, duplicated};
use support::proxy::CountingProxy;
use support::{TestBroker, TestDb};

const EVENTS: usize = 2000;

/// A broker 50 ms away: every batch is in flight long enough for a fault to hit it.
async fn slow_broker() -> (CountingProxy, String) {
    let latency = Duration::from_millis(50);
    let proxy = CountingProxy::start_with_latency("127.0.0.1:5672".parse().unwrap(), latency).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    (proxy, url)
}

async fn wait_consumed(broker: &TestBroker, at_least: usize) {
    broker.wait_for(at_least, Duration::from_secs(30)).await;
    assert!(
        broker.received().len() >= at_least,
        "load did not get going"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_then_restart_loses_nothing() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let (_proxy, broker_url) = slow_broker().await;
    let slow = [("OUTBOXD_RABBITMQ_URL", broker_url.as_str())];
    let mut first = Instance::start(&db.url, &broker, &slow);
    first.wait_running().await;
    let producer = Producer::start(&db.url, EVENTS, 10).await;
    wait_consumed(&broker, 500).await;
    first.kill_9();
    let fault_at = Instant::now();
    let orphaned = db.count("PROCESSING").await;
    println!("{orphaned} event(s) were in flight when the process died");
    assert!(orphaned > 0, "the fault hit mid-delivery");
    let second = Instance::start(&db.url, &broker, &slow);
    second.wait_running().await;
    let committed = producer.finish().await;

    let audit = audit(
        &db.url,
        &broker,
        &committed,
        fault_at,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audit.committed, EVENTS);
    assert_eq!(audit.lost, 0, "{audit:?}\n{}", second.log());
    assert_eq!(db.count("PUBLISHED").await, EVENTS as i64);
    // Only events in flight when the process died may repeat, and those were claimed twice.
    let client = db.client().await;
    for tracking_id in duplicated(&broker) {
        let attempts: i32 = client
            .query_one(
                "SELECT attempts FROM outbox WHERE tracking_id = $1",
                &[&tracking_id],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            attempts >= 2,
            "{tracking_id} was delivered twice after {attempts} attempt(s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_instances_killed_the_others_take_over() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let (_proxy, broker_url) = slow_broker().await;
    let slow = [("OUTBOXD_RABBITMQ_URL", broker_url.as_str())];
    let mut doomed = Instance::start(&db.url, &broker, &slow);
    let others = [
        Instance::start(&db.url, &broker, &slow),
        Instance::start(&db.url, &broker, &slow),
    ];
    doomed.wait_running().await;
    for other in &others {
        other.wait_running().await;
    }
    let producer = Producer::start(&db.url, EVENTS, 10).await;
    wait_consumed(&broker, 500).await;
    doomed.kill_9();
    let fault_at = Instant::now();
    let committed = producer.finish().await;

    let audit = audit(
        &db.url,
        &broker,
        &committed,
        fault_at,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audit.lost, 0, "{audit:?}");
    assert_eq!(db.count("PUBLISHED").await, EVENTS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_leaves_no_lease_behind() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let (_proxy, broker_url) = slow_broker().await;
    let slow = [("OUTBOXD_RABBITMQ_URL", broker_url.as_str())];
    let mut first = Instance::start(&db.url, &broker, &slow);
    first.wait_running().await;
    let producer = Producer::start(&db.url, EVENTS, 10).await;
    wait_consumed(&broker, 500).await;
    let code = first.terminate().await;
    let fault_at = Instant::now();
    assert_eq!(code, Some(0), "{}", first.log());
    // Nothing it claimed is left leased: delivered, or released to PENDING.
    let client = db.client().await;
    let leased: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE status = 'PROCESSING' OR locked_until IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leased, 0, "{}", first.log());

    let second = Instance::start(&db.url, &broker, &slow);
    second.wait_running().await;
    let committed = producer.finish().await;
    let audit = audit(
        &db.url,
        &broker,
        &committed,
        fault_at,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audit.lost, 0, "{audit:?}");
    assert_eq!(db.count("PUBLISHED").await, EVENTS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_dropped_and_refused_then_everything_is_delivered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let proxy = CountingProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let instance = Instance::start(&db.url, &broker, &[("OUTBOXD_RABBITMQ_URL", url.as_str())]);
    instance.wait_running().await;
    let producer = Producer::start(&db.url, EVENTS, 10).await;
    wait_consumed(&broker, 500).await;
    proxy.refuse(true);
    proxy.cut();
    let fault_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let consumed_while_down = broker.received().len();
    let published_while_down = db.count("PUBLISHED").await;
    assert!(
        published_while_down as usize <= consumed_while_down,
        "PUBLISHED only after an ack: {published_while_down} published, {consumed_while_down} consumed"
    );
    proxy.refuse(false);
    let committed = producer.finish().await;

    let audit = audit(
        &db.url,
        &broker,
        &committed,
        fault_at,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audit.lost, 0, "{audit:?}\n{}", instance.log());
    assert_eq!(db.count("PUBLISHED").await, EVENTS as i64);
    assert_eq!(
        db.count("DEAD_LETTER").await,
        0,
        "an outage dead-letters nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_webhook_gets_everything_with_bounded_retries() {
    use support::webhook::{Endpoint, Reply};
    const N: usize = 500;
    let db = TestDb::new().await;
    let broker = TestBroker::new(None).await;
    let endpoint = Endpoint::start(|_| {
        if rand::random::<bool>() {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let url = endpoint.url();
    let routes = "*=webhook:flappy";
    let instance = Instance::start(
        &db.url,
        &broker,
        &[
            ("OUTBOXD_ROUTING_ROUTES", routes),
            ("OUTBOXD_WEBHOOK_FLAPPY_URL", url.as_str()),
            (
                "OUTBOXD_WEBHOOK_FLAPPY_SECRETS",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            ("OUTBOXD_WEBHOOK_FLAPPY_FAILURES_TO_OPEN", "50"),
            ("OUTBOXD_RETRY_MAX_ATTEMPTS", "25"),
            ("OUTBOXD_RETRY_BASE_DELAY", "20ms"),
            ("OUTBOXD_RETRY_MAX_DELAY", "500ms"),
        ],
    );
    instance.wait_running().await;
    let producer = Producer::start(&db.url, N, 10).await;
    let committed = producer.finish().await;
    let fault_at = Instant::now();
    assert!(
        db.wait_settled(Duration::from_secs(60)).await,
        "{}",
        instance.log()
    );
    assert_eq!(db.count("PUBLISHED").await, N as i64, "{}", instance.log());

    let hits = endpoint.hits();
    let acked: std::collections::HashSet<&str> = hits.iter().map(|h| h.id()).collect();
    assert_eq!(
        acked.len(),
        committed.len(),
        "every event reached the endpoint"
    );
    // Every request is an attempt the database counted: retries stay within the policy.
    let client = db.client().await;
    let attempts: i64 = client
        .query_one("SELECT sum(attempts)::int8 FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    let max_attempts: i32 = client
        .query_one("SELECT max(attempts) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "{N} events, {} requests, {attempts} attempts, at most {max_attempts} for one event, settled {:?} after the load",
        hits.len(),
        fault_at.elapsed()
    );
    assert_eq!(hits.len() as i64, attempts);
    assert!(max_attempts <= 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_instance_is_fenced_when_it_wakes_after_another_took_over() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let (_slow, broker_url) = slow_broker().await;
    let pg = CountingProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let stalled_url = pg.url(&db.name);
    let stalled = Instance::start(
        &db.url,
        &broker,
        &[
            ("DATABASE_URL", stalled_url.as_str()),
            ("OUTBOXD_RABBITMQ_URL", broker_url.as_str()),
            ("OUTBOXD_LISTENER_PING_INTERVAL", "30s"),
            ("OUTBOXD_LISTENER_KEEPALIVE_IDLE", "30s"),
        ],
    );
    stalled.wait_running().await;
    let producer = Producer::start(&db.url, EVENTS, 10).await;
    // Stall its database connections while it has batches in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.count("PROCESSING").await == 0 {
        assert!(Instant::now() < deadline, "nothing in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pg.stall(true);
    let fault_at = Instant::now();
    // A second instance, connected directly, reaps its leases and delivers.
    let rescuer = Instance::start(
        &db.url,
        &broker,
        &[("OUTBOXD_RABBITMQ_URL", broker_url.as_str())],
    );
    rescuer.wait_running().await;
    let committed = producer.finish().await;
    tokio::time::sleep(Duration::from_secs(5)).await; // well past the 2 s lease
    pg.stall(false);

    let audit = audit(
        &db.url,
        &broker,
        &committed,
        fault_at,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audit.lost, 0, "{audit:?}");
    assert_eq!(db.count("PUBLISHED").await, EVENTS as i64);
    let addr = stalled.http_addr();
    let mut fenced = 0.0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while fenced == 0.0 && Instant::now() < deadline {
        let (_, metrics) = support::http_get(addr, "/metrics").await;
        fenced = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("outbox_fenced_outcomes_total ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("the stalled instance's late outcomes refused: {fenced}");
    assert!(
        fenced > 0.0,
        "its late complete was refused\n{}",
        stalled.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn careless_rows_are_delivered_and_secrets_never_show() {
    use support::webhook::{Endpoint, Reply};
    const DB_PASSWORD: &str = "pg-pass-7b1f0c2e9d";
    const ADMIN_TOKEN: &str = "admin-token-5e3a91c07f2b4d68";
    // base64 of "hook-key-0f9e8d7c6b5a" (the key itself must not show either)
    const HOOK_SECRET: &str = "whsec_aG9vay1rZXktMGY5ZThkN2M2YjVh";
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let url_with_password = db
        .url
        .replace("postgres@", &format!("postgres:{DB_PASSWORD}@"));
    let hook_url = endpoint.url();
    let instance = Instance::start(
        &db.url,
        &broker,
        &[
            ("DATABASE_URL", url_with_password.as_str()),
            ("OUTBOXD_HTTP_ADMIN_TOKEN", ADMIN_TOKEN),
            ("OUTBOXD_ROUTING_ROUTES", "*=rabbitmq,webhook:hook"),
            ("OUTBOXD_WEBHOOK_HOOK_URL", hook_url.as_str()),
            ("OUTBOXD_WEBHOOK_HOOK_SECRETS", HOOK_SECRET),
            ("RUST_LOG", "debug"),
        ],
    );
    instance.wait_running().await;

    // Rows a careless producer might write: odd JSON where JSON is expected, empty and
    // non-ASCII text, defaults left out.
    let client = db.client().await;
    let inserted = client
        .execute(
            r#"INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, metadata)
               VALUES ('order', '', 'order.created', '42', '[1, 2]'),
                      ('order', '1', 'order.created', '"just text"', '"text"'),
                      ('order', '2', 'ordér.créé', 'null', 'null'),
                      ('', '3', 'order.created', '{"nested": {"deep": [1, {"x": null}]}}', '{"n": 1, "b": true}')"#,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 4);
    // What the schema refuses, it refuses with a clear error to the producer.
    let refused = client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, metadata)
             VALUES ('order', '4', 'order.created', '{}', NULL)",
            &[],
        )
        .await
        .unwrap_err();
    let refused = outboxd::store::error_text(&refused);
    assert!(refused.contains("metadata"), "{refused}");

    assert!(
        db.wait_settled(Duration::from_secs(15)).await,
        "{}",
        instance.log()
    );
    assert_eq!(db.count("PUBLISHED").await, 4, "{}", instance.log());
    assert_eq!(endpoint.hits().len(), 4);
    assert_eq!(broker.received().len(), 4);

    let (_, metrics) = support::http_get(instance.http_addr(), "/metrics").await;
    let (status, _) = support::http_get(instance.http_addr(), "/api/dead-letters").await;
    assert_eq!(status, 401);
    let log = instance.log();
    for secret in [
        DB_PASSWORD,
        ADMIN_TOKEN,
        HOOK_SECRET,
        "aG9vay1rZXktMGY5ZThkN2M2YjVh",
        "hook-key-0f9e8d7c6b5a",
    ] {
        assert!(!log.contains(secret), "{secret} appears in the log");
        assert!(!metrics.contains(secret), "{secret} appears in /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_load_loses_nothing() {
    use support::private_pg::PrivateCluster;
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let url = cluster.migrated_database("app").await;

    let broker = TestBroker::new(Some("#")).await;
    let (_slow, broker_url) = slow_broker().await;
    let instance = Instance::start(
        &url,
        &broker,
        &[("OUTBOXD_RABBITMQ_URL", broker_url.as_str())],
    );
    instance.wait_running().await;
    let producer = Producer::start(&url, EVENTS, 10).await;
    wait_consumed(&broker, 500).await;
    let restarting = tokio::task::spawn_blocking(move || {
        cluster.restart();
        cluster
    });
    let fault_at = Instant::now();
    let cluster = restarting.await.unwrap();
    let acknowledged = producer.finish().await;

    // The database is the truth: every event in it must have been consumed.
    let audit_at = Instant::now();
    let audited = audit(
        &url,
        &broker,
        &acknowledged,
        fault_at,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audited.lost, 0, "{audited:?}\n{}", instance.log());
    let client = outboxd::store::connect_once(&url, Duration::from_secs(5), "test")
        .await
        .unwrap();
    let stored: Vec<uuid::Uuid> = client
        .query("SELECT tracking_id FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all = audit(&url, &broker, &stored, audit_at, Duration::from_secs(30)).await;
    assert_eq!(all.lost, 0, "{all:?}");
    let published: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE status = 'PUBLISHED'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published as usize, stored.len());
    assert!(
        instance.log().contains("listener connection lost"),
        "the listener saw the restart"
    );
    drop(cluster);
}

fn outboxd_cli(args: &[&str], database_url: &str) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
    for (name, _) in std::env::vars() {
        if name.starts_with("OUTBOXD_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_database_password_is_a_clear_error_that_hides_the_password() {
    use support::private_pg::PrivateCluster;
    let cluster = tokio::task::spawn_blocking(|| {
        PrivateCluster::start_with(Some("right-horse-battery"), |_| Vec::new())
    })
    .await
    .unwrap();
    let url = format!(
        "postgres://postgres:wrong-staple-7431@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    );
    let output = outboxd_cli(&["migrate"], &url);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(
        !stderr.contains("wrong-staple-7431"),
        "the password is not shown: {stderr}"
    );
    assert!(!stderr.contains("panicked"));
    let right = format!(
        "postgres://postgres:right-horse-battery@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    );
    let output = outboxd_cli(&["migrate"], &right);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, and a server certificate it signed for `localhost` only.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    for ca in ["ca", "other-ca"] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=outboxd test {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ]);
    }
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    let owned = std::process::Command::new("chown")
        .args(["postgres:postgres", "server.key", "server.pem"])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(owned.success());
    let private = std::process::Command::new("chmod")
        .args(["600", "server.key"])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(private.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_is_verified_as_the_url_asks_and_never_downgraded() {
    use support::private_pg::PrivateCluster;
    let cluster = tokio::task::spawn_blocking(|| {
        PrivateCluster::start_with(None, |dir| {
            certificates(dir);
            vec![
                "ssl=on".into(),
                format!("ssl_cert_file={}", dir.join("server.pem").display()),
                format!("ssl_key_file={}", dir.join("server.key").display()),
            ]
        })
    })
    .await
    .unwrap();
    let ca = cluster.dir.join("ca.pem");
    let other_ca = cluster.dir.join("other-ca.pem");
    let url = |host: &str, mode: &str, root: &std::path::Path| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            cluster.port,
            root.display()
        )
    };
    // The right CA and host name: migrate works over verified TLS.
    let output = outboxd_cli(&["migrate"], &url("localhost", "verify-full", &ca));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The server really saw TLS.
    let client = outboxd::store::connect_once(
        &url("localhost", "verify-full", &ca),
        Duration::from_secs(5),
        "test",
    )
    .await
    .unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    // A certificate from another CA is refused.
    let output = outboxd_cli(&["migrate"], &url("localhost", "verify-full", &other_ca));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect") && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
    // The wrong host name is refused by verify-full, accepted by verify-ca.
    let output = outboxd_cli(&["migrate"], &url("127.0.0.1", "verify-full", &ca));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let output = outboxd_cli(&["migrate"], &url("127.0.0.1", "verify-ca", &ca));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A server without TLS is refused under verify-full, not used in the clear.
    let plain = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let plain_url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        plain.port,
        ca.display()
    );
    let output = outboxd_cli(&["migrate"], &plain_url);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    drop(plain);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_tls_is_verified_against_the_configured_ca() {
    use support::tls_proxy::TlsProxy;
    let dir = std::env::temp_dir().join(format!("outboxd-amqps-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    certificates(&dir);
    let cert = std::fs::read(dir.join("server.pem")).unwrap();
    let key = std::fs::read(dir.join("server.key")).unwrap();
    let proxy = TlsProxy::start("127.0.0.1:5672".parse().unwrap(), &cert, &key).await;
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let amqps = |host: &str| format!("amqps://guest:guest@{host}:{}/%2f", proxy.addr.port());
    let ca = dir.join("ca.pem").display().to_string();
    let other_ca = dir.join("other-ca.pem").display().to_string();

    // The right CA and host name: delivered over TLS.
    let good = amqps("localhost");
    let instance = Instance::start(
        &db.url,
        &broker,
        &[
            ("OUTBOXD_RABBITMQ_URL", good.as_str()),
            ("OUTBOXD_RABBITMQ_CA_FILE", ca.as_str()),
        ],
    );
    instance.wait_running().await;
    let producer = Producer::start(&db.url, 200, 10).await;
    let committed = producer.finish().await;
    let audited = audit(
        &db.url,
        &broker,
        &committed,
        Instant::now(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(audited.lost, 0, "{audited:?}\n{}", instance.log());
    drop(instance);

    // Another CA, or a name the certificate does not carry: refused, events wait.
    for (url, ca_file) in [
        (amqps("localhost"), other_ca.as_str()),
        (amqps("127.0.0.1"), ca.as_str()),
    ] {
        let refused = Instance::start(
            &db.url,
            &broker,
            &[
                ("OUTBOXD_RABBITMQ_URL", url.as_str()),
                ("OUTBOXD_RABBITMQ_CA_FILE", ca_file),
            ],
        );
        refused.wait_running().await;
        let client = db.client().await;
        let tracking_id = outboxd::enqueue(
            &client,
            &outboxd::NewEvent::new("order", "x", "order.created", serde_json::json!({})),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !refused.log().contains("RabbitMQ unreachable") {
            assert!(Instant::now() < deadline, "{}", refused.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = refused.log();
        assert!(
            log.to_lowercase().contains("certificate") || log.contains("TLS"),
            "{log}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            broker
                .received()
                .iter()
                .all(|m| m.message_id != tracking_id.to_string()),
            "nothing is sent over an unverified connection"
        );
        let status: String = client
            .query_one(
                "SELECT status FROM outbox WHERE tracking_id = $1",
                &[&tracking_id],
            )
            .await
            .unwrap()
            .get(0);
        assert_ne!(status, "PUBLISHED");
        drop(refused);
        client
            .execute("DELETE FROM outbox WHERE tracking_id = $1", &[&tracking_id])
            .await
            .unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_dead_letter_while_everything_else_flows() {
    use support::webhook::{Endpoint, Reply};
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let refusing = Endpoint::start(|_| Reply::status(400).with_body("schema mismatch")).await;
    let hook_url = refusing.url();
    let instance = Instance::start(
        &db.url,
        &broker,
        &[
            ("OUTBOXD_RABBITMQ_MAX_PAYLOAD_BYTES", "4096"),
            (
                "OUTBOXD_ROUTING_ROUTES",
                "legacy.*=webhook:legacy; *=rabbitmq",
            ),
            ("OUTBOXD_WEBHOOK_LEGACY_URL", hook_url.as_str()),
            (
                "OUTBOXD_WEBHOOK_LEGACY_SECRETS",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
        ],
    );
    instance.wait_running().await;
    let producer = Producer::start(&db.url, EVENTS, 10).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', 'big', 'order.created', jsonb_build_object('blob', repeat('x', 10000))),
                    ('legacy', 'old', 'legacy.imported', '{}')",
        )
        .await
        .unwrap();
    let committed = producer.finish().await;
    let audited = audit(
        &db.url,
        &broker,
        &committed,
        Instant::now(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(audited.lost, 0, "{audited:?}");
    let rows = client
        .query(
            "SELECT aggregate_id, attempts, last_error FROM outbox WHERE status = 'DEAD_LETTER' ORDER BY aggregate_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let (big, old) = (&rows[0], &rows[1]);
    assert_eq!(big.get::<_, String>(0), "big");
    assert_eq!(big.get::<_, i32>(1), 1);
    assert!(big.get::<_, String>(2).contains("max_payload_bytes"));
    assert_eq!(old.get::<_, String>(0), "old");
    assert_eq!(old.get::<_, i32>(1), 1);
    assert!(
        old.get::<_, String>(2)
            .contains("HTTP 400: schema mismatch")
    );
    assert_eq!(db.count("PUBLISHED").await, EVENTS as i64);
}
