//! Record: each event's outcomes become one decision ([`decide`]), the decisions of a
//! group become one statement per verb (complete, schedule_retry, bury), each fenced by
//! the claim's `lock_token` (invariant 3) and tried again for a few seconds while the
//! database is briefly away. Counted in the delivery metrics.

use super::decide::{Decision, decide};
use super::deliver::{Deliverer, Outcomes};
use crate::event::{Event, Outcome};
use crate::metrics::FailureKind;
use crate::retry::{Backoff, random_jitter};
use crate::routing::Unrouted;
use crate::store::history::AttemptItem;
use crate::store::{BuryItem, CompleteItem, RetryItem, StoreError};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use uuid::Uuid;

/// What a finished delivery tells the relay.
#[derive(Debug, Default)]
pub(super) struct BatchReport {
    /// The delays of the retries this batch scheduled, so the relay claims them when
    /// they fall due instead of waiting for the safety sweep.
    pub retries: Vec<Duration>,
    /// Events of the same aggregates (ordering) that this batch's outcomes released:
    /// due now, to be claimed at once (id, created_at).
    pub released: Vec<(i64, SystemTime)>,
}

/// The longest wait between two tries of an outcome statement.
const WRITE_MAX_WAIT: Duration = Duration::from_secs(2);
/// An outcome statement is tried for at least this long, even past the lease: a late
/// write is harmless (the lease fence refuses it if another owner took over) and still
/// saves a re-delivery when nobody did.
const WRITE_MIN_WINDOW: Duration = Duration::from_secs(6);

