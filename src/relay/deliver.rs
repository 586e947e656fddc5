//! Deliver: a claimed batch is split by route (events of one route travel together, so a
//! slow destination holds up only the events routed to it), each group is sent to every
//! destination it still needs at the same time (invariant 5: not to one already in
//! `delivered_to`), and the lease is renewed while that runs (invariant 7). The
//! outcomes go on to `record`.

use super::gates::Slot;
use super::record::BatchReport;
use crate::config::{RelayConfig, RetryConfig};
use crate::event::{Event, Outcome};
use crate::metrics::Metrics;
use crate::routing::{Route, Router, Unrouted};
use crate::sink::Sink;
use crate::store::Store;
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, interval_at};
use uuid::Uuid;

/// What to do with a group of claimed events.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// Send to these destinations (minus those in each event's `delivered_to`).
    Deliver(Vec<String>),
    /// No rule matched.
    Unrouted(Unrouted),
}

impl Plan {
    /// The destinations at least one of `events` still needs (not in its `delivered_to`).
    pub(super) fn still_needed(&self, events: &[Event]) -> Vec<String> {
        match self {
            Plan::Deliver(destinations) => destinations
                .iter()
                .filter(|d| events.iter().any(|e| !e.delivered_to.contains(d)))
                .cloned()
                .collect(),
            Plan::Unrouted(_) => Vec::new(),
        }
    }
}

/// Splits claimed events into groups that share a plan, in order of first appearance.
pub(super) fn plan(router: &Router, events: Vec<Event>) -> Vec<(Plan, Vec<Event>)> {
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

/// Each destination's outcome for each event of a group (`None`: not sent there, it had
/// acknowledged already), and how long the destination took for the group.
pub(super) type Outcomes = Vec<(String, Vec<Option<Outcome>>, Duration)>;

/// What delivery tasks share.
pub(super) struct Deliverer {
    pub store: Store,
    pub router: Router,
    pub destinations: HashMap<String, Arc<dyn Sink>>,
    pub relay: RelayConfig,
    pub retry: RetryConfig,
    pub metrics: Metrics,
}

impl Deliverer {
    /// Delivers a group of one claim to every destination it still needs, renewing the
    /// lease while that runs, then records the outcomes fenced by the token.
    pub async fn deliver(
        &self,
        lock_token: Uuid,
        plan: Plan,
        events: Vec<Event>,
        slots: HashMap<String, Slot>,
    ) -> BatchReport {
        let destinations = match plan {
            Plan::Deliver(destinations) => destinations,
            Plan::Unrouted(policy) => return self.unrouted(lock_token, policy, &events).await,
        };
        // How long the lease lasts as far as this task knows: from the claim (just now),
        // pushed on by every renewal.
        let mut leased_until = Instant::now() + self.relay.lease;
        let work = self.send_everywhere(&destinations, &events, slots);
        tokio::pin!(work);
        let beat_every = self.relay.lease / 3;
        let mut beat = interval_at(Instant::now() + beat_every, beat_every);
        let per_destination = loop {
            tokio::select! {
                outcomes = &mut work => break outcomes,
                _ = beat.tick() => {
                    if let Some(until) = self.renew(lock_token, &events).await {
                        leased_until = until;
                    }
                }
            }
        };
        self.record(lock_token, &events, &per_destination, leased_until)
            .await
    }

    /// extend_lease (invariant 7). Returns the lease's new end when it was renewed.
    pub(super) async fn renew(&self, lock_token: Uuid, events: &[Event]) -> Option<Instant> {
        let asked = Instant::now();
        match self
            .store
            .extend_lease(lock_token, events, self.relay.lease)
            .await
        {
            Ok(owned) => {
                if owned < events.len() {
                    tracing::warn!(
                        lost = events.len() - owned,
                        "lease of some events moved on while delivering (reaped); their outcome will be fenced"
                    );
                }
                Some(asked + self.relay.lease)
            }
            Err(error) => {
                tracing::warn!(%error, "could not extend lease");
                None
            }
        }
    }

    /// For each destination, the outcomes of the events it still needed; each
    /// destination's slot is handed back as soon as its part is done.
    async fn send_everywhere(
        &self,
        destinations: &[String],
        events: &[Event],
        mut slots: HashMap<String, Slot>,
    ) -> Outcomes {
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
        let sends = plans.iter().map(|(name, sink, needed)| {
            let slot = slots.remove(name.as_str());
            async move {
                let _slot = slot;
                let Some(sink) = sink else {
                    let missing = Outcome::destination_failed(format!(
                        "destination {name} is not configured in this instance"
                    ));
                    let by_event = (0..events.len())
                        .map(|i| needed.contains(&i).then(|| missing.clone()))
                        .collect();
                    return (name.to_string(), by_event, Duration::ZERO);
                };
                let started = Instant::now();
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
                        by_event[index] = Some(Outcome::destination_failed(
                            "destination returned no outcome",
                        ));
                    }
                }
                (name.to_string(), by_event, started.elapsed())
            }
        });
        join_all(sends).await
    }
}
