//! Replays: already PUBLISHED events sent again to one destination (`outboxd replay`,
//! `POST /api/replays`), each with its own tracking_id and the `outbox-replay-id` header.
//! A replay is a stored job (`outbox_replays`); the [`Replayer`] of a running instance
//! takes it under a lease and sends it a batch at a time, at most `rate` events a
//! second, advancing the job's cursor as the destination acknowledges: a crash resumes
//! from the cursor (the batch in flight is sent again). It sends to that destination
//! only. With ordering, the events of one aggregate go one after the other, each only
//! once the one before it was acknowledged.
//!
//! The request side (parse, check, dry run, store, status, cancel) is shared by the CLI
//! and the API, which only read their input and present the answer.

use crate::dead_letters::{RequestError, check_text, parse_time};
use crate::event::{Event, Outcome};
use crate::retry::Backoff;
use crate::sink::Sink;
use crate::store::history::AttemptItem;
use crate::store::replays::{EventFilter, Replay, ReplayCount, ReplayJob};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, interval_at};
use tokio_util::sync::CancellationToken;

/// Events a second when the request names no rate.
pub const DEFAULT_RATE: u32 = 100;
/// The highest rate a replay may ask for.
pub const MAX_RATE: u32 = 100_000;
/// Events read and sent per batch at most (and at most `rate`, so the cursor moves at
/// least every second).
const MAX_BATCH: i64 = 500;
/// How long a replay's holder keeps it without renewing; renewed every third of it
/// while sending. A holder that is no longer a live instance loses it at once.
pub const REPLAY_LEASE: Duration = Duration::from_secs(15);

/// A replay as asked for (CLI flags or API JSON).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// `rabbitmq` or `webhook:NAME`.
    pub destination: String,
    /// An id (`5016`) or a time (`2026-12-01T00:00:00Z`): from (inclusive).
    #[serde(default)]
    pub from: Option<String>,
    /// An id (inclusive) or a time (exclusive).
    #[serde(default)]
    pub to: Option<String>,
    /// An event type; `*` matches any run of characters.
    #[serde(default)]
    pub event_type: Option<String>,
    /// `TYPE` or `TYPE:ID`.
    #[serde(default)]
    pub aggregate: Option<String>,
    /// Why (required): what the consumer lost, so the record explains the duplicates.
    #[serde(default)]
    pub reason: String,
    /// Events a second (default [`DEFAULT_RATE`]).
    #[serde(default)]
    pub rate: Option<u32>,
    /// Count what would be sent; store nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Who asks (the API's default: "api").
    #[serde(default)]
    pub by: Option<String>,
}

/// What a replay request did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Started {
    /// A dry run: what would be sent.
    DryRun {
        destination: String,
        filter: String,
        count: ReplayCount,
    },
    /// Stored: a running instance sends it.
    Stored {
        id: i64,
        destination: String,
        filter: String,
        matched: i64,
        rate: u32,
    },
}

/// A filter from its written parts (`--from`, `--to`, `--event-type`, `--aggregate`).
pub fn parse_filter(
    from: Option<&str>,
    to: Option<&str>,
    event_type: Option<&str>,
    aggregate: Option<&str>,
) -> Result<EventFilter, RequestError> {
    let mut filter = EventFilter::default();
    for (name, text, is_from) in [("from", from, true), ("to", to, false)] {
        let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
            continue;
        };
        check_text(name, text)?;
        if let Ok(id) = text.parse::<i64>() {
            if is_from {
                filter.from_id = Some(id);
            } else {
                filter.to_id = Some(id);
            }
        } else {
            let time = parse_time(name, Some(text))
                .map_err(|_| {
                    RequestError::BadRequest(format!(
                        "{name} {text:?} is neither an event id (5016) nor a time like 2026-12-01T00:00:00Z"
                    ))
                })?
                .expect("given");
            if is_from {
                filter.from_at = Some(time);
            } else {
                filter.to_at = Some(time);
            }
        }
    }
    if let Some(event_type) = event_type.filter(|t| !t.is_empty()) {
        check_text("event_type", event_type)?;
        filter.event_type = Some(event_type.to_string());
    }
    if let Some(aggregate) = aggregate.filter(|a| !a.is_empty()) {
        check_text("aggregate", aggregate)?;
        match aggregate.split_once(':') {
            Some((kind, id)) if !kind.is_empty() && !id.is_empty() => {
                filter.aggregate_type = Some(kind.to_string());
                filter.aggregate_id = Some(id.to_string());
            }
            None => filter.aggregate_type = Some(aggregate.to_string()),
            _ => {
                return Err(RequestError::BadRequest(format!(
                    "aggregate {aggregate:?} is not TYPE or TYPE:ID (order, order:42)"
                )));
            }
        }
    }
    Ok(filter)
}

