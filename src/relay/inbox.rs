//! What the relay has been asked to claim: ids (notified, or returned by the reaper),
//! the sweeps requested (each kind once, oldest first: one kind never replaces or
//! starves another), and when the retries it scheduled fall due.
//! Everything that arrives while a claim runs is merged here and goes into the next
//! claim, so under load claims are large and back to back.

use crate::high_load::HighLoad;
use crate::membership::{SHARDS, Shares};
use crate::notification::{Created, Notified};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
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
    /// The shards of notified ids this instance claims, from the live instances the
    /// listener just read (src/membership.rs).
    Shares(Shares),
}

/// What a claim without ids is for.
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
    /// A destination claims had left out (saturated or parked) takes events again:
    /// what they left behind.
    Resumed,
    /// This instance gained shards (another left or stopped renewing): ids of them
    /// heard before may have been left to nobody.
    Rebalanced,
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
            Sweep::Resumed => "resumed",
            Sweep::Rebalanced => "rebalanced",
        }
    }

    pub fn is_counted(self) -> bool {
        Sweep::COUNTED.contains(&self)
    }

    /// Whether a finished sweep of this kind also did `other`'s work. A sweep of every
    /// due event finds what the safety sweep (due for longer than the grace) and the
    /// retry sweep (due retries) look for; those two find only their own.
    fn covers(self, other: Sweep) -> bool {
        match self {
            Sweep::Drain
            | Sweep::Requested
            | Sweep::Reconnect
            | Sweep::Resumed
            | Sweep::Rebalanced => true,
            Sweep::Safety | Sweep::Retry => self == other,
        }
    }
}

/// The relay's work list.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Notified ids, with their notification's `created_at` bounds when it had them.
    pending: BTreeMap<i64, Option<Created>>,
    /// Ids whose last delivery crashed (a worker died, a task panicked): claimed one at a
    /// time, so whatever crashed can only take its own event down.
    suspects: BTreeSet<i64>,
    /// Requested sweeps, oldest first, each kind once.
    sweeps: VecDeque<Sweep>,
    /// When retries this instance scheduled fall due (rounded up to 10 ms slots).
    retry_at: BTreeSet<Instant>,
    /// The notified ids that are this instance's to claim; the others' owners claim
    /// the rest.
    shares: Shares,
    /// Whether the shares are of aggregates (per-aggregate ordering: every notified id
    /// is taken in, and the claim takes only the events of owned aggregates) rather
    /// than of id blocks.
    by_aggregate: bool,
}

impl Inbox {
    /// Asks for a sweep; one of the same kind already waiting keeps its place.
    pub fn request(&mut self, sweep: Sweep) {
        if !self.sweeps.contains(&sweep) {
            self.sweeps.push_back(sweep);
        }
    }

    /// The sweep to run next (the longest waiting), if any.
    pub fn sweep(&self) -> Option<Sweep> {
        self.sweeps.front().copied()
    }

    /// `sweep` claimed a full batch and has more to do: it goes behind the other waiting
    /// sweeps, so a sweep that always finds work (retries falling due all the time)
    /// cannot starve the others.
    pub fn sweep_continues(&mut self, sweep: Sweep) {
        if let Some(at) = self.sweeps.iter().position(|s| *s == sweep) {
            self.sweeps.remove(at);
            self.sweeps.push_back(sweep);
        }
    }

    /// `sweep` found everything it was for: it and every waiting sweep it covers are done.
    pub fn sweep_done(&mut self, sweep: Sweep) {
        self.sweeps.retain(|waiting| !sweep.covers(*waiting));
    }

