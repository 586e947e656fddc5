//! High-load (drain) mode, as one instance sees it.
//!
//! A transaction that issued NOTIFY holds a cluster-wide lock through its commit, so a
//! notifying trigger lets producers commit only one at a time. When producers insert at
//! least `enter_rate` events a second (the growth of the event ids this instance claims
//! or is notified of), it switches the trigger off for everyone
//! (`outbox_mode`: drain mode, a lease renewed every second while the load lasts) and
//! claims back to back instead, pausing `poll_interval` after a short claim. Other
//! instances hear "drain" on the channel and claim back to back too.
//!
//! Leaving is race-free (design.md section 1): commit `mode = 'notify'` (or see the
//! lease lapse), then take N := a fresh transaction id, and keep claiming, ever less
//! often, until no transaction that could have read drain mode can still commit an event
//! (`Store::drain_horizon_passed`); then claim once more and rely on notifications again.

use crate::config::HighLoadConfig;
use crate::metrics::Metrics;
use crate::store::Store;
use std::time::Duration;
use tokio::time::Instant;

/// How often the load is measured (and drain mode renewed).
const WINDOW: Duration = Duration::from_secs(1);
/// The longest pause between claims while leaving drain mode.
const MAX_LEAVING_INTERVAL: Duration = Duration::from_secs(1);

/// This instance's mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Notifications drive the claims.
    Notify,
    /// Claims back to back. `holding`: this instance entered or last renewed drain mode.
    /// `lease_end`: when drain mode ends unless renewed, as far as this instance knows.
    Drain { holding: bool, lease_end: Instant },
    /// Notifications are on again; claims go on until every transaction that could have
    /// read drain mode has ended. `fence` is N, once taken.
    Leaving {
        fence: Option<String>,
        interval: Duration,
        next: Instant,
    },
}

impl Mode {
    fn gauge(&self) -> i64 {
        match self {
            Mode::Notify => 0,
            Mode::Drain { .. } => 1,
            Mode::Leaving { .. } => 2,
        }
    }
}

pub struct HighLoad {
    config: HighLoadConfig,
    holder: String,
    metrics: Metrics,
    mode: Mode,
    /// Start of the current measuring window (None: no new event seen since the last one).
    window_start: Option<Instant>,
    /// The highest event id seen (claimed or notified), and its value at the window's
    /// start. Ids come from one sequence, so their growth is the insert rate of every
    /// producer, the same for every instance, whichever claimed what.
    highest_id: i64,
    window_start_id: i64,
    /// Read the mode from the database at the next tick (the listener reconnected, so
    /// a broadcast may have been missed).
    recheck: bool,
    next_poll: Instant,
    /// The horizon wait every start runs has not ended yet (it is no switch of mode).
    starting: bool,
    /// Shutting down: never enter drain mode again.
    stopping: bool,
}