/// Checks a replay request and stores it (or counts it, for a dry run). `destinations`
/// are the ones this configuration defines.
pub async fn start(
    store: &Store,
    destinations: &[String],
    request: &ReplayRequest,
) -> Result<Started, RequestError> {
    let by = request.by.as_deref().unwrap_or("api");
    if !destinations.contains(&request.destination) {
        return Err(RequestError::BadRequest(format!(
            "destination {:?} is not defined here; defined: {} (a replay goes to one of them)",
            request.destination,
            destinations.join(", ")
        )));
    }
    let filter = parse_filter(
        request.from.as_deref(),
        request.to.as_deref(),
        request.event_type.as_deref(),
        request.aggregate.as_deref(),
    )?;
    let rate = request.rate.unwrap_or(DEFAULT_RATE);
    if !(1..=MAX_RATE).contains(&rate) {
        return Err(RequestError::BadRequest(format!(
            "rate {rate} is out of range: give 1 to {MAX_RATE} events a second (default {DEFAULT_RATE})"
        )));
    }
    if request.dry_run {
        let count = store.count_replay(&request.destination, &filter).await?;
        return Ok(Started::DryRun {
            destination: request.destination.clone(),
            filter: filter.describe(),
            count,
        });
    }
    if request.reason.trim().is_empty() {
        return Err(RequestError::BadRequest(
            "a replay needs a reason (what the consumer lost, so the duplicates are explained): give --reason \"...\"".into(),
        ));
    }
    check_text("reason", &request.reason)?;
    check_text("by", by)?;
    if by.trim().is_empty() {
        return Err(RequestError::BadRequest(
            "a replay needs to know who asked for it: give --by NAME".into(),
        ));
    }
    let (id, matched) = store
        .create_replay(
            &request.destination,
            &filter,
            rate as i32,
            request.reason.trim(),
            by.trim(),
        )
        .await?;
    tracing::info!(
        replay = id,
        destination = %request.destination,
        filter = %filter.describe(),
        matched,
        rate,
        reason = request.reason.trim(),
        by = by.trim(),
        "replay stored"
    );
    Ok(Started::Stored {
        id,
        destination: request.destination.clone(),
        filter: filter.describe(),
        matched,
        rate,
    })
}

/// One replay (`Some(id)`) or the newest ones.
pub async fn status(store: &Store, id: Option<i64>) -> Result<Vec<Replay>, RequestError> {
    let replays = store.list_replays(id, 20).await?;
    if let (Some(id), true) = (id, replays.is_empty()) {
        return Err(RequestError::NoEvent(format!("replay {id}")));
    }
    Ok(replays)
}

/// Stops a running replay (its holder stops after the batch in flight).
pub async fn cancel(store: &Store, id: i64, by: &str) -> Result<Replay, RequestError> {
    check_text("by", by)?;
    let cancelled = store.cancel_replay(id, by.trim()).await?;
    let replay = status(store, Some(id)).await?.remove(0);
    if !cancelled {
        return Err(RequestError::BadRequest(format!(
            "replay {id} is {}, not RUNNING: nothing to cancel",
            replay.status
        )));
    }
    tracing::info!(replay = id, by = by.trim(), "replay cancelled");
    Ok(replay)
}

/// Runs the stored replays to this instance's destinations, one at a time. Woken when
/// the gauges see a running replay (every `http.gauge_refresh_interval`), so an idle
/// instance asks nothing more of the database.
pub struct Replayer {
    store: Store,
    sinks: HashMap<String, Arc<dyn Sink>>,
    holder: String,
    wake: Arc<Notify>,
}

