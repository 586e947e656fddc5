//! The RabbitMQ destination: one connection, a confirm-mode channel, persistent and
//! `mandatory` publishes. A batch is published, then its confirms are awaited together.
//! Only a confirm ack without a return is `Delivered` (invariant 2): a mandatory return
//! (no queue bound) or a nack is the event's `Retry`; a closed channel or a confirm that
//! does not arrive in time is the broker's. When the broker cannot be reached nothing is
//! sent and the batch is `Deferred`; the circuit around this sink (`sink::guard`) then
//! spaces the tries with the reconnect delays.

pub mod config;
pub mod demo_queue;
pub mod message;
pub mod routing_key;

pub use config::RabbitMqConfig;
pub use routing_key::RoutingKeyTemplate;

use crate::event::{Event, Outcome};
use crate::secret::redact;
use crate::sink::circuit::CircuitSettings;
use crate::sink::{DestinationConfig, Sink};
use crate::validate::ConfigError;
use futures_util::future::{BoxFuture, join_all};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

/// The name this destination has in `delivered_to` and in metric labels.
pub const DESTINATION: &str = "rabbitmq";

struct Live {
    connection: Connection,
    /// Channels in confirm mode that no batch uses now. A batch has a channel to itself:
    /// lapin hands a mandatory return to whichever confirm of the channel it resolves
    /// next, so on a shared channel one batch's return could be read by another and
    /// the returned event taken for delivered.
    idle: std::sync::Mutex<Vec<Channel>>,
    /// Which connection this is (the n-th opened), so a batch retires only its own.
    generation: u64,
}

/// The channel a batch publishes on, and what it needs to know of its connection.
struct InUse {
    channel: Channel,
    generation: u64,
    /// The largest frame the broker takes (properties must fit in one).
    frame_max: usize,
}

impl Live {
    /// A channel of this batch's own: an idle one, or a new one in confirm mode (given
    /// up after `wait`: a broker that stopped answering must not hang the batch).
    async fn in_use(&self, wait: std::time::Duration) -> Result<InUse, String> {
        let frame_max = match self.connection.configuration().frame_max() {
            0 => usize::MAX,
            max => max as usize,
        };
        let idle = {
            let mut idle = self.idle.lock().expect("idle channels");
            idle.retain(|c| c.status().connected());
            idle.pop()
        };
        let channel = match idle {
            Some(channel) => channel,
            None => tokio::time::timeout(wait, confirming_channel(&self.connection))
                .await
                .map_err(|_| {
                    format!(
                        "RabbitMQ did not open a channel within {}",
                        crate::duration_text::format(wait)
                    )
                })??,
        };
        Ok(InUse {
            channel,
            generation: self.generation,
            frame_max,
        })
    }

    /// Closes a connection that is no longer trusted, without waiting for it.
    fn retire(self) {
        tokio::spawn(async move {
            let closing = self.connection.close(200, "outboxd reconnects".into());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), closing).await;
        });
    }
}

/// A new channel on `connection`, in publisher-confirm mode.
async fn confirming_channel(connection: &Connection) -> Result<Channel, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a RabbitMQ channel: {e}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
    Ok(channel)
}

/// Publishes events to one exchange with publisher confirms.
pub struct RabbitMqSink {
    config: RabbitMqConfig,
    routing_key: RoutingKeyTemplate,
    live: Mutex<Option<Live>>,
    opened: std::sync::atomic::AtomicU64,
}

