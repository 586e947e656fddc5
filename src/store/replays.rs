//! Replays (`outbox_replays`): stored jobs that send already PUBLISHED events again to
//! one destination, run by the instances under a lease and fenced by their holder; and
//! the filter they share with bulk redrives of dead letters.

use super::operations::like_pattern;
use super::{Store, StoreError, event_from_row};
use crate::event::Event;
use serde::Serialize;
use std::time::{Duration, SystemTime};
use tokio_postgres::types::ToSql;

const CREATE_REPLAY: &str = include_str!("../../sql/create_replay.sql");
const COUNT_REPLAY: &str = include_str!("../../sql/count_replay.sql");
const REPLAY_BATCH: &str = include_str!("../../sql/replay_batch.sql");
const CLAIM_REPLAY: &str = include_str!("../../sql/claim_replay.sql");
const ADVANCE_REPLAY: &str = include_str!("../../sql/advance_replay.sql");
const FINISH_REPLAY: &str = include_str!("../../sql/finish_replay.sql");
const CANCEL_REPLAY: &str = include_str!("../../sql/cancel_replay.sql");
const LIST_REPLAYS: &str = include_str!("../../sql/list_replays.sql");
const REPLAYS_PASSED: &str = include_str!("../../sql/replays_passed.sql");
const REDRIVE_CANDIDATES: &str = include_str!("../../sql/redrive_candidates.sql");

/// Which events a replay or a bulk redrive names. Every part is optional; ids and
/// times may be combined.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EventFilter {
    /// Ids from (inclusive).
    pub from_id: Option<i64>,
    /// Ids to (inclusive).
    pub to_id: Option<i64>,
    /// Created at or after.
    #[serde(serialize_with = "rfc3339_opt")]
    pub from_at: Option<SystemTime>,
    /// Created before.
    #[serde(serialize_with = "rfc3339_opt")]
    pub to_at: Option<SystemTime>,
    /// An event type, `*` standing for any run of characters.
    pub event_type: Option<String>,
    pub aggregate_type: Option<String>,
    /// Only with `aggregate_type`.
    pub aggregate_id: Option<String>,
}

fn rfc3339_opt<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
        None => s.serialize_none(),
    }
}

/// A statement's parameters: the ones before the filter's, then the filter's seven.
type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

impl EventFilter {
    fn like(&self) -> Option<String> {
        self.event_type.as_deref().map(like_pattern)
    }

    /// `before`, then the filter as the seven parameters every filtering statement
    /// takes in this order: from_id, to_id, from_at, to_at, event_type (as the LIKE
    /// pattern `like`, from [`EventFilter::like`]), aggregate_type, aggregate_id.
    fn params<'a>(&'a self, like: &'a Option<String>, before: Params<'a>) -> Params<'a> {
        let mut params = before;
        params.extend([
            &self.from_id as &(dyn ToSql + Sync),
            &self.to_id,
            &self.from_at,
            &self.to_at,
            like,
            &self.aggregate_type,
            &self.aggregate_id,
        ]);
        params
    }

    /// The filter stored in a row's seven columns from `first` on (from_id, to_id,
    /// from_at, to_at, event_type as given, aggregate_type, aggregate_id).
    fn from_row(r: &tokio_postgres::Row, first: usize) -> EventFilter {
        EventFilter {
            from_id: r.get(first),
            to_id: r.get(first + 1),
            from_at: r.get(first + 2),
            to_at: r.get(first + 3),
            event_type: r.get(first + 4),
            aggregate_type: r.get(first + 5),
            aggregate_id: r.get(first + 6),
        }
    }

    /// Whether the filter's time, type and aggregate parts name an event (ids are
    /// compared by the caller's SQL).
    pub fn names(&self, created_at: SystemTime, event_type: &str, aggregate: (&str, &str)) -> bool {
        self.from_at.is_none_or(|t| created_at >= t)
            && self.to_at.is_none_or(|t| created_at < t)
            && self.event_type.as_deref().is_none_or(|p| {
                crate::routing::Pattern::parse(p).is_ok_and(|p| p.matches(event_type))
            })
            && self
                .aggregate_type
                .as_deref()
                .is_none_or(|t| t == aggregate.0)
            && self
                .aggregate_id
                .as_deref()
                .is_none_or(|i| i == aggregate.1)
    }

    /// The filter as people write it: `from 2026-12-01T00:00:00Z, event_type order.*`.
    pub fn describe(&self) -> String {
        let time = |t: &SystemTime| humantime::format_rfc3339(*t).to_string();
        let mut parts = Vec::new();
        if let Some(id) = self.from_id {
            parts.push(format!("id >= {id}"));
        }
        if let Some(id) = self.to_id {
            parts.push(format!("id <= {id}"));
        }
        if let Some(t) = &self.from_at {
            parts.push(format!("created >= {}", time(t)));
        }
        if let Some(t) = &self.to_at {
            parts.push(format!("created < {}", time(t)));
        }
        if let Some(e) = &self.event_type {
            parts.push(format!("event_type {e}"));
        }
        match (&self.aggregate_type, &self.aggregate_id) {
            (Some(t), Some(i)) => parts.push(format!("aggregate {t}:{i}")),
            (Some(t), None) => parts.push(format!("aggregate type {t}")),
            _ => {}
        }
        if parts.is_empty() {
            "every event".into()
        } else {
            parts.join(", ")
        }
    }
}

