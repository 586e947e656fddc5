//! A webhook destination: each event is POSTed as JSON, signed per the Standard Webhooks
//! specification (`webhook-id` = tracking_id, `webhook-timestamp`, `webhook-signature`
//! with one `v1,<base64 HMAC-SHA256>` per secret, so secrets rotate without downtime).
//! 2xx acknowledges. 408, 425, 429 (honouring `Retry-After`), 5xx, timeouts and
//! connection or TLS errors retry; a redirect (never followed) and every other 4xx are
//! permanent. A circuit breaker defers the endpoint's events while it is down, so its
//! outage costs them no attempt and does not hold up other destinations.

use crate::config::WebhookConfig;
use crate::event::{Event, Outcome};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::sink::circuit::{Admission, Circuit, CircuitSettings, Transition};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::future::{BoxFuture, join_all};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use serde_json::value::RawValue;
use sha2::Sha256;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// How much of an error response's body `last_error` keeps.
const BODY_EXCERPT: usize = 1024;

/// Checks a webhook URL: absolute http(s) with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("must start with http:// or https://".into());
    }
    if parsed.host_str().is_none() {
        return Err("names no host".into());
    }
    Ok(())
}

/// Checks an extra header's name and value.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header {name:?} is not valid"))?;
    Ok(())
}

/// The HMAC key of a Standard Webhooks secret: base64 after an optional `whsec_` prefix.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64.decode(encoded.trim()).map_err(|_| {
        "is not a Standard Webhooks secret: expected whsec_ followed by base64".to_string()
    })?;
    if key.is_empty() {
        return Err("is empty".into());
    }
    Ok(key)
}

/// The `webhook-signature` header: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` for
/// every key, space-separated.
pub fn sign(keys: &[Vec<u8>], id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key size");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Retry-After` as a delay from `now`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What an HTTP response means for the event.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    location: Option<&str>,
    body_excerpt: &str,
    now: SystemTime,
) -> Outcome {
    let said = if body_excerpt.is_empty() {
        String::new()
    } else {
        format!(": {body_excerpt}")
    };
    match status {
        200..=299 => Outcome::Delivered,
        300..=399 => Outcome::Rejected {
            reason: format!(
                "HTTP {status} redirect to {} not followed; set the webhook url to the final address",
                location.unwrap_or("(no Location)")
            ),
        },
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            reason: format!("HTTP {status}{said}"),
            not_before: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        400..=499 => Outcome::Rejected {
            reason: format!("HTTP {status}{said}"),
        },
        _ => Outcome::Retry {
            reason: format!("unexpected HTTP status {status}{said}"),
            not_before: None,
        },
    }
}

/// The request body: the event as JSON, its payload and metadata embedded as they are.
pub fn body(event: &Event) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        tracking_id: String,
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
    /// The URL without credentials, for logs and `last_error`.
    shown_url: String,
    keys: Vec<Vec<u8>>,
    timeout: Duration,
    client: reqwest::Client,
    in_flight: Semaphore,
    circuit: Mutex<Circuit>,
    metrics: Metrics,
}

