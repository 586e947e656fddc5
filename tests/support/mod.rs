//! Test support: each test gets a fresh PostgreSQL database (NOTIFY channels are per
//! database), its own RabbitMQ exchange and queue, and a consumer that records what
//! arrived. Everything is removed on drop, also when the test fails.
#![allow(dead_code)]

pub mod fleet;
pub mod private_pg;
pub mod proxy;
pub mod tls_proxy;
pub mod webhook;

/// A plain HTTP GET on 127.0.0.1 (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], None).await
}

/// An HTTP/1.1 request on 127.0.0.1 (status code, body).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Checks `check` every 50 ms until it holds (true) or `timeout` passes (false).
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// promtool: `$PROMTOOL` (set by `scripts/test`), then the copy `scripts/test` unpacks
/// under target/tools, then PATH. Missing, the test fails: it is never skipped.
pub fn promtool() -> std::path::PathBuf {
    tool("PROMTOOL", "target/tools/usr/bin/promtool", "promtool")
}

/// The Python that has the `standardwebhooks` verifier: `$OUTBOXD_TEST_PYTHON` (set by
/// `scripts/test`), then the virtualenv `scripts/test` makes under target/tools.
pub fn test_python() -> std::path::PathBuf {
    tool("OUTBOXD_TEST_PYTHON", "target/tools/python/bin/python", "")
}

fn tool(variable: &str, unpacked: &str, on_path: &str) -> std::path::PathBuf {
    if let Ok(path) = std::env::var(variable) {
        return path.into();
    }
    let unpacked = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(unpacked);
    if unpacked.exists() {
        return unpacked;
    }
    let found = std::env::var_os("PATH")
        .filter(|_| !on_path.is_empty())
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(on_path))
                .find(|candidate| candidate.exists())
        });
    found.unwrap_or_else(|| {
        panic!(
            "{variable} is not set and {} does not exist: run the suite with ./scripts/test (it installs the tool there)",
            unpacked.display()
        )
    })
}

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outboxd::Config;
use outboxd::store::{Store, connect_once, migrate, partitions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use uuid::Uuid;

pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=error".into()),
        )
        .with_test_writer()
        .try_init();
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A database of this test's own, migrated; dropped (with FORCE) on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh database, migrated as `outboxd migrate` does (schema and partitions).
    pub async fn new() -> TestDb {
        let db = Self::empty().await;
        let mut client = connect_once(&db.url, Duration::from_secs(5), "outboxd-test")
            .await
            .unwrap();
        migrate::run(&mut client).await.unwrap();
        partitions::ensure(&mut client, 7).await.unwrap();
        db
    }

    /// A fresh database without the schema.
    pub async fn empty() -> TestDb {
        init_logging();
        let name = unique("outboxd_t");
        let admin = admin().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable"),
            name,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect_once(&self.url, Duration::from_secs(5), "outboxd-test-producer")
            .await
            .unwrap()
    }

    /// The status of every row, by tracking id.
    pub async fn statuses(&self) -> HashMap<Uuid, String> {
        let client = self.client().await;
        client
            .query("SELECT tracking_id, status FROM outbox", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// The id of the event with `tracking_id`.
    pub async fn id_of(&self, tracking_id: Uuid) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT id FROM outbox WHERE tracking_id = $1",
                &[&tracking_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn count(&self, status: &str) -> i64 {
        let client = self.client().await;
        client
            .query_one("SELECT count(*) FROM outbox WHERE status = $1", &[&status])
            .await
            .unwrap()
            .get(0)
    }

    /// Refuses new connections to this database and terminates outboxd's listener
    /// backend: the listener is down until [`TestDb::allow_connections`]. Returns how
    /// many listener backends were terminated.
    pub async fn cut_listener(&self) -> usize {
        let admin = admin().await;
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS false",
                self.name
            ))
            .await
            .unwrap();
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = $1 AND application_name = 'outboxd-listener'",
                &[&self.name],
            )
            .await
            .unwrap()
            .len()
    }

    pub async fn allow_connections(&self) {
        admin()
            .await
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                self.name
            ))
            .await
            .unwrap();
    }

    /// `n` events committed in one INSERT (typically while no outboxd runs).
    pub async fn insert_backlog(&self, n: i64) {
        self.client()
            .await
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'order', g::text, 'order.created', jsonb_build_object('n', g, 'total', 12.5)
                   FROM generate_series(1, $1::int8) AS g",
                &[&n],
            )
            .await
            .unwrap();
    }

    /// Waits until no row is PENDING or PROCESSING (or the timeout passes).
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let client = self.client().await;
        let deadline = Instant::now() + timeout;
        loop {
            if open_events(&client).await == 0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts the outbox rows every statement rewrites, exactly (a statement-level trigger
/// with a transition table: no statistics flush lag), for the tests and benchmarks that bound them.
pub struct RowUpdates;

impl RowUpdates {
    pub async fn install(db: &TestDb) -> RowUpdates {
        db.client()
            .await
            .batch_execute(
                "CREATE TABLE test_row_updates (n int8 NOT NULL);
                 CREATE FUNCTION test_count_updates() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     INSERT INTO test_row_updates SELECT count(*) FROM changed;
                     RETURN NULL;
                 END $$;
                 CREATE TRIGGER test_count_updates AFTER UPDATE ON outbox
                     REFERENCING NEW TABLE AS changed
                     FOR EACH STATEMENT EXECUTE FUNCTION test_count_updates();",
            )
            .await
            .unwrap();
        RowUpdates
    }

    pub async fn total(&self, db: &TestDb) -> i64 {
        db.client()
            .await
            .query_one(
                "SELECT coalesce(sum(n), 0)::int8 FROM test_row_updates",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }
}

/// Runs `work` to completion on a thread of its own: `Drop` may run inside a runtime
/// that must not be blocked.
fn block_on_aside(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work);
    })
    .join();
}

