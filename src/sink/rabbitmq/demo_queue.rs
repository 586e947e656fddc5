//! A throw-away queue bound to the configured exchange, for `outboxd demo`: it receives
//! what outboxd publishes and disappears with its connection. Not part of delivery.

use super::RabbitMqConfig;
use crate::secret::redact;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

/// The demo's queue and its consumer.
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
