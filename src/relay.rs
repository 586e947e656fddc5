//! The relay: turns wake-ups (notified ids, sweep requests, retry timers) into claims,
//! delivers each claimed batch to its destinations, and records the outcome fenced by
//! the claim's `lock_token`. Everything that arrives while a claim runs goes into the
//! next claim, so under load claims are large and back to back; when idle it sends
//! nothing but its timers.

use crate::config::{RelayConfig, RetryConfig};
use crate::event::{Event, Outcome};
use crate::high_load::HighLoad;
use crate::listener::Wake;
use crate::metrics::{Metrics, SweepKind};
use crate::retry::{backoff_delay, next_attempt_delay, random_jitter};
use crate::routing::{Route, Router, Unrouted};
use crate::sink::Sink;
use crate::store::{BuryItem, CompleteItem, RetryItem, Store, StoreError};
use futures_util::future::join_all;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Above this many notified-but-unclaimed ids the relay forgets them and sweeps instead
/// (same result, bounded memory).
const MAX_PENDING_IDS: usize = 200_000;

/// What a claim without ids is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Sweep {
    /// Safety net: only events due for longer than the grace period.
    Safety,
    /// The retry timer fired: events whose backoff ended.
    Retry,
    /// High-load (drain) mode: producers do not notify, so claim whatever is due.
    Drain,
    /// A notification carried no ids (too many for one payload) or could not be read.
    Requested,
    /// The listener (re)connected: everything committed while nobody listened.
    Reconnect,
}

impl Sweep {
    fn recovered_label(self) -> Option<SweepKind> {
        match self {
            Sweep::Safety => Some(SweepKind::Safety),
            Sweep::Reconnect => Some(SweepKind::Reconnect),
            Sweep::Retry | Sweep::Drain | Sweep::Requested => None,
        }
    }
}

/// How one event's attempt ends, from the outcomes of its destinations.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Complete {
        acked: Vec<String>,
    },
    Retry {
        delay: Duration,
        reason: String,
        give_back_attempt: bool,
        acked: Vec<String>,
    },
    Bury {
        reason: String,
        acked: Vec<String>,
    },
}

/// Combines the outcomes of every destination an event was sent to in this attempt.
/// PUBLISHED only when every destination acknowledged (invariant 2); a permanent failure
/// buries at once; a failure retries until `max_attempts`; a destination that was not
/// tried (Deferred) gives the attempt back (invariant 4). Pure: `jitter` is passed in.
pub fn decide(
    event: &Event,
    outcomes: &[(&str, &Outcome)],
    retry: &RetryConfig,
    jitter: f64,
) -> Decision {
    let acked: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Delivered))
        .map(|(d, _)| d.to_string())
        .collect();
    let rejected: Vec<String> = outcomes
        .iter()
        .filter_map(|(d, o)| match o {
            Outcome::Rejected { reason } => Some(format!("{d}: {reason}")),
            _ => None,
        })
        .collect();
    if !rejected.is_empty() {
        return Decision::Bury {
            reason: format!("rejected: {}", rejected.join("; ")),
            acked,
        };
    }
    let mut retry_reasons = Vec::new();
    let mut not_before: Option<Duration> = None;
    for (destination, outcome) in outcomes {
        if let Outcome::Retry {
            reason,
            not_before: nb,
        } = outcome
        {
            retry_reasons.push(format!("{destination}: {reason}"));
            not_before = not_before.max(*nb);
        }
    }
    if !retry_reasons.is_empty() {
        let max_attempts = event.max_attempts.unwrap_or(retry.max_attempts);
        let reason = retry_reasons.join("; ");
        if event.attempts >= max_attempts {
            return Decision::Bury {
                reason: format!(
                    "gave up after {} attempts; last error: {reason}",
                    event.attempts
                ),
                acked,
            };
        }
        let backoff = backoff_delay(event.attempts, retry.base_delay, retry.max_delay, jitter);
        return Decision::Retry {
            delay: next_attempt_delay(backoff, not_before, retry.max_delay),
            reason: format!("attempt {} failed: {reason}", event.attempts),
            give_back_attempt: false,
            acked,
        };
    }
    let mut deferred = Vec::new();
    let mut wait = Duration::ZERO;
    for (destination, outcome) in outcomes {
        if let Outcome::Deferred { reason, not_before } = outcome {
            deferred.push(format!("{destination}: {reason}"));
            wait = wait.max(*not_before);
        }
    }
    if !deferred.is_empty() {
        return Decision::Retry {
            delay: wait.max(retry.base_delay).min(retry.max_delay),
            reason: format!(
                "deferred (destination unavailable, no attempt charged): {}",
                deferred.join("; ")
            ),
            give_back_attempt: true,
            acked,
        };
    }
    Decision::Complete { acked }
}