/// Events not finished yet (PENDING or PROCESSING).
pub async fn open_events(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM outbox WHERE status IN ('PENDING', 'PROCESSING')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn admin() -> tokio_postgres::Client {
    connect_once(ADMIN_URL, Duration::from_secs(5), "outboxd-test-admin")
        .await
        .unwrap()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_aside(async move {
            let admin = admin().await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        });
    }
}

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub event_type: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub received_at: SystemTime,
}

/// An exchange and a queue of this test's own, with a consumer recording every message.
pub struct TestBroker {
    pub exchange: String,
    pub queue: String,
    received: Arc<Mutex<Vec<Received>>>,
    connection: Option<Connection>,
}

impl TestBroker {
    /// Declares a topic exchange and, if `binding` is given, a queue bound with it and a
    /// consumer on that queue.
    pub async fn new(binding: Option<&str>) -> TestBroker {
        init_logging();
        let exchange = unique("outboxd_t");
        let queue = format!("{exchange}.q");
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672");
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        if let Some(binding) = binding {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .basic_qos(2000, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "outboxd-test".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let sink = Arc::clone(&received);
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = consumer.next().await {
                    let props = &delivery.properties;
                    let headers = props
                        .headers()
                        .as_ref()
                        .map(|h| {
                            h.inner()
                                .iter()
                                .map(|(k, v)| {
                                    let text = match v {
                                        lapin::types::AMQPValue::LongString(s) => {
                                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                                        }
                                        other => format!("{other:?}"),
                                    };
                                    (k.to_string(), text)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    sink.lock().unwrap().push(Received {
                        message_id: props
                            .message_id()
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                        event_type: props
                            .kind()
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                        routing_key: delivery.routing_key.to_string(),
                        body: delivery.data.clone(),
                        headers,
                        received_at: SystemTime::now(),
                    });
                }
            });
        }
        TestBroker {
            exchange,
            queue,
            received,
            connection: Some(connection),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The message ids received so far, readable after the broker moved elsewhere.
    pub fn received_handle(&self) -> impl Fn() -> Vec<String> + Send + Sync + 'static {
        let received = Arc::clone(&self.received);
        move || {
            received
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.message_id.clone())
                .collect()
        }
    }

    /// How many messages arrived so far.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until at least `n` messages arrived (or the timeout passes).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() <= deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.received()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let exchange = self.exchange.clone();
        let connection = self.connection.take();
        block_on_aside(async move {
            // Closing the consumer's connection removes its exclusive queue.
            if let Some(connection) = connection {
                let _ = connection.close(200, "bye".into()).await;
            }
            if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                && let Ok(channel) = conn.create_channel().await
            {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
                let _ = conn.close(200, "bye".into()).await;
            }
        });
    }
}

/// A config for `db` and `broker` with test-friendly timings: the safety sweep is an
/// hour away, so only the push path and the reconnect sweep deliver.
pub fn config(db: &TestDb, broker: &TestBroker) -> Config {
    config_for(&db.url, broker)
}

/// The same test-friendly config for a database given by URL.
pub fn config_for(database_url: &str, broker: &TestBroker) -> Config {
    let mut config = Config::default();
    config.database.url = database_url.to_string();
    config.database.pool_size = 4;
    config.rabbitmq.url = AMQP_URL.into();
    config.rabbitmq.exchange = broker.exchange.clone();
    config.rabbitmq.declare_exchange = false;
    config.relay.safety_sweep_interval = Duration::from_secs(3600);
    config.relay.shutdown_grace = Duration::from_secs(5);
    config.listener.reconnect_max_delay = Duration::from_millis(500);
    config.http.listen = "127.0.0.1:0".into();
    config.validate().unwrap();
    config
}

/// Starts an instance and waits until its listener is connected.
pub async fn start(config: Config) -> outboxd::Outboxd {
    let service = outboxd::Outboxd::start(config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.metrics().listener_connected.get() != 1 {
        assert!(Instant::now() < deadline, "listener did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    service
}

/// Waits until the instance's start-up claiming ended (the horizon wait every start
/// runs claims whatever is due), so that only the push path and the sweeps a test
/// counts deliver what comes next.
pub async fn wait_started(service: &outboxd::Outboxd) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.metrics().high_load_mode.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "the start-up horizon wait did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A store on `db`, for tests that act as a (crashing) worker.
pub async fn store(config: &Config) -> Store {
    Store::connect(&config.database).await.unwrap()
}

/// A routing rule: these event type patterns to these destinations, ordering as
/// `relay.ordering` says.
pub fn route(event_types: &[&str], destinations: &[&str]) -> outboxd::config::RouteConfig {
    outboxd::config::RouteConfig {
        event_types: event_types.iter().map(|s| s.to_string()).collect(),
        destinations: destinations.iter().map(|s| s.to_string()).collect(),
        ordering: None,
    }
}
