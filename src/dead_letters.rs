//! Dead letters as operators see them, the same through the CLI (`outboxd dead-letters`)
//! and the HTTP API (`/api/dead-letters`): a page of them (filters, the page size, the
//! next page's cursor), one event in full, and a redrive (what was sent again, and what
//! was left alone because it was not a dead letter). The CLI and the API only parse
//! their input and present the answer.

use crate::store::operations::{DeadLetter, DeadLetterFilter, EventDetail, RedriveError};
use crate::store::{Store, StoreError};
use serde::Serialize;
use std::time::SystemTime;

/// A page holds this many dead letters unless the request asks for another size.
pub const DEFAULT_PAGE: i64 = 50;
/// The largest page.
pub const MAX_PAGE: i64 = 1000;

/// A request that cannot be answered (dead letters and event lookups alike).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request itself is wrong (the message says what to send instead).
    #[error("{0}")]
    BadRequest(String),
    /// No event is named so (`id 17`, `tracking_id 0192...`).
    #[error("no event with {0}")]
    NoEvent(String),
    /// The database did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RedriveError> for RequestError {
    fn from(error: RedriveError) -> Self {
        match error {
            RedriveError::Store(error) => RequestError::Store(error),
            refused => RequestError::BadRequest(refused.to_string()),
        }
    }
}

/// Which dead letters to list, as the caller wrote it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListRequest {
    /// An event type, `*` standing for any run of characters.
    pub event_type: Option<String>,
    /// RFC 3339 times: created at or after `since`, before `until`.
    pub since: Option<String>,
    pub until: Option<String>,
    /// The previous page's `next_before_id`.
    pub before_id: Option<i64>,
    /// Page size; [`DEFAULT_PAGE`] when absent, 1 to [`MAX_PAGE`].
    pub limit: Option<i64>,
}

/// One page of dead letters, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub items: Vec<DeadLetter>,
    /// Pass as `before_id` for the next page; `None` on the last page.
    pub next_before_id: Option<i64>,
}

/// What a redrive did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Redriven {
    /// Back to PENDING, with the redrive on the record.
    pub redriven: Vec<i64>,
    /// Named, but not dead letters: left alone.
    pub not_dead_letters: Vec<i64>,
}

/// What a discard did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Discarded {
    /// Given up on, with the discard on the record.
    pub discarded: Vec<i64>,
    /// The next events of their aggregates, released (ordering).
    pub released: Vec<i64>,
    /// Named, but not (undiscarded) dead letters: left alone.
    pub not_dead_letters: Vec<i64>,
}

/// Refuses text PostgreSQL cannot hold (a NUL character): the caller's mistake, said as
/// such, not a database failure. `name` is how the caller called it.
pub fn check_text(name: &str, text: &str) -> Result<(), RequestError> {
    if text.contains('\0') {
        return Err(RequestError::BadRequest(format!(
            "{name} contains a NUL character (\\u0000), which no stored event can hold: remove it"
        )));
    }
    Ok(())
}

/// A time given as RFC 3339 (`2026-11-24T16:00:00Z`); `name` is how the caller called
/// it (`--since`, `since`).
pub fn parse_time(name: &str, text: Option<&str>) -> Result<Option<SystemTime>, RequestError> {
    text.map(|t| {
        humantime::parse_rfc3339_weak(t).map_err(|_| {
            RequestError::BadRequest(format!(
                "{name} {t:?} is not a time like 2026-11-24T16:00:00Z"
            ))
        })
    })
    .transpose()
}

/// The page size a request asks for: [`DEFAULT_PAGE`] when absent, 1 to [`MAX_PAGE`].
pub fn page_size(limit: Option<i64>) -> Result<i64, RequestError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(RequestError::BadRequest(format!(
            "limit {limit} is out of range: give 1 to {MAX_PAGE} (default {DEFAULT_PAGE})"
        )));
    }
    Ok(limit)
}

/// A keyset page from `items`, read newest first with one row more than `limit`: the
/// page, and the next page's `before_id` when that extra row showed one follows.
pub fn keyset_page<T>(
    mut items: Vec<T>,
    limit: i64,
    id: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<i64>) {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_before_id = more.then(|| items.last().map(id)).flatten();
    (items, next_before_id)
}

