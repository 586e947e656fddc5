//! The event as outboxd sees it once claimed, and the outcome a destination reports.

use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// A claimed outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    pub created_at: SystemTime,
    /// The idempotency key consumers dedupe on (AMQP `message_id`).
    pub tracking_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload as JSON text, published as is.
    pub payload: String,
    /// Headers and trace context (a JSON object; anything else is ignored).
    pub metadata: serde_json::Value,
    /// Attempts so far, this one included (counted at claim).
    pub attempts: i32,
    /// The row's own limit; `None`: the configured `retry.max_attempts`.
    pub max_attempts: Option<i32>,
    /// Destinations that already acknowledged this event.
    pub delivered_to: Vec<String>,
    /// Sent again by this replay (`outboxd replay`), not delivered: destinations add
    /// the `outbox-replay-id` header, so a consumer that dedupes on the tracking_id can
    /// choose to apply it anyway.
    pub replay_id: Option<i64>,
}

/// The header naming the replay that sent an event again (AMQP header and HTTP header).
pub const REPLAY_HEADER: &str = "outbox-replay-id";

/// Events leased by one claim, all under one `lock_token`.
#[derive(Debug, Clone)]
pub struct Claim {
    pub lock_token: Uuid,
    pub events: Vec<Event>,
    /// How many candidates this claim held instead of claiming (ordering): a sweep whose
    /// batch is full of held events has not reached the end of what is due.
    pub held: usize,
}

/// What one destination did with one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Acknowledged: a broker confirm ack (not a nack, not a return) or an HTTP 2xx.
    Delivered,
    /// Failed in a way that may pass later; `not_before` is the destination's own
    /// earliest next time, if it named one.
    Retry {
        reason: String,
        not_before: Option<Duration>,
        fault: Fault,
    },
    /// Failed for good: the event goes to DEAD_LETTER now.
    Rejected { reason: String },
    /// Not attempted (destination unreachable or its circuit open): the attempt counted
    /// at claim is given back, since a destination's outage is not the event's fault.
    Deferred {
        reason: String,
        not_before: Duration,
    },
}

/// Whose failure a `Retry` is. The circuit around a destination counts only the
/// destination's own failures: one event that cannot be routed must not hold up the
/// others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The destination is down, overloaded or too slow (a 5xx, a timeout, a lost
    /// connection, a confirm that never came).
    Destination,
    /// The destination answered, about this event alone (a mandatory return, a nack).
    Event,
}

impl Outcome {
    /// Retry later: the destination failed (counts toward its circuit).
    pub fn destination_failed(reason: impl Into<String>) -> Outcome {
        Outcome::Retry {
            reason: reason.into(),
            not_before: None,
            fault: Fault::Destination,
        }
    }

    /// Retry later: the destination answered, but not with an acknowledgement, about
    /// this event alone.
    pub fn event_failed(reason: impl Into<String>) -> Outcome {
        Outcome::Retry {
            reason: reason.into(),
            not_before: None,
            fault: Fault::Event,
        }
    }
}
