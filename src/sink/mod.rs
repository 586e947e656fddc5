//! Destinations. A sink delivers a batch and reports one [`Outcome`] per event, in order;
//! it never touches the database. Each destination is a folder of its own that owns its
//! config, its checks and its I/O (only `sink/rabbitmq/` knows the broker, only
//! `sink/webhook/` speaks HTTP); [`build`] makes every routed one, each wrapped in the
//! same circuit breaker ([`guard`]). Adding a destination is a new folder and a line in
//! `Config::destinations`.

pub mod circuit;
pub mod guard;
pub mod rabbitmq;
pub mod webhook;

use crate::event::{Event, Outcome};
use crate::metrics::Metrics;
use crate::validate::ConfigError;
use circuit::CircuitSettings;
pub use circuit::Parking;
use futures_util::future::BoxFuture;
use std::sync::Arc;

/// A destination events are delivered to.
pub trait Sink: Send + Sync {
    /// The name recorded in `delivered_to` and in metric labels (`rabbitmq`).
    fn name(&self) -> &str;

    /// Delivers `events`; returns exactly one outcome per event, in order. A nack, a
    /// mandatory return or a timeout is never `Delivered`; an event the peer cannot carry
    /// is `Rejected` before anything is sent.
    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>>;

    /// Connects ahead of the first delivery, so that a wrong address is reported at
    /// start. Nothing to do by default.
    fn connect(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// `Some(n)`: the destination takes one event per request, at most `n` at a time, so
    /// its circuit is asked before each request rather than once per batch.
    fn concurrency(&self) -> Option<usize> {
        None
    }

    /// Whether to claim events for it now: its circuit parks them while it is failing
    /// and asks for one probe after each cool-down. Always ready by default.
    fn parking(&self) -> Parking {
        Parking::Ready
    }

    /// Whether the destination takes deliveries now; `Err` says why not (readiness).
    fn available(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What each destination's config offers the builder.
pub trait DestinationConfig {
    /// The destinations it defines, by the names routes use (`rabbitmq`, `webhook:NAME`).
    fn names(&self) -> Vec<String>;

    /// Checks every value.
    fn validate(&self) -> Result<(), ConfigError>;

    /// Builds destination `name` (one of [`DestinationConfig::names`]) and the settings
    /// of the circuit around it; the sink may keep `metrics` for series of its own.
    fn build(
        &self,
        name: &str,
        metrics: &Metrics,
    ) -> Result<(Box<dyn Sink>, CircuitSettings), String>;
}

/// Every destination defined by `configs`, by name.
pub fn defined(configs: &[&dyn DestinationConfig]) -> Vec<String> {
    configs.iter().flat_map(|c| c.names()).collect()
}

/// Builds each destination in `routed`, wrapped in its circuit breaker, with its metric
/// series exported at zero.
pub fn build(
    configs: &[&dyn DestinationConfig],
    routed: &[String],
    metrics: &Metrics,
) -> Result<Vec<Arc<dyn Sink>>, String> {
    let mut built: Vec<Arc<dyn Sink>> = Vec::new();
    for name in routed {
        let config = configs
            .iter()
            .find(|c| c.names().contains(name))
            .ok_or_else(|| {
                format!(
                    "route names {name}, which is not defined; defined: {}",
                    defined(configs).join(", ")
                )
            })?;
        let (sink, circuit) = config
            .build(name, metrics)
            .map_err(|e| format!("{name}: {e}"))?;
        metrics.add_destination(name);
        built.push(Arc::new(guard::Guarded::new(
            sink,
            circuit,
            metrics.clone(),
        )));
    }
    Ok(built)
}