impl WebhookSink {
    /// `name` is the config name; the destination is `webhook:<name>`.
    pub fn new(
        name: &str,
        config: &WebhookConfig,
        metrics: Metrics,
    ) -> Result<WebhookSink, String> {
        check_url(&config.url)?;
        let url = reqwest::Url::parse(&config.url).map_err(|e| e.to_string())?;
        let keys = config
            .secrets
            .iter()
            .map(|s| decode_secret(s.expose()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut headers = HeaderMap::new();
        for (header, value) in &config.headers {
            check_header(header, value)?;
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
        let destination = format!("webhook:{name}");
        metrics
            .destination_circuit_open
            .with_label_values(&[&destination])
            .set(0);
        let mut shown = url.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        Ok(WebhookSink {
            name: destination,
            shown_url: shown.to_string(),
            url,
            keys,
            timeout: config.timeout,
            client,
            in_flight: Semaphore::new(config.max_in_flight),
            circuit: Mutex::new(Circuit::new(CircuitSettings {
                failures_to_open: config.failures_to_open,
                cool_down: config.cool_down,
                max_cool_down: config.cool_down * 6,
                probe_timeout: config.timeout + Duration::from_secs(5),
            })),
            metrics,
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
        let sent = self
            .client
            .post(self.url.clone())
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => return self.failed_request(error),
        };
        let status = response.status().as_u16();
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
            format!("no response within {:?} (timeout)", self.timeout)
        } else if error.is_connect() {
            format!("cannot connect: {detail}")
        } else {
            format!("request failed: {detail}")
        };
        Outcome::Retry {
            reason,
            not_before: None,
        }
    }

    async fn deliver_batch(&self, events: &[Event]) -> Vec<Outcome> {
        let admission = self.circuit.lock().expect("circuit").admit(Instant::now());
        let (sent, held_back) = match admission {
            Admission::All => (events.len(), None),
            Admission::Probe => (
                events.len().min(1),
                Some((
                    "circuit open: probing the endpoint with one event".to_string(),
                    Duration::from_secs(1),
                )),
            ),
            Admission::Nothing { retry_in } => (
                0,
                Some((
                    format!(
                        "circuit open: {} is failing; next probe in {:?}",
                        self.shown_url, retry_in
                    ),
                    retry_in,
                )),
            ),
        };
        let mut outcomes = join_all(events[..sent].iter().map(|e| self.post(e))).await;
        let now = Instant::now();
        {
            let mut circuit = self.circuit.lock().expect("circuit");
            for outcome in outcomes.iter_mut() {
                let transition = match outcome {
                    // A 4xx reached a live endpoint: the event's fault, not the endpoint's.
                    Outcome::Delivered | Outcome::Rejected { .. } => circuit.succeeded(),
                    Outcome::Retry { reason, .. } => {
                        let transition = circuit.failed(now);
                        if admission == Admission::Probe {
                            // A failed probe is the endpoint's outage: no attempt charged.
                            *outcome = Outcome::Deferred {
                                reason: format!("probe failed: {reason}"),
                                not_before: Duration::from_secs(1),
                            };
                        }
                        transition
                    }
                    Outcome::Deferred { .. } => None,
                };
                self.report(transition);
            }
        }
        if let Some((reason, not_before)) = held_back {
            outcomes.extend(events[sent..].iter().map(|_| Outcome::Deferred {
                reason: reason.clone(),
                not_before,
            }));
        }
        outcomes
    }

    fn report(&self, transition: Option<Transition>) {
        let gauge = self
            .metrics
            .destination_circuit_open
            .with_label_values(&[&self.name]);
        match transition {
            Some(Transition::Opened { cool_down }) => {
                gauge.set(1);
                tracing::warn!(
                    destination = %self.name,
                    cool_down_ms = cool_down.as_millis() as u64,
                    "circuit opened: endpoint failing; its events wait without using attempts"
                );
            }
            Some(Transition::Closed) => {
                gauge.set(0);
                tracing::info!(destination = %self.name, "circuit closed: endpoint answers again");
            }
            None => {}
        }
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.deliver_batch(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_secret_signs_for_rotation() {
        let keys = vec![b"one".to_vec(), b"two".to_vec()];
        let signature = sign(&keys, "id", 1, b"{}");
        let parts: Vec<&str> = signature.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn secrets_must_be_base64() {
        assert!(decode_secret("whsec_not base64!").is_err());
        assert!(decode_secret("whsec_").is_err());
        assert_eq!(decode_secret("whsec_aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_secret("aGVsbG8=").unwrap(), b"hello");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn responses_are_classified() {
        let now = SystemTime::now();
        let retry = |s: u16| matches!(classify(s, None, None, "", now), Outcome::Retry { .. });
        let rejected =
            |s: u16| matches!(classify(s, None, None, "", now), Outcome::Rejected { .. });
        for status in [200, 201, 204, 299] {
            assert_eq!(classify(status, None, None, "", now), Outcome::Delivered);
        }
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(retry(status), "{status} retries");
        }
        for status in [
            300, 301, 302, 307, 308, 400, 401, 403, 404, 409, 410, 413, 422,
        ] {
            assert!(rejected(status), "{status} is permanent");
        }
        match classify(429, Some("7"), None, "slow down", now) {
            Outcome::Retry { not_before, reason } => {
                assert_eq!(not_before, Some(Duration::from_secs(7)));
                assert_eq!(reason, "HTTP 429: slow down");
            }
            other => panic!("{other:?}"),
        }
        match classify(301, None, Some("https://elsewhere/"), "", now) {
            Outcome::Rejected { reason } => {
                assert!(reason.contains("https://elsewhere/") && reason.contains("not followed"))
            }
            other => panic!("{other:?}"),
        }
    }

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
        };
        let json: serde_json::Value = serde_json::from_slice(&body(&event)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "tracking_id": "00000000-0000-0000-0000-000000000000",
                "event_type": "order.created",
                "aggregate_type": "order",
                "aggregate_id": "42",
                "payload": { "total": 12.5 },
                "metadata": { "traceparent": "x" },
                "created_at": "2023-11-14T22:13:20.123Z"
            })
        );
    }

    mod properties {
        use super::super::parse_retry_after;
        use proptest::prelude::*;
        use std::time::{Duration, SystemTime, UNIX_EPOCH};

        proptest! {
            #[test]
            fn retry_after_seconds_parse(seconds in 0u64..10_000_000) {
                let now = SystemTime::now();
                prop_assert_eq!(parse_retry_after(&seconds.to_string(), now), Some(Duration::from_secs(seconds)));
            }

            #[test]
            fn retry_after_dates_parse_to_the_delay(now_s in 1_000_000_000u64..2_000_000_000, ahead in 0u64..1_000_000) {
                let now = UNIX_EPOCH + Duration::from_secs(now_s);
                let date = httpdate::fmt_http_date(now + Duration::from_secs(ahead));
                prop_assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(ahead)));
            }

            #[test]
            fn any_retry_after_parses_or_is_ignored_without_panicking(value in ".{0,40}") {
                let _ = parse_retry_after(&value, SystemTime::now());
            }
        }
    }
}
