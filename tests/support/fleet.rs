//! Fault-injection harness: real `outboxd` processes against a test database and broker,
//! a producer committing events while faults happen, and the audit every scenario ends
//! with (every committed event consumed, none lost; duplicates counted).

use super::TestBroker;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// One `outboxd run` process.
pub struct Instance {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    /// Starts `outboxd run` on the database and `broker` with fault-friendly timings (2 s lease)
    /// plus `extra` environment.
    pub fn start(database_url: &str, broker: &TestBroker, extra: &[(&str, &str)]) -> Instance {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
        command.arg("run");
        for (name, _) in std::env::vars() {
            if name.starts_with("OUTBOXD_") || name == "DATABASE_URL" {
                command.env_remove(name);
            }
        }
        command
            .env("DATABASE_URL", database_url)
            .env("OUTBOXD_RABBITMQ_EXCHANGE", &broker.exchange)
            .env("OUTBOXD_RABBITMQ_DECLARE_EXCHANGE", "false")
            .env("OUTBOXD_HTTP_LISTEN", "127.0.0.1:0")
            .env("OUTBOXD_DATABASE_POOL_SIZE", "4")
            .env("OUTBOXD_RELAY_LEASE", "2s")
            .env("OUTBOXD_RELAY_BATCH_SIZE", "100")
            .env("OUTBOXD_RETRY_BASE_DELAY", "100ms")
            .env("OUTBOXD_RETRY_MAX_DELAY", "2s")
            .env("OUTBOXD_LISTENER_RECONNECT_MAX_DELAY", "500ms")
            .env("OUTBOXD_RABBITMQ_RECONNECT_MAX_DELAY", "500ms")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped());
        for (name, value) in extra {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start outboxd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Instance { child, log }
    }

    /// Waits until the log says the instance runs (its listener is up).
    pub async fn wait_running(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().contains("listening") {
            assert!(
                Instant::now() < deadline,
                "outboxd did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where this instance serves `/metrics` (read from its log).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("serving /metrics"))
            .unwrap_or_else(|| panic!("no HTTP address in the log:\n{log}"));
        let start = line.find("127.0.0.1:").expect("address");
        let end = line[start..]
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
            .map_or(line.len(), |e| start + e);
        line[start..end].parse().expect("socket address")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to release anything.
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGSTOP: the process stalls with every connection open (a long GC pause, a
    /// frozen VM); `resume` lets it go on where it was.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} failed");
    }

    /// SIGTERM, then the exit code once it stopped.
    pub async fn terminate(&mut self) -> Option<i32> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "outboxd did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Commits `total` events in transactions of `per_commit`, as fast as it can; the
/// tracking ids committed so far are readable while it runs.
pub struct Producer {
    pub committed: Arc<Mutex<Vec<Uuid>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    /// `url`: the database to commit into. A commit that fails (the server restarts)
    /// is tried again on a new connection with new events; only acknowledged commits are
    /// recorded (a failed one may still have committed: the database is the truth).
    pub async fn start(url: &str, total: usize, per_commit: usize) -> Producer {
        let url = url.to_string();
        let committed = Arc::new(Mutex::new(Vec::with_capacity(total)));
        let record = Arc::clone(&committed);
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut n = 0;
            while n < total {
                let Some(connected) = client.as_mut() else {
                    match outboxd::store::connect_once(
                        &url,
                        Duration::from_secs(2),
                        "outboxd-test-producer",
                    )
                    .await
                    {
                        Ok(c) => client = Some(c),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                    continue;
                };
                let events: Vec<outboxd::NewEvent> = (n..(n + per_commit).min(total))
                    .map(|i| {
                        outboxd::NewEvent::new(
                            "order",
                            i.to_string(),
                            "order.created",
                            serde_json::json!({ "n": i }),
                        )
                    })
                    .collect();
                let attempt = async {
                    let tx = connected.transaction().await?;
                    let ids = outboxd::enqueue_many(&tx, &events).await?;
                    tx.commit().await?;
                    Ok::<_, tokio_postgres::Error>(ids)
                };
                match attempt.await {
                    Ok(ids) => {
                        n += ids.len();
                        record.lock().unwrap().extend(ids);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(_) => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Producer { committed, task }
    }

    /// Stops committing; returns what was committed so far.
    pub fn abort(self) -> Vec<Uuid> {
        self.task.abort();
        self.committed.lock().unwrap().clone()
    }

    pub async fn finish(self) -> Vec<Uuid> {
        self.task.await.unwrap();
        self.committed.lock().unwrap().clone()
    }
}

/// What a scenario ended with.
#[derive(Debug)]
pub struct Audit {
    pub committed: usize,
    pub delivered: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub recovered_in: Duration,
}

/// Waits (up to `timeout`) until every committed event was consumed and every row is
/// PUBLISHED, then counts. `fault_at`: when the fault was injected.
pub async fn audit(
    url: &str,
    broker: &TestBroker,
    committed: &[Uuid],
    fault_at: Instant,
    timeout: Duration,
) -> Audit {
    let wanted: HashSet<String> = committed.iter().map(|id| id.to_string()).collect();
    let deadline = Instant::now() + timeout;
    let client = outboxd::store::connect_once(url, Duration::from_secs(5), "outboxd-test-audit")
        .await
        .unwrap();
    loop {
        let received: HashSet<String> = broker
            .received()
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        if wanted.is_subset(&received) && super::open_events(&client).await == 0 {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_in = fault_at.elapsed();
    let received = broker.received();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for message in &received {
        *counts.entry(message.message_id.clone()).or_default() += 1;
    }
    let delivered = wanted.iter().filter(|id| counts.contains_key(*id)).count();
    let audit = Audit {
        committed: wanted.len(),
        delivered,
        lost: wanted.len() - delivered,
        duplicates: counts.values().map(|n| n - 1).sum(),
        recovered_in,
    };
    println!("{audit:?}");
    audit
}

/// Tracking ids consumed more than once.
pub fn duplicated(broker: &TestBroker) -> Vec<Uuid> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for message in broker.received() {
        *counts.entry(message.message_id).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .filter_map(|(id, _)| id.parse().ok())
        .collect()
}

/// Checks one destination's arrivals: each aggregate's events arrive in id order (a
/// re-sent earlier event may come again later; a later event never comes before an
/// earlier one) and every one arrives. Returns how many arrivals were duplicates.
pub fn audit_order(
    destination: &str,
    arrivals: &[(String, i64)],
    expected: &HashMap<String, Vec<i64>>,
) -> usize {
    let mut arrived: HashMap<&str, usize> = HashMap::new();
    let mut duplicates = 0;
    for (key, id) in arrivals {
        let ids = &expected[key];
        let position = ids
            .binary_search(id)
            .unwrap_or_else(|_| panic!("{destination}: event {id} is not one of {key}'s"));
        let have = arrived.entry(key.as_str()).or_default();
        if position < *have {
            duplicates += 1;
            continue;
        }
        assert_eq!(
            position, *have,
            "{destination}: aggregate {key} received event {id} before event {}",
            ids[*have]
        );
        *have += 1;
    }
    for (key, ids) in expected {
        assert_eq!(
            arrived.get(key.as_str()).copied().unwrap_or(0),
            ids.len(),
            "{destination}: aggregate {key} is missing events"
        );
    }
    duplicates
}