impl Deliverer {
    pub(super) async fn record(
        &self,
        lock_token: Uuid,
        events: &[Event],
        per_destination: &Outcomes,
        leased_until: Instant,
    ) -> BatchReport {
        let mut complete = Vec::new();
        let mut retry = Vec::new();
        let mut bury = Vec::new();
        let mut history = Vec::new();
        let now = SystemTime::now();
        for (index, event) in events.iter().enumerate() {
            let outcomes: Vec<(&str, &Outcome)> = per_destination
                .iter()
                .filter_map(|(name, outcomes, _)| {
                    outcomes[index].as_ref().map(|o| (name.as_str(), o))
                })
                .collect();
            for (destination, outcome) in &outcomes {
                self.count(event, destination, outcome);
            }
            for (destination, outcomes, took) in per_destination {
                if let Some(failed) = outcomes[index]
                    .as_ref()
                    .and_then(|o| AttemptItem::failed(event, destination, o, *took))
                {
                    history.push(failed);
                }
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
                    if !self.store.order().dead_letters_block
                        && self.store.order().is_ordered(&event.event_type)
                    {
                        self.metrics.ordering_skipped.inc();
                        tracing::warn!(
                            tracking_id = %event.tracking_id,
                            aggregate_type = %event.aggregate_type,
                            aggregate_id = %event.aggregate_id,
                            "ordering_dead_letters = skip: later events of this aggregate go on without this one"
                        );
                    }
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
        let mut lease = Lease {
            lock_token,
            events,
            until: leased_until,
        };
        let mut ended = self
            .write("complete", complete.len(), &mut lease, || {
                self.store.complete(lock_token, &complete)
            })
            .await;
        self.write("schedule_retry", retry.len(), &mut lease, || {
            self.store.schedule_retry(lock_token, &retry)
        })
        .await;
        let buried = self
            .write("bury", bury.len(), &mut lease, || {
                self.store.bury(lock_token, &bury)
            })
            .await;
        if !self.store.order().dead_letters_block {
            ended.extend(buried);
        }
        self.record_history(&history).await;
        BatchReport {
            retries,
            released: self.release_next(events, &ended).await,
        }
    }

    /// Ordering: the events of `ended` (published, or dead-lettered under `skip`) no
    /// longer hold back their aggregates: the next held event of each is released and
    /// returned, to be claimed at once. Written after the outcomes committed, so a claim
    /// that held an event before them is seen (and one that held after them sees them:
    /// `claim_held`).
    pub(super) async fn release_next(
        &self,
        events: &[Event],
        ended: &[i64],
    ) -> Vec<(i64, SystemTime)> {
        let order = self.store.order();
        if ended.is_empty() || !order.any() {
            return Vec::new();
        }
        let aggregates: Vec<(&str, &str)> = events
            .iter()
            .filter(|e| ended.contains(&e.id) && order.is_ordered(&e.event_type))
            .map(|e| (e.aggregate_type.as_str(), e.aggregate_id.as_str()))
            .collect();
        let mut backoff = Backoff::new(Duration::from_millis(200), WRITE_MAX_WAIT);
        let until = Instant::now() + WRITE_MIN_WINDOW;
        loop {
            match self.store.unhold_aggregates(&aggregates, false).await {
                Ok(released) => return released,
                Err(error) if error.is_transient() && Instant::now() < until => {
                    tokio::time::sleep(backoff.failed()).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "could not release the next events of these aggregates; the safety sweep does");
                    return Vec::new();
                }
            }
        }
    }

    /// Events no routing rule matches: dead-lettered or skipped as configured, counted.
    pub(super) async fn unrouted(
        &self,
        lock_token: Uuid,
        policy: Unrouted,
        events: &[Event],
    ) -> BatchReport {
        self.metrics.unrouted.inc_by(events.len() as u64);
        let mut lease = Lease {
            lock_token,
            events,
            until: Instant::now() + self.relay.lease,
        };
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
                let buried = self
                    .write("bury", bury.len(), &mut lease, || {
                        self.store.bury(lock_token, &bury)
                    })
                    .await;
                if !self.store.order().dead_letters_block {
                    return BatchReport {
                        released: self.release_next(events, &buried).await,
                        ..BatchReport::default()
                    };
                }
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
                let completed = self
                    .write("complete", complete.len(), &mut lease, || {
                        self.store.complete(lock_token, &complete)
                    })
                    .await;
                return BatchReport {
                    released: self.release_next(events, &completed).await,
                    ..BatchReport::default()
                };
            }
        }
        BatchReport::default()
    }

    /// Writes the failed attempts into the delivery history (outbox_attempts): one
    /// statement for the group. The history is for people; a write that fails is
    /// logged, and delivery goes on.
    async fn record_history(&self, history: &[AttemptItem]) {
        if history.is_empty() {
            return;
        }
        if let Err(error) = self.store.record_attempts(history).await {
            tracing::warn!(%error, attempts = history.len(), "could not write failed attempts into the delivery history");
        }
    }

    fn count(&self, event: &Event, destination: &str, outcome: &Outcome) {
        match outcome {
            Outcome::Delivered => {
                self.metrics
                    .published
                    .with_label_values(&[destination])
                    .inc();
                if let Ok(latency) = std::time::SystemTime::now().duration_since(event.created_at) {
                    self.metrics
                        .destination_latency
                        .with_label_values(&[destination])
                        .observe(latency.as_secs_f64());
                }
            }
            Outcome::Retry { reason, .. } => {
                self.metrics.failed(destination, FailureKind::Retry);
                tracing::warn!(
                    tracking_id = %event.tracking_id,
                    destination,
                    attempt = event.attempts,
                    error = %reason,
                    "delivery failed"
                );
            }
            Outcome::Rejected { reason } => {
                self.metrics.failed(destination, FailureKind::Rejected);
                tracing::warn!(
                    tracking_id = %event.tracking_id,
                    destination,
                    error = %reason,
                    "delivery rejected"
                );
            }
            Outcome::Deferred { .. } => self.metrics.failed(destination, FailureKind::Deferred),
        }
    }

    /// Records one kind of outcome for `expected` events and counts those the lease fence
    /// refused (invariant 3). While the database does not answer (a restart, a failover)
    /// it keeps trying as long as the lease lasts (and at least `WRITE_MIN_WINDOW`),
    /// renewing the lease whenever the database answers again: every outcome that lands
    /// saves a re-delivery. One that
    /// still fails leaves the events leased: the reaper returns them and they are
    /// delivered again. A retry after a lost reply finds the rows already updated and is
    /// counted as fenced. Returns the ids written.
    async fn write<F, Fut>(
        &self,
        verb: &'static str,
        expected: usize,
        lease: &mut Lease<'_>,
        mut statement: F,
    ) -> Vec<i64>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<i64>, StoreError>>,
    {
        if expected == 0 {
            return Vec::new();
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), WRITE_MAX_WAIT);
        let at_least_until = Instant::now() + WRITE_MIN_WINDOW;
        let written = loop {
            match statement().await {
                Err(error)
                    if error.is_transient() && Instant::now() < lease.until.max(at_least_until) =>
                {
                    let wait = backoff.failed();
                    tracing::warn!(verb, %error, retry_in_ms = wait.as_millis() as u64, "could not record outcome; retrying while the lease lasts");
                    tokio::time::sleep(wait).await;
                    if let Some(until) = self.renew(lease.lock_token, lease.events).await {
                        lease.until = until;
                    }
                }
                other => break other,
            }
        };
        match written {
            Ok(done) => {
                if done.len() < expected {
                    let fenced = expected - done.len();
                    self.metrics.fenced_outcomes.inc_by(fenced as u64);
                    tracing::warn!(
                        verb,
                        fenced,
                        "outcome refused: the lease had moved on to another owner"
                    );
                }
                done
            }
            Err(error) => {
                tracing::error!(
                    verb,
                    events = expected,
                    %error,
                    "could not record outcome; the events return to PENDING when their lease expires"
                );
                Vec::new()
            }
        }
    }
}

/// The claim an outcome is recorded under, and how long it lasts.
pub(super) struct Lease<'a> {
    lock_token: Uuid,
    events: &'a [Event],
    /// When the lease ends, as far as this task knows (pushed on by each renewal).
    until: Instant,
}
