//! The delivery history (`outbox_attempts`): each failed attempt of an event at a
//! destination, for the story `outboxd events show` tells. A retry or a rejection is
//! recorded; a deferral is not (an open circuit tried nothing), nor is a success (it is
//! on the row: `delivered_to`, `processed_at`).

use super::{Store, StoreError};
use crate::event::{Event, Outcome};
use serde::Serialize;
use std::time::{Duration, SystemTime};

const RECORD_ATTEMPTS: &str = include_str!("../../sql/record_attempts.sql");
const LIST_ATTEMPTS: &str = include_str!("../../sql/list_attempts.sql");
const TRIM_ATTEMPTS: &str = include_str!("../../sql/trim_attempts.sql");

/// An error is kept up to this many characters.
pub const ERROR_CHARS: usize = 2_000;
/// Rows removed per trimming statement.
const TRIM_BATCH: i64 = 10_000;

/// One failed attempt to record.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptItem {
    pub outbox_id: i64,
    pub tracking_id: uuid::Uuid,
    pub destination: String,
    pub attempt: i32,
    pub took: Duration,
    /// `retry` or `rejected`.
    pub outcome: &'static str,
    pub http_status: Option<i32>,
    pub error: String,
    /// The replay that sent it (`None`: a delivery).
    pub replay_id: Option<i64>,
}

impl AttemptItem {
    /// The failed attempt `outcome` is, or `None` (delivered, or deferred: not tried).
    pub fn failed(
        event: &Event,
        destination: &str,
        outcome: &Outcome,
        took: Duration,
    ) -> Option<AttemptItem> {
        let (kind, reason) = match outcome {
            Outcome::Retry { reason, .. } => ("retry", reason),
            Outcome::Rejected { reason } => ("rejected", reason),
            Outcome::Delivered | Outcome::Deferred { .. } => return None,
        };
        Some(AttemptItem {
            outbox_id: event.id,
            tracking_id: event.tracking_id,
            destination: destination.to_string(),
            attempt: event.attempts,
            took,
            outcome: kind,
            http_status: http_status(reason),
            error: cut(reason, ERROR_CHARS),
            replay_id: None,
        })
    }
}

/// One recorded failed attempt, as `events show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    #[serde(serialize_with = "super::operations::rfc3339")]
    pub at: SystemTime,
    pub destination: String,
    pub attempt: i32,
    pub duration_ms: f64,
    pub outcome: String,
    pub http_status: Option<i32>,
    pub error: String,
    pub replay_id: Option<i64>,
}

/// The HTTP status a webhook's failure reason starts with (`HTTP 503: ...`).
pub fn http_status(reason: &str) -> Option<i32> {
    let rest = reason.strip_prefix("HTTP ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (digits.len() == 3).then(|| digits.parse().ok()).flatten()
}

/// `text` cut to at most `chars` characters, marked when cut.
pub fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        None => text.to_string(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

impl Store {
    /// Records failed attempts, one statement for all.
    pub async fn record_attempts(&self, items: &[AttemptItem]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = items.iter().map(|i| i.outbox_id).collect();
        let tracking: Vec<uuid::Uuid> = items.iter().map(|i| i.tracking_id).collect();
        let destinations: Vec<&str> = items.iter().map(|i| i.destination.as_str()).collect();
        let attempts: Vec<i32> = items.iter().map(|i| i.attempt).collect();
        let took: Vec<f64> = items
            .iter()
            .map(|i| i.took.as_secs_f64() * 1000.0)
            .collect();
        let outcomes: Vec<&str> = items.iter().map(|i| i.outcome).collect();
        let statuses: Vec<Option<i32>> = items.iter().map(|i| i.http_status).collect();
        // PostgreSQL text holds no NUL.
        let errors: Vec<String> = items.iter().map(|i| i.error.replace('\0', "")).collect();
        let replays: Vec<Option<i64>> = items.iter().map(|i| i.replay_id).collect();
        let client = self.pooled().await?;
        client
            .execute(
                RECORD_ATTEMPTS,
                &[
                    &ids,
                    &tracking,
                    &destinations,
                    &attempts,
                    &took,
                    &outcomes,
                    &statuses,
                    &errors,
                    &replays,
                ],
            )
            .await
            .map_err(StoreError::query("record_attempts"))?;
        Ok(())
    }

    /// One event's failed attempts, oldest first.
    pub async fn attempts_of(&self, outbox_id: i64) -> Result<Vec<Attempt>, StoreError> {
        let client = self.pooled().await?;
        let rows = client
            .query(LIST_ATTEMPTS, &[&outbox_id])
            .await
            .map_err(StoreError::query("list_attempts"))?;
        Ok(rows
            .iter()
            .map(|r| Attempt {
                at: r.get(0),
                destination: r.get(1),
                attempt: r.get(2),
                duration_ms: r.get(3),
                outcome: r.get(4),
                http_status: r.get(5),
                error: r.get(6),
                replay_id: r.get(7),
            })
            .collect())
    }

    /// Forgets failed attempts older than `retention` (a dead letter's stay), in
    /// batches. Returns how many.
    pub async fn trim_attempts(&self, retention: Duration) -> Result<u64, StoreError> {
        let client = self.pooled().await?;
        let mut trimmed = 0;
        loop {
            let removed = client
                .execute(TRIM_ATTEMPTS, &[&retention.as_secs_f64(), &TRIM_BATCH])
                .await
                .map_err(StoreError::query("trim_attempts"))?;
            trimmed += removed;
            if removed < TRIM_BATCH as u64 {
                return Ok(trimmed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_are_read_from_webhook_reasons() {
        assert_eq!(http_status("HTTP 503"), Some(503));
        assert_eq!(http_status("HTTP 429: slow down"), Some(429));
        assert_eq!(http_status("HTTP 5030"), None);
        assert_eq!(http_status("timed out after 2s"), None);
        assert_eq!(http_status("returned by the broker: 312 NO_ROUTE"), None);
    }

    #[test]
    fn errors_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("ééééé", 3), "ééé…");
        assert_eq!(cut(&"x".repeat(5000), ERROR_CHARS).chars().count(), 2001);
    }
}