/// Shared by the relay loop and its delivery tasks.
struct Deliverer {
    store: Store,
    router: Router,
    destinations: HashMap<String, Arc<dyn Sink>>,
    relay: RelayConfig,
    retry: RetryConfig,
    metrics: Metrics,
}

/// What a finished delivery tells the loop.
struct BatchReport {
    /// The delays of the retries this batch scheduled, so the relay claims them when
    /// they fall due instead of waiting for the safety sweep.
    retries: Vec<Duration>,
}

/// The relay loop. See the module docs.
pub struct Relay {
    deliverer: Arc<Deliverer>,
    wakes: mpsc::UnboundedReceiver<Wake>,
    high_load: Option<HighLoad>,
}

struct State {
    pending: BTreeSet<i64>,
    sweep: Option<Sweep>,
    /// When retries this instance scheduled fall due (rounded up to 10 ms slots).
    retry_at: BTreeSet<Instant>,
    claim_failures: i32,
    claims_blocked_until: Option<Instant>,
    in_flight: JoinSet<BatchReport>,
    tokens: HashMap<tokio::task::Id, Uuid>,
    high_load: HighLoad,
}

impl State {
    fn request(&mut self, sweep: Sweep) {
        self.sweep = self.sweep.max(Some(sweep));
    }

    fn absorb(&mut self, wake: Wake) {
        match wake {
            Wake::Ids(ids) => {
                if let Some(highest) = ids.iter().max() {
                    self.high_load.saw(*highest);
                }
                self.pending.extend(ids);
                if self.pending.len() > MAX_PENDING_IDS {
                    self.pending.clear();
                    self.request(Sweep::Requested);
                }
            }
            Wake::Sweep => self.request(Sweep::Requested),
            Wake::Reconnected => {
                self.request(Sweep::Reconnect);
                self.high_load.reconnected();
            }
            Wake::Drain => self.high_load.heard_drain(),
            Wake::Notify => self.high_load.heard_notify(),
        }
    }

