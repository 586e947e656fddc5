//! The listener: keeps one LISTEN connection up (`database.listen_url`, so a pooler in
//! transaction mode cannot break LISTEN) and forwards every notification to the relay at
//! once. NOTIFY is a hint and the table is the truth: on every (re)connect LISTEN runs
//! first and then the relay is asked for a reconnect sweep, so nothing committed while
//! nobody listened is missed. An idle connection is pinged and TCP keepalive is lowered,
//! so a dead server is noticed in seconds. This file is policy; the connection itself is
//! `store::listen`.

use crate::config::{Config, ListenerConfig};
use crate::metrics::Metrics;
use crate::notification::{Notified, parse_payload};
use crate::relay::Wake;
use crate::retry::Backoff;
use crate::store::listen::Listening;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The notification channel.
pub const CHANNEL: &str = "outbox_events";

/// How one connection's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown, or nobody takes wake-ups any more.
    Shutdown,
    /// The connection was up and got lost (why).
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
            url: config.database.listen_url().to_string(),
            connect_timeout: config.database.connect_timeout,
            config: config.listener.clone(),
            wakes,
            metrics,
        }
    }

    /// Connects, listens, reconnects with jittered exponential backoff; ends on shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(
            self.config.reconnect_min_delay,
            self.config.reconnect_max_delay,
        );
        loop {
            match self.run_once(&shutdown).await {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::Lost(reason)) => {
                    // It was up: reconnect at once-ish, not after the last outage's wait.
                    backoff.succeeded();
                    tracing::warn!(error = %reason, "listener connection lost; reconnecting");
                }
                Err(reason) => {
                    tracing::warn!(error = %reason, attempt = backoff.failures() + 1, "listener cannot connect; retrying");
                }
            }
            self.metrics.listener_connected.set(0);
            let delay = backoff.failed();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.metrics.listener_connected.set(0);
    }

    /// One connection's life: connect, LISTEN, ask for a sweep, forward notifications
    /// and ping while idle, until the connection fails or shutdown. `Err`: it could not
    /// connect or LISTEN.
    pub async fn run_once(&self, shutdown: &CancellationToken) -> Result<Ended, String> {
        let mut listening = Listening::open(
            &self.url,
            self.connect_timeout,
            self.config.keepalive_idle,
            CHANNEL,
        )
        .await
        .map_err(|e| e.to_string())?;
        self.metrics.listener_connected.set(1);
        tracing::info!(channel = CHANNEL, "listening");
        // LISTEN is in place: whatever committed before it must be swept.
        if self.wakes.send(Wake::Reconnected).is_err() {
            return Ok(Ended::Shutdown);
        }
        let ping_every = self.config.ping_interval;
        let ping_timeout = self.config.keepalive_idle.max(Duration::from_secs(5));
        let mut ping_at = tokio::time::Instant::now() + ping_every;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                heard = listening.next() => {
                    let payload = match heard {
                        Ok(payload) => payload,
                        Err(reason) => return Ok(Ended::Lost(reason)),
                    };
                    ping_at = tokio::time::Instant::now() + ping_every;
                    if self.wakes.send(Wake::Heard(self.read(&payload))).is_err() {
                        return Ok(Ended::Shutdown);
                    }
                }
                _ = tokio::time::sleep_until(ping_at) => {
                    if let Err(reason) = listening.ping(ping_timeout).await {
                        return Ok(Ended::Lost(reason));
                    }
                    ping_at = tokio::time::Instant::now() + ping_every;
                }
            }
        }
    }

    /// What a payload asks for; a malformed one (anyone may NOTIFY the channel) is
    /// counted and answered with a sweep.
    fn read(&self, payload: &str) -> Notified {
        self.metrics.notifications.inc();
        parse_payload(payload).unwrap_or_else(|problem| {
            self.metrics.malformed_notifications.inc();
            tracing::warn!(%problem, "malformed notification on {CHANNEL}; sweeping instead");
            Notified::Sweep
        })
    }
}
