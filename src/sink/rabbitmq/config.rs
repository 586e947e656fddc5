//! `[rabbitmq]`: where and how events are published, with its defaults and checks.

use super::routing_key::RoutingKeyTemplate;
use crate::duration_text;
use crate::secret::redact;
use crate::sink::circuit::CircuitSettings;
use crate::validate::{ConfigError, Setting, backoff_bounds};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqConfig {
    pub url: String,
    pub exchange: String,
    /// Used only when `declare_exchange` is true.
    pub exchange_type: String,
    /// Declare the exchange (durable) at connect. Off: it must already exist.
    pub declare_exchange: bool,
    /// Template; `{event_type}`, `{aggregate_type}` and `{aggregate_id}` are replaced.
    pub routing_key: String,
    /// A batch whose confirms have not all arrived by then counts as failed.
    #[serde(with = "duration_text")]
    pub confirm_timeout: Duration,
    /// Larger payloads are dead-lettered instead of published (keep it at or below the
    /// broker's `max_message_size`, which closes the channel over a larger message).
    pub max_payload_bytes: usize,
    /// For `amqps://`: a PEM file of the CA(s) to trust instead of the system's roots.
    pub ca_file: String,
    /// After the broker was unreachable (or stopped confirming), the first new try waits
    /// this long; each failed try doubles the wait up to `reconnect_max_delay`.
    #[serde(with = "duration_text")]
    pub reconnect_min_delay: Duration,
    #[serde(with = "duration_text")]
    pub reconnect_max_delay: Duration,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "outbox".into(),
            exchange_type: "topic".into(),
            declare_exchange: true,
            routing_key: "{event_type}".into(),
            confirm_timeout: Duration::from_secs(10),
            max_payload_bytes: 16 * 1024 * 1024,
            ca_file: String::new(),
            reconnect_min_delay: Duration::from_millis(200),
            reconnect_max_delay: Duration::from_secs(10),
        }
    }
}

fn at(key: &str) -> Setting {
    Setting::at("rabbitmq", key)
}

impl RabbitMqConfig {
    /// Checks every value's range and shape.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(at("url").invalid(redact(&self.url), "must start with amqp:// or amqps://"));
        }
        if self.exchange.len() > 255 {
            return Err(at("exchange").invalid(&self.exchange, "is longer than 255 bytes"));
        }
        if !["topic", "direct", "fanout", "headers"].contains(&self.exchange_type.as_str()) {
            return Err(at("exchange_type").invalid(
                &self.exchange_type,
                "must be one of topic, direct, fanout, headers",
            ));
        }
        if self.declare_exchange && self.exchange.is_empty() {
            return Err(at("declare_exchange").invalid(
                true,
                "the default exchange (empty name) cannot be declared; set declare_exchange = false",
            ));
        }
        RoutingKeyTemplate::parse(&self.routing_key)
            .map_err(|e| at("routing_key").invalid(&self.routing_key, e))?;
        at("confirm_timeout").positive(self.confirm_timeout)?;
        at("max_payload_bytes").in_range(self.max_payload_bytes, 1..=536_870_912)?;
        if !self.ca_file.is_empty() && !std::path::Path::new(&self.ca_file).is_file() {
            return Err(at("ca_file").invalid(&self.ca_file, "is not a readable file"));
        }
        backoff_bounds(
            "rabbitmq",
            self.reconnect_min_delay,
            self.reconnect_max_delay,
        )?;
        Ok(())
    }

    /// The circuit around the broker: one failure (unreachable, a lost connection, a
    /// confirm that never came) opens it; tries are then spaced by the reconnect delays.
    pub fn circuit(&self) -> CircuitSettings {
        CircuitSettings {
            failures_to_open: 1,
            cool_down: self.reconnect_min_delay,
            max_cool_down: self.reconnect_max_delay,
            probe_timeout: self.confirm_timeout * 2 + Duration::from_secs(5),
        }
    }
}
