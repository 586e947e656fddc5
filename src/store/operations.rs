//! What operators read and do: the database-wide gauges, dead letters listed and shown,
//! and redrives (each needs a reason and is recorded).

use super::{Store, StoreError};
use serde::Serialize;
use std::time::SystemTime;

const GAUGES: &str = include_str!("../../sql/gauges.sql");
const LIST_DEAD_LETTERS: &str = include_str!("../../sql/list_dead_letters.sql");
const SHOW_EVENT: &str = include_str!("../../sql/show_event.sql");
const LIST_REDRIVES: &str = include_str!("../../sql/list_redrives.sql");
const REDRIVE: &str = include_str!("../../sql/redrive.sql");
const DISCARD: &str = include_str!("../../sql/discard.sql");
const FIND_TRACKING_ID: &str = include_str!("../../sql/find_tracking_id.sql");
const LIST_AGGREGATE_EVENTS: &str = include_str!("../../sql/list_aggregate_events.sql");

/// Numbers true across every instance, read from the database.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauges {
    pub pending: i64,
    pub oldest_pending_age_seconds: f64,
    pub dead_letters: i64,
    pub notification_queue_usage: f64,
    pub default_partition_rows: i64,
    /// Events held behind an earlier event of their aggregate (ordering).
    pub held: i64,
    /// Dead letters holding back later events of their aggregate.
    pub dead_letters_blocking: i64,
    /// Replays waiting for or being sent.
    pub replays_running: i64,
    /// Dead row versions in outbox's partitions.
    pub partition_dead_tuples: i64,
    /// Age in transactions of the oldest snapshot this database's sessions hold.
    pub xmin_horizon_age: i64,
    /// Seconds since the oldest open transaction of this database began.
    pub oldest_transaction_age_seconds: f64,
    /// Replication slots: what each holds back.
    pub replication_slots: Vec<SlotGauge>,
}

/// What one replication slot holds back.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct SlotGauge {
    pub slot: String,
    /// Age in transactions of the xmin (catalog_xmin for a logical slot) it keeps.
    pub xmin_age: i64,
    /// WAL kept for it, in bytes.
    pub wal_bytes: f64,
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    /// An event type, `*` standing for any run of characters.
    pub event_type: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// Only ids below this one: the previous page's `next_before_id`.
    pub before_id: Option<i64>,
    /// Page size (`dead_letters::list` keeps it within 1..=1000).
    pub limit: i64,
}

/// One dead letter in a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    pub tracking_id: uuid::Uuid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub attempts: i32,
    #[serde(serialize_with = "rfc3339_opt")]
    pub dead_since: Option<SystemTime>,
    pub last_error: Option<String>,
    pub delivered_to: Vec<String>,
}

/// One event in an aggregate's listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventSummary {
    pub id: i64,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    pub tracking_id: uuid::Uuid,
    pub status: String,
    pub event_type: String,
    pub attempts: i32,
    #[serde(serialize_with = "rfc3339")]
    pub next_attempt_at: SystemTime,
    #[serde(serialize_with = "rfc3339_opt")]
    pub processed_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub delivered_to: Vec<String>,
}

/// One event in full, with its redrive history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventDetail {
    pub id: i64,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    pub tracking_id: uuid::Uuid,
    pub status: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub attempts: i32,
    pub max_attempts: Option<i32>,
    #[serde(serialize_with = "rfc3339")]
    pub next_attempt_at: SystemTime,
    #[serde(serialize_with = "rfc3339_opt")]
    pub processed_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub delivered_to: Vec<String>,
    pub redrives: Vec<Redrive>,
    /// Failed attempts, oldest first (the delivery history).
    pub failed_attempts: Vec<super::history::Attempt>,
    /// Replays that sent it again.
    pub replays: Vec<super::replays::Replay>,
    /// Everything above in the order it happened: committed, each failed attempt,
    /// redrives and discards, published or dead-lettered.
    pub story: Vec<StoryStep>,
}

/// One step of an event's story.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoryStep {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// `committed`, `attempt_failed`, `redriven`, `discarded`, `published`,
    /// `dead_lettered`, `replayed`.
    pub step: &'static str,
    pub detail: String,
}