fn replay_from_row(r: &tokio_postgres::Row) -> Replay {
    Replay {
        id: r.get(0),
        destination: r.get(1),
        filter: EventFilter::from_row(r, 2),
        rate: r.get(9),
        reason: r.get(10),
        requested_by: r.get(11),
        requested_at: r.get(12),
        status: r.get(13),
        matched: r.get(14),
        cursor: r.get(15),
        sent: r.get(16),
        rejected: r.get(17),
        holder: r.get(18),
        started_at: r.get(19),
        finished_at: r.get(20),
        cancelled_by: r.get(21),
    }
}

/// A replay as the running instance executes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayJob {
    pub id: i64,
    pub destination: String,
    pub filter: EventFilter,
    /// Events a second, at most.
    pub rate: i32,
    /// The last id done.
    pub cursor: i64,
}

/// A replay as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replay {
    pub id: i64,
    pub destination: String,
    pub filter: EventFilter,
    pub rate: i32,
    pub reason: String,
    pub requested_by: String,
    #[serde(serialize_with = "super::operations::rfc3339")]
    pub requested_at: SystemTime,
    /// `RUNNING`, `DONE` or `CANCELLED`.
    pub status: String,
    /// Events the filter matched when it was asked for.
    pub matched: i64,
    /// The last id done: a crash resumes after it.
    pub cursor: i64,
    pub sent: i64,
    /// Refused by the destination for good (in the delivery history), skipped.
    pub rejected: i64,
    /// The instance running it now.
    pub holder: Option<String>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub started_at: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub finished_at: Option<SystemTime>,
    pub cancelled_by: Option<String>,
}

/// What a dry run counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayCount {
    pub events: i64,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
}

impl Store {
    /// What a replay of `filter` to `destination` would send.
    pub async fn count_replay(
        &self,
        destination: &str,
        filter: &EventFilter,
    ) -> Result<ReplayCount, StoreError> {
        let like = filter.like();
        let client = self.pooled().await?;
        let row = client
            .query_one(COUNT_REPLAY, &filter.params(&like, vec![&destination]))
            .await
            .map_err(StoreError::query("count_replay"))?;
        Ok(ReplayCount {
            events: row.get(0),
            first_id: row.get(1),
            last_id: row.get(2),
        })
    }

