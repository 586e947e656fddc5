//! The listener: keeps one LISTEN connection up (`database.listen_url`, so a pooler in
//! transaction mode cannot break LISTEN) and forwards every notification to the relay at
//! once. NOTIFY is a hint and the table is the truth: on every (re)connect LISTEN runs
//! first and then the relay is asked for a reconnect sweep, so nothing committed while
//! nobody listened is missed. An idle connection is pinged and TCP keepalive is lowered,
//! so a dead server is noticed in seconds. The listener also keeps this instance's
//! membership (`outbox_instances`): it joins once LISTEN is in place, renews it on a
//! heartbeat that doubles as the ping, reads who else is live, and hands the relay the
//! shards of notified ids that are this instance's to claim (src/membership.rs); it
//! leaves on shutdown. This file is policy; the connection itself is `store::listen`.

use crate::config::{Config, ListenerConfig};
use crate::membership::Shares;
use crate::metrics::Metrics;
use crate::notification::{Notified, parse_payload};
use crate::relay::Wake;
use crate::retry::Backoff;
use crate::store::listen::{HeartbeatError, Listening};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The notification channel.
pub const CHANNEL: &str = "outbox_events";

/// A member that has not renewed its membership for this many heartbeat intervals is
/// dropped by the others.
const MISSED_BEATS: u32 = 5;

/// The heartbeat's state on one connection.
struct Beat {
    /// Other live instances at the last reading.
    others: usize,
    next_at: tokio::time::Instant,
    /// The server refused a heartbeat (warned once).
    refused: bool,
}

impl Default for Beat {
    fn default() -> Self {
        Beat {
            others: 0,
            next_at: tokio::time::Instant::now(),
            refused: false,
        }
    }
}

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
    /// This instance's name among the members.
    name: String,
    url: String,
    connect_timeout: Duration,
    config: ListenerConfig,
    wakes: mpsc::UnboundedSender<Wake>,
    metrics: Metrics,
}

impl Listener {
    pub fn new(
        config: &Config,
        name: String,
        wakes: mpsc::UnboundedSender<Wake>,
        metrics: Metrics,
    ) -> Self {
        Self {
            name,
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

    /// One connection's life: connect, LISTEN, join the members, ask for a sweep,
    /// forward notifications and beat the heartbeat, until the connection fails or
    /// shutdown (then leave). `Err`: it could not connect or LISTEN.
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
        tracing::info!(channel = CHANNEL, instance = %self.name, "listening");
        // Join before the sweep: the shares take effect first, so an id of a shard this
        // instance gains is either heard from now on or committed before the sweep.
        let mut beat = Beat::default();
        if let Err(reason) = self.beat(&listening, &mut beat).await {
            return Ok(Ended::Lost(reason));
        }
        // LISTEN is in place: whatever committed before it must be swept.
        if self.wakes.send(Wake::Reconnected).is_err() {
            return Ok(self.leave(&listening).await);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(self.leave(&listening).await),
                heard = listening.next() => {
                    let payload = match heard {
                        Ok(payload) => payload,
                        Err(reason) => return Ok(Ended::Lost(reason)),
                    };
                    let notified = self.read(&payload);
                    if notified == Notified::Members {
                        // One joined or left: read the members now, not at the next beat.
                        if let Err(reason) = self.beat(&listening, &mut beat).await {
                            return Ok(Ended::Lost(reason));
                        }
                    } else if self.wakes.send(Wake::Heard(notified)).is_err() {
                        return Ok(self.leave(&listening).await);
                    }
                }
                _ = tokio::time::sleep_until(beat.next_at) => {
                    if let Err(reason) = self.beat(&listening, &mut beat).await {
                        return Ok(Ended::Lost(reason));
                    }
                }
            }
        }
    }

    /// One heartbeat: renews this instance's membership, reads the live members and
    /// hands the relay its shares. `Err`: the connection is lost. A heartbeat the server
    /// refuses (no right to write `outbox_instances`) leaves this instance claiming
    /// every notified id, as if alone: the work is divided less well, nothing is missed.
    async fn beat(&self, listening: &Listening, beat: &mut Beat) -> Result<(), String> {
        // The row lapses MISSED_BEATS heartbeat intervals from now, alone or not. Alone,
        // this instance beats only at the idle ping's pace, so its row lapses between
        // beats: an instance that joins then drops it and says so, and this one, if it
        // is alive, hears that, joins again at once and says so too. A stalled one stays
        // dropped, so a newcomer never waits on it.
        let timeout = self.config.keepalive_idle.max(Duration::from_secs(5));
        let shares = match listening
            .heartbeat(
                &self.name,
                self.config.heartbeat_interval * MISSED_BEATS,
                timeout,
            )
            .await
        {
            Ok(members) => Shares::of(&self.name, &members),
            Err(HeartbeatError::Lost(reason)) => return Err(reason),
            Err(HeartbeatError::Refused(reason)) => {
                if !beat.refused {
                    tracing::warn!(error = %reason, "cannot keep this instance's membership; it claims every notified event, as if alone");
                }
                beat.refused = true;
                Shares::default()
            }
        };
        if shares.members() != beat.others + 1 {
            tracing::info!(
                instances = shares.members(),
                shards = shares.count(),
                "instances on this database changed; notified events divided anew"
            );
        }
        beat.others = shares.members() - 1;
        self.metrics.instances.set(shares.members() as i64);
        self.metrics.shards_owned.set(shares.count() as i64);
        let every = if beat.others > 0 {
            self.config.heartbeat_interval
        } else {
            self.config.ping_interval
        };
        beat.next_at = tokio::time::Instant::now() + every;
        // The relay gone means shutdown; the caller notices on its next send.
        let _ = self.wakes.send(Wake::Shares(shares));
        Ok(())
    }

    /// Shutdown: this instance's membership ends, so the others take its share over.
    async fn leave(&self, listening: &Listening) -> Ended {
        if let Err(error) = listening.leave(&self.name, Duration::from_secs(2)).await {
            tracing::warn!(%error, "could not leave the members; the others drop this instance once its listener connection is gone");
        }
        Ended::Shutdown
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