impl EventDetail {
    /// The story of the event, oldest step first, from what it holds.
    pub fn tell(&self) -> Vec<StoryStep> {
        let mut story = vec![StoryStep {
            at: self.created_at,
            step: "committed",
            detail: format!(
                "{} of {}:{}",
                self.event_type, self.aggregate_type, self.aggregate_id
            ),
        }];
        for a in &self.failed_attempts {
            let status = a
                .http_status
                .map(|s| format!("HTTP {s}, "))
                .unwrap_or_default();
            let replay = a
                .replay_id
                .map(|r| format!(" (replay {r})"))
                .unwrap_or_default();
            story.push(StoryStep {
                at: a.at,
                step: "attempt_failed",
                detail: format!(
                    "{} attempt {}{replay}: {}{} after {:.0} ms ({})",
                    a.destination, a.attempt, status, a.outcome, a.duration_ms, a.error
                ),
            });
        }
        for r in &self.redrives {
            story.push(StoryStep {
                at: r.at,
                step: if r.action == "discard" {
                    "discarded"
                } else {
                    "redriven"
                },
                detail: format!("by {}: {}", r.by, r.reason),
            });
        }
        for r in &self.replays {
            story.push(StoryStep {
                at: r.started_at.unwrap_or(r.requested_at),
                step: "replayed",
                detail: format!(
                    "replay {} to {} ({}), asked by {}: {}",
                    r.id, r.destination, r.status, r.requested_by, r.reason
                ),
            });
        }
        if let Some(at) = self.processed_at {
            match self.status.as_str() {
                "PUBLISHED" => story.push(StoryStep {
                    at,
                    step: "published",
                    detail: format!("acknowledged by {}", self.delivered_to.join(", ")),
                }),
                "DEAD_LETTER" | "DISCARDED" => story.push(StoryStep {
                    at,
                    step: "dead_lettered",
                    detail: self.last_error.clone().unwrap_or_default(),
                }),
                _ => {}
            }
        }
        story.sort_by_key(|s| s.at);
        story
    }
}

/// A recorded redrive.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Redrive {
    pub reason: String,
    pub by: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// The error the event had when it was sent again.
    pub last_error: Option<String>,
    pub attempts: i32,
    /// `redrive`, or `discard` (given up on: `outboxd dead-letters discard`).
    pub action: String,
}

/// Why a redrive was refused before touching anything.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error(
        "a redrive needs a reason (what was fixed, so the event can pass now): give --reason \"...\""
    )]
    NoReason,
    #[error("a discard needs a reason (why the event is given up on): give --reason \"...\"")]
    NoDiscardReason,
    #[error("a redrive needs to know who asked for it: give --by NAME")]
    NoRequester,
    #[error("name at least one dead letter: --id ID")]
    NoIds,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*time).to_string())
}

fn rfc3339_opt<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, s),
        None => s.serialize_none(),
    }
}

/// `order.*` as a LIKE pattern: `%` and `_` taken literally, `*` any run of characters.
pub fn like_pattern(pattern: &str) -> String {
    let mut like = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '\\' | '%' | '_' => {
                like.push('\\');
                like.push(c);
            }
            '*' => like.push('%'),
            other => like.push(other),
        }
    }
    like
}

impl Store {
    /// The gauges, in one statement.
    pub async fn gauges(&self) -> Result<Gauges, StoreError> {
        let client = self.pooled().await?;
        let statement = client
            .prepare_cached(GAUGES)
            .await
            .map_err(StoreError::query("gauges"))?;
        let row = client
            .query_one(&statement, &[])
            .await
            .map_err(StoreError::query("gauges"))?;
        Ok(Gauges {
            pending: row.get(0),
            oldest_pending_age_seconds: row.get(1),
            dead_letters: row.get(2),
            notification_queue_usage: row.get(3),
            default_partition_rows: row.get(4),
            held: row.get(5),
            dead_letters_blocking: row.get(6),
            replays_running: row.get(7),
            partition_dead_tuples: row.get(8),
            xmin_horizon_age: row.get(9),
            oldest_transaction_age_seconds: row.get(10),
            replication_slots: serde_json::from_str(row.get::<_, &str>(11)).unwrap_or_default(),
        })
    }