    fn schedule_retries(&mut self, delays: &[Duration]) {
        let now = Instant::now();
        for delay in delays {
            // Round up to a 10 ms slot: bounded timers, and never before the row is due.
            let slot = Duration::from_millis((delay.as_millis() as u64).div_ceil(10) * 10 + 10);
            self.retry_at.insert(now + slot);
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retry_at.first().copied()
    }
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
            crate::config::HighLoadConfig {
                enabled: false,
                ..Default::default()
            },
            String::new(),
            metrics.clone(),
        );
        Self {
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
            high_load: Some(high_load),
        }
    }

    /// High-load (drain) mode as configured. Without it, this relay never enters drain
    /// mode itself but still follows other instances into it.
    pub fn with_high_load(mut self, high_load: HighLoad) -> Self {
        self.high_load = Some(high_load);
        self
    }

    /// Runs until `shutdown`; then stops claiming, lets in-flight deliveries finish
    /// within `shutdown_grace`, and releases every event it still holds.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let config = self.deliverer.relay.clone();
        let mut safety = interval_at(
            Instant::now() + config.safety_sweep_interval,
            config.safety_sweep_interval,
        );
        safety.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = State {
            pending: BTreeSet::new(),
            sweep: None,
            retry_at: BTreeSet::new(),
            claim_failures: 0,
            claims_blocked_until: None,
            in_flight: JoinSet::new(),
            tokens: HashMap::new(),
            high_load: self.high_load.take().expect("run once"),
        };
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            self.fill(&mut state).await;
            let far = Instant::now() + Duration::from_secs(86_400);
            let next_retry = state.next_retry();
            let claims_blocked_until = state.claims_blocked_until;
            let high_load_at = state.high_load.next_wake();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = state.in_flight.join_next_with_id(), if !state.in_flight.is_empty() => {
                    finished(&mut state, done);
                }
                wake = self.wakes.recv() => match wake {
                    Some(wake) => {
                        state.absorb(wake);
                        while let Ok(more) = self.wakes.try_recv() {
                            state.absorb(more);
                        }
                    }
                    None => {
                        // Every sender is gone: only timers can wake us now.
                        shutdown.cancelled().await;
                        break;
                    }
                },
                _ = sleep_until(next_retry.unwrap_or(far)), if next_retry.is_some() => {
                    let now = Instant::now();
                    while state.retry_at.first().is_some_and(|at| *at <= now) {
                        state.retry_at.pop_first();
                    }
                    state.request(Sweep::Retry);
                }
                _ = sleep_until(claims_blocked_until.unwrap_or(far)), if claims_blocked_until.is_some() => {
                    state.claims_blocked_until = None;
                }
                _ = sleep_until(high_load_at.unwrap_or(far)), if high_load_at.is_some() => {
                    if state.high_load.tick(&self.deliverer.store).await {
                        state.request(Sweep::Drain);
                    }
                }
                _ = safety.tick() => state.request(Sweep::Safety),
            }
        }
        self.drain(state).await;
    }

    /// Claims while there is work and room for another batch in flight.
    async fn fill(&self, state: &mut State) {
        let d = &self.deliverer;
        let batch = d.relay.batch_size;
        while state.in_flight.len() < d.relay.max_in_flight_batches {
            if state.claims_blocked_until.is_some() {
                return;
            }
            let claimed = if let Some(sweep) = state.sweep {
                let grace = if sweep == Sweep::Safety {
                    d.relay.safety_sweep_grace
                } else {
                    Duration::ZERO
                };
                let claimed = if sweep == Sweep::Retry {
                    d.store.claim_due_retries(batch, d.relay.lease).await
                } else {
                    d.store.claim_due(batch, grace, d.relay.lease).await
                };
                match claimed {
                    Ok(claim) => {
                        // A drain-mode poll claims back to back until a claim comes
                        // back empty; other sweeps end with the first short claim.
                        let more = if sweep == Sweep::Drain {
                            !claim.events.is_empty()
                        } else {
                            claim.events.len() == batch
                        };
                        if !more {
                            state.sweep = None;
                        }
                        if let Some(kind) = sweep.recovered_label() {
                            let found = claim.events.len() as u64;
                            if found > 0 {
                                d.metrics
                                    .sweep_recovered
                                    .with_label_values(&[kind.label()])
                                    .inc_by(found);
                                if kind == SweepKind::Safety {
                                    tracing::warn!(
                                        events = found,
                                        "safety sweep found events no notification delivered"
                                    );
                                }
                            }
                        }
                        Ok(claim)
                    }
                    Err(e) => Err(e),
                }
            } else if !state.pending.is_empty() {
                let ids: Vec<i64> = std::iter::from_fn(|| state.pending.pop_first())
                    .take(batch)
                    .collect();
                let claimed = d.store.claim_ids(&ids, d.relay.lease).await;
                if claimed.is_err() {
                    // Keep them: the claim is tried again once the database answers.
                    state.pending.extend(ids);
                }
                claimed
            } else {
                return;
            };
            match claimed {
                Ok(claim) => {
                    state.claim_failures = 0;
                    if let Some(highest) = claim.events.iter().map(|e| e.id).max() {
                        state.high_load.saw(highest);
                    }
                    let token = claim.lock_token;
                    // Events of one route travel together; a slow destination holds up
                    // only the events routed to it.
                    for (plan, events) in plan(&d.router, claim.events) {
                        let deliverer = Arc::clone(&self.deliverer);
                        let handle = state
                            .in_flight
                            .spawn(async move { deliverer.deliver(token, plan, events).await });
                        state.tokens.insert(handle.id(), token);
                    }
                }
                Err(error) => {
                    state.claim_failures += 1;
                    let delay = backoff_delay(
                        state.claim_failures,
                        Duration::from_millis(100),
                        Duration::from_secs(5),
                        random_jitter(),
                    );
                    tracing::error!(%error, retry_in_ms = delay.as_millis() as u64, "claim failed");
                    state.claims_blocked_until = Some(Instant::now() + delay);
                    return;
                }
            }
        }
    }

    async fn drain(self, mut state: State) {
        state.high_load.stop(&self.deliverer.store).await;
        let grace = self.deliverer.relay.shutdown_grace;
        let deadline = Instant::now() + grace;
        if !state.in_flight.is_empty() {
            tracing::info!(
                batches = state.in_flight.len(),
                "shutting down: waiting for in-flight deliveries"
            );
        }
        while !state.in_flight.is_empty() {
            tokio::select! {
                Some(done) = state.in_flight.join_next_with_id() => finished(&mut state, done),
                _ = sleep_until(deadline) => {
                    tracing::warn!(batches = state.in_flight.len(), "shutdown grace over: abandoning in-flight deliveries");
                    state.in_flight.abort_all();
                    while let Some(done) = state.in_flight.join_next_with_id().await {
                        finished(&mut state, done);
                    }
                }
            }
        }
        // Aborted deliveries leave their tokens behind: hand their events back.
        let mut tokens: Vec<Uuid> = state.tokens.values().copied().collect();
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

fn finished(
    state: &mut State,
    done: Result<(tokio::task::Id, BatchReport), tokio::task::JoinError>,
) {
    match done {
        Ok((id, report)) => {
            state.tokens.remove(&id);
            state.schedule_retries(&report.retries);
        }
        Err(error) if error.is_cancelled() => {
            // Aborted on shutdown: its token stays, so drain() releases its events.
        }
        Err(error) => {
            // A panicking delivery: its events stay leased until the reaper returns them.
            state.tokens.remove(&error.id());
            tracing::error!(%error, "delivery task failed; its events return when their lease expires");
        }
    }
}

/// What to do with a group of claimed events.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// Send to these destinations (minus those in each event's `delivered_to`).
    Deliver(Vec<String>),
    /// No rule matched.
    Unrouted(Unrouted),
}

