//! Destinations. A sink delivers a batch and reports one [`Outcome`] per event; it never
//! touches the database. Only `sink/rabbitmq.rs` knows the broker, only
//! `sink/webhook.rs` speaks HTTP.

pub mod circuit;
pub mod rabbitmq;
pub mod webhook;

use crate::event::{Event, Outcome};
use futures_util::future::BoxFuture;

/// A destination events are delivered to.
pub trait Sink: Send + Sync {
    /// The name recorded in `delivered_to` and in metric labels (`rabbitmq`).
    fn name(&self) -> &str;

    /// Delivers `events`; returns exactly one outcome per event, in order. A nack, a
    /// mandatory return or a timeout is never `Delivered`.
    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>>;
}
