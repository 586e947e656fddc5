//! The relay: an event's trip through outboxd, one file a step.
//!
//! - [`inbox`]: what woke it (notified ids, the reaper's ids, sweep requests, retry
//!   timers), merged, so everything that arrives while a claim runs goes into the next.
//! - [`claim`]: lease the next batch (`FOR UPDATE SKIP LOCKED`, one `lock_token`).
//! - [`deliver`]: send each route's events to every destination they still need, the
//!   lease renewed meanwhile.
//! - [`decide`]: what each event's outcomes mean (pure).
//! - [`record`]: complete / schedule_retry / bury, fenced by the `lock_token`.
//!
//! Under load claims are large and back to back; idle, it sends nothing but its timers.
//! On shutdown it stops claiming, lets in-flight deliveries finish within
//! `shutdown_grace`, and releases what it still holds.

mod claim;
pub mod decide;
mod deliver;
mod gates;
pub mod inbox;
mod record;

pub use decide::{Decision, decide};
pub use inbox::{Sweep, Wake};

use crate::config::{HighLoadConfig, RelayConfig, RetryConfig};
use crate::high_load::HighLoad;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::routing::Router;
use crate::sink::Sink;
use crate::store::Store;
use deliver::Deliverer;
use gates::Gates;
use inbox::Inbox;
use record::BatchReport;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The events one delivery task holds, under one claim's `lock_token`.
struct Held {
    lock_token: Uuid,
    events: Vec<(i64, std::time::SystemTime)>,
    /// The destination it probes, if it is a probe.
    probe: Option<String>,
}

/// The relay loop. See the module docs.
pub struct Relay {
    deliverer: Arc<Deliverer>,
    wakes: mpsc::UnboundedReceiver<Wake>,
    inbox: Inbox,
    in_flight: JoinSet<BatchReport>,
    /// What each running delivery holds, so a crash or shutdown can hand it back.
    held: HashMap<tokio::task::Id, Held>,
    claim_backoff: Backoff,
    claims_blocked_until: Option<Instant>,
    high_load: HighLoad,
    gates: Gates,
}

impl Relay {
    pub fn new(
        store: Store,
        router: Router,
        destinations: Vec<Arc<dyn Sink>>,
        relay: RelayConfig,
        retry: RetryConfig,
        metrics: Metrics,
        wakes: mpsc::UnboundedReceiver<Wake>,
    ) -> Self {
        let high_load = HighLoad::new(
            HighLoadConfig {
                enabled: false,
                ..Default::default()
            },
            String::new(),
            metrics.clone(),
        );
        let routed: Vec<String> = router
            .destinations()
            .into_iter()
            .filter(|name| destinations.iter().any(|sink| sink.name() == name))
            .collect();
        Self {
            gates: Gates {
                routed,
                ..Gates::default()
            },
            deliverer: Arc::new(Deliverer {
                store,
                router,
                destinations: destinations
                    .into_iter()
                    .map(|sink| (sink.name().to_string(), sink))
                    .collect(),
                relay,
                retry,
                metrics,
            }),
            wakes,
            inbox: Inbox::default(),
            in_flight: JoinSet::new(),
            held: HashMap::new(),
            claim_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            claims_blocked_until: None,
            high_load,
        }
    }

    /// Instances divide the notified events by aggregate, not by id block (with
    /// per-aggregate ordering: see [`crate::membership`]).
    pub fn dividing_by_aggregate(mut self, by_aggregate: bool) -> Self {
        self.inbox.divide_by_aggregate(by_aggregate);
        self
    }

    /// High-load (drain) mode as configured. Without it, this relay never enters drain
    /// mode itself but still follows other instances into it.
    pub fn with_high_load(mut self, high_load: HighLoad) -> Self {
        self.high_load = high_load;
        self
    }

    /// One round, for tests and tools: takes in every wake-up waiting, claims what they
    /// ask for (as many batches as may be in flight), and waits until each of those
    /// deliveries has recorded its outcome. Returns how many events it claimed.
    pub async fn run_once(&mut self) -> usize {
        self.take_waiting();
        let claimed = self.fill().await;
        while let Some(done) = self.in_flight.join_next_with_id().await {
            self.finished(done).await;
        }
        claimed
    }