/// Splits claimed events into groups that share a plan, in order of first appearance.
fn plan(router: &Router, events: Vec<Event>) -> Vec<(Plan, Vec<Event>)> {
    let mut groups: Vec<(Plan, Vec<Event>)> = Vec::new();
    for event in events {
        let plan = match router.route(&event.event_type) {
            Route::To(destinations) => Plan::Deliver(destinations.to_vec()),
            Route::Unrouted(policy) => Plan::Unrouted(policy),
        };
        match groups.iter_mut().find(|(p, _)| *p == plan) {
            Some((_, group)) => group.push(event),
            None => groups.push((plan, vec![event])),
        }
    }
    groups
}

impl Deliverer {
    /// Delivers a group of one claim to every destination it still needs, renewing the
    /// lease while that runs (invariant 7), then records the outcomes fenced by the token.
    async fn deliver(&self, lock_token: Uuid, plan: Plan, events: Vec<Event>) -> BatchReport {
        let destinations = match plan {
            Plan::Deliver(destinations) => destinations,
            Plan::Unrouted(policy) => return self.unrouted(lock_token, policy, &events).await,
        };
        let work = self.send_everywhere(&destinations, &events);
        tokio::pin!(work);
        let beat_every = self.relay.lease / 3;
        let mut beat = interval_at(Instant::now() + beat_every, beat_every);
        let per_destination = loop {
            tokio::select! {
                outcomes = &mut work => break outcomes,
                _ = beat.tick() => {
                    match self.store.extend_lease(lock_token, &events, self.relay.lease).await {
                        Ok(owned) if owned < events.len() => tracing::warn!(
                            lost = events.len() - owned,
                            "lease of some events moved on while delivering (reaped); their outcome will be fenced"
                        ),
                        Ok(_) => {}
                        Err(error) => tracing::warn!(%error, "could not extend lease"),
                    }
                }
            }
        };
        self.record(lock_token, &events, &per_destination).await
    }