/// How a replay's run ended on this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    /// Nothing left: DONE.
    Done,
    /// Cancelled, or taken over by another holder.
    Stopped,
    /// This instance is shutting down; the lease runs out and another takes it.
    ShuttingDown,
}

impl Replayer {
    pub fn new(
        store: Store,
        sinks: &[Arc<dyn Sink>],
        holder: String,
        wake: Arc<Notify>,
    ) -> Replayer {
        Replayer {
            store,
            sinks: sinks
                .iter()
                .map(|s| (s.name().to_string(), s.clone()))
                .collect(),
            holder,
            wake,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            // Every replay nobody runs, one after the other.
            loop {
                match self.run_once(&shutdown).await {
                    Ok(Some((_, Ran::ShuttingDown))) => return,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "replay failed; trying again at the next wake-up");
                        break;
                    }
                }
            }
        }
    }

    /// Takes one replay nobody runs and runs it to its end here (`None`: none waits).
    pub async fn run_once(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(i64, Ran)>, StoreError> {
        let names: Vec<String> = self.sinks.keys().cloned().collect();
        let Some(job) = self
            .store
            .claim_replay(&self.holder, &names, REPLAY_LEASE)
            .await?
        else {
            return Ok(None);
        };
        tracing::info!(replay = job.id, destination = %job.destination, cursor = job.cursor, "replay taken");
        let id = job.id;
        let ran = self.execute(job, shutdown).await?;
        Ok(Some((id, ran)))
    }

    async fn execute(
        &self,
        mut job: ReplayJob,
        shutdown: &CancellationToken,
    ) -> Result<Ran, StoreError> {
        let sink = self.sinks[&job.destination].clone();
        let batch = (job.rate as i64).clamp(1, MAX_BATCH);
        let mut pace = Pace::new(job.rate as u32);
        loop {
            if shutdown.is_cancelled() {
                return Ok(Ran::ShuttingDown);
            }
            let events = self.store.replay_batch(&job, job.cursor, batch).await?;
            let Some(last) = events.last().map(|e| e.id) else {
                if self.store.finish_replay(job.id, &self.holder).await? {
                    tracing::info!(replay = job.id, "replay done");
                    return Ok(Ran::Done);
                }
                return Ok(Ran::Stopped);
            };
            let Some((sent, rejected)) =
                self.send(&sink, &job, events, &mut pace, shutdown).await?
            else {
                return Ok(if shutdown.is_cancelled() {
                    Ran::ShuttingDown
                } else {
                    Ran::Stopped
                });
            };
            let kept = self
                .store
                .advance_replay(
                    job.id,
                    &self.holder,
                    Some(last),
                    sent,
                    rejected,
                    REPLAY_LEASE,
                )
                .await?;
            if !kept {
                tracing::info!(replay = job.id, "replay cancelled or taken over; stopped");
                return Ok(Ran::Stopped);
            }
            job.cursor = last;
        }
    }

    /// Sends one batch until every event is acknowledged or rejected (rejections are
    /// recorded and skipped); a failure that may pass is sent again after a backoff.
    /// With ordering, a round holds at most one event of each aggregate. Returns
    /// (sent, rejected), or `None` when the replay was cancelled or taken over, or the
    /// instance shuts down.
    async fn send(
        &self,
        sink: &Arc<dyn Sink>,
        job: &ReplayJob,
        mut pending: Vec<Event>,
        pace: &mut Pace,
        shutdown: &CancellationToken,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let (mut sent, mut rejected) = (0i64, 0i64);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        while !pending.is_empty() {
            let round = self.round(&pending);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = pace.wait(round.len()) => {}
            }
            let events: Vec<Event> = round.iter().map(|&i| pending[i].clone()).collect();
            let started = Instant::now();
            let work = sink.deliver(&events);
            tokio::pin!(work);
            let mut beat = interval_at(Instant::now() + REPLAY_LEASE / 3, REPLAY_LEASE / 3);
            let mut lost = false;
            let outcomes = loop {
                tokio::select! {
                    outcomes = &mut work => break outcomes,
                    _ = beat.tick() => {
                        lost |= !self.store.advance_replay(job.id, &self.holder, None, 0, 0, REPLAY_LEASE).await?;
                    }
                }
            };
            let took = started.elapsed();
            let mut done = HashSet::new();
            let mut failures = Vec::new();
            let mut wait = None;
            for (index, (event, outcome)) in round.iter().zip(events.iter().zip(&outcomes)) {
                match outcome {
                    Outcome::Delivered => {
                        sent += 1;
                        done.insert(*index);
                    }
                    Outcome::Rejected { reason } => {
                        tracing::warn!(replay = job.id, tracking_id = %event.tracking_id, %reason, "replayed event rejected; skipped");
                        rejected += 1;
                        done.insert(*index);
                    }
                    Outcome::Retry { not_before, .. } => {
                        wait = wait.max(*not_before);
                    }
                    Outcome::Deferred { not_before, .. } => {
                        wait = wait.max(Some(*not_before));
                    }
                }
                if let Some(mut failed) =
                    AttemptItem::failed(event, &job.destination, outcome, took)
                {
                    failed.replay_id = Some(job.id);
                    failures.push(failed);
                }
            }
            if let Err(error) = self.store.record_attempts(&failures).await {
                tracing::warn!(%error, "could not write a replay's failed sends into the delivery history");
            }
            if lost {
                return Ok(None);
            }
            let before = pending.len();
            let mut index = 0;
            pending.retain(|_| {
                let keep = !done.contains(&index);
                index += 1;
                keep
            });
            if pending.len() == before - round.len() {
                backoff.succeeded();
                continue;
            }
            // Some failed in a way that may pass: wait, keep the lease, send them again.
            let delay = backoff.failed().max(wait.unwrap_or_default());
            tracing::warn!(
                replay = job.id,
                left = pending.len(),
                retry_in_ms = delay.as_millis() as u64,
                "replay sends failed; trying again"
            );
            let until = Instant::now() + delay;
            while Instant::now() < until {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep_until(until.min(Instant::now() + REPLAY_LEASE / 3)) => {}
                }
                if !self
                    .store
                    .advance_replay(job.id, &self.holder, None, 0, 0, REPLAY_LEASE)
                    .await?
                {
                    return Ok(None);
                }
            }
        }
        Ok(Some((sent, rejected)))
    }

    /// The indexes of `pending` to send now: all of them, except that an ordered event
    /// waits while an earlier event of its aggregate is still pending.
    fn round(&self, pending: &[Event]) -> Vec<usize> {
        let order = self.store.order();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        pending
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                let key = (e.aggregate_type.as_str(), e.aggregate_id.as_str());
                let first = seen.insert(key);
                first || !order.is_ordered(&e.event_type)
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// At most `rate` events a second: each round waits for its share of time.
struct Pace {
    per_event: Duration,
    next: Instant,
}

impl Pace {
    fn new(rate: u32) -> Pace {
        Pace {
            per_event: Duration::from_secs_f64(1.0 / rate.max(1) as f64),
            next: Instant::now(),
        }
    }

    async fn wait(&mut self, events: usize) {
        let now = Instant::now();
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next = self.next.max(now) + self.per_event * events as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_ids_times_types_and_aggregates() {
        let f = parse_filter(
            Some("17"),
            Some("2026-12-01T00:00:00Z"),
            Some("order.*"),
            Some("order:42"),
        )
        .unwrap();
        assert_eq!(f.from_id, Some(17));
        assert!(f.to_at.is_some());
        assert_eq!(f.event_type.as_deref(), Some("order.*"));
        assert_eq!(f.aggregate_type.as_deref(), Some("order"));
        assert_eq!(f.aggregate_id.as_deref(), Some("42"));
        let f = parse_filter(None, None, None, Some("order")).unwrap();
        assert_eq!(f.aggregate_id, None);
        assert!(parse_filter(Some("yesterday"), None, None, None).is_err());
        assert!(parse_filter(None, None, None, Some(":42")).is_err());
    }
}
