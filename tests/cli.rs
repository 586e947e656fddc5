//! The binary's edges: migrations are idempotent and safe to run concurrently; bad
//! configuration and an unreachable or unmigrated database give one clear line and a
//! non-zero exit, never a panic.

mod support;

use std::process::{Command, Output};
use support::TestDb;

fn outboxd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    command.args(args);
    // Start from a clean slate: no settings leak in from the caller's environment.
    for (name, _) in std::env::vars() {
        if name.starts_with("OUTBOXD_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run outboxd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn query_i64(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op_and_concurrent_migrates_both_succeed() {
    let db = TestDb::empty().await;
    let url = db.url.clone();
    let first = {
        let url = url.clone();
        std::thread::spawn(move || outboxd(&["migrate"], &[("DATABASE_URL", &url)]))
    };
    let second = {
        let url = url.clone();
        std::thread::spawn(move || outboxd(&["migrate"], &[("DATABASE_URL", &url)]))
    };
    for output in [first.join().unwrap(), second.join().unwrap()] {
        assert!(
            output.status.success(),
            "concurrent migrate failed: {}",
            stderr(&output)
        );
    }
    let partitions_sql = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'outbox'::regclass";
    assert_eq!(
        query_i64(&db, "SELECT count(*) FROM outboxd_schema_migrations").await,
        outboxd::store::migrate::MIGRATIONS.len() as i64
    );
    assert_eq!(
        query_i64(&db, partitions_sql).await,
        9,
        "DEFAULT + today + 7 days"
    );

    let objects_sql = "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace";
    let objects = query_i64(&db, objects_sql).await;
    let again = outboxd(&["migrate"], &[("DATABASE_URL", &url)]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        query_i64(&db, objects_sql).await,
        objects,
        "a second migrate changes nothing"
    );
    assert_eq!(
        query_i64(&db, "SELECT count(*) FROM outboxd_schema_migrations").await,
        outboxd::store::migrate::MIGRATIONS.len() as i64
    );

    let dry = outboxd(&["migrate", "--dry-run"], &[("DATABASE_URL", &url)]);
    assert!(dry.status.success());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("up to date"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_sql_and_changes_nothing() {
    let db = TestDb::empty().await;
    let output = outboxd(&["migrate", "--dry-run"], &[("DATABASE_URL", &db.url)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("CREATE TABLE outbox"), "{stdout}");
    assert_eq!(
        query_i64(
            &db,
            "SELECT count(*) FROM pg_class WHERE relname = 'outbox'"
        )
        .await,
        0
    );
}

#[test]
fn bad_config_value_fails_with_key_value_and_fix() {
    let output = outboxd(&["run"], &[("OUTBOXD_RELAY_BATCH_SIZE", "0")]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    assert!(
        text.contains("relay.batch_size") && text.contains("\"0\""),
        "{text}"
    );
    assert!(
        text.contains("OUTBOXD_RELAY_BATCH_SIZE"),
        "names the fix: {text}"
    );
    assert!(!text.contains("panicked"));

    let dir = std::env::temp_dir().join(format!("outboxd-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outboxd.toml");
    std::fs::write(&path, "[relay]\nlease = \"forever\"\n").unwrap();
    let output = outboxd(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("lease") && text.contains("forever"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreachable_database_fails_with_a_clear_line() {
    let output = outboxd(
        &["run"],
        &[(
            "DATABASE_URL",
            "postgres://postgres:hunter2@127.0.0.1:1/app",
        )],
    );
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    assert!(
        text.contains("cannot connect to PostgreSQL at 127.0.0.1:1"),
        "{text}"
    );
    assert!(text.contains("DATABASE_URL"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "the password is not shown: {text}"
    );
    assert!(!text.contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_database_says_to_run_migrate() {
    let db = TestDb::empty().await;
    let output = outboxd(&["run"], &[("DATABASE_URL", &db.url)]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("run `outboxd migrate`"), "{text}");
    let status = outboxd(&["status"], &[("DATABASE_URL", &db.url)]);
    assert_eq!(status.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_events_per_status() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', g::text, 'order.created', '{}' FROM generate_series(1, 3) g;
             UPDATE outbox SET status = 'DEAD_LETTER', last_error = 'x' WHERE aggregate_id = '3';",
        )
        .await
        .unwrap();
    let output = outboxd(&["status"], &[("DATABASE_URL", &db.url)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = |status: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(status))
            .unwrap_or_default()
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(line("PENDING"), "2", "{stdout}");
    assert_eq!(line("DEAD_LETTER"), "1", "{stdout}");
    assert_eq!(line("PUBLISHED"), "0", "{stdout}");
    assert!(stdout.contains("1 dead letter"), "{stdout}");

    let json = outboxd(&["status", "--json"], &[("DATABASE_URL", &db.url)]);
    assert!(json.status.success(), "{}", stderr(&json));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let events = |status: &str| {
        value["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["status"] == status)
            .map(|s| s["events"].as_i64().unwrap())
    };
    assert_eq!(events("PENDING"), Some(2), "{value}");
    assert_eq!(events("DEAD_LETTER"), Some(1), "{value}");
    assert_eq!(value["dead_letters"], 1);
    assert_eq!(value["default_partition_rows"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_unfinished_events_and_exits_zero() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    const K: i64 = 20;
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', g::text, 'order.created', '{}' FROM generate_series(1, $1::int8) g",
            &[&K],
        )
        .await
        .unwrap();
    // A "broker" that accepts connections and never answers: deliveries hang.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broker_url = format!(
        "amqp://guest:guest@{}/%2f",
        black_hole.local_addr().unwrap()
    );

    let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("OUTBOXD_RABBITMQ_URL", &broker_url)
        .env("OUTBOXD_RABBITMQ_CONFIRM_TIMEOUT", "60s")
        .env("OUTBOXD_RELAY_SHUTDOWN_GRACE", "1s")
        .env("OUTBOXD_HTTP_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });

    // Wait until every event is claimed (PROCESSING) and stuck in delivery.
    let deadline = Instant::now() + Duration::from_secs(15);
    while db.count("PROCESSING").await < K {
        assert!(Instant::now() < deadline, "events were not claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "outboxd did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = lines.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("released unfinished events"), "{log}");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'PENDING' AND locked_until IS NULL
                                       AND lock_token IS NULL AND attempts = 0),
                    count(*)
               FROM outbox",
            &[],
        )
        .await
        .unwrap();
    let released: i64 = row.get(0);
    let total: i64 = row.get(1);
    assert_eq!(
        (released, total),
        (K, K),
        "every claimed event is back to PENDING, attempt given back"
    );
    drop(black_hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_events_arriving() {
    let db = TestDb::empty().await;
    let broker = support::TestBroker::new(None).await;
    let output = outboxd(
        &["demo", "--events", "3"],
        &[
            ("DATABASE_URL", &db.url),
            ("OUTBOXD_RABBITMQ_EXCHANGE", &broker.exchange),
            ("OUTBOXD_RABBITMQ_DECLARE_EXCHANGE", "false"),
            ("OUTBOXD_HTTP_LISTEN", "127.0.0.1:0"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", stderr(&output));
    assert_eq!(stdout.matches("commit to consumer").count(), 3, "{stdout}");
    assert_eq!(db.count("PUBLISHED").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_from_before_high_load_mode_says_to_migrate_and_migrate_upgrades_it() {
    // A database migrated by a version without migration 0003: no outbox_mode, the old
    // trigger function.
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "DROP TABLE outbox_mode;
             DROP FUNCTION outbox_notify_ids(int8[]);
             DROP FUNCTION outbox_notify_ids(int8[], timestamptz, timestamptz);
             DROP TABLE outbox_tracking_ids;
             DELETE FROM outboxd_schema_migrations WHERE version >= 3;",
        )
        .await
        .unwrap();
    client
        .batch_execute(
            outboxd::store::migrate::MIGRATIONS[0]
                .sql
                .split("CREATE FUNCTION")
                .nth(1)
                .map(|rest| {
                    format!(
                        "CREATE OR REPLACE FUNCTION{}",
                        rest.split("CREATE TRIGGER").next().unwrap()
                    )
                })
                .unwrap()
                .as_str(),
        )
        .await
        .unwrap();
    // An event committed under the old schema.
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', '1', 'order.created', '{}')",
            &[],
        )
        .await
        .unwrap();

    let output = outboxd(&["run"], &[("DATABASE_URL", &db.url)]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.contains("outbox_mode") && text.contains("run `outboxd migrate`"),
        "{text}"
    );

    let migrated = outboxd(&["migrate"], &[("DATABASE_URL", &db.url)]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    assert_eq!(
        query_i64(
            &db,
            "SELECT count(*) FROM outbox_mode WHERE mode = 'notify'"
        )
        .await,
        1
    );
    // The event is still there, and new inserts work with the new trigger.
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', '2', 'order.created', '{}')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(query_i64(&db, "SELECT count(*) FROM outbox").await, 2);
}

/// Found: a schema applied by hand (0001 with psql) made `migrate` fail with `relation
/// "outbox_id_seq" already exists` and no hint. Now it says what it found and how to
/// record it; recorded so, `migrate` applies the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_applied_by_hand_is_recognised_and_migrate_says_how_to_adopt_it() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    client
        .batch_execute(outboxd::store::migrate::MIGRATIONS[0].sql)
        .await
        .unwrap();
    for command in [&["migrate"][..], &["migrate", "--dry-run"], &["run"]] {
        let output = outboxd(command, &[("DATABASE_URL", &db.url)]);
        assert_ne!(output.status.code(), Some(0), "{command:?}");
        let text = stderr(&output);
        assert!(
            text.contains("outboxd_schema_migrations")
                && text.contains("by hand")
                && text.contains("0001_outbox")
                && !text.contains("already exists"),
            "{command:?}: {text}"
        );
    }
    // Do as it says: record 0001, then migrate applies the rest.
    let text = stderr(&outboxd(&["migrate"], &[("DATABASE_URL", &db.url)]));
    let record = text
        .split("record them with: ")
        .nth(1)
        .and_then(|rest| rest.split(" Then run").next())
        .unwrap_or_else(|| panic!("no statement to record them: {text}"));
    client.batch_execute(record).await.unwrap();
    let migrated = outboxd(&["migrate"], &[("DATABASE_URL", &db.url)]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    assert_eq!(
        query_i64(&db, "SELECT count(*) FROM outboxd_schema_migrations").await,
        outboxd::store::migrate::MIGRATIONS.len() as i64
    );
}

/// Found: a database recorded as newer than the binary was accepted silently, so a
/// rollback ran old code on a new schema. Now `migrate` and `run` refuse and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_binary_is_refused_with_what_to_run() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outboxd_schema_migrations (version, name) VALUES (9999, 'from_the_future')",
        )
        .await
        .unwrap();
    for command in [&["migrate"][..], &["run"], &["status"]] {
        let output = outboxd(command, &[("DATABASE_URL", &db.url)]);
        assert_eq!(output.status.code(), Some(1), "{command:?}");
        let text = stderr(&output);
        assert!(
            text.contains("9999") && text.contains("newer than this outboxd"),
            "{command:?}: {text}"
        );
    }
}

/// `outboxd run` for `db` and `broker` with `stderr` as its standard error.
fn spawn_run(
    db: &TestDb,
    broker: &support::TestBroker,
    stderr: std::process::Stdio,
) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    for (name, _) in std::env::vars() {
        if name.starts_with("OUTBOXD_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("OUTBOXD_RABBITMQ_EXCHANGE", &broker.exchange)
        .env("OUTBOXD_RABBITMQ_DECLARE_EXCHANGE", "false")
        .env("OUTBOXD_HTTP_LISTEN", "127.0.0.1:0")
        // Plenty to write: every statement and frame.
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start outboxd")
}

/// SIGTERM, then the exit code, or `None` if it did not exit within `within`.
fn terminate(child: &mut std::process::Child, within: std::time::Duration) -> Option<i32> {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    let _ = child.wait();
    None
}

/// SIGHUP neither ends the process (the default for that signal) nor reloads anything:
/// it is answered with a line that says to restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_answered_with_a_line_and_changes_nothing() {
    use std::io::{BufRead, BufReader};
    let db = TestDb::new().await;
    let broker = support::TestBroker::new(Some("#")).await;
    let mut child = spawn_run(&db, &broker, std::process::Stdio::piped());
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = std::sync::Arc::clone(&lines);
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            record.lock().unwrap().push(line);
        }
    });
    let said = |text: &str| lines.lock().unwrap().iter().any(|l| l.contains(text));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !said("outboxd running") {
        assert!(
            std::time::Instant::now() < deadline,
            "outboxd did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let sent = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !said("SIGHUP received") {
        assert!(std::time::Instant::now() < deadline, "no word on SIGHUP");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(said("restart outboxd"));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
    assert_eq!(
        terminate(&mut child, std::time::Duration::from_secs(20)),
        Some(0)
    );
}

/// Found: with standard error a closed pipe (`outboxd run 2>&1 | head -3`, a log shipper
/// that died) SIGTERM hung until SIGKILL. Logging must never stop delivery or shutdown:
/// not a closed pipe, not a full one that nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_or_unread_stderr_pipe_never_stops_delivery_or_shutdown() {
    use outboxd::{NewEvent, enqueue};
    for closed in [true, false] {
        let case = if closed {
            "closed pipe"
        } else {
            "pipe nobody reads"
        };
        let db = TestDb::new().await;
        let broker = support::TestBroker::new(Some("#")).await;
        let mut child = spawn_run(&db, &broker, std::process::Stdio::piped());
        let pipe = child.stderr.take();
        if closed {
            drop(pipe);
        }
        // Let it start (and log a lot), then commit events.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let producer = db.client().await;
        for n in 0..50 {
            enqueue(
                &producer,
                &NewEvent::new(
                    "order",
                    n.to_string(),
                    "order.created",
                    serde_json::json!({}),
                ),
            )
            .await
            .unwrap();
        }
        let received = broker
            .wait_for(50, std::time::Duration::from_secs(20))
            .await;
        assert_eq!(received.len(), 50, "{case}: events still delivered");
        let code = terminate(&mut child, std::time::Duration::from_secs(20));
        assert_eq!(code, Some(0), "{case}: SIGTERM ends it, exit 0");
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `outboxd health` answers for the instance on this host: 0 once it is ready, 1 with
/// the reason while it is not (RabbitMQ unreachable), 1 naming the address when nothing
/// answers, and 2 when there is no HTTP endpoint to ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_zero_only_while_the_instance_is_ready() {
    let db = TestDb::new().await;
    let broker = support::TestBroker::new(Some("#")).await;
    for (case, amqp) in [
        ("ready", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("broker unreachable", "amqp://guest:guest@127.0.0.1:1/%2f"),
    ] {
        let port = free_port();
        // Asked as a container asks: the instance binds every address, health finds it.
        let listen = format!("0.0.0.0:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
        for (name, _) in std::env::vars() {
            if name.starts_with("OUTBOXD_") || name == "DATABASE_URL" {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("OUTBOXD_RABBITMQ_URL", amqp)
            .env("OUTBOXD_RABBITMQ_EXCHANGE", &broker.exchange)
            .env("OUTBOXD_RABBITMQ_DECLARE_EXCHANGE", "false")
            .env("OUTBOXD_HTTP_LISTEN", &listen)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let env = [
            ("DATABASE_URL", db.url.as_str()),
            ("OUTBOXD_HTTP_LISTEN", listen.as_str()),
        ];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let mut last;
        loop {
            last = outboxd(&["health"], &env);
            let settled = if case == "ready" {
                last.status.success()
            } else {
                stderr(&last).contains("rabbitmq")
            };
            if settled || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let text = stderr(&last);
        if case == "ready" {
            assert!(last.status.success(), "{case}: {text}");
            assert!(
                String::from_utf8_lossy(&last.stdout).contains("ready"),
                "{case}"
            );
        } else {
            assert_eq!(last.status.code(), Some(1), "{case}: {text}");
            assert!(
                text.contains("503") && text.contains("rabbitmq"),
                "{case}: the reason is named: {text}"
            );
            assert!(
                outboxd(&["health", "--live"], &env).status.success(),
                "{case}: alive all the same"
            );
        }
        assert_eq!(
            terminate(&mut child, std::time::Duration::from_secs(20)),
            Some(0)
        );
    }
    let nobody = format!("127.0.0.1:{}", free_port());
    let unreachable = outboxd(&["health", "--addr", &nobody], &[("DATABASE_URL", &db.url)]);
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains(&nobody),
        "{}",
        stderr(&unreachable)
    );
    let off = outboxd(
        &["health"],
        &[("DATABASE_URL", &db.url), ("OUTBOXD_HTTP_LISTEN", "")],
    );
    assert_eq!(off.status.code(), Some(2), "{}", stderr(&off));
    assert!(stderr(&off).contains("http.listen"), "{}", stderr(&off));
}

/// `outboxd config check` validates file, environment and flags without connecting to
/// anything (0 or 2); `config show` prints the effective values with their sources and
/// no secret.
#[test]
fn config_check_and_show_answer_without_connecting() {
    let env = [
        // Nothing listens there: neither command may try.
        ("DATABASE_URL", "postgres://app:DBPASSWORD@127.0.0.1:1/app"),
        ("OUTBOXD_RELAY_BATCH_SIZE", "200"),
    ];
    let checked = outboxd(&["config", "check"], &env);
    assert!(checked.status.success(), "{}", stderr(&checked));
    let said = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(
        said.contains("configuration ok") && said.contains("rabbitmq"),
        "{said}"
    );

    let bad = outboxd(
        &["config", "check"],
        &[
            ("DATABASE_URL", env[0].1),
            ("OUTBOXD_RELAY_BATCH_SIZE", "many"),
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("relay.batch_size")
            && stderr(&bad).contains("OUTBOXD_RELAY_BATCH_SIZE"),
        "{}",
        stderr(&bad)
    );

    let shown = outboxd(
        &[
            "config",
            "show",
            "--database-url",
            "postgres://cli:FLAGPASSWORD@127.0.0.1:1/app",
        ],
        &env,
    );
    assert!(shown.status.success(), "{}", stderr(&shown));
    let text = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(!text.contains("PASSWORD"), "{text}");
    assert!(
        text.contains("url = \"postgres://cli:***@127.0.0.1:1/app\"  # flag --database-url"),
        "{text}"
    );
    assert!(text.contains("batch_size = 200  # environment"), "{text}");
    assert!(
        text.contains("max_in_flight_batches = 4  # default"),
        "{text}"
    );
}

/// In JSON log mode every line on standard error is JSON, the fatal error included.
#[test]
fn json_log_mode_writes_the_fatal_error_as_json_too() {
    let output = outboxd(
        &["--log-format", "json", "status"],
        &[("DATABASE_URL", "postgres://app:SECRET@127.0.0.1:1/app")],
    );
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let fatal = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("outboxd: error:"))
        })
        .unwrap_or_else(|| panic!("no fatal line in {text}"));
    assert_eq!(fatal["level"], "ERROR");
    assert_eq!(fatal["exit_code"], 1);
    assert!(!text.contains("SECRET"), "{text}");
}

/// Configuration errors speak the operator's words: no Rust type names, no "config file
/// (environment)" when there is no file, and a bad `--database-url` names the flag.
#[test]
fn config_errors_name_what_the_operator_wrote() {
    let dir = std::env::temp_dir().join(format!("outboxd-words-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("outboxd.toml");
    std::fs::write(&file, "[relay]\nbatch_size = \"lots\"\n").unwrap();
    let typed = outboxd(
        &["--config", file.to_str().unwrap(), "config", "check"],
        &[],
    );
    let text = stderr(&typed);
    assert_eq!(typed.status.code(), Some(2), "{text}");
    assert!(
        text.contains("whole number") && text.contains("batch_size") && !text.contains("usize"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let from_env = outboxd(&["config", "check"], &[("OUTBOXD_RELAY_LEASE", "soon")]);
    let text = stderr(&from_env);
    assert_eq!(from_env.status.code(), Some(2), "{text}");
    assert!(
        text.contains("from the environment") && !text.contains("config file (environment)"),
        "{text}"
    );

    let flag = outboxd(&["--database-url", "not a url", "status"], &[]);
    let text = stderr(&flag);
    assert_eq!(flag.status.code(), Some(2), "{text}");
    assert!(
        text.contains("--database-url")
            && !text.contains("[database]")
            && !text.contains("DATABASE_URL is honoured"),
        "{text}"
    );
}

/// `dead-letters list` pages keep the filters given, the last page offers no next one,
/// an out-of-range `--limit` is refused, and a redrive run where neither `$USER` nor
/// `$LOGNAME` is set is recorded as `cli@HOST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_pages_keep_their_filters_and_end_cleanly() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', g::text, CASE WHEN g <= 3 THEN 'order.x' ELSE 'user.x' END, '{}'
               FROM generate_series(1, 5) g;
             UPDATE outbox SET status = 'DEAD_LETTER', last_error = 'x', processed_at = now();",
        )
        .await
        .unwrap();
    let env = [("DATABASE_URL", db.url.as_str())];
    let list = |args: &[&str]| {
        let mut all = vec!["dead-letters", "list"];
        all.extend_from_slice(args);
        let output = outboxd(&all, &env);
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let first = list(&["--event-type", "order.*", "--limit", "2"]);
    let more = first
        .lines()
        .find_map(|l| l.strip_prefix("more: "))
        .unwrap_or_else(|| panic!("no next page offered: {first}"));
    assert!(
        more.starts_with("outboxd dead-letters list --event-type 'order.*' --limit 2 --before-id "),
        "{more}"
    );
    let before = more.rsplit(' ').next().unwrap();
    let last = list(&[
        "--event-type",
        "order.*",
        "--limit",
        "2",
        "--before-id",
        before,
    ]);
    assert_eq!(last.matches("order.x").count(), 1, "{last}");
    assert!(
        !last.contains("more:"),
        "the last page offers no next one: {last}"
    );
    let exact = list(&["--event-type", "user.*", "--limit", "2"]);
    assert!(
        !exact.contains("more:"),
        "a full last page is the last: {exact}"
    );
    let zero = outboxd(&["dead-letters", "list", "--limit", "0"], &env);
    assert_eq!(zero.status.code(), Some(2));
    assert!(stderr(&zero).contains("1 to 1000"), "{}", stderr(&zero));

    let id: i64 = client
        .query_one("SELECT min(id) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    for (name, _) in std::env::vars() {
        if name.starts_with("OUTBOXD_")
            || name == "DATABASE_URL"
            || name == "USER"
            || name == "LOGNAME"
        {
            command.env_remove(name);
        }
    }
    let redriven = command
        .args([
            "dead-letters",
            "redrive",
            "--id",
            &id.to_string(),
            "--reason",
            "fixed",
        ])
        .env("DATABASE_URL", &db.url)
        .env("HOSTNAME", "ops-box-7")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(redriven.status.success(), "{}", stderr(&redriven));
    let by: String = client
        .query_one("SELECT redriven_by FROM outbox_redrives", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, "cli@ops-box-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_blocked_by_a_long_transaction_never_queues_producers_behind_it() {
    use outboxd::store::migrate::{LockWait, run, run_waiting};
    use outboxd::{NewEvent, enqueue};
    use std::time::Duration;
    let db = TestDb::new().await;
    let client = db.client().await;
    // 0009 is pending again (it is written to run twice): it alters outbox_tracking_ids.
    client
        .batch_execute("DELETE FROM outboxd_schema_migrations WHERE version = 9")
        .await
        .unwrap();
    let event = |n: i32| {
        NewEvent::new(
            "order",
            n.to_string(),
            "order.created",
            serde_json::json!({}),
        )
    };
    // A producer's transaction stays open; its insert holds outbox_tracking_ids.
    let mut long = db.client().await;
    let open = long.transaction().await.unwrap();
    enqueue(&open, &event(0)).await.unwrap();

    // When the lock never comes: a clear refusal, nothing applied.
    let mut migrating = db.client().await;
    let wait = LockWait {
        timeout: Duration::from_millis(100),
        tries: 3,
    };
    let refused = run_waiting(&mut migrating, wait)
        .await
        .unwrap_err()
        .to_string();
    for words in [
        "0009_event_lookup",
        "3 times",
        "pg_stat_activity",
        "run `outboxd migrate` again",
    ] {
        assert!(refused.contains(words), "{words:?} in: {refused}");
    }
    assert_eq!(
        query_i64(
            &db,
            "SELECT count(*) FROM outboxd_schema_migrations WHERE version = 9"
        )
        .await,
        0
    );

    // While a migrate waits, other producers go on committing: none is queued behind it
    // for longer than one try (their own lock_timeout would fail them otherwise).
    let url = db.url.clone();
    let migrate = tokio::spawn(async move {
        let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        run(&mut client).await
    });
    let other = db.client().await;
    other
        .batch_execute("SET lock_timeout = '3s'")
        .await
        .unwrap();
    for n in 1..=10 {
        enqueue(&other, &event(n))
            .await
            .unwrap_or_else(|e| panic!("producer {n} was queued behind the migration: {e}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        !migrate.is_finished(),
        "the migration waits for the open transaction"
    );
    open.commit().await.unwrap();
    let applied = tokio::time::timeout(Duration::from_secs(30), migrate)
        .await
        .expect("the migration finishes once the transaction ends")
        .unwrap()
        .unwrap();
    assert_eq!(
        applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        vec![9]
    );
    assert_eq!(query_i64(&db, "SELECT count(*) FROM outbox").await, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_show_and_adopt_change_the_rule_the_database_keeps() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let ordered = [
        ("DATABASE_URL", url.as_str()),
        ("OUTBOXD_RELAY_ORDERING", "per_aggregate"),
    ];
    let shown = outboxd(&["ordering", "show"], &ordered);
    assert!(shown.status.success(), "{}", stderr(&shown));
    for words in [
        "database:      nothing recorded yet",
        "configuration: ordering = \"per_aggregate\", ordering_dead_letters = \"block\"",
    ] {
        assert!(
            stdout(&shown).contains(words),
            "{words:?} in {}",
            stdout(&shown)
        );
    }

    // A held event (as a claim leaves it) is released by the change of rule.
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, next_attempt_at)
             VALUES ('order', '1', 'order.created', '{}', 'infinity')",
        )
        .await
        .unwrap();
    let adopted = outboxd(&["ordering", "adopt"], &ordered);
    assert!(adopted.status.success(), "{}", stderr(&adopted));
    assert!(stdout(&adopted).contains("the database now keeps ordering = \"per_aggregate\""));
    assert_eq!(
        query_i64(
            &db,
            "SELECT count(*) FROM outbox WHERE next_attempt_at = 'infinity'"
        )
        .await,
        0
    );
    let again = outboxd(&["ordering", "adopt"], &ordered);
    assert!(
        stdout(&again).contains("already keeps"),
        "{}",
        stdout(&again)
    );

    // Another configuration: show says they differ; adopt is refused while an event is
    // being delivered (a live lease: an instance is running).
    let unordered = [("DATABASE_URL", url.as_str())];
    let shown = outboxd(&["ordering", "show"], &unordered);
    assert!(
        stdout(&shown)
            .contains("they differ: an instance with this configuration would refuse to start"),
        "{}",
        stdout(&shown)
    );
    client
        .batch_execute(
            "UPDATE outbox SET status = 'PROCESSING', locked_until = now() + interval '1 minute',
                    lock_token = gen_random_uuid()",
        )
        .await
        .unwrap();
    let refused = outboxd(&["ordering", "adopt"], &unordered);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    for words in [
        "1 events are being delivered right now",
        "stop every outboxd instance",
    ] {
        assert!(
            stderr(&refused).contains(words),
            "{words:?} in {}",
            stderr(&refused)
        );
    }
    client
        .batch_execute(
            "UPDATE outbox SET status = 'PUBLISHED', locked_until = NULL, lock_token = NULL",
        )
        .await
        .unwrap();
    let adopted = outboxd(&["ordering", "adopt"], &unordered);
    assert!(adopted.status.success(), "{}", stderr(&adopted));
    assert!(stdout(&adopted).contains("the database now keeps ordering = \"none\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_ends_the_process_cleanly() {
    // The database answers nothing (a stalled connection): the start waits for it when
    // the orchestrator gives up and sends SIGTERM. Before the handler was in place from
    // the first moment, the signal's default action killed the process (no exit code).
    let db = TestDb::new().await;
    let proxy = support::proxy::CountingProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    proxy.stall(true);
    let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["run", "--migrate"])
        .env("DATABASE_URL", proxy.url(&db.name))
        .env("OUTBOXD_DATABASE_CONNECT_TIMEOUT", "60s")
        .env("OUTBOXD_HTTP_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(child.try_wait().unwrap().is_none(), "still starting");
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outboxd did not end after SIGTERM while starting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("stopped while starting"), "{log}");
}
