//! The RabbitMQ destination: one connection, a confirm-mode channel, persistent and
//! `mandatory` publishes. A batch is published, then its confirms are awaited together.
//! Only a confirm ack without a return is `Delivered` (invariant 2): a nack, a mandatory
//! return (no queue bound), a closed channel or a confirm that does not arrive in time is
//! a `Retry`. When the broker cannot be reached the batch is `Deferred` (not attempted)
//! while the connection is re-established with jittered exponential backoff.

use crate::config::{RabbitMqConfig, redact};
use crate::event::{Event, Outcome};
use crate::metrics::Metrics;
use crate::retry::{backoff_delay, random_jitter};
use crate::sink::Sink;
use futures_util::future::{BoxFuture, join_all};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::time::{Instant, UNIX_EPOCH};
use tokio::sync::Mutex;

/// The name this destination has in `delivered_to` and in metric labels.
pub const DESTINATION: &str = "rabbitmq";

/// A routing key template: literal text and `{event_type}`, `{aggregate_type}`,
/// `{aggregate_id}` placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingKeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    EventType,
    AggregateType,
    AggregateId,
}

impl RoutingKeyTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "event_type" => Part::EventType,
                "aggregate_type" => Part::AggregateType,
                "aggregate_id" => Part::AggregateId,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}}; use {{event_type}}, {{aggregate_type}} or {{aggregate_id}}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    pub fn render(&self, event: &Event) -> String {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => key.push_str(text),
                Part::EventType => key.push_str(&event.event_type),
                Part::AggregateType => key.push_str(&event.aggregate_type),
                Part::AggregateId => key.push_str(&event.aggregate_id),
            }
        }
        key
    }
}

struct Live {
    connection: Connection,
    channel: Channel,
}

impl Live {
    /// Closes a connection that is no longer trusted, without waiting for it.
    fn retire(self) {
        tokio::spawn(async move {
            let closing = self.connection.close(200, "outboxd reconnects".into());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), closing).await;
        });
    }
}

struct Reconnect {
    failures: i32,
    not_before: Option<Instant>,
    last_error: String,
}

/// Publishes events to one exchange with publisher confirms.
pub struct RabbitMqSink {
    config: RabbitMqConfig,
    routing_key: RoutingKeyTemplate,
    live: Mutex<Option<Live>>,
    reconnect: std::sync::Mutex<Reconnect>,
    metrics: Metrics,
}

impl RabbitMqSink {
    pub fn new(config: RabbitMqConfig, metrics: Metrics) -> Result<Self, String> {
        let routing_key = RoutingKeyTemplate::parse(&config.routing_key)?;
        metrics
            .destination_circuit_open
            .with_label_values(&[DESTINATION])
            .set(0);
        Ok(Self {
            config,
            routing_key,
            live: Mutex::new(None),
            reconnect: std::sync::Mutex::new(Reconnect {
                failures: 0,
                not_before: None,
                last_error: String::new(),
            }),
            metrics,
        })
    }

    /// Connects now (used at start so a wrong URL is reported at once).
    pub async fn check(&self) -> Result<(), String> {
        self.channel().await.map(|_| ())
    }