    /// For each destination, the outcomes of the events it still needed (invariant 5:
    /// a destination in `delivered_to` is not sent the event again).
    async fn send_everywhere(
        &self,
        destinations: &[String],
        events: &[Event],
    ) -> Vec<(String, Vec<Option<Outcome>>)> {
        let plans: Vec<_> = destinations
            .iter()
            .map(|name| {
                let needed: Vec<usize> = events
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| !e.delivered_to.iter().any(|d| d == name))
                    .map(|(i, _)| i)
                    .collect();
                (name, self.destinations.get(name), needed)
            })
            .collect();
        let sends = plans.iter().map(|(name, sink, needed)| async move {
            let Some(sink) = sink else {
                let missing = Outcome::Retry {
                    reason: format!("destination {name} is not configured in this instance"),
                    not_before: None,
                };
                let by_event = (0..events.len())
                    .map(|i| needed.contains(&i).then(|| missing.clone()))
                    .collect();
                return (name.to_string(), by_event);
            };
            let outcomes = if needed.len() == events.len() {
                sink.deliver(events).await
            } else if needed.is_empty() {
                Vec::new()
            } else {
                let subset: Vec<Event> = needed.iter().map(|&i| events[i].clone()).collect();
                sink.deliver(&subset).await
            };
            let mut by_event: Vec<Option<Outcome>> = vec![None; events.len()];
            for (&index, outcome) in needed.iter().zip(outcomes) {
                by_event[index] = Some(outcome);
            }
            for &index in needed {
                if by_event[index].is_none() {
                    by_event[index] = Some(Outcome::Retry {
                        reason: "destination returned no outcome".into(),
                        not_before: None,
                    });
                }
            }
            (name.to_string(), by_event)
        });
        join_all(sends).await
    }

    async fn record(
        &self,
        lock_token: Uuid,
        events: &[Event],
        per_destination: &[(String, Vec<Option<Outcome>>)],
    ) -> BatchReport {
        let mut complete = Vec::new();
        let mut retry = Vec::new();
        let mut bury = Vec::new();
        let now = SystemTime::now();
        for (index, event) in events.iter().enumerate() {
            let outcomes: Vec<(&str, &Outcome)> = per_destination
                .iter()
                .filter_map(|(name, outcomes)| outcomes[index].as_ref().map(|o| (name.as_str(), o)))
                .collect();
            for (destination, outcome) in &outcomes {
                self.count(event, destination, outcome);
            }
            match decide(event, &outcomes, &self.retry, random_jitter()) {
                Decision::Complete { acked } => {
                    let latency = now.duration_since(event.created_at).unwrap_or_default();
                    self.metrics.delivery_latency.observe(latency.as_secs_f64());
                    complete.push(CompleteItem {
                        id: event.id,
                        created_at: event.created_at,
                        acked,
                    });
                }
                Decision::Retry {
                    delay,
                    reason,
                    give_back_attempt,
                    acked,
                } => {
                    retry.push(RetryItem {
                        id: event.id,
                        created_at: event.created_at,
                        delay,
                        last_error: reason,
                        give_back_attempt,
                        acked,
                    });
                }
                Decision::Bury { reason, acked } => {
                    tracing::error!(
                        tracking_id = %event.tracking_id,
                        event_type = %event.event_type,
                        attempts = event.attempts,
                        error = %reason,
                        "event moved to dead letters"
                    );
                    bury.push(BuryItem {
                        id: event.id,
                        created_at: event.created_at,
                        last_error: reason,
                        acked,
                    });
                }
            }
        }
        let retries = retry.iter().map(|r| r.delay).collect();
        self.write("complete", complete.len(), || {
            self.store.complete(lock_token, &complete)
        })
        .await;
        self.write("schedule_retry", retry.len(), || {
            self.store.schedule_retry(lock_token, &retry)
        })
        .await;
        self.write("bury", bury.len(), || self.store.bury(lock_token, &bury))
            .await;
        BatchReport { retries }
    }

    /// Events no routing rule matches: dead-lettered or skipped as configured, counted.
    async fn unrouted(&self, lock_token: Uuid, policy: Unrouted, events: &[Event]) -> BatchReport {
        self.metrics.unrouted.inc_by(events.len() as u64);
        match policy {
            Unrouted::DeadLetter => {
                let bury: Vec<BuryItem> = events
                    .iter()
                    .map(|e| BuryItem {
                        id: e.id,
                        created_at: e.created_at,
                        last_error: format!(
                            "unrouted: no routing rule matches event_type {:?}; add a rule to [[routing.routes]], then redrive",
                            e.event_type
                        ),
                        acked: Vec::new(),
                    })
                    .collect();
                tracing::warn!(events = bury.len(), "unrouted events moved to dead letters");
                self.write("bury", bury.len(), || self.store.bury(lock_token, &bury))
                    .await;
            }
            Unrouted::Skip => {
                let complete: Vec<CompleteItem> = events
                    .iter()
                    .map(|e| CompleteItem {
                        id: e.id,
                        created_at: e.created_at,
                        acked: Vec::new(),
                    })
                    .collect();
                self.write("complete", complete.len(), || {
                    self.store.complete(lock_token, &complete)
                })
                .await;
            }
        }
        BatchReport {
            retries: Vec::new(),
        }
    }

    fn count(&self, event: &Event, destination: &str, outcome: &Outcome) {
        match outcome {
            Outcome::Delivered => {
                self.metrics
                    .published
                    .with_label_values(&[destination])
                    .inc();
            }
            Outcome::Retry { reason, .. } => {
                self.metrics
                    .delivery_failures
                    .with_label_values(&[destination, "retry"])
                    .inc();
                tracing::warn!(
                    tracking_id = %event.tracking_id,
                    destination,
                    attempt = event.attempts,
                    error = %reason,
                    "delivery failed"
                );
            }
            Outcome::Rejected { reason } => {
                self.metrics
                    .delivery_failures
                    .with_label_values(&[destination, "rejected"])
                    .inc();
                tracing::warn!(
                    tracking_id = %event.tracking_id,
                    destination,
                    error = %reason,
                    "delivery rejected"
                );
            }
            Outcome::Deferred { .. } => {
                self.metrics
                    .delivery_failures
                    .with_label_values(&[destination, "deferred"])
                    .inc();
            }
        }
    }

    /// Records one kind of outcome for `expected` events (retried while the database is
    /// briefly away) and counts those the lease fence refused (invariant 3). A failed
    /// statement leaves the events leased: the reaper returns them and they are
    /// delivered again.
    async fn write<F, Fut>(&self, verb: &'static str, expected: usize, statement: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<i64>, StoreError>>,
    {
        if expected == 0 {
            return;
        }
        match persist(statement).await {
            Ok(done) if done.len() < expected => {
                let fenced = expected - done.len();
                self.metrics.fenced_outcomes.inc_by(fenced as u64);
                tracing::warn!(
                    verb,
                    fenced,
                    "outcome refused: the lease had moved on to another owner"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::error!(
                verb,
                events = expected,
                %error,
                "could not record outcome; the events return to PENDING when their lease expires"
            ),
        }
    }
}

/// Records an outcome, trying again for a few seconds when the database does not
/// answer (a restart, a failover): every outcome that lands saves a re-delivery.
/// A retry after a lost reply finds the rows already updated and is counted as fenced.
async fn persist<F, Fut>(write: F) -> Result<Vec<i64>, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<i64>, StoreError>>,
{
    use backon::{ExponentialBuilder, Retryable};
    write
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(5)
                .with_jitter(),
        )
        .when(StoreError::is_transient)
        .notify(|error, after| {
            tracing::warn!(%error, retry_in_ms = after.as_millis() as u64, "could not record outcome; retrying")
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(attempts: i32, max_attempts: Option<i32>) -> Event {
        Event {
            id: 1,
            created_at: SystemTime::now(),
            tracking_id: Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: "1".into(),
            event_type: "order.created".into(),
            payload: "{}".into(),
            metadata: serde_json::Value::Null,
            attempts,
            max_attempts,
            delivered_to: vec![],
        }
    }

    fn retry_later(reason: &str) -> Outcome {
        Outcome::Retry {
            reason: reason.into(),
            not_before: None,
        }
    }

    #[test]
    fn every_ack_completes() {
        let d = decide(
            &event(1, None),
            &[("rabbitmq", &Outcome::Delivered)],
            &RetryConfig::default(),
            0.5,
        );
        assert_eq!(
            d,
            Decision::Complete {
                acked: vec!["rabbitmq".into()]
            }
        );
    }

    #[test]
    fn a_failure_retries_with_backoff_and_keeps_other_acks() {
        let ok = Outcome::Delivered;
        let fail = retry_later("nack");
        let d = decide(
            &event(3, None),
            &[("a", &ok), ("b", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        match d {
            Decision::Retry {
                delay,
                give_back_attempt,
                acked,
                reason,
            } => {
                assert_eq!(delay, Duration::from_secs(2));
                assert!(!give_back_attempt);
                assert_eq!(acked, vec!["a".to_string()]);
                assert!(reason.contains("b: nack"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_attempts_buries_with_the_last_error() {
        let fail = retry_later("returned as unroutable");
        let d = decide(
            &event(10, None),
            &[("rabbitmq", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        match d {
            Decision::Bury { reason, .. } => assert!(
                reason.contains("gave up after 10 attempts") && reason.contains("unroutable")
            ),
            other => panic!("{other:?}"),
        }
        // The row's own max_attempts wins over the configured one.
        let d = decide(
            &event(2, Some(2)),
            &[("rabbitmq", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        assert!(matches!(d, Decision::Bury { .. }));
    }

    #[test]
    fn a_permanent_failure_buries_at_once() {
        let rejected = Outcome::Rejected {
            reason: "400 Bad Request".into(),
        };
        let d = decide(
            &event(1, None),
            &[("w", &rejected)],
            &RetryConfig::default(),
            0.0,
        );
        assert!(matches!(d, Decision::Bury { reason, .. } if reason.contains("400")));
    }

    #[test]
    fn deferred_gives_the_attempt_back_even_at_the_limit() {
        let deferred = Outcome::Deferred {
            reason: "unreachable".into(),
            not_before: Duration::from_secs(3),
        };
        let d = decide(
            &event(10, None),
            &[("rabbitmq", &deferred)],
            &RetryConfig::default(),
            0.0,
        );
        match d {
            Decision::Retry {
                delay,
                give_back_attempt,
                ..
            } => {
                assert!(give_back_attempt);
                assert_eq!(delay, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_destinations_not_before_is_honoured() {
        let fail = Outcome::Retry {
            reason: "429".into(),
            not_before: Some(Duration::from_secs(20)),
        };
        let d = decide(
            &event(1, None),
            &[("w", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        assert!(matches!(d, Decision::Retry { delay, .. } if delay == Duration::from_secs(20)));
    }
}
