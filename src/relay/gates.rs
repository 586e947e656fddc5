//! Gates: which destinations claims leave out now. A destination with
//! `relay.max_in_flight_batches` batches in flight is saturated; one whose circuit is
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
use tokio::time::Instant;

/// What the gates remember between claims.
#[derive(Debug, Default)]
pub(super) struct Gates {
    /// Every destination a route names, that this instance delivers to.
    pub routed: Vec<String>,
    /// Batches in flight per destination.
    pub busy: HashMap<String, usize>,
    /// Destinations whose probe event was claimed and is still being delivered.
    pub probing: BTreeSet<String>,
    /// Destinations whose probe claim found nothing waiting: claimed for again (the
    /// circuit lets the first event through as its probe) until the circuit moves on.
    pub nothing_to_probe: BTreeSet<String>,
    /// Destinations claims have left out since they last took events.
    pub left_out: BTreeSet<String>,
    /// When a parked destination's cool-down ends (look at the gates again then).
    pub look_again: Option<Instant>,
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
    /// A batch for `destinations` started.
    pub fn started(&mut self, destinations: &[String]) {
        for name in destinations {
            *self.busy.entry(name.clone()).or_default() += 1;
        }
    }

    /// A batch for `destinations` ended (`probe`: it carried that destination's probe).
    pub fn ended(&mut self, destinations: &[String], probe: Option<&str>) {
        for name in destinations {
            if let Some(busy) = self.busy.get_mut(name) {
                *busy = busy.saturating_sub(1);
            }
        }
        if let Some(probe) = probe {
            self.probing.remove(probe);
        }
    }
}

impl Relay {
    /// Looks at every destination's load and circuit; a destination that takes events
    /// again after claims left it out gets the sweep that finds what they left behind.
    pub(super) fn gates(&mut self) -> Open {
        let limit = self.deliverer.relay.max_in_flight_batches;
        let gates = &mut self.gates;
        let mut open = Open::default();
        gates.look_again = None;
        for name in &gates.routed {
            let saturated = gates.busy.get(name).copied().unwrap_or(0) >= limit;
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
