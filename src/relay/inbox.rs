//! What the relay has been asked to claim: ids (notified, or returned by the reaper),
//! the most urgent sweep requested, and when the retries it scheduled fall due.
//! Everything that arrives while a claim runs is merged here and goes into the next
//! claim, so under load claims are large and back to back.

use crate::high_load::HighLoad;
use crate::notification::Notified;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

/// Above this many notified-but-unclaimed ids the relay forgets them and sweeps instead
/// (same result, bounded memory).
const MAX_PENDING_IDS: usize = 200_000;

/// What wakes the relay up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A notification on the channel.
    Heard(Notified),
    /// The reaper returned these ids to PENDING: claim them now.
    Reaped(Vec<i64>),
    /// LISTEN is (again) in place: claim everything committed while nobody listened.
    Reconnected,
}

/// What a claim without ids is for, least urgent first (a later kind replaces an
/// earlier one that is still waiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sweep {
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
    /// The sweeps whose finds are counted in `outbox_sweep_recovered_total{sweep}`: in a
    /// healthy system the safety sweep finds nothing.
    pub const COUNTED: [Sweep; 2] = [Sweep::Reconnect, Sweep::Safety];

    /// The metric label of a counted sweep.
    pub fn label(self) -> &'static str {
        match self {
            Sweep::Safety => "safety",
            Sweep::Retry => "retry",
            Sweep::Drain => "drain",
            Sweep::Requested => "requested",
            Sweep::Reconnect => "reconnect",
        }
    }

    pub fn is_counted(self) -> bool {
        Sweep::COUNTED.contains(&self)
    }
}

/// The relay's work list.
#[derive(Debug, Default)]
pub struct Inbox {
    pending: BTreeSet<i64>,
    sweep: Option<Sweep>,
    /// When retries this instance scheduled fall due (rounded up to 10 ms slots).
    retry_at: BTreeSet<Instant>,
}

impl Inbox {
    pub fn request(&mut self, sweep: Sweep) {
        self.sweep = self.sweep.max(Some(sweep));
    }

    /// The sweep to run next, if any.
    pub fn sweep(&self) -> Option<Sweep> {
        self.sweep
    }

    /// The requested sweep found everything it was for.
    pub fn sweep_done(&mut self) {
        self.sweep = None;
    }

    /// Takes in a wake-up; `high_load` hears of the ids and of mode broadcasts.
    pub fn absorb(&mut self, wake: Wake, high_load: &mut HighLoad) {
        match wake {
            Wake::Heard(Notified::Ids(ids)) | Wake::Reaped(ids) => {
                if let Some(highest) = ids.iter().max() {
                    high_load.saw(*highest);
                }
                self.pending.extend(ids);
                if self.pending.len() > MAX_PENDING_IDS {
                    self.pending.clear();
                    self.request(Sweep::Requested);
                }
            }
            Wake::Heard(Notified::Sweep) => self.request(Sweep::Requested),
            Wake::Heard(Notified::Drain) => high_load.heard_drain(),
            Wake::Heard(Notified::Notify) => high_load.heard_notify(),
            Wake::Reconnected => {
                self.request(Sweep::Reconnect);
                high_load.reconnected();
            }
        }
    }

    /// Up to `limit` notified ids, lowest first.
    pub fn take_ids(&mut self, limit: usize) -> Vec<i64> {
        std::iter::from_fn(|| self.pending.pop_first())
            .take(limit)
            .collect()
    }

    /// Ids whose claim failed: claimed again once the database answers.
    pub fn put_back(&mut self, ids: Vec<i64>) {
        self.pending.extend(ids);
    }

    pub fn has_ids(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Remembers when the retries just scheduled fall due.
    pub fn schedule_retries(&mut self, delays: &[Duration]) {
        let now = Instant::now();
        for delay in delays {
            // Round up to a 10 ms slot: bounded timers, and never before the row is due.
            let slot = Duration::from_millis((delay.as_millis() as u64).div_ceil(10) * 10 + 10);
            self.retry_at.insert(now + slot);
        }
    }

    /// When the next scheduled retry falls due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry_at.first().copied()
    }

    /// The retry timer fired: forget the slots that are due and sweep for retries.
    pub fn retries_due(&mut self, now: Instant) {
        while self.retry_at.first().is_some_and(|at| *at <= now) {
            self.retry_at.pop_first();
        }
        self.request(Sweep::Retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HighLoadConfig;
    use crate::metrics::Metrics;

    fn high_load() -> HighLoad {
        HighLoad::new(HighLoadConfig::default(), "test".into(), Metrics::new())
    }

    #[test]
    fn ids_merge_and_the_most_urgent_sweep_wins() {
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        inbox.absorb(Wake::Heard(Notified::Ids(vec![5, 3])), &mut hl);
        inbox.absorb(Wake::Reaped(vec![4, 3]), &mut hl);
        assert_eq!(inbox.take_ids(2), vec![3, 4]);
        assert_eq!(inbox.take_ids(10), vec![5]);
        assert!(!inbox.has_ids());
        inbox.request(Sweep::Safety);
        inbox.absorb(Wake::Reconnected, &mut hl);
        inbox.request(Sweep::Retry);
        assert_eq!(inbox.sweep(), Some(Sweep::Reconnect));
        inbox.sweep_done();
        assert_eq!(inbox.sweep(), None);
    }

    #[test]
    fn too_many_ids_become_one_sweep() {
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        inbox.absorb(
            Wake::Heard(Notified::Ids((0..=MAX_PENDING_IDS as i64).collect())),
            &mut hl,
        );
        assert!(!inbox.has_ids());
        assert_eq!(inbox.sweep(), Some(Sweep::Requested));
    }
}
