//! The producer API: enqueue events inside the caller's own transaction, so they commit
//! or roll back with the business rows. One INSERT for any number of events (one
//! notification). Works with any tokio-postgres client or transaction.

use tokio_postgres::GenericClient;
use uuid::Uuid;

const ENQUEUE: &str = include_str!("../sql/enqueue.sql");

/// An event to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    /// Headers and trace context (`traceparent`), sent as AMQP headers.
    pub metadata: serde_json::Value,
    /// The idempotency key consumers dedupe on; generated (UUIDv7) when `None`.
    pub tracking_id: Option<Uuid>,
    /// This event's own attempt limit; `None`: outboxd's `retry.max_attempts`.
    pub max_attempts: Option<i32>,
}

impl NewEvent {
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
            metadata: serde_json::Value::Object(Default::default()),
            tracking_id: None,
            max_attempts: None,
        }
    }

    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_tracking_id(mut self, tracking_id: Uuid) -> Self {
        self.tracking_id = Some(tracking_id);
        self
    }

    pub fn with_max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }
}

/// Inserts one event; returns its tracking id. Call it inside your transaction.
pub async fn enqueue<C: GenericClient>(
    client: &C,
    event: &NewEvent,
) -> Result<Uuid, tokio_postgres::Error> {
    Ok(enqueue_many(client, std::slice::from_ref(event)).await?[0])
}

/// Inserts many events in one statement; returns their tracking ids in order.
pub async fn enqueue_many<C: GenericClient>(
    client: &C,
    events: &[NewEvent],
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = events
        .iter()
        .map(|e| e.tracking_id.unwrap_or_else(Uuid::now_v7))
        .collect();
    let aggregate_types: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let metadata: Vec<&serde_json::Value> = events.iter().map(|e| &e.metadata).collect();
    let max_attempts: Vec<Option<i32>> = events.iter().map(|e| e.max_attempts).collect();
    client
        .execute(
            ENQUEUE,
            &[
                &ids,
                &aggregate_types,
                &aggregate_ids,
                &event_types,
                &payloads,
                &metadata,
                &max_attempts,
            ],
        )
        .await?;
    Ok(ids)
}