    /// The open channel, connecting first if needed. While the broker is unreachable,
    /// connection attempts are spaced by the reconnect backoff.
    async fn channel(&self) -> Result<Channel, String> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref()
            && current.channel.status().connected()
        {
            return Ok(current.channel.clone());
        }
        if let Some(old) = live.take() {
            old.retire();
        }
        {
            let state = self.reconnect.lock().expect("reconnect state");
            if let Some(at) = state.not_before
                && Instant::now() < at
            {
                return Err(state.last_error.clone());
            }
        }
        match self.open().await {
            Ok(opened) => {
                let channel = opened.channel.clone();
                *live = Some(opened);
                let mut state = self.reconnect.lock().expect("reconnect state");
                if state.failures > 0 {
                    tracing::info!(destination = DESTINATION, "connected to RabbitMQ again");
                }
                state.failures = 0;
                state.not_before = None;
                self.metrics
                    .destination_circuit_open
                    .with_label_values(&[DESTINATION])
                    .set(0);
                Ok(channel)
            }
            Err(error) => {
                let mut state = self.reconnect.lock().expect("reconnect state");
                state.failures += 1;
                let delay = backoff_delay(
                    state.failures,
                    self.config.reconnect_min_delay,
                    self.config.reconnect_max_delay,
                    random_jitter(),
                );
                state.not_before = Some(Instant::now() + delay);
                state.last_error = error.clone();
                self.metrics
                    .destination_circuit_open
                    .with_label_values(&[DESTINATION])
                    .set(1);
                tracing::warn!(
                    destination = DESTINATION,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "RabbitMQ unreachable; events wait (deferred, no attempt charged)"
                );
                Err(error)
            }
        }
    }

    async fn open(&self) -> Result<Live, String> {
        let url = &self.config.url;
        let connect = async {
            if self.config.ca_file.is_empty() {
                return Connection::connect(url, ConnectionProperties::default()).await;
            }
            // amqps with a private CA: trust exactly the configured certificates.
            let cert_chain = std::fs::read_to_string(&self.config.ca_file).map_err(|e| {
                lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(e)))
            })?;
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(cert_chain),
            };
            Connection::connect_with_config(
                url,
                ConnectionProperties::default(),
                tls,
                lapin::runtime::default_runtime()?,
            )
            .await
        };
        let connection = tokio::time::timeout(self.config.confirm_timeout, connect)
            .await
            .map_err(|_| format!("cannot connect to RabbitMQ at {}: timed out", redact(url)))?
            .map_err(|e| {
                format!(
                    "cannot connect to RabbitMQ at {}: {e}; check that it is running and that rabbitmq.url (OUTBOXD_RABBITMQ_URL) is right",
                    redact(url)
                )
            })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("cannot open a RabbitMQ channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
        if self.config.declare_exchange {
            let kind = match self.config.exchange_type.as_str() {
                "direct" => ExchangeKind::Direct,
                "fanout" => ExchangeKind::Fanout,
                "headers" => ExchangeKind::Headers,
                _ => ExchangeKind::Topic,
            };
            channel
                .exchange_declare(
                    self.config.exchange.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    format!(
                        "cannot declare exchange {:?} ({}): {e}; if it exists with other settings, set rabbitmq.declare_exchange = false",
                        self.config.exchange, self.config.exchange_type
                    )
                })?;
        }
        Ok(Live {
            connection,
            channel,
        })
    }

    fn properties(&self, event: &Event) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let serde_json::Value::Object(map) = &event.metadata {
            for (key, value) in map {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                headers.insert(
                    ShortString::from(key.as_str()),
                    AMQPValue::LongString(LongString::from(text)),
                );
            }
        }
        headers.insert(
            "aggregate_type".into(),
            AMQPValue::LongString(LongString::from(event.aggregate_type.as_str())),
        );
        headers.insert(
            "aggregate_id".into(),
            AMQPValue::LongString(LongString::from(event.aggregate_id.as_str())),
        );
        headers.insert("outbox_attempt".into(), AMQPValue::LongInt(event.attempts));
        let timestamp = event
            .created_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        BasicProperties::default()
            .with_message_id(event.tracking_id.to_string().into())
            .with_type(event.event_type.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(timestamp)
            .with_app_id("outboxd".into())
            .with_headers(headers)
    }

    async fn publish_batch(&self, events: &[Event]) -> Vec<Outcome> {
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(reason) => {
                let not_before = {
                    let state = self.reconnect.lock().expect("reconnect state");
                    state
                        .not_before
                        .map(|at| at.saturating_duration_since(Instant::now()))
                        .unwrap_or(self.config.reconnect_min_delay)
                };
                return events
                    .iter()
                    .map(|_| Outcome::Deferred {
                        reason: reason.clone(),
                        not_before,
                    })
                    .collect();
            }
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut confirms = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            if event.payload.len() > self.config.max_payload_bytes {
                // RabbitMQ would close the channel over it, failing the whole batch.
                outcomes[index] = Some(Outcome::Rejected {
                    reason: format!(
                        "payload of {} bytes is larger than rabbitmq.max_payload_bytes ({}); the broker would refuse it",
                        event.payload.len(),
                        self.config.max_payload_bytes
                    ),
                });
                continue;
            }
            let routing_key = self.routing_key.render(event);
            let published = channel
                .basic_publish(
                    self.config.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    event.payload.as_bytes(),
                    self.properties(event),
                )
                .await;
            match published {
                Ok(confirm) => confirms.push((index, routing_key, confirm)),
                Err(error) => {
                    // The channel is gone. This event's publish failed; the rest of the
                    // batch was never sent, so it waits without being charged.
                    outcomes[index] = Some(Outcome::Retry {
                        reason: format!("publish failed: {error}"),
                        not_before: None,
                    });
                    for slot in outcomes.iter_mut().skip(index + 1).filter(|o| o.is_none()) {
                        *slot = Some(Outcome::Deferred {
                            reason: format!("not published: the channel closed ({error})"),
                            not_before: self.config.reconnect_min_delay,
                        });
                    }
                    break;
                }
            }
        }
        let waited = tokio::time::timeout(
            self.config.confirm_timeout,
            join_all(
                confirms
                    .into_iter()
                    .map(|(index, routing_key, confirm)| async move {
                        (index, routing_key, confirm.await)
                    }),
            ),
        )
        .await;
        match waited {
            Ok(results) => {
                for (index, routing_key, result) in results {
                    outcomes[index] = Some(self.classify(result, &routing_key));
                }
            }
            Err(_) => {
                let reason = format!(
                    "no publisher confirm within {:?}; the message may or may not have been stored",
                    self.config.confirm_timeout
                );
                for slot in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *slot = Some(Outcome::Retry {
                        reason: reason.clone(),
                        not_before: None,
                    });
                }
                // A channel that lost confirms is not trusted again.
                if let Some(old) = self.live.lock().await.take() {
                    old.retire();
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or(Outcome::Retry {
                    reason: "not published".into(),
                    not_before: None,
                })
            })
            .collect()
    }

    fn classify(&self, result: lapin::Result<Confirmation>, routing_key: &str) -> Outcome {
        match result {
            Ok(Confirmation::Ack(None)) => Outcome::Delivered,
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                Outcome::Retry {
                    reason: format!(
                        "returned by RabbitMQ as unroutable: {} {} (exchange {:?}, routing key {:?}); bind a queue that matches this routing key",
                        returned.reply_code, returned.reply_text, self.config.exchange, routing_key
                    ),
                    not_before: None,
                }
            }
            Ok(Confirmation::Nack(None)) => Outcome::Retry {
                reason: format!(
                    "nacked by RabbitMQ (exchange {:?}, routing key {routing_key:?}): the broker could not store it",
                    self.config.exchange
                ),
                not_before: None,
            },
            Ok(Confirmation::NotRequested) => Outcome::Retry {
                reason: "channel was not in confirm mode".into(),
                not_before: None,
            },
            Err(error) => Outcome::Retry {
                reason: format!("confirm failed: {error}"),
                not_before: None,
            },
        }
    }
}