    /// Runs until `shutdown`; then stops claiming, lets in-flight deliveries finish
    /// within `shutdown_grace`, and releases every event it still holds.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let every = self.deliverer.relay.safety_sweep_interval;
        let mut safety = interval_at(Instant::now() + every, every);
        safety.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Set on shutdown while drain mode is being left: claims go on (within
        // `shutdown_grace`) until no producer that read drain mode can still commit.
        let mut stopping: Option<Instant> = None;
        let mut wakes_open = true;
        loop {
            if stopping.is_none() && shutdown.is_cancelled() {
                if !self.high_load.stop(&self.deliverer.store).await {
                    break;
                }
                tracing::info!(
                    "shutting down: claiming until every producer that read drain mode has committed"
                );
                stopping = Some(Instant::now() + self.deliverer.relay.shutdown_grace);
            }
            self.fill().await;
            // Leaving ended with one more claim (just made), or the grace is over.
            if let Some(deadline) = stopping
                && (!self.high_load.is_leaving() || Instant::now() >= deadline)
            {
                break;
            }
            let far = Instant::now() + Duration::from_secs(86_400);
            let next_retry = self.inbox.next_retry();
            let claims_blocked_until = self.claims_blocked_until;
            let high_load_at = self.high_load.next_wake();
            let look_again = self.gates.look_again;
            let slots = self.gates.slots.clone();
            let stop_at = stopping;
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if stop_at.is_none() => continue,
                _ = sleep_until(stop_at.unwrap_or(far)), if stop_at.is_some() => {}
                Some(done) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => {
                    self.finished(done).await;
                }
                wake = self.wakes.recv(), if wakes_open => match wake {
                    Some(wake) => {
                        self.inbox.absorb(wake, &mut self.high_load);
                        self.take_waiting();
                    }
                    None => {
                        // Every sender is gone (the listener and the reaper end on
                        // shutdown): only timers can wake us now.
                        wakes_open = false;
                        if stop_at.is_none() {
                            shutdown.cancelled().await;
                        }
                    }
                },
                _ = sleep_until(next_retry.unwrap_or(far)), if next_retry.is_some() => {
                    self.inbox.retries_due(Instant::now());
                }
                _ = sleep_until(claims_blocked_until.unwrap_or(far)), if claims_blocked_until.is_some() => {
                    self.claims_blocked_until = None;
                }
                // A parked destination's cool-down ended: time to probe it.
                _ = sleep_until(look_again.unwrap_or(far)), if look_again.is_some() => {}
                // A destination's part of a group is done: it has room again.
                _ = slots.freed() => {}
                _ = sleep_until(high_load_at.unwrap_or(far)), if high_load_at.is_some() => {
                    if self.high_load.tick(&self.deliverer.store).await {
                        self.inbox.request(Sweep::Drain);
                    }
                }
                _ = safety.tick() => self.inbox.request(Sweep::Safety),
            }
        }
        let deadline =
            stopping.unwrap_or_else(|| Instant::now() + self.deliverer.relay.shutdown_grace);
        self.shut_down(deadline).await;
    }

    /// Takes in every wake-up already waiting, without blocking.
    fn take_waiting(&mut self) {
        while let Ok(wake) = self.wakes.try_recv() {
            self.inbox.absorb(wake, &mut self.high_load);
        }
    }

    async fn finished(
        &mut self,
        done: Result<(tokio::task::Id, BatchReport), tokio::task::JoinError>,
    ) {
        match done {
            Ok((id, report)) => {
                if let Some(held) = self.held.remove(&id) {
                    self.gates.probed(held.probe.as_deref());
                }
                self.inbox.schedule_retries(&report.retries);
                self.inbox.released(&report.released);
            }
            Err(error) if error.is_cancelled() => {
                // Aborted on shutdown: what it held stays, so shut_down() releases it.
            }
            Err(error) => {
                let Some(held) = self.held.remove(&error.id()) else {
                    return;
                };
                self.gates.probed(held.probe.as_deref());
                self.crashed(held, error).await;
            }
        }
    }

    /// A delivery task panicked: its events go back at once (not after the lease), to
    /// be claimed one at a time; a lone event that keeps crashing ends as a dead letter
    /// with the crash as its reason.
    async fn crashed(&mut self, held: Held, error: tokio::task::JoinError) {
        let panic = match error.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into()),
            Err(error) => error.to_string(),
        };
        let reason = if held.events.len() == 1 {
            format!("delivery crashed on this event: {panic}")
        } else {
            format!(
                "delivery of a batch of {} crashed ({panic}); each is claimed alone now",
                held.events.len()
            )
        };
        tracing::error!(events = held.events.len(), error = %panic, "delivery crashed; its events are claimed one at a time");
        let released = self
            .deliverer
            .store
            .release_crashed(
                held.lock_token,
                &held.events,
                &reason,
                self.deliverer.retry.max_attempts,
            )
            .await;
        match released {
            Ok(released) => {
                if !released.buried.is_empty() {
                    tracing::error!(ids = ?released.buried, error = %reason, "event moved to dead letters");
                }
                if let Err(error) = self.deliverer.store.release_after_burial(&released).await {
                    tracing::warn!(%error, "could not release the aggregate of a crashed event; the safety sweep does");
                }
                self.inbox.suspect(released.returned);
            }
            Err(error) => {
                tracing::error!(%error, "could not hand back a crashed delivery's events; the reaper returns them when their lease expires")
            }
        }
    }

    /// Lets in-flight deliveries finish until `deadline`, then releases what is left.
    /// (High-load mode was handed back when the shutdown began: `HighLoad::stop`.)
    async fn shut_down(mut self, deadline: Instant) {
        if !self.in_flight.is_empty() {
            tracing::info!(
                batches = self.in_flight.len(),
                "shutting down: waiting for in-flight deliveries"
            );
        }
        while !self.in_flight.is_empty() {
            tokio::select! {
                Some(done) = self.in_flight.join_next_with_id() => self.finished(done).await,
                _ = sleep_until(deadline) => {
                    tracing::warn!(batches = self.in_flight.len(), "shutdown grace over: abandoning in-flight deliveries");
                    self.in_flight.abort_all();
                    while let Some(done) = self.in_flight.join_next_with_id().await {
                        self.finished(done).await;
                    }
                }
            }
        }
        // Aborted deliveries leave what they held behind: hand their events back.
        let mut tokens: Vec<Uuid> = self.held.values().map(|h| h.lock_token).collect();
        tokens.sort();
        tokens.dedup();
        match self.deliverer.store.release(&tokens).await {
            Ok(0) => {}
            Ok(released) => {
                tracing::info!(events = released, "released unfinished events to PENDING")
            }
            Err(error) => {
                tracing::error!(%error, "could not release unfinished events; the reaper returns them when their lease expires")
            }
        }
    }
}
