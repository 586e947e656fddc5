//! The listener: its own direct connection (`database.listen_url`, so a pooler in
//! transaction mode cannot break LISTEN), `LISTEN outbox_events`, and the ids of every
//! notification forwarded to the relay at once. NOTIFY is a hint and the table is the
//! truth: on every (re)connect it runs LISTEN first and then asks the relay for a
//! reconnect sweep, so nothing committed while nobody listened is missed. An idle
//! connection is pinged and TCP keepalive is lowered, so a dead server is noticed in
//! seconds. The connection is driven with `poll_message` (a plain spawned connection
//! future would drop notifications).

use crate::config::{Config, ListenerConfig, redact};
use crate::metrics::Metrics;
use crate::notification::{Notified, parse_payload};
use crate::retry::{backoff_delay, random_jitter};
use crate::store::{describe_target, error_text};
use crate::tls::parse_url;
use futures_util::future::poll_fn;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// The notification channel.
pub const CHANNEL: &str = "outbox_events";

/// What the listener tells the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// Claim these ids (from a notification, or returned by the reaper).
    Ids(Vec<i64>),
    /// Claim every due PENDING event (a notification without ids, or a malformed one).
    Sweep,
    /// LISTEN is (again) in place: claim everything committed while nobody listened.
    Reconnected,
    /// Another instance entered or renewed high-load (drain) mode.
    Drain,
    /// Another instance left drain mode.
    Notify,
}

/// Why a listening session ended.
#[derive(Debug)]
enum Ended {
    Shutdown,
    Lost(String),
}

/// Keeps one LISTEN connection up and forwards what it hears.
pub struct Listener {
    url: String,
    connect_timeout: Duration,
    config: ListenerConfig,
    wakes: mpsc::UnboundedSender<Wake>,
    metrics: Metrics,
}

impl Listener {
    pub fn new(config: &Config, wakes: mpsc::UnboundedSender<Wake>, metrics: Metrics) -> Self {
        Self {
            url: config.listen_url().to_string(),
            connect_timeout: config.database.connect_timeout,
            config: config.listener.clone(),
            wakes,
            metrics,
        }
    }

    /// Connects, listens, reconnects with jittered exponential backoff; ends on shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0;
        loop {
            match self.listen_once(&shutdown).await {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::Lost(reason)) => {
                    failures = 1;
                    tracing::warn!(error = %reason, "listener connection lost; reconnecting");
                }
                Err(reason) => {
                    failures += 1;
                    tracing::warn!(error = %reason, attempt = failures, "listener cannot connect; retrying");
                }
            }
            self.metrics.listener_connected.set(0);
            let delay = backoff_delay(
                failures,
                self.config.reconnect_min_delay,
                self.config.reconnect_max_delay,
                random_jitter(),
            );
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.metrics.listener_connected.set(0);
    }

    /// One connection's life: connect, LISTEN, ask for a sweep, forward notifications and
    /// ping while idle, until the connection fails or shutdown.
    async fn listen_once(&self, shutdown: &CancellationToken) -> Result<Ended, String> {
        let target = parse_url(&self.url)
            .map_err(|e| format!("bad listen URL {}: {e}", redact(&self.url)))?;
        let mut pg = target.config.clone();
        pg.connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(self.config.keepalive_idle)
            .keepalives_interval((self.config.keepalive_idle / 2).max(Duration::from_secs(1)))
            .keepalives_retries(3)
            .tcp_user_timeout(self.config.keepalive_idle * 3);
        if pg.get_application_name().is_none() {
            pg.application_name("outboxd-listener");
        }
        let tls = target.connector()?;
        let (client, mut connection) = pg.connect(tls).await.map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                describe_target(&pg),
                error_text(&e)
            )
        })?;

        // The connection is polled here, in a task of its own, for both replies and
        // notifications; notifications go through `notes`.
        let (notes_tx, mut notes) = mpsc::unbounded_channel::<Result<String, String>>();
        let driver = tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if notes_tx.send(Ok(n.payload().to_string())).is_err() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {} // notices
                    Some(Err(error)) => {
                        let _ = notes_tx.send(Err(error_text(&error)));
                        break;
                    }
                    None => {
                        let _ = notes_tx.send(Err("connection closed by the server".into()));
                        break;
                    }
                }
            }
        });
        let _abort_driver = AbortOnDrop(driver);

        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| format!("LISTEN failed: {}", error_text(&e)))?;
        self.metrics.listener_connected.set(1);
        tracing::info!(channel = CHANNEL, "listening");
        // LISTEN is in place: whatever committed before it must be swept.
        if self.wakes.send(Wake::Reconnected).is_err() {
            return Ok(Ended::Shutdown);
        }

        let ping_every = self.config.ping_interval;
        let mut ping_at = tokio::time::Instant::now() + ping_every;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                note = notes.recv() => {
                    let payload = match note {
                        Some(Ok(payload)) => payload,
                        Some(Err(reason)) => return Ok(Ended::Lost(reason)),
                        None => return Ok(Ended::Lost("connection task ended".into())),
                    };
                    ping_at = tokio::time::Instant::now() + ping_every;
                    self.metrics.notifications.inc();
                    let wake = match parse_payload(&payload) {
                        Ok(Notified::Ids(ids)) => Wake::Ids(ids),
                        Ok(Notified::Sweep) => Wake::Sweep,
                        Ok(Notified::Drain) => Wake::Drain,
                        Ok(Notified::Notify) => Wake::Notify,
                        Err(problem) => {
                            self.metrics.malformed_notifications.inc();
                            tracing::warn!(%problem, "malformed notification on {CHANNEL}; sweeping instead");
                            Wake::Sweep
                        }
                    };
                    if self.wakes.send(wake).is_err() {
                        return Ok(Ended::Shutdown);
                    }
                }
                _ = tokio::time::sleep_until(ping_at) => {
                    let ping = tokio::time::timeout(self.config.keepalive_idle.max(Duration::from_secs(5)), client.simple_query(""));
                    match ping.await {
                        Ok(Ok(_)) => ping_at = tokio::time::Instant::now() + ping_every,
                        Ok(Err(e)) => return Ok(Ended::Lost(format!("ping failed: {}", error_text(&e)))),
                        Err(_) => return Ok(Ended::Lost("ping timed out (half-open connection?)".into())),
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