    /// Takes in a wake-up; `high_load` hears of the ids and of mode broadcasts.
    pub fn absorb(&mut self, wake: Wake, high_load: &mut HighLoad) {
        match wake {
            Wake::Reaped(ids) => self.suspect(ids),
            Wake::Heard(Notified::Ids(ids, created)) => {
                if let Some(highest) = ids.iter().max() {
                    high_load.saw(*highest);
                }
                let by_aggregate = self.by_aggregate;
                for id in ids
                    .into_iter()
                    .filter(|id| by_aggregate || self.shares.owns(*id))
                {
                    let known = self.pending.entry(id).or_insert(created);
                    *known = match (*known, created) {
                        (Some(a), Some(b)) => Some(a.merge(b)),
                        _ => None,
                    };
                }
                if self.pending.len() > MAX_PENDING_IDS {
                    self.pending.clear();
                    self.request(Sweep::Requested);
                }
            }
            Wake::Heard(Notified::Sweep) => self.request(Sweep::Requested),
            Wake::Heard(Notified::Drain) => high_load.heard_drain(),
            Wake::Heard(Notified::Notify) => high_load.heard_notify(),
            // The listener reads the members itself; nothing for the relay.
            Wake::Heard(Notified::Members) => {}
            Wake::Reconnected => {
                self.request(Sweep::Reconnect);
                high_load.reconnected();
            }
            Wake::Shares(shares) => {
                // Ids already taken in stay: claiming one another instance owns now is
                // harmless (SKIP LOCKED). Ids of a gained shard heard before the gain
                // were committed before this sweep begins, so it finds them.
                if shares.gained_over(&self.shares) {
                    self.request(Sweep::Rebalanced);
                }
                self.shares = shares;
            }
        }
    }

    /// The division this instance last heard of.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// Divide by aggregate instead of by id block (see [`crate::membership`]).
    pub fn divide_by_aggregate(&mut self, by_aggregate: bool) {
        self.by_aggregate = by_aggregate;
    }

    /// The aggregate shards a claim of notified ids takes events of (`None`: all), one
    /// flag per shard.
    pub fn aggregate_shards(&self) -> Option<Vec<bool>> {
        (self.by_aggregate && self.shares.count() < SHARDS).then(|| {
            (0..SHARDS)
                .map(|shard| self.shares.owns_shard(shard))
                .collect()
        })
    }

    /// Ids whose delivery crashed: each is claimed alone.
    pub fn suspect(&mut self, ids: Vec<i64>) {
        self.suspects.extend(ids);
    }

    /// The next id to claim alone, if any.
    pub fn take_suspect(&mut self) -> Option<i64> {
        self.suspects.pop_first()
    }

    /// Up to `limit` notified ids, lowest first, and when they were created (`None`
    /// when any of them came without bounds).
    pub fn take_ids(&mut self, limit: usize) -> (Vec<i64>, Option<Created>) {
        let mut ids = Vec::with_capacity(limit.min(self.pending.len()));
        let mut created: Option<Option<Created>> = None;
        while ids.len() < limit {
            let Some((id, bounds)) = self.pending.pop_first() else {
                break;
            };
            ids.push(id);
            created = Some(match (created, bounds) {
                (None, bounds) => bounds,
                (Some(Some(a)), Some(b)) => Some(a.merge(b)),
                (Some(_), _) => None,
            });
        }
        (ids, created.flatten())
    }

    /// Ids whose claim failed: claimed again once the database answers.
    pub fn put_back(&mut self, ids: Vec<i64>, created: Option<Created>) {
        for id in ids {
            self.pending.insert(id, created);
        }
    }