    /// Stores a replay job; returns its id and the events it matches now.
    pub async fn create_replay(
        &self,
        destination: &str,
        filter: &EventFilter,
        rate: i32,
        reason: &str,
        by: &str,
    ) -> Result<(i64, i64), StoreError> {
        let like = filter.like();
        let mut params = filter.params(&like, vec![&destination]);
        params.extend([
            &filter.event_type as &(dyn ToSql + Sync),
            &rate,
            &reason,
            &by,
        ]);
        let client = self.pooled().await?;
        let row = client
            .query_one(CREATE_REPLAY, &params)
            .await
            .map_err(StoreError::query("create_replay"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Takes a replay nobody runs, to one of `destinations`, for `holder`.
    pub async fn claim_replay(
        &self,
        holder: &str,
        destinations: &[String],
        lease: Duration,
    ) -> Result<Option<ReplayJob>, StoreError> {
        let client = self.pooled().await?;
        let row = client
            .query_opt(
                CLAIM_REPLAY,
                &[&holder, &destinations, &lease.as_secs_f64()],
            )
            .await
            .map_err(StoreError::query("claim_replay"))?;
        Ok(row.map(|r| ReplayJob {
            id: r.get(0),
            destination: r.get(1),
            filter: EventFilter::from_row(&r, 2),
            rate: r.get(9),
            cursor: r.get(10),
        }))
    }

    /// The next `limit` events of `job` after `after`.
    pub async fn replay_batch(
        &self,
        job: &ReplayJob,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let like = job.filter.like();
        let params = job
            .filter
            .params(&like, vec![&job.destination, &after, &limit]);
        let client = self.pooled().await?;
        let rows = client
            .query(REPLAY_BATCH, &params)
            .await
            .map_err(StoreError::query("replay_batch"))?;
        Ok(rows
            .iter()
            .map(|r| Event {
                replay_id: Some(job.id),
                ..event_from_row(r)
            })
            .collect())
    }

    /// Records progress (`cursor`: the last id done; `None`: only renew the lease).
    /// `false`: the replay was cancelled or another holder took it: stop.
    pub async fn advance_replay(
        &self,
        id: i64,
        holder: &str,
        cursor: Option<i64>,
        sent: i64,
        rejected: i64,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let client = self.pooled().await?;
        let rows = client
            .query(
                ADVANCE_REPLAY,
                &[
                    &id,
                    &holder,
                    &cursor,
                    &sent,
                    &rejected,
                    &lease.as_secs_f64(),
                ],
            )
            .await
            .map_err(StoreError::query("advance_replay"))?;
        Ok(!rows.is_empty())
    }

    /// Marks a replay DONE. `false`: it was cancelled or taken over meanwhile.
    pub async fn finish_replay(&self, id: i64, holder: &str) -> Result<bool, StoreError> {
        let client = self.pooled().await?;
        let rows = client
            .query(FINISH_REPLAY, &[&id, &holder])
            .await
            .map_err(StoreError::query("finish_replay"))?;
        Ok(!rows.is_empty())
    }

    /// Cancels a running replay. `false`: it was not running.
    pub async fn cancel_replay(&self, id: i64, by: &str) -> Result<bool, StoreError> {
        let client = self.pooled().await?;
        let rows = client
            .query(CANCEL_REPLAY, &[&id, &by])
            .await
            .map_err(StoreError::query("cancel_replay"))?;
        Ok(!rows.is_empty())
    }

    /// Replays, newest first: one (`id`), or the newest `limit`.
    pub async fn list_replays(
        &self,
        id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Replay>, StoreError> {
        let client = self.pooled().await?;
        let rows = client
            .query(LIST_REPLAYS, &[&id, &limit])
            .await
            .map_err(StoreError::query("list_replays"))?;
        Ok(rows.iter().map(replay_from_row).collect())
    }

    /// The replays that sent the event `id` again (their cursor passed it and their
    /// filter names it), oldest first.
    pub async fn replays_of(
        &self,
        id: i64,
        created_at: SystemTime,
        event_type: &str,
        aggregate: (&str, &str),
        delivered_to: &[String],
    ) -> Result<Vec<Replay>, StoreError> {
        let client = self.pooled().await?;
        let rows = client
            .query(REPLAYS_PASSED, &[&id, &delivered_to])
            .await
            .map_err(StoreError::query("replays_passed"))?;
        Ok(rows
            .iter()
            .map(replay_from_row)
            .filter(|r| r.filter.names(created_at, event_type, aggregate))
            .collect())
    }

    /// The next `limit` undiscarded dead letters `filter` names, after `after`.
    pub async fn redrive_candidates(
        &self,
        filter: &EventFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let like = filter.like();
        let client = self.pooled().await?;
        let rows = client
            .query(
                REDRIVE_CANDIDATES,
                &filter.params(&like, vec![&after, &limit]),
            )
            .await
            .map_err(StoreError::query("redrive_candidates"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}