impl RabbitMqSink {
    pub fn new(config: RabbitMqConfig) -> Result<Self, String> {
        let routing_key = RoutingKeyTemplate::parse(&config.routing_key)?;
        Ok(Self {
            config,
            routing_key,
            live: Mutex::new(None),
            opened: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A channel for one batch, connecting first if needed.
    async fn channel(&self) -> Result<InUse, String> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref()
            && current.connection.status().connected()
        {
            return current.in_use(self.config.confirm_timeout).await;
        }
        if let Some(old) = live.take() {
            old.retire();
        }
        let mut opened = self.open().await.inspect_err(|error| {
            tracing::warn!(
                destination = DESTINATION,
                %error,
                "RabbitMQ unreachable; its events wait (parked, no attempt charged)"
            )
        })?;
        opened.generation = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let in_use = opened.in_use(self.config.confirm_timeout).await;
        *live = Some(opened);
        in_use
    }

    /// A batch is done with its channel: idle again if its connection is still the
    /// current one and the channel still open.
    async fn give_back(&self, used: InUse) {
        let live = self.live.lock().await;
        if let Some(current) = live.as_ref()
            && current.generation == used.generation
            && used.channel.status().connected()
        {
            current
                .idle
                .lock()
                .expect("idle channels")
                .push(used.channel);
        }
    }

    /// Retires connection `generation` if it is still the current one (another batch
    /// may have opened a fresh one meanwhile: that one stays).
    async fn retire(&self, generation: u64) {
        let mut live = self.live.lock().await;
        if live.as_ref().is_some_and(|l| l.generation == generation)
            && let Some(old) = live.take()
        {
            old.retire();
        }
    }

    async fn open(&self) -> Result<Live, String> {
        let url = &self.config.url;
        // Named, so operators find it in the management UI: `outboxd@HOST`.
        let properties = || {
            ConnectionProperties::default()
                .with_connection_name(format!("outboxd@{}", crate::host_name()).into())
        };
        let connect = async {
            if self.config.ca_file.is_empty() {
                return Connection::connect(url, properties()).await;
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
                properties(),
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
        let channel = confirming_channel(&connection).await?;
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
            idle: std::sync::Mutex::new(vec![channel]),
            generation: 0,
        })
    }

    async fn publish_batch(&self, events: &[Event]) -> Vec<Outcome> {
        let Ok(exchange) = ShortString::try_new(self.config.exchange.as_str()) else {
            let refused = "rabbitmq.exchange is longer than 255 bytes; shorten it";
            return events
                .iter()
                .map(|_| Outcome::destination_failed(refused))
                .collect();
        };
        let used = match self.channel().await {
            Ok(used) => used,
            Err(reason) => {
                return events
                    .iter()
                    .map(|_| Outcome::Deferred {
                        reason: reason.clone(),
                        not_before: self.config.reconnect_min_delay,
                    })
                    .collect();
            }
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut messages = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let rendered = self.routing_key.render(event);
            match message::build(
                event,
                &rendered,
                used.frame_max,
                self.config.max_payload_bytes,
            ) {
                Ok(message) => messages.push((index, rendered, message)),
                // Refused before sending: this event alone, with its reason.
                Err(reason) => outcomes[index] = Some(Outcome::Rejected { reason }),
            }
        }
        // Every publish is queued at its first poll, in batch order (lapin assigns the
        // delivery tag and queues the frames before it awaits anything), so the I/O
        // thread writes the batch in a few wake-ups instead of one round trip per
        // message; each future then resolves once its frames are written.
        let published = join_all(messages.into_iter().map(|(index, rendered, message)| {
            let (channel, exchange) = (&used.channel, exchange.clone());
            let payload = events[index].payload.as_bytes();
            async move {
                let result = channel
                    .basic_publish(
                        exchange,
                        message.routing_key,
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        payload,
                        message.properties,
                    )
                    .await;
                (index, rendered, result)
            }
        }))
        .await;
        let mut confirms = Vec::with_capacity(published.len());
        let mut failed = false;
        for (index, rendered, result) in published {
            match result {
                Ok(confirm) => confirms.push((index, rendered, confirm)),
                // The channel is gone. The first event whose publish failed is charged;
                // the later ones were never sent, so they wait without being charged.
                Err(error) if !failed => {
                    failed = true;
                    outcomes[index] = Some(Outcome::destination_failed(format!(
                        "publish failed: {error}"
                    )));
                }
                Err(error) => {
                    outcomes[index] = Some(Outcome::Deferred {
                        reason: format!("not published: the channel closed ({error})"),
                        not_before: self.config.reconnect_min_delay,
                    });
                }
            }
        }
        // Each confirm by the same deadline: those that arrived count, whatever the others do.
        let deadline = tokio::time::Instant::now() + self.config.confirm_timeout;
        let results = join_all(confirms.into_iter().map(
            |(index, routing_key, confirm)| async move {
                (
                    index,
                    routing_key,
                    tokio::time::timeout_at(deadline, confirm).await,
                )
            },
        ))
        .await;
        // A mandatory return is handed to whichever confirm lapin resolves next, which
        // under a multiple-ack need not be the returned message's own: read each
        // return's message_id (the event's tracking_id) and blame exactly that event.
        let returned: std::collections::HashMap<String, (u16, String)> = results
            .iter()
            .filter_map(|(_, _, result)| match result {
                Ok(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) => Some((
                    r.properties.message_id().as_ref()?.to_string(),
                    (r.reply_code, r.reply_text.to_string()),
                )),
                _ => None,
            })
            .collect();
        let mut lost_confirms = false;
        for (index, routing_key, result) in results {
            let own_return = returned.get(&events[index].tracking_id.to_string());
            outcomes[index] = Some(match result {
                Ok(_) if own_return.is_some() => {
                    let (code, text) = own_return.expect("just checked");
                    self.unroutable(*code, text, &routing_key)
                }
                Ok(Ok(Confirmation::Ack(Some(_)))) => Outcome::Delivered,
                Ok(Ok(Confirmation::Nack(Some(_)))) => {
                    self.classify(Ok(Confirmation::Nack(None)), &routing_key)
                }
                Ok(confirmed) => self.classify(confirmed, &routing_key),
                Err(_) => {
                    lost_confirms = true;
                    Outcome::destination_failed(format!(
                        "no publisher confirm within {}; the message may or may not have been stored",
                        crate::duration_text::format(self.config.confirm_timeout)
                    ))
                }
            });
        }
        if lost_confirms {
            // A connection that lost confirms is not trusted again; only this batch's.
            self.retire(used.generation).await;
        } else {
            self.give_back(used).await;
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::destination_failed("not published")))
            .collect()
    }

    fn unroutable(&self, code: u16, text: &str, routing_key: &str) -> Outcome {
        Outcome::event_failed(format!(
            "returned by RabbitMQ as unroutable: {code} {text} (exchange {:?}, routing key {routing_key:?}); bind a queue that matches this routing key",
            self.config.exchange
        ))
    }

    fn classify(&self, result: lapin::Result<Confirmation>, routing_key: &str) -> Outcome {
        match result {
            Ok(Confirmation::Ack(None)) => Outcome::Delivered,
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => self
                .unroutable(
                    returned.reply_code,
                    returned.reply_text.as_str(),
                    routing_key,
                ),
            Ok(Confirmation::Nack(None)) => Outcome::event_failed(format!(
                "nacked by RabbitMQ (exchange {:?}, routing key {routing_key:?}): the broker could not store it",
                self.config.exchange
            )),
            Ok(Confirmation::NotRequested) => {
                Outcome::destination_failed("channel was not in confirm mode")
            }
            Err(error) => Outcome::destination_failed(format!("confirm failed: {error}")),
        }
    }
}

impl DestinationConfig for RabbitMqConfig {
    fn names(&self) -> Vec<String> {
        vec![DESTINATION.to_string()]
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check()
    }

    fn build(
        &self,
        _name: &str,
        _metrics: &crate::metrics::Metrics,
    ) -> Result<(Box<dyn Sink>, CircuitSettings), String> {
        Ok((Box::new(RabbitMqSink::new(self.clone())?), self.circuit()))
    }
}

impl Sink for RabbitMqSink {
    fn name(&self) -> &str {
        DESTINATION
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.publish_batch(events))
    }

    fn connect(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            let used = self.channel().await?;
            self.give_back(used).await;
            Ok(())
        })
    }
}
