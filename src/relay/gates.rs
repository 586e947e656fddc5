//! Gates: which destinations claims leave out now. A destination with
//! its part of `relay.max_in_flight_batches` in flight is saturated (the setting is a
//! host's budget, split among the live instances there: see
//! [`crate::membership::Shares::part_of`]); one whose circuit is
//! open is parked. Events that still need such a destination stay PENDING and
//! unclaimed (the claim's SQL leaves them out), so a slow destination never holds the
//! slots other destinations' events need, and a destination that is down has its
//! backlog neither claimed nor rewritten. After each cool-down one of its events is
//! claimed alone to probe it; when it takes events again, a sweep picks up what the
//! claims left behind.

use super::Relay;
use super::inbox::Sweep;
use crate::sink::Parking;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Batch slots per destination, shared with the delivery tasks: a task hands a
/// destination's slot back as soon as its part of the group is done (not when the whole
/// group is, so a destination that shares events with a slow one is not held by it),
/// and wakes the relay.
#[derive(Debug, Default, Clone)]
pub(super) struct Slots(Arc<Taken>);

#[derive(Debug, Default)]
struct Taken {
    busy: Mutex<HashMap<String, usize>>,
    freed: Notify,
}

impl Slots {
    /// Slots of `name` in use.
    pub fn busy(&self, name: &str) -> usize {
        self.0
            .busy
            .lock()
            .expect("slots")
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Takes a slot of each of `names`.
    pub fn take(&self, names: &[String]) -> HashMap<String, Slot> {
        let mut busy = self.0.busy.lock().expect("slots");
        names
            .iter()
            .map(|name| {
                *busy.entry(name.clone()).or_default() += 1;
                (
                    name.clone(),
                    Slot {
                        slots: self.clone(),
                        name: name.clone(),
                    },
                )
            })
            .collect()
    }

    /// Until a slot is handed back (at once if one was since the last call).
    pub async fn freed(&self) {
        self.0.freed.notified().await
    }
}

/// One destination's slot, held by a delivery task; handed back when dropped (also when
/// the task ends early, crashes or is aborted).
#[derive(Debug)]
pub(super) struct Slot {
    slots: Slots,
    name: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.slots.0.busy.lock()
            && let Some(n) = busy.get_mut(&self.name)
        {
            *n = n.saturating_sub(1);
        }
        self.slots.0.freed.notify_one();
    }
}

/// What the gates remember between claims.
#[derive(Debug, Default)]
pub(super) struct Gates {
    /// Every destination a route names, that this instance delivers to.
    pub routed: Vec<String>,
    /// Batch slots in use per destination.
    pub slots: Slots,
    /// Destinations whose probe event was claimed and is still being delivered.
    pub probing: BTreeSet<String>,
    /// Destinations whose probe claim found nothing waiting: claimed for again (the
    /// circuit lets the first event through as its probe) until the circuit moves on.
    pub nothing_to_probe: BTreeSet<String>,
    /// Destinations claims have left out since they last took events.
    pub left_out: BTreeSet<String>,
    /// When a parked destination's cool-down ends (look at the gates again then).
    pub look_again: Option<Instant>,
    /// Batches in flight allowed per destination at the last look (0: not looked yet).
    pub allowed: usize,
}

/// The gates at one moment.
#[derive(Debug, Default)]
pub(super) struct Open {
    /// Destinations claims leave out.
    pub avoid: Vec<String>,
    /// A destination to claim one event for, to probe it.
    pub probe: Option<String>,
    /// Every destination is left out and none is to be probed: claim nothing.
    pub everything_waits: bool,
}

impl Gates {
    /// A probe's batch ended.
    pub fn probed(&mut self, probe: Option<&str>) {
        if let Some(probe) = probe {
            self.probing.remove(probe);
        }
    }
}

impl Relay {
    /// Looks at every destination's load and circuit; a destination that takes events
    /// again after claims left it out gets the sweep that finds what they left behind.
    pub(super) fn gates(&mut self) -> Open {
        let shares = self.inbox.shares();
        let limit = shares.part_of(self.deliverer.relay.max_in_flight_batches);
        if limit != self.gates.allowed {
            if self.gates.allowed != 0 {
                tracing::info!(
                    instances_on_this_host = shares.neighbours(),
                    batches_per_destination = limit,
                    "relay.max_in_flight_batches split among the instances on this host"
                );
            }
            self.gates.allowed = limit;
            self.deliverer.metrics.batches_allowed.set(limit as i64);
        }
        let gates = &mut self.gates;
        let mut open = Open::default();
        gates.look_again = None;
        for name in &gates.routed {
            let saturated = gates.slots.busy(name) >= limit;
            let parking = self
                .deliverer
                .destinations
                .get(name)
                .map_or(Parking::Ready, |sink| sink.parking());
            if parking != Parking::Probe {
                gates.nothing_to_probe.remove(name);
            }
            let waits = match parking {
                Parking::Ready => saturated,
                Parking::Parked { until } => {
                    let until = Instant::from_std(until);
                    gates.look_again = Some(gates.look_again.map_or(until, |at| at.min(until)));
                    true
                }
                // Its probe is claimed and on its way to the circuit.
                Parking::Probe if gates.probing.contains(name) => true,
                Parking::Probe if gates.nothing_to_probe.contains(name) => saturated,
                Parking::Probe => {
                    if !saturated && open.probe.is_none() {
                        open.probe = Some(name.clone());
                    }
                    true
                }
            };
            if waits {
                open.avoid.push(name.clone());
            }
        }
        open.everything_waits = !gates.routed.is_empty()
            && open.avoid.len() == gates.routed.len()
            && open.probe.is_none();
        let resumed: Vec<String> = gates
            .left_out
            .iter()
            .filter(|name| !open.avoid.contains(name))
            .cloned()
            .collect();
        if !resumed.is_empty() {
            for name in &resumed {
                gates.left_out.remove(name);
            }
            tracing::debug!(destinations = ?resumed, "destinations take events again: sweeping for what claims left out");
            self.inbox.request(Sweep::Resumed);
        }
        open
    }
}
