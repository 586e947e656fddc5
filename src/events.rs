//! Events as operators look them up, the same through the CLI (`outboxd events`) and the
//! HTTP API (`/api/events`): one event by its id or by the tracking_id consumers see
//! (AMQP message_id, webhook-id), and one aggregate's events, newest first, a page at a
//! time. Reads only; any status.

use crate::dead_letters::{RequestError, check_text, keyset_page, page_size};
use crate::store::Store;
use crate::store::operations::{EventDetail, EventSummary};
use serde::Serialize;

/// How the caller named one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKey {
    /// The outbox row's id (`5016`).
    Id(i64),
    /// The tracking_id (`0192f0c1-...`).
    TrackingId(uuid::Uuid),
}

impl EventKey {
    /// A whole number is an id, a UUID a tracking_id.
    pub fn parse(text: &str) -> Result<EventKey, RequestError> {
        let text = text.trim();
        if let Ok(id) = text.parse::<i64>() {
            return Ok(EventKey::Id(id));
        }
        uuid::Uuid::parse_str(text)
            .map(EventKey::TrackingId)
            .map_err(|_| {
                RequestError::BadRequest(format!(
                    "{text:?} names no event: give its tracking_id (a UUID, as consumers see it in message_id or webhook-id) or its id (a whole number)"
                ))
            })
    }
}

impl std::fmt::Display for EventKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventKey::Id(id) => write!(f, "id {id}"),
            EventKey::TrackingId(tracking_id) => write!(f, "tracking_id {tracking_id}"),
        }
    }
}

/// One aggregate, as `TYPE:ID` (`order:42`); the id may hold colons itself, the type
/// may not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Aggregate {
    pub aggregate_type: String,
    pub aggregate_id: String,
}

impl Aggregate {
    pub fn parse(text: &str) -> Result<Aggregate, RequestError> {
        match text.split_once(':') {
            Some((kind, id)) if !kind.is_empty() && !id.is_empty() => Ok(Aggregate {
                aggregate_type: kind.to_string(),
                aggregate_id: id.to_string(),
            }),
            _ => Err(RequestError::BadRequest(format!(
                "{text:?} is not an aggregate: give TYPE:ID, as the events were written (aggregate_type \"order\", aggregate_id \"42\": order:42)"
            ))),
        }
    }
}

/// Which page of an aggregate's events.
#[derive(Debug, Clone, PartialEq)]
pub struct ListRequest {
    pub aggregate: Aggregate,
    /// The previous page's `next_before_id`.
    pub before_id: Option<i64>,
    /// Page size; `dead_letters::DEFAULT_PAGE` when absent, 1 to `dead_letters::MAX_PAGE`.
    pub limit: Option<i64>,
}

/// One page of an aggregate's events, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub items: Vec<EventSummary>,
    /// Pass as `before_id` for the next page; `None` on the last page.
    pub next_before_id: Option<i64>,
}

/// One event in full, with its redrive history.
pub async fn show(store: &Store, key: EventKey) -> Result<EventDetail, RequestError> {
    let id = match key {
        EventKey::Id(id) => Some(id),
        EventKey::TrackingId(tracking_id) => store.find_tracking_id(tracking_id).await?,
    };
    let Some(id) = id else {
        return Err(RequestError::NoEvent(key.to_string()));
    };
    store
        .show_event(id)
        .await?
        .ok_or_else(|| RequestError::NoEvent(key.to_string()))
}

/// One page of an aggregate's events.
pub async fn list(store: &Store, request: &ListRequest) -> Result<Page, RequestError> {
    let limit = page_size(request.limit)?;
    let aggregate = &request.aggregate;
    check_text("aggregate_type", &aggregate.aggregate_type)?;
    check_text("aggregate_id", &aggregate.aggregate_id)?;
    // One more than the page, to know whether another page follows.
    let items = store
        .list_aggregate_events(
            &aggregate.aggregate_type,
            &aggregate.aggregate_id,
            request.before_id,
            limit + 1,
        )
        .await?;
    let (items, next_before_id) = keyset_page(items, limit, |e| e.id);
    Ok(Page {
        aggregate_type: aggregate.aggregate_type.clone(),
        aggregate_id: aggregate.aggregate_id.clone(),
        items,
        next_before_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_named_by_id_or_tracking_id() {
        assert_eq!(EventKey::parse("5016").unwrap(), EventKey::Id(5016));
        let uuid = "0192f0c1-7d3e-7a00-8000-000000000001";
        assert_eq!(
            EventKey::parse(uuid).unwrap(),
            EventKey::TrackingId(uuid.parse().unwrap())
        );
        let refused = EventKey::parse("order-42").unwrap_err().to_string();
        assert!(
            refused.contains("tracking_id") && refused.contains("UUID"),
            "{refused}"
        );
    }

    #[test]
    fn an_aggregate_is_type_colon_id() {
        assert_eq!(
            Aggregate::parse("order:42").unwrap(),
            Aggregate {
                aggregate_type: "order".into(),
                aggregate_id: "42".into()
            }
        );
        // The id keeps its own colons.
        assert_eq!(
            Aggregate::parse("tenant:eu:7").unwrap().aggregate_id,
            "eu:7"
        );
        for bad in ["order", ":42", "order:", ""] {
            let refused = Aggregate::parse(bad).unwrap_err().to_string();
            assert!(refused.contains("TYPE:ID"), "{bad}: {refused}");
        }
    }
}