    /// Events released from a hold (ordering): claimed with the next batch of ids.
    pub fn released(&mut self, events: &[(i64, std::time::SystemTime)]) {
        for (id, created_at) in events {
            let seconds = created_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let created = Created {
                since: seconds.floor() as i64 - 1,
                until: seconds.ceil() as i64 + 1,
            };
            let known = self.pending.entry(*id).or_insert(Some(created));
            *known = known.map(|k| k.merge(created));
        }
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
    fn ids_merge() {
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        let at = |since, until| Some(Created { since, until });
        inbox.absorb(Wake::Heard(Notified::Ids(vec![5, 3], at(10, 11))), &mut hl);
        inbox.absorb(Wake::Heard(Notified::Ids(vec![4, 3], at(12, 12))), &mut hl);
        inbox.absorb(Wake::Heard(Notified::Ids(vec![6], None)), &mut hl);
        assert_eq!(inbox.take_ids(2), (vec![3, 4], at(10, 12)));
        assert_eq!(inbox.take_ids(10), (vec![5, 6], None), "6 came unbounded");
        assert!(!inbox.has_ids());
    }

    #[test]
    fn reaped_ids_are_suspects_claimed_one_at_a_time() {
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        inbox.absorb(Wake::Reaped(vec![9, 7]), &mut hl);
        assert!(!inbox.has_ids(), "not claimed in a batch");
        assert_eq!(inbox.take_suspect(), Some(7));
        assert_eq!(inbox.take_suspect(), Some(9));
        assert_eq!(inbox.take_suspect(), None);
    }

    #[test]
    fn a_retry_timer_never_replaces_a_waiting_safety_sweep() {
        let mut inbox = Inbox::default();
        inbox.request(Sweep::Safety);
        // Every slot busy: the safety sweep waits while retry timers keep firing.
        for _ in 0..3 {
            inbox.retries_due(Instant::now());
            assert_eq!(
                inbox.sweep(),
                Some(Sweep::Safety),
                "the older request runs first"
            );
        }
        inbox.sweep_done(Sweep::Safety);
        assert_eq!(inbox.sweep(), Some(Sweep::Retry));
        inbox.sweep_done(Sweep::Retry);
        assert_eq!(inbox.sweep(), None);
    }

    #[test]
    fn a_sweep_that_always_finds_work_takes_turns() {
        let mut inbox = Inbox::default();
        inbox.retries_due(Instant::now());
        inbox.request(Sweep::Safety);
        // The retry sweep's claims keep coming back full.
        inbox.sweep_continues(Sweep::Retry);
        assert_eq!(inbox.sweep(), Some(Sweep::Safety));
        inbox.sweep_continues(Sweep::Safety);
        assert_eq!(inbox.sweep(), Some(Sweep::Retry));
    }

    #[test]
    fn a_sweep_of_everything_due_covers_the_others_but_not_the_reverse() {
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        inbox.request(Sweep::Retry);
        inbox.request(Sweep::Safety);
        inbox.absorb(Wake::Reconnected, &mut hl);
        inbox.sweep_done(Sweep::Retry);
        assert_eq!(inbox.sweep(), Some(Sweep::Safety));
        inbox.sweep_done(Sweep::Safety);
        assert_eq!(inbox.sweep(), Some(Sweep::Reconnect));
        inbox.request(Sweep::Safety);
        inbox.request(Sweep::Retry);
        inbox.sweep_done(Sweep::Reconnect);
        assert_eq!(inbox.sweep(), None);
    }

    #[test]
    fn only_ids_of_owned_shards_are_taken_and_a_gained_shard_is_swept() {
        use crate::membership::{BLOCK, Shares};
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        let members = vec!["a".to_string(), "b".to_string()];
        let mine = Shares::of("a", &members);
        let ids: Vec<i64> = (0..BLOCK * 8).collect();
        inbox.absorb(Wake::Shares(mine.clone()), &mut hl);
        assert_eq!(inbox.sweep(), None, "losing shards needs no sweep");
        inbox.absorb(Wake::Heard(Notified::Ids(ids.clone(), None)), &mut hl);
        let (taken, _) = inbox.take_ids(usize::MAX);
        let expected: Vec<i64> = ids.iter().copied().filter(|id| mine.owns(*id)).collect();
        assert!(!expected.is_empty() && expected.len() < ids.len());
        assert_eq!(taken, expected);
        // "b" left: "a" owns everything again, and sweeps for what nobody took.
        inbox.absorb(Wake::Shares(Shares::of("a", &members[..1])), &mut hl);
        assert_eq!(inbox.sweep(), Some(Sweep::Rebalanced));
        inbox.absorb(Wake::Heard(Notified::Ids(ids.clone(), None)), &mut hl);
        assert_eq!(inbox.take_ids(usize::MAX).0, ids);
    }

    #[test]
    fn too_many_ids_become_one_sweep() {
        let mut inbox = Inbox::default();
        let mut hl = high_load();
        inbox.absorb(
            Wake::Heard(Notified::Ids((0..=MAX_PENDING_IDS as i64).collect(), None)),
            &mut hl,
        );
        assert!(!inbox.has_ids());
        assert_eq!(inbox.sweep(), Some(Sweep::Requested));
    }
}