    /// Dead letters, newest first.
    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let client = self.pooled().await?;
        let pattern = filter.event_type.as_deref().map(like_pattern);
        let rows = client
            .query(
                LIST_DEAD_LETTERS,
                &[
                    &pattern,
                    &filter.since,
                    &filter.until,
                    &filter.before_id,
                    &filter.limit,
                ],
            )
            .await
            .map_err(StoreError::query("list_dead_letters"))?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                id: r.get(0),
                created_at: r.get(1),
                tracking_id: r.get(2),
                event_type: r.get(3),
                aggregate_type: r.get(4),
                aggregate_id: r.get(5),
                attempts: r.get(6),
                dead_since: r.get(7),
                last_error: r.get(8),
                delivered_to: r.get(9),
            })
            .collect())
    }

    /// One event in full (any status), or `None`.
    pub async fn show_event(&self, id: i64) -> Result<Option<EventDetail>, StoreError> {
        let client = self.pooled().await?;
        let Some(r) = client
            .query_opt(SHOW_EVENT, &[&id])
            .await
            .map_err(StoreError::query("show_event"))?
        else {
            return Ok(None);
        };
        let redrives = client
            .query(LIST_REDRIVES, &[&id])
            .await
            .map_err(StoreError::query("list_redrives"))?
            .iter()
            .map(|h| Redrive {
                reason: h.get(0),
                by: h.get(1),
                at: h.get(2),
                last_error: h.get(3),
                attempts: h.get(4),
                action: h.get(5),
            })
            .collect();
        drop(client);
        let failed_attempts = self.attempts_of(id).await?;
        let delivered_to: Vec<String> = r.get(14);
        let replays = self
            .replays_of(id, r.get(1), r.get(4), (r.get(5), r.get(6)), &delivered_to)
            .await?;
        let json = |text: String| serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        let mut event = EventDetail {
            id: r.get(0),
            created_at: r.get(1),
            tracking_id: r.get(2),
            status: r.get(3),
            event_type: r.get(4),
            aggregate_type: r.get(5),
            aggregate_id: r.get(6),
            payload: json(r.get(7)),
            metadata: json(r.get(8)),
            attempts: r.get(9),
            max_attempts: r.get(10),
            next_attempt_at: r.get(11),
            processed_at: r.get(12),
            last_error: r.get(13),
            delivered_to: r.get(14),
            redrives,
            failed_attempts,
            replays,
            story: Vec::new(),
        };
        event.story = event.tell();
        Ok(Some(event))
    }

    /// The id of the event with this tracking_id, or `None`.
    pub async fn find_tracking_id(
        &self,
        tracking_id: uuid::Uuid,
    ) -> Result<Option<i64>, StoreError> {
        let client = self.pooled().await?;
        let row = client
            .query_opt(FIND_TRACKING_ID, &[&tracking_id])
            .await
            .map_err(StoreError::query("find_tracking_id"))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// One aggregate's events, newest first: ids below `before_id`, at most `limit`.
    pub async fn list_aggregate_events(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        before_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventSummary>, StoreError> {
        let client = self.pooled().await?;
        let statement = client
            .prepare_cached(LIST_AGGREGATE_EVENTS)
            .await
            .map_err(StoreError::query("list_aggregate_events"))?;
        let rows = client
            .query(
                &statement,
                &[&aggregate_type, &aggregate_id, &before_id, &limit],
            )
            .await
            .map_err(StoreError::query("list_aggregate_events"))?;
        Ok(rows
            .iter()
            .map(|r| EventSummary {
                id: r.get(0),
                created_at: r.get(1),
                tracking_id: r.get(2),
                status: r.get(3),
                event_type: r.get(4),
                attempts: r.get(5),
                next_attempt_at: r.get(6),
                processed_at: r.get(7),
                last_error: r.get(8),
                delivered_to: r.get(9),
            })
            .collect())
    }

    /// redrive: dead letters back to PENDING, recorded with `reason` and `by`.
    /// Returns the ids sent again (ids that are not dead letters are left alone).
    pub async fn redrive(
        &self,
        ids: &[i64],
        reason: &str,
        by: &str,
    ) -> Result<Vec<i64>, RedriveError> {
        refuse_incomplete(ids, reason, by, RedriveError::NoReason)?;
        let client = self.pooled().await?;
        let rows = client
            .query(REDRIVE, &[&ids, &reason.trim(), &by.trim()])
            .await
            .map_err(StoreError::query("redrive"))?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        tracing::info!(
            ?ids,
            reason = reason.trim(),
            by = by.trim(),
            "dead letters redriven"
        );
        Ok(ids)
    }

    /// discard: dead letters given up on (see sql/discard.sql), each recorded with the
    /// reason and who asked. Returns the ids discarded and their aggregates.
    pub async fn discard(
        &self,
        ids: &[i64],
        reason: &str,
        by: &str,
    ) -> Result<(Vec<i64>, Vec<(String, String)>), RedriveError> {
        refuse_incomplete(ids, reason, by, RedriveError::NoDiscardReason)?;
        let client = self.pooled().await?;
        let rows = client
            .query(DISCARD, &[&ids, &reason.trim(), &by.trim()])
            .await
            .map_err(StoreError::query("discard"))?;
        let discarded: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        tracing::info!(
            ids = ?discarded,
            reason = reason.trim(),
            by = by.trim(),
            "dead letters discarded"
        );
        Ok((
            discarded,
            rows.iter().map(|r| (r.get(1), r.get(2))).collect(),
        ))
    }
}

/// A redrive or discard names ids, gives a reason (`no_reason` when it does not) and
/// says who asks; refused before anything is read otherwise.
fn refuse_incomplete(
    ids: &[i64],
    reason: &str,
    by: &str,
    no_reason: RedriveError,
) -> Result<(), RedriveError> {
    if reason.trim().is_empty() {
        return Err(no_reason);
    }
    if by.trim().is_empty() {
        return Err(RedriveError::NoRequester);
    }
    if ids.is_empty() {
        return Err(RedriveError::NoIds);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_patterns_become_like_patterns() {
        assert_eq!(like_pattern("order.*"), "order.%");
        assert_eq!(like_pattern("order_created"), "order\\_created");
        assert_eq!(like_pattern("100%"), "100\\%");
        assert_eq!(like_pattern("*"), "%");
    }
}
