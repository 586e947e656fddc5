//! A circuit breaker for one destination. After `failures_to_open` consecutive failures
//! (any success resets the count) the circuit opens: the destination gets nothing for a
//! cool-down, then one probe event. A probe that succeeds closes the circuit; one that
//! fails opens it again for twice the cool-down (up to `max_cool_down`). Events held back
//! are `Deferred`, so a destination's outage costs them no attempt. Pure: the caller
//! passes the time in.

use std::time::{Duration, Instant};

/// How the breaker is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitSettings {
    pub failures_to_open: u32,
    pub cool_down: Duration,
    pub max_cool_down: Duration,
    /// A probe not reported back within this time is considered lost.
    pub probe_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, cool_down: Duration },
    Probing { since: Instant, cool_down: Duration },
}

/// What a batch may send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send everything.
    All,
    /// Send exactly one event to probe the destination; defer the rest.
    Probe,
    /// Open: send nothing; try again after this long.
    Nothing { retry_in: Duration },
}

/// Whether to claim events for the destination now (its events are parked while its
/// circuit is open, so an outage rewrites no rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    /// Closed: claim for it.
    Ready,
    /// The cool-down is over: claim one event to probe it.
    Probe,
    /// Open, or a probe is out: claim nothing for it before this instant.
    Parked { until: Instant },
}

/// A change worth logging and exporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { cool_down: Duration },
    Closed,
}

#[derive(Debug, Clone)]
pub struct Circuit {
    settings: CircuitSettings,
    state: State,
}

impl Circuit {
    pub fn new(settings: CircuitSettings) -> Circuit {
        Circuit {
            settings,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }

    /// Whether to claim for the destination at `now` (changes nothing).
    pub fn parking(&self, now: Instant) -> Parking {
        match self.state {
            State::Closed { .. } => Parking::Ready,
            State::Open { until, .. } if now < until => Parking::Parked { until },
            State::Probing { since, .. } if now < since + self.settings.probe_timeout => {
                Parking::Parked {
                    until: since + self.settings.probe_timeout,
                }
            }
            State::Open { .. } | State::Probing { .. } => Parking::Probe,
        }
    }

    /// Asks to send a batch at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::All,
            State::Open { until, cool_down } => {
                if now >= until {
                    self.state = State::Probing {
                        since: now,
                        cool_down,
                    };
                    Admission::Probe
                } else {
                    Admission::Nothing {
                        retry_in: until - now,
                    }
                }
            }
            State::Probing { since, cool_down } => {
                if now.duration_since(since) >= self.settings.probe_timeout {
                    // The probe never reported back (its delivery was abandoned): send another.
                    self.state = State::Probing {
                        since: now,
                        cool_down,
                    };
                    Admission::Probe
                } else {
                    Admission::Nothing {
                        retry_in: self.settings.cool_down.min(self.settings.probe_timeout),
                    }
                }
            }
        }
    }

    /// Reports a delivery that reached the destination and succeeded.
    pub fn succeeded(&mut self) -> Option<Transition> {
        let was_open = self.is_open();
        self.state = State::Closed { failures: 0 };
        was_open.then_some(Transition::Closed)
    }

    /// Reports a delivery that failed because of the destination (timeout, 5xx...).
    pub fn failed(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.settings.failures_to_open {
                    return Some(self.open(now, self.settings.cool_down));
                }
                self.state = State::Closed { failures };
                None
            }
            State::Probing { cool_down, .. } => {
                let longer = (cool_down * 2).min(self.settings.max_cool_down);
                Some(self.open(now, longer))
            }
            // Late results of requests sent before the circuit opened.
            State::Open { .. } => None,
        }
    }

    fn open(&mut self, now: Instant, cool_down: Duration) -> Transition {
        self.state = State::Open {
            until: now + cool_down,
            cool_down,
        };
        Transition::Opened { cool_down }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CircuitSettings {
        CircuitSettings {
            failures_to_open: 3,
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(12),
            probe_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn parking_follows_the_state_without_changing_it() {
        let t = Instant::now();
        let mut c = Circuit::new(settings());
        assert_eq!(c.parking(t), Parking::Ready);
        for _ in 0..3 {
            c.failed(t);
        }
        let until = t + Duration::from_secs(5);
        assert_eq!(c.parking(t), Parking::Parked { until });
        assert_eq!(c.parking(until), Parking::Probe);
        assert_eq!(c.parking(until), Parking::Probe, "asking changes nothing");
        assert_eq!(c.admit(until), Admission::Probe);
        // The probe is out: parked until it reports or its timeout.
        assert_eq!(
            c.parking(until),
            Parking::Parked {
                until: until + Duration::from_secs(2)
            }
        );
        assert_eq!(c.parking(until + Duration::from_secs(2)), Parking::Probe);
        c.succeeded();
        assert_eq!(c.parking(until), Parking::Ready);
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut c = Circuit::new(settings());
        assert_eq!(c.failed(t), None);
        assert_eq!(c.failed(t), None);
        assert_eq!(c.succeeded(), None);
        assert_eq!(c.failed(t), None);
        assert_eq!(c.failed(t), None);
        assert_eq!(
            c.failed(t),
            Some(Transition::Opened {
                cool_down: Duration::from_secs(5)
            })
        );
        assert_eq!(
            c.admit(t + Duration::from_secs(1)),
            Admission::Nothing {
                retry_in: Duration::from_secs(4)
            }
        );
    }

    #[test]
    fn after_the_cool_down_one_probe_goes_and_decides() {
        let t = Instant::now();
        let mut c = Circuit::new(settings());
        for _ in 0..3 {
            c.failed(t);
        }
        let later = t + Duration::from_secs(5);
        assert_eq!(c.admit(later), Admission::Probe);
        assert!(
            matches!(c.admit(later), Admission::Nothing { .. }),
            "one probe at a time"
        );
        // The probe fails: open again, twice as long.
        assert_eq!(
            c.failed(later),
            Some(Transition::Opened {
                cool_down: Duration::from_secs(10)
            })
        );
        assert!(matches!(
            c.admit(later + Duration::from_secs(9)),
            Admission::Nothing { .. }
        ));
        assert_eq!(c.admit(later + Duration::from_secs(10)), Admission::Probe);
        // Fails again: capped.
        assert_eq!(
            c.failed(later + Duration::from_secs(10)),
            Some(Transition::Opened {
                cool_down: Duration::from_secs(12)
            })
        );
        assert_eq!(c.admit(later + Duration::from_secs(22)), Admission::Probe);
        assert_eq!(c.succeeded(), Some(Transition::Closed));
        assert_eq!(c.admit(later + Duration::from_secs(22)), Admission::All);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_its_timeout() {
        let t = Instant::now();
        let mut c = Circuit::new(settings());
        for _ in 0..3 {
            c.failed(t);
        }
        assert_eq!(c.admit(t + Duration::from_secs(5)), Admission::Probe);
        assert!(matches!(
            c.admit(t + Duration::from_secs(6)),
            Admission::Nothing { .. }
        ));
        assert_eq!(c.admit(t + Duration::from_secs(7)), Admission::Probe);
    }

    #[test]
    fn late_failures_while_open_change_nothing() {
        let t = Instant::now();
        let mut c = Circuit::new(settings());
        for _ in 0..3 {
            c.failed(t);
        }
        assert_eq!(c.failed(t), None);
        assert_eq!(c.admit(t + Duration::from_secs(5)), Admission::Probe);
    }
}
