//! The circuit breaker around any destination ([`circuit`](super::circuit) decides, this
//! applies it). While a destination is down its events are not sent but `Deferred`, so
//! its outage costs them no attempt (invariant 4) and does not hold up other
//! destinations; after a cool-down one event probes it. What counts as the
//! destination's failure: a `Retry` with `Fault::Destination`, and a batch the sink
//! could not send at all (`Deferred`). An answer about one event (a 4xx, a mandatory
//! return) shows the destination is alive. The `outbox_destination_circuit_open` gauge
//! and readiness follow the circuit. A destination that takes one event per request
//! (webhooks: [`Sink::concurrency`]) is admitted request by request, at most its
//! concurrency at a time, so a black-holed endpoint is charged at most
//! `failures_to_open` + that many events before its circuit opens, not a whole batch.

use super::Sink;
use super::circuit::{Admission, Circuit, CircuitSettings, Transition};
use crate::event::{Event, Fault, Outcome};
use crate::metrics::Metrics;
use futures_util::future::BoxFuture;
use futures_util::future::join_all;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// How long events held back while a probe is out wait before they are claimed again.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// A destination behind its circuit breaker.
pub struct Guarded {
    inner: Box<dyn Sink>,
    circuit: Mutex<Circuit>,
    /// For a destination that takes one event per request: its requests in flight.
    per_request: Option<Semaphore>,
    metrics: Metrics,
}

impl Guarded {
    pub fn new(inner: Box<dyn Sink>, settings: CircuitSettings, metrics: Metrics) -> Guarded {
        Guarded {
            per_request: inner.concurrency().map(Semaphore::new),
            inner,
            circuit: Mutex::new(Circuit::new(settings)),
            metrics,
        }
    }

    /// One event per request: each request waits for a place, then asks the circuit,
    /// then is sent (or deferred) and reported before the next one is admitted.
    async fn deliver_each(&self, events: &[Event], places: &Semaphore) -> Vec<Outcome> {
        join_all(events.iter().map(|event| async move {
            let _place = places.acquire().await.expect("never closed");
            let admission = self.circuit.lock().expect("circuit").admit(Instant::now());
            if let Admission::Nothing { retry_in } = admission {
                return Outcome::Deferred {
                    reason: format!(
                        "circuit open: {} is failing; next probe in {}",
                        self.name(),
                        crate::duration_text::rounded(retry_in)
                    ),
                    not_before: retry_in,
                };
            }
            let mut outcome = self
                .inner
                .deliver(std::slice::from_ref(event))
                .await
                .pop()
                .unwrap_or_else(|| Outcome::destination_failed("destination returned no outcome"));
            let transition = {
                let mut circuit = self.circuit.lock().expect("circuit");
                judge(
                    &mut circuit,
                    &mut outcome,
                    admission == Admission::Probe,
                    &mut false,
                    Instant::now(),
                )
            };
            if let (Some(Transition::Opened { cool_down }), Outcome::Deferred { not_before, .. }) =
                (transition, &mut outcome)
            {
                *not_before = (*not_before).max(cool_down);
            }
            self.report(transition);
            outcome
        }))
        .await
    }

    async fn deliver_guarded(&self, events: &[Event]) -> Vec<Outcome> {
        let admission = self.circuit.lock().expect("circuit").admit(Instant::now());
        let (sent, held_back) = match admission {
            Admission::All => (events.len(), None),
            Admission::Probe => (
                events.len().min(1),
                Some((
                    format!("circuit open: probing {} with one event", self.name()),
                    PROBE_WAIT,
                )),
            ),
            Admission::Nothing { retry_in } => (
                0,
                Some((
                    format!(
                        "circuit open: {} is failing; next probe in {}",
                        self.name(),
                        crate::duration_text::rounded(retry_in)
                    ),
                    retry_in,
                )),
            ),
        };
        let mut outcomes = if sent == 0 {
            Vec::new()
        } else {
            self.inner.deliver(&events[..sent]).await
        };
        let probing = admission == Admission::Probe;
        let now = Instant::now();
        let mut opened_for = None;
        {
            let mut circuit = self.circuit.lock().expect("circuit");
            let mut unsent = false;
            for outcome in outcomes.iter_mut() {
                let transition = judge(&mut circuit, outcome, probing, &mut unsent, now);
                if let Some(Transition::Opened { cool_down }) = transition {
                    opened_for = Some(cool_down);
                }
                self.report(transition);
            }
        }
        if let Some(cool_down) = opened_for {
            // Nothing is sent before the next probe: no point claiming them sooner.
            for outcome in outcomes.iter_mut() {
                if let Outcome::Deferred { not_before, .. } = outcome {
                    *not_before = (*not_before).max(cool_down);
                }
            }
        }
        if let Some((reason, not_before)) = held_back {
            outcomes.extend(events[sent..].iter().map(|_| Outcome::Deferred {
                reason: reason.clone(),
                not_before,
            }));
        }
        outcomes
    }

    fn report(&self, transition: Option<Transition>) {
        let gauge = self
            .metrics
            .destination_circuit_open
            .with_label_values(&[self.name()]);
        match transition {
            Some(Transition::Opened { cool_down }) => {
                gauge.set(1);
                tracing::warn!(
                    destination = %self.name(),
                    cool_down_ms = cool_down.as_millis() as u64,
                    "circuit opened: destination failing; its events are parked without using attempts; next probe in {}",
                    crate::duration_text::rounded(cool_down)
                );
            }
            Some(Transition::Closed) => {
                gauge.set(0);
                tracing::info!(destination = %self.name(), "circuit closed: destination answers again");
            }
            None => {}
        }
    }
}

impl Sink for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>> {
        match &self.per_request {
            Some(places) => Box::pin(self.deliver_each(events, places)),
            None => Box::pin(self.deliver_guarded(events)),
        }
    }

    fn concurrency(&self) -> Option<usize> {
        self.inner.concurrency()
    }

    fn connect(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            let connected = self.inner.connect().await;
            if connected.is_err() {
                // Unreachable at start: not ready, and the first events wait for a probe.
                let transition = self.circuit.lock().expect("circuit").failed(Instant::now());
                self.report(transition);
            }
            connected
        })
    }

    fn parking(&self) -> super::Parking {
        self.circuit
            .lock()
            .expect("circuit")
            .parking(Instant::now())
    }

    fn available(&self) -> Result<(), String> {
        if self.circuit.lock().expect("circuit").is_open() {
            return Err("unreachable or failing: its circuit is open and its events wait".into());
        }
        self.inner.available()
    }
}

/// What one outcome tells the circuit (and how a failed probe is reported): an answer
/// about the event shows the destination alive; its own failure counts; a batch it
/// could not send at all counts once (`unsent` remembers).
fn judge(
    circuit: &mut Circuit,
    outcome: &mut Outcome,
    probing: bool,
    unsent: &mut bool,
    now: Instant,
) -> Option<Transition> {
    match outcome {
        Outcome::Delivered
        | Outcome::Rejected { .. }
        | Outcome::Retry {
            fault: Fault::Event,
            ..
        } => circuit.succeeded(),
        Outcome::Retry {
            reason,
            fault: Fault::Destination,
            ..
        } => {
            let transition = circuit.failed(now);
            if probing {
                // A failed probe is the destination's outage: no attempt charged.
                *outcome = Outcome::Deferred {
                    reason: format!("probe failed: {reason}"),
                    not_before: PROBE_WAIT,
                };
            }
            transition
        }
        Outcome::Deferred { .. } if !*unsent => {
            *unsent = true;
            circuit.failed(now)
        }
        Outcome::Deferred { .. } => None,
    }
}