impl HighLoad {
    pub fn new(config: HighLoadConfig, holder: String, metrics: Metrics) -> Self {
        metrics.high_load_mode.set(
            Mode::Leaving {
                fence: None,
                interval: Duration::ZERO,
                next: Instant::now(),
            }
            .gauge(),
        );
        Self {
            holder,
            metrics,
            // Every start begins as if leaving drain mode: a producer that read drain
            // mode before a restart (or a kill -9, which leaves no trace to decide by)
            // may commit after it, unannounced; claims go on until its transaction ended.
            mode: Mode::Leaving {
                fence: None,
                interval: config.poll_interval,
                next: Instant::now(),
            },
            window_start: None,
            highest_id: 0,
            window_start_id: 0,
            recheck: false,
            next_poll: Instant::now(),
            starting: true,
            stopping: false,
            config,
        }
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// An event id was claimed or notified.
    pub fn saw(&mut self, id: i64) {
        if id <= self.highest_id {
            return;
        }
        if self.window_start.is_none() {
            self.window_start = Some(Instant::now());
            if self.highest_id == 0 {
                // The first id since start: measure from here.
                self.highest_id = id;
            }
            self.window_start_id = self.highest_id;
        }
        self.highest_id = id;
    }

    /// Another instance entered or renewed drain mode.
    pub fn heard_drain(&mut self) {
        let lease_end = Instant::now() + self.config.lease;
        match &mut self.mode {
            Mode::Drain { lease_end: end, .. } => *end = (*end).max(lease_end),
            _ => self.follow(lease_end),
        }
    }

    /// Claims back to back because another instance holds drain mode until `lease_end`.
    fn follow(&mut self, lease_end: Instant) {
        self.set(Mode::Drain {
            holding: false,
            lease_end,
        });
        self.window_start.get_or_insert_with(Instant::now);
        self.next_poll = Instant::now();
    }

    /// An instance left drain mode: leave it too.
    pub fn heard_notify(&mut self) {
        if matches!(self.mode, Mode::Drain { .. }) {
            self.leave_now();
        }
    }

    /// The listener (re)connected: broadcasts may have been missed.
    pub fn reconnected(&mut self) {
        if self.config.enabled || self.mode != Mode::Notify {
            self.recheck = true;
        }
    }

    /// When `tick` must run next (None: nothing to do until a claim or a broadcast).
    pub fn next_wake(&self) -> Option<Instant> {
        if self.recheck {
            return Some(Instant::now());
        }
        let window_end = self.window_start.map(|start| start + WINDOW);
        let own = match &self.mode {
            Mode::Notify => None,
            Mode::Drain { .. } => Some(self.next_poll),
            Mode::Leaving { next, .. } => Some(*next),
        };
        match (window_end, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what is due; true when the relay should claim now (a poll).
    pub async fn tick(&mut self, store: &Store) -> bool {
        let now = Instant::now();
        if self.recheck {
            self.recheck = false;
            self.read_mode(store).await;
        }
        if let Some(start) = self.window_start
            && now >= start + WINDOW
        {
            let grown = (self.highest_id - self.window_start_id).max(0);
            let rate = grown as f64 / now.duration_since(start).as_secs_f64();
            self.window_start_id = self.highest_id;
            self.window_start = (self.mode != Mode::Notify).then_some(now);
            self.judge(store, rate).await;
        }
        if let Mode::Drain {
            holding: false,
            lease_end,
        } = self.mode
            && now >= lease_end
        {
            // No renewal heard for a whole lease: ask the database.
            self.read_mode(store).await;
        }
        match &self.mode {
            Mode::Notify => false,
            Mode::Drain { .. } => {
                if now >= self.next_poll {
                    self.next_poll = now + self.config.poll_interval;
                    self.metrics.high_load_claims.inc();
                    true
                } else {
                    false
                }
            }
            Mode::Leaving { next, .. } if now < *next => false,
            Mode::Leaving { .. } => self.leaving(store).await,
        }
    }

    /// The relay claims back to back (polls) in this mode.
    pub fn polling(&self) -> bool {
        self.mode != Mode::Notify
    }

    /// On shutdown: hand notifications back at once rather than when the lease lapses,
    /// and start leaving drain mode. Returns true when this instance should keep
    /// claiming a while before it exits: a producer that read drain mode may still
    /// commit, and no notification will announce it.
    pub async fn stop(&mut self, store: &Store) -> bool {
        self.stopping = true;
        if let Mode::Drain { holding: true, .. } = self.mode {
            match store.leave_drain(&self.holder).await {
                Ok(_) => tracing::info!("left high-load (drain) mode on shutdown"),
                Err(error) => tracing::warn!(
                    %error,
                    "could not leave drain mode on shutdown; notifications resume when its lease lapses"
                ),
            }
        }
        match self.mode {
            Mode::Notify => false,
            Mode::Drain { .. } => {
                self.leave_now();
                true
            }
            Mode::Leaving { .. } => true,
        }
    }

    /// Leaving drain mode: claims go on until the horizon passed. (Following another
    /// instance in drain mode is not leaving: that instance keeps claiming.)
    pub fn is_leaving(&self) -> bool {
        matches!(self.mode, Mode::Leaving { .. })
    }

    /// What one second of load says.
    async fn judge(&mut self, store: &Store, rate: f64) {
        let c = &self.config;
        match self.mode.clone() {
            Mode::Notify | Mode::Leaving { .. } => {
                if c.enabled && !self.stopping && rate >= c.enter_rate as f64 {
                    self.enter(store, rate).await;
                }
            }
            Mode::Drain { holding, .. } => {
                if rate >= c.exit_rate as f64 {
                    if holding && !self.stopping {
                        self.enter(store, rate).await;
                    }
                } else if holding {
                    match store.leave_drain(&self.holder).await {
                        Ok(true) => {
                            tracing::info!(
                                events_per_second = rate as u64,
                                "load fell: leaving high-load (drain) mode"
                            );
                            self.leave_now();
                        }
                        Ok(false) => {
                            // Another instance renewed it: follow until it leaves.
                            self.set(Mode::Drain {
                                holding: false,
                                lease_end: Instant::now() + self.config.lease,
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not leave drain mode; trying again")
                        }
                    }
                }
            }
        }
    }

    async fn enter(&mut self, store: &Store, rate: f64) {
        match store.enter_drain(&self.holder, self.config.lease).await {
            Ok(()) => {
                if !matches!(self.mode, Mode::Drain { .. }) {
                    tracing::info!(
                        events_per_second = rate as u64,
                        "sustained load: entering high-load (drain) mode, notifications off"
                    );
                    self.next_poll = Instant::now();
                    self.window_start = Some(Instant::now());
                }
                self.set(Mode::Drain {
                    holding: true,
                    lease_end: Instant::now() + self.config.lease,
                });
            }
            Err(error) => tracing::warn!(%error, "could not enter or renew drain mode"),
        }
    }

    fn leave_now(&mut self) {
        self.set(Mode::Leaving {
            fence: None,
            interval: self.config.poll_interval,
            next: Instant::now(),
        });
    }

    async fn read_mode(&mut self, store: &Store) {
        match store.read_mode().await {
            Ok(row) if row.draining => {
                let lease_end = Instant::now() + row.remaining;
                match &mut self.mode {
                    Mode::Drain { lease_end: end, .. } => *end = lease_end,
                    _ => self.follow(lease_end),
                }
            }
            Ok(_) => {
                if matches!(self.mode, Mode::Drain { .. }) {
                    self.leave_now();
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the high-load mode; trying again");
                self.recheck = true;
            }
        }
    }

    /// One step of leaving: take N if not yet taken, then test the horizon. Claims each
    /// time; once the horizon passed, claims once more and goes back to notify mode.
    async fn leaving(&mut self, store: &Store) -> bool {
        let Mode::Leaving {
            fence, interval, ..
        } = self.mode.clone()
        else {
            return false;
        };
        self.metrics.high_load_claims.inc();
        let fence = match fence {
            Some(fence) => fence,
            None => match store.drain_fence().await {
                Ok(Some(fence)) => fence,
                Ok(None) => {
                    // Drain mode is on again (another instance entered it).
                    self.recheck = true;
                    self.leave_later(None, interval);
                    return true;
                }
                Err(error) => {
                    tracing::warn!(%error, "could not take the drain fence; trying again");
                    self.leave_later(None, interval);
                    return true;
                }
            },
        };
        match store.drain_horizon_passed(&fence).await {
            Ok(true) => {
                tracing::info!(
                    "every transaction that could have read drain mode has ended: notify mode"
                );
                self.set(Mode::Notify);
            }
            Ok(false) => self.leave_later(Some(fence), (interval * 2).min(MAX_LEAVING_INTERVAL)),
            Err(error) => {
                tracing::warn!(%error, "could not check the drain horizon; trying again");
                self.leave_later(Some(fence), (interval * 2).min(MAX_LEAVING_INTERVAL));
            }
        }
        true
    }

    /// Still leaving: the next step (and claim) in `interval`.
    fn leave_later(&mut self, fence: Option<String>, interval: Duration) {
        self.mode = Mode::Leaving {
            fence,
            interval,
            next: Instant::now() + interval,
        };
    }

    fn set(&mut self, mode: Mode) {
        let before = self.mode.gauge();
        self.mode = mode;
        let after = self.mode.gauge();
        if std::mem::take(&mut self.starting) {
            // The start's own horizon wait ended (or drain mode was entered): no switch.
            self.metrics.high_load_mode.set(after);
            if after != 1 {
                return;
            }
        }
        if before != after {
            self.metrics.high_load_mode.set(after);
            match after {
                1 => self
                    .metrics
                    .high_load_switches
                    .with_label_values(&["drain"])
                    .inc(),
                0 => self
                    .metrics
                    .high_load_switches
                    .with_label_values(&["notify"])
                    .inc(),
                _ => {}
            }
        }
    }
}
