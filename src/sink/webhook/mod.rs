//! A webhook destination: each event is POSTed as JSON, signed per the Standard Webhooks
//! specification (`webhook-id` = tracking_id, `webhook-timestamp`, `webhook-signature`:
//! see [`signature`]), at most `max_in_flight` at a time. What the answer means is
//! [`response::classify`]; timeouts and connection or TLS errors retry as the
//! endpoint's failure. The circuit that defers an endpoint's events while it is down
//! wraps this sink (`sink::guard`); this file only speaks HTTP.

pub mod config;
pub mod response;
pub mod signature;

pub use config::WebhookConfig;

use crate::event::{Event, Outcome};
use crate::metrics::{Metrics, WEBHOOK_CLASSES, webhook_class};
use crate::sink::circuit::CircuitSettings;
use crate::sink::{DestinationConfig, Sink};
use crate::validate::ConfigError;
use futures_util::future::{BoxFuture, join_all};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use response::classify;
use serde_json::value::RawValue;
use signature::{decode_secret, sign};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// How much of an error response's body `last_error` keeps.
const BODY_EXCERPT: usize = 1024;

/// The request body: the event as JSON, its payload and metadata embedded as they are.
pub fn body(event: &Event) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        tracking_id: String,
        outbox_id: i64,
        event_type: &'a str,
        aggregate_type: &'a str,
        aggregate_id: &'a str,
        payload: &'a RawValue,
        metadata: &'a serde_json::Value,
        created_at: String,
    }
    let null = RawValue::from_string("null".into()).expect("valid JSON");
    let payload: Box<RawValue> = RawValue::from_string(event.payload.clone()).unwrap_or(null);
    serde_json::to_vec(&Body {
        tracking_id: event.tracking_id.to_string(),
        outbox_id: event.id,
        event_type: &event.event_type,
        aggregate_type: &event.aggregate_type,
        aggregate_id: &event.aggregate_id,
        payload: &payload,
        metadata: &event.metadata,
        created_at: humantime::format_rfc3339_millis(event.created_at).to_string(),
    })
    .expect("serializable")
}

/// One webhook endpoint.
pub struct WebhookSink {
    name: String,
    url: reqwest::Url,
    keys: Vec<Vec<u8>>,
    timeout: Duration,
    client: reqwest::Client,
    in_flight: Semaphore,
    max_in_flight: usize,
    /// This endpoint's `outbox_webhook_responses_total` series, one per class of
    /// [`WEBHOOK_CLASSES`] in its order (empty when built without the instance's metrics).
    responses: Vec<prometheus::IntCounter>,
}

impl WebhookSink {
    /// `name` is the config name; the destination is `webhook:<name>`.
    pub fn new(name: &str, config: &WebhookConfig) -> Result<WebhookSink, String> {
        config::check_url(&config.url)?;
        let url = reqwest::Url::parse(&config.url).map_err(|e| e.to_string())?;
        let keys = config
            .secrets
            .iter()
            .map(|s| decode_secret(s.expose()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut headers = HeaderMap::new();
        for (header, value) in &config.headers {
            config::check_header(header, value)?;
            headers.insert(
                HeaderName::from_bytes(header.as_bytes()).map_err(|e| e.to_string())?,
                HeaderValue::from_str(value).map_err(|e| e.to_string())?,
            );
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(config.max_in_flight)
            .user_agent(concat!("outboxd/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(WebhookSink {
            name: destination(name),
            url,
            keys,
            timeout: config.timeout,
            client,
            in_flight: Semaphore::new(config.max_in_flight),
            max_in_flight: config.max_in_flight,
            responses: Vec::new(),
        })
    }

    async fn post(&self, event: &Event) -> Outcome {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("semaphore never closed");
        let body = body(event);
        let id = event.tracking_id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = sign(&self.keys, &id, timestamp, &body);
        let mut request = self
            .client
            .post(self.url.clone())
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature);
        if let Some(replay) = event.replay_id {
            request = request.header(crate::event::REPLAY_HEADER, replay.to_string());
        }
        let sent = request.body(body).send().await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => {
                self.count(if error.is_timeout() {
                    "timeout"
                } else {
                    "error"
                });
                return self.failed_request(error);
            }
        };
        let status = response.status().as_u16();
        self.count(webhook_class(status));
        if (200..300).contains(&status) {
            return Outcome::Delivered;
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header(RETRY_AFTER);
        let location = header(LOCATION);
        let mut excerpt = Vec::new();
        while excerpt.len() < BODY_EXCERPT {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                _ => break,
            }
        }
        excerpt.truncate(BODY_EXCERPT);
        let excerpt = String::from_utf8_lossy(&excerpt).trim().to_string();
        classify(
            status,
            retry_after.as_deref(),
            location.as_deref(),
            &excerpt,
            SystemTime::now(),
        )
    }

    fn count(&self, class: &str) {
        if let Some(counter) = WEBHOOK_CLASSES
            .iter()
            .position(|c| *c == class)
            .and_then(|i| self.responses.get(i))
        {
            counter.inc();
        }
    }

    fn failed_request(&self, error: reqwest::Error) -> Outcome {
        // The URL may carry credentials: keep it out of logs and `last_error`.
        let error = error.without_url();
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(inner) = source {
            detail.push_str(": ");
            detail.push_str(&inner.to_string());
            source = inner.source();
        }
        let reason = if error.is_timeout() {
            format!(
                "no response within {} (timeout)",
                crate::duration_text::format(self.timeout)
            )
        } else if error.is_connect() {
            format!("cannot connect: {detail}")
        } else {
            format!("request failed: {detail}")
        };
        Outcome::destination_failed(reason)
    }
}

/// The name a route gives webhook `name`.
pub fn destination(name: &str) -> String {
    format!("webhook:{name}")
}

impl DestinationConfig for BTreeMap<String, WebhookConfig> {
    fn names(&self) -> Vec<String> {
        self.keys().map(|name| destination(name)).collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.iter()
            .try_for_each(|(name, webhook)| webhook.check(name))
    }

    fn build(
        &self,
        destination: &str,
        metrics: &Metrics,
    ) -> Result<(Box<dyn Sink>, CircuitSettings), String> {
        let name = destination.strip_prefix("webhook:").unwrap_or(destination);
        let webhook = self
            .get(name)
            .ok_or_else(|| format!("no [webhooks.{name}] section"))?;
        let mut sink = WebhookSink::new(name, webhook)?;
        sink.responses = metrics.add_webhook(&sink.name);
        Ok((Box::new(sink), webhook.circuit()))
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(join_all(events.iter().map(|event| self.post(event))))
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.max_in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_embeds_payload_and_metadata() {
        let event = Event {
            id: 1,
            created_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            tracking_id: uuid::Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "order.created".into(),
            payload: r#"{"total": 12.5}"#.into(),
            metadata: serde_json::json!({ "traceparent": "x" }),
            attempts: 1,
            max_attempts: None,
            delivered_to: vec![],
            replay_id: None,
        };
        let json: serde_json::Value = serde_json::from_slice(&body(&event)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "tracking_id": "00000000-0000-0000-0000-000000000000",
                "outbox_id": 1,
                "event_type": "order.created",
                "aggregate_type": "order",
                "aggregate_id": "42",
                "payload": { "total": 12.5 },
                "metadata": { "traceparent": "x" },
                "created_at": "2023-11-14T22:13:20.123Z"
            })
        );
    }
}