/// One page of dead letters.
pub async fn list(store: &Store, request: &ListRequest) -> Result<Page, RequestError> {
    let limit = page_size(request.limit)?;
    if let Some(event_type) = &request.event_type {
        check_text("event_type", event_type)?;
    }
    // One more than the page, to know whether another page follows.
    let filter = DeadLetterFilter {
        event_type: request.event_type.clone(),
        since: parse_time("since", request.since.as_deref())?,
        until: parse_time("until", request.until.as_deref())?,
        before_id: request.before_id,
        limit: limit + 1,
    };
    let items = store.list_dead_letters(&filter).await?;
    let (items, next_before_id) = keyset_page(items, limit, |d| d.id);
    Ok(Page {
        items,
        next_before_id,
    })
}

/// One event in full, with its redrive history (any status).
pub async fn show(store: &Store, id: i64) -> Result<EventDetail, RequestError> {
    crate::events::show(store, crate::events::EventKey::Id(id)).await
}

/// Sends dead letters again, recorded with `reason` and `by`.
pub async fn redrive(
    store: &Store,
    ids: &[i64],
    reason: &str,
    by: &str,
) -> Result<Redriven, RequestError> {
    check_text("reason", reason)?;
    check_text("by", by)?;
    let redriven = store.redrive(ids, reason, by).await?;
    let not_dead_letters = left_alone(ids, &redriven);
    Ok(Redriven {
        redriven,
        not_dead_letters,
    })
}

/// Discards dead letters (see `outboxd dead-letters discard`) and releases the next
/// held event of each of their aggregates. `store` must claim under the database's
/// ordering rule ([`Store::with_recorded_order`]).
pub async fn discard(
    store: &Store,
    ids: &[i64],
    reason: &str,
    by: &str,
) -> Result<Discarded, RequestError> {
    check_text("reason", reason)?;
    check_text("by", by)?;
    let (discarded, aggregates) = store.discard(ids, reason, by).await?;
    let keys: Vec<(&str, &str)> = aggregates
        .iter()
        .map(|(t, i)| (t.as_str(), i.as_str()))
        .collect();
    let released = store
        .unhold_aggregates(&keys, true)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let not_dead_letters = left_alone(ids, &discarded);
    Ok(Discarded {
        discarded,
        released,
        not_dead_letters,
    })
}

/// The ids asked for that `done` does not hold (not dead letters: left alone).
fn left_alone(asked: &[i64], done: &[i64]) -> Vec<i64> {
    asked
        .iter()
        .copied()
        .filter(|id| !done.contains(id))
        .collect()
}

/// What a bulk redrive (a filter instead of ids) did, or would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BulkRedriven {
    /// The filter, as people write it.
    pub filter: String,
    /// Dry run: the dead letters it names; otherwise the ones this redrive moved (a
    /// concurrent redrive of the same filter moved the others: each moves once).
    pub redriven: u64,
    pub dry_run: bool,
}

/// Sends again every undiscarded dead letter `filter` names, at most `rate` a second
/// (recorded with `reason` and `by`), or counts them (`dry_run`).
pub async fn redrive_matching(
    store: &Store,
    filter: &crate::store::replays::EventFilter,
    reason: &str,
    by: &str,
    rate: u32,
    dry_run: bool,
) -> Result<BulkRedriven, RequestError> {
    if rate == 0 || rate > crate::replay::MAX_RATE {
        return Err(RequestError::BadRequest(format!(
            "rate {rate} is out of range: give 1 to {} dead letters a second",
            crate::replay::MAX_RATE
        )));
    }
    if !dry_run {
        check_text("reason", reason)?;
        check_text("by", by)?;
        if reason.trim().is_empty() {
            return Err(RedriveError::NoReason.into());
        }
    }
    let step = (rate as i64).min(1000);
    let (mut after, mut redriven) = (0i64, 0u64);
    let mut next = tokio::time::Instant::now();
    loop {
        let ids = store.redrive_candidates(filter, after, step).await?;
        let Some(&last) = ids.last() else { break };
        after = last;
        if dry_run {
            redriven += ids.len() as u64;
            continue;
        }
        tokio::time::sleep_until(next).await;
        next = tokio::time::Instant::now()
            + std::time::Duration::from_secs_f64(ids.len() as f64 / rate as f64);
        redriven += store.redrive(&ids, reason, by).await?.len() as u64;
    }
    Ok(BulkRedriven {
        filter: filter.describe(),
        redriven,
        dry_run,
    })
}