/// A throw-away queue bound to the configured exchange, for `outboxd demo`: it receives
/// what outboxd publishes and disappears with its connection.
pub struct DemoQueue {
    connection: Connection,
    consumer: lapin::Consumer,
}

impl DemoQueue {
    pub async fn bind(config: &RabbitMqConfig) -> Result<DemoQueue, String> {
        use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
        let connection = Connection::connect(&config.url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ at {}: {e}", redact(&config.url)))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let kind = ExchangeKind::Custom(config.exchange_type.clone());
        channel
            .exchange_declare(
                config.exchange.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    passive: !config.declare_exchange,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("exchange {:?}: {e}", config.exchange))?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        channel
            .queue_bind(
                queue.name().clone(),
                config.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "outboxd-demo".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(DemoQueue {
            connection,
            consumer,
        })
    }

    /// The next message's `message_id` (the tracking id), or `None` when the queue is gone.
    pub async fn next(&mut self) -> Option<String> {
        use futures_util::StreamExt;
        let delivery = self.consumer.next().await?.ok()?;
        Some(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
        )
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "demo done".into()).await;
    }
}

impl Sink for RabbitMqSink {
    fn name(&self) -> &str {
        DESTINATION
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.publish_batch(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn event(event_type: &str) -> Event {
        Event {
            id: 1,
            created_at: SystemTime::now(),
            tracking_id: uuid::Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: event_type.into(),
            payload: "{}".into(),
            metadata: serde_json::json!({}),
            attempts: 1,
            max_attempts: None,
            delivered_to: vec![],
        }
    }

    #[test]
    fn routing_key_templates_render_fields() {
        let e = event("order.created");
        let cases = [
            ("{event_type}", "order.created"),
            ("events.{aggregate_type}.{aggregate_id}", "events.order.42"),
            ("fixed", "fixed"),
            ("", ""),
        ];
        for (template, expected) in cases {
            assert_eq!(
                RoutingKeyTemplate::parse(template).unwrap().render(&e),
                expected
            );
        }
        assert!(RoutingKeyTemplate::parse("{payload}").is_err());
        assert!(RoutingKeyTemplate::parse("{event_type").is_err());
    }
}
