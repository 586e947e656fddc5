//! Configuration: defaults, then `outboxd.toml`, then `OUTBOXD_<SECTION>_<KEY>` (and
//! `DATABASE_URL`) environment variables, then CLI flags. Every value is checked at start;
//! an invalid one fails with the key, the value and the fix, before anything runs.

use crate::routing::{Router, Unrouted};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The whole configuration of one outboxd instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub listener: ListenerConfig,
    pub relay: RelayConfig,
    pub high_load: HighLoadConfig,
    pub retry: RetryConfig,
    pub rabbitmq: RabbitMqConfig,
    pub partitions: PartitionsConfig,
    pub http: HttpConfig,
    pub routing: RoutingConfig,
    /// Webhook destinations by name; a route names one as `webhook:NAME`.
    pub webhooks: BTreeMap<String, WebhookConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// An event no rule matches: `dead_letter` or `skip`. Counted either way.
    pub unrouted: Unrouted,
    /// Ordered rules; the first matching one wins. None: everything to `rabbitmq`.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Patterns such as `order.*`, `order.created`, `*`.
    pub event_types: Vec<String>,
    /// `rabbitmq` and/or `webhook:NAME`.
    pub destinations: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are POSTed (http:// or https://). Redirects are not followed.
    pub url: String,
    /// Standard Webhooks secrets (`whsec_<base64>`). Each one signs every request, so
    /// a secret can be rotated without downtime.
    pub secrets: Vec<Secret>,
    #[serde(with = "duration_text", default = "WebhookConfig::default_timeout")]
    pub timeout: Duration,
    /// Requests in flight to this endpoint at most.
    #[serde(default = "WebhookConfig::default_max_in_flight")]
    pub max_in_flight: usize,
    /// Extra headers on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Consecutive failures that open the circuit.
    #[serde(default = "WebhookConfig::default_failures_to_open")]
    pub failures_to_open: u32,
    /// How long an open circuit waits before one probe (doubles per failed probe, up to
    /// six times this).
    #[serde(with = "duration_text", default = "WebhookConfig::default_cool_down")]
    pub cool_down: Duration,
}

impl WebhookConfig {
    fn default_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_max_in_flight() -> usize {
        16
    }
    fn default_failures_to_open() -> u32 {
        5
    }
    fn default_cool_down() -> Duration {
        Duration::from_secs(5)
    }

    /// A webhook to `url` signed with `secret`, other settings at their defaults.
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            secrets: vec![Secret::new(secret)],
            timeout: Self::default_timeout(),
            max_in_flight: Self::default_max_in_flight(),
            headers: BTreeMap::new(),
            failures_to_open: Self::default_failures_to_open(),
            cool_down: Self::default_cool_down(),
        }
    }
}

/// A secret: usable, never shown (`Debug` prints `***`).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz` and the dead-letter API; empty turns
    /// the listener off.
    pub listen: String,
    /// Bearer token the dead-letter API requires; empty turns the API off.
    pub admin_token: Secret,
    /// How often the database-wide gauges (pending, oldest age, dead letters, notification
    /// queue, DEFAULT rows) are read: one statement each time, whatever the scrape rate.
    #[serde(with = "duration_text")]
    pub gauge_refresh_interval: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            admin_token: Secret::new(""),
            gauge_refresh_interval: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection string for claims and outcomes (a pooler in transaction mode is fine).
    pub url: String,
    /// Direct connection for LISTEN; empty means `url`. Point it past any pooler in
    /// transaction mode: such a pooler silently breaks LISTEN.
    pub listen_url: String,
    pub pool_size: usize,
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// An idle listener sends one cheap statement this often, so a half-open TCP
    /// connection is noticed.
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    /// TCP keepalive idle time on the listener's connection (the OS default is 2 h).
    #[serde(with = "duration_text")]
    pub keepalive_idle: Duration,
    #[serde(with = "duration_text")]
    pub reconnect_min_delay: Duration,
    #[serde(with = "duration_text")]
    pub reconnect_max_delay: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Most events one claim leases (and one delivery publishes).
    pub batch_size: usize,
    /// Batches delivered at the same time by this instance.
    pub max_in_flight_batches: usize,
    /// How long a claim owns its events; renewed while a delivery runs. The reaper
    /// returns events whose lease expired (their worker died) every `lease / 2`.
    #[serde(with = "duration_text")]
    pub lease: Duration,
    /// The safety sweep claims due PENDING events that no notification delivered.
    #[serde(with = "duration_text")]
    pub safety_sweep_interval: Duration,
    /// The safety sweep leaves events due for less than this to the push path.
    #[serde(with = "duration_text")]
    pub safety_sweep_grace: Duration,
    /// On SIGTERM: how long in-flight deliveries may finish before their events are
    /// released to PENDING.
    #[serde(with = "duration_text")]
    pub shutdown_grace: Duration,
}

/// High-load (drain) mode: under sustained load the NOTIFY trigger is switched off (its
/// commit lock serializes producers) and outboxd claims back to back instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HighLoadConfig {
    /// Off: notifications stay on whatever the load.
    pub enabled: bool,
    /// Enter drain mode when producers insert at least this many events a second
    /// (measured from the growth of event ids, so every instance sees the total).
    /// From about this rate on, claiming every `poll_interval` costs PostgreSQL no more
    /// statements than one claim per notification, and producers stop queueing for the
    /// NOTIFY commit lock.
    pub enter_rate: u64,
    /// Leave drain mode when the insert rate falls below this.
    pub exit_rate: u64,
    /// How long drain mode lasts unless renewed (every second while the load stays):
    /// the longest notifications stay off after the draining instance died.
    #[serde(with = "duration_text")]
    pub lease: Duration,
    /// In drain mode: the pause between claims that came back short.
    #[serde(with = "duration_text")]
    pub poll_interval: Duration,
}

impl Default for HighLoadConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            enter_rate: 500,
            exit_rate: 250,
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_millis(2),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts before an event becomes a dead letter (a row's own `max_attempts`
    /// column wins when set).
    pub max_attempts: i32,
    /// Delay after the first failed attempt; doubles with each attempt, with jitter.
    #[serde(with = "duration_text")]
    pub base_delay: Duration,
    #[serde(with = "duration_text")]
    pub max_delay: Duration,
}

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
    #[serde(with = "duration_text")]
    pub reconnect_min_delay: Duration,
    #[serde(with = "duration_text")]
    pub reconnect_max_delay: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionsConfig {
    /// Daily partitions are kept created this many days ahead of today (UTC).
    pub days_ahead: u32,
    /// How often `run` checks them (and the DEFAULT partition).
    #[serde(with = "duration_text")]
    pub check_interval: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            listen_url: String::new(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            keepalive_idle: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_in_flight_batches: 4,
            lease: Duration::from_secs(60),
            safety_sweep_interval: Duration::from_secs(30),
            safety_sweep_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
        }
    }
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

impl Default for PartitionsConfig {
    fn default() -> Self {
        Self {
            days_ahead: 7,
            check_interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// A configuration problem, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("config file {path} is not valid: {reason}")]
    Malformed { path: String, reason: String },
    #[error("invalid config {key} = {value:?}: {problem}; fix: {fix}")]
    Invalid {
        key: String,
        value: String,
        problem: String,
        fix: String,
    },
}

/// The environment variable that overrides `section.key`.
pub fn env_name(section: &str, key: &str) -> String {
    format!("OUTBOXD_{}_{}", section.to_uppercase(), key.to_uppercase())
}

fn invalid(section: &str, key: &str, value: impl ToString, problem: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key: format!("{section}.{key}"),
        value: value.to_string(),
        problem: problem.to_string(),
        fix: format!(
            "set `{key}` under [{section}] in outboxd.toml or the environment variable {}",
            env_name(section, key)
        ),
    }
}

impl Config {
    /// Reads `path` (if given, it must exist; `None` reads nothing), then applies the
    /// environment `env` (name, value pairs) on top, then validates.
    /// Returns the config and warnings (such as unknown `OUTBOXD_*` variables).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|error| ConfigError::Unreadable {
                        path: path.display().to_string(),
                        reason: error.to_string(),
                    })?;
                text.parse::<toml::Table>()
                    .map_err(|error| ConfigError::Malformed {
                        path: path.display().to_string(),
                        reason: error.to_string().trim().replace('\n', " "),
                    })?
            }
            None => toml::Table::new(),
        };
        let warnings = apply_env(&mut table, env)?;
        let config: Config =
            Config::deserialize(table).map_err(|error| ConfigError::Malformed {
                path: path.map_or("(environment)".into(), |p| p.display().to_string()),
                reason: error.to_string().trim().replace('\n', " "),
            })?;
        config.validate()?;
        Ok((config, warnings))
    }

    /// The URL the listener connects to.
    pub fn listen_url(&self) -> &str {
        if self.database.listen_url.is_empty() {
            &self.database.url
        } else {
            &self.database.listen_url
        }
    }

    /// Checks every value's range and shape.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.database;
        if d.url.trim().is_empty() {
            return Err(invalid(
                "database",
                "url",
                &d.url,
                "is empty (DATABASE_URL is honoured too)",
            ));
        }
        crate::tls::parse_url(&d.url).map_err(|e| invalid("database", "url", redact(&d.url), e))?;
        if !d.listen_url.is_empty() {
            crate::tls::parse_url(&d.listen_url)
                .map_err(|e| invalid("database", "listen_url", redact(&d.listen_url), e))?;
        }
        in_range("database", "pool_size", d.pool_size, 1..=256)?;
        positive("database", "connect_timeout", d.connect_timeout)?;

        let l = &self.listener;
        positive("listener", "ping_interval", l.ping_interval)?;
        positive("listener", "keepalive_idle", l.keepalive_idle)?;
        backoff_bounds("listener", l.reconnect_min_delay, l.reconnect_max_delay)?;

        let r = &self.relay;
        in_range("relay", "batch_size", r.batch_size, 1..=10_000)?;
        in_range(
            "relay",
            "max_in_flight_batches",
            r.max_in_flight_batches,
            1..=64,
        )?;
        if r.lease < Duration::from_secs(1) {
            return Err(invalid(
                "relay",
                "lease",
                show(r.lease),
                "must be at least 1s",
            ));
        }
        positive("relay", "safety_sweep_interval", r.safety_sweep_interval)?;

        let h = &self.high_load;
        in_range("high_load", "enter_rate", h.enter_rate, 1..=10_000_000)?;
        if h.exit_rate >= h.enter_rate {
            return Err(invalid(
                "high_load",
                "exit_rate",
                h.exit_rate,
                format!(
                    "must be below high_load.enter_rate ({}), or the mode would flap",
                    h.enter_rate
                ),
            ));
        }
        if h.lease < Duration::from_secs(2) {
            return Err(invalid(
                "high_load",
                "lease",
                show(h.lease),
                "must be at least 2s (drain mode is renewed every second)",
            ));
        }
        if h.poll_interval < Duration::from_millis(1) || h.poll_interval > Duration::from_secs(1) {
            return Err(invalid(
                "high_load",
                "poll_interval",
                show(h.poll_interval),
                "must be between 1ms and 1s",
            ));
        }

        let t = &self.retry;
        in_range("retry", "max_attempts", t.max_attempts, 1..=1000)?;
        positive("retry", "base_delay", t.base_delay)?;
        if t.max_delay < t.base_delay {
            return Err(invalid(
                "retry",
                "max_delay",
                show(t.max_delay),
                "must not be below retry.base_delay",
            ));
        }

        let q = &self.rabbitmq;
        if !(q.url.starts_with("amqp://") || q.url.starts_with("amqps://")) {
            return Err(invalid(
                "rabbitmq",
                "url",
                redact(&q.url),
                "must start with amqp:// or amqps://",
            ));
        }
        if q.exchange.len() > 255 {
            return Err(invalid(
                "rabbitmq",
                "exchange",
                &q.exchange,
                "is longer than 255 bytes",
            ));
        }
        if !["topic", "direct", "fanout", "headers"].contains(&q.exchange_type.as_str()) {
            return Err(invalid(
                "rabbitmq",
                "exchange_type",
                &q.exchange_type,
                "must be one of topic, direct, fanout, headers",
            ));
        }
        if q.declare_exchange && q.exchange.is_empty() {
            return Err(invalid(
                "rabbitmq",
                "declare_exchange",
                true,
                "the default exchange (empty name) cannot be declared; set declare_exchange = false",
            ));
        }
        crate::sink::rabbitmq::RoutingKeyTemplate::parse(&q.routing_key)
            .map_err(|e| invalid("rabbitmq", "routing_key", &q.routing_key, e))?;
        positive("rabbitmq", "confirm_timeout", q.confirm_timeout)?;
        in_range(
            "rabbitmq",
            "max_payload_bytes",
            q.max_payload_bytes,
            1..=536_870_912,
        )?;
        if !q.ca_file.is_empty() && !std::path::Path::new(&q.ca_file).is_file() {
            return Err(invalid(
                "rabbitmq",
                "ca_file",
                &q.ca_file,
                "is not a readable file",
            ));
        }
        backoff_bounds("rabbitmq", q.reconnect_min_delay, q.reconnect_max_delay)?;

        let p = &self.partitions;
        in_range("partitions", "days_ahead", p.days_ahead, 1..=365)?;
        positive("partitions", "check_interval", p.check_interval)?;

        let h = &self.http;
        positive("http", "gauge_refresh_interval", h.gauge_refresh_interval)?;
        if !h.admin_token.expose().is_empty() && h.admin_token.expose().len() < 16 {
            return Err(invalid(
                "http",
                "admin_token",
                "***",
                "is shorter than 16 characters; use a long random token (e.g. openssl rand -hex 32)",
            ));
        }
        if !h.listen.is_empty() && h.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http",
                "listen",
                &h.listen,
                "is not an address like 127.0.0.1:9187 (empty turns the HTTP listener off)",
            ));
        }

        for (name, webhook) in &self.webhooks {
            validate_webhook(name, webhook)?;
        }
        let router = self
            .router()
            .map_err(|e| invalid("routing", "routes", "...", e))?;
        for destination in router.destinations() {
            let known = destination == crate::routing::DEFAULT_DESTINATION
                || destination
                    .strip_prefix("webhook:")
                    .is_some_and(|name| self.webhooks.contains_key(name));
            if !known {
                let mut defined = vec!["rabbitmq".to_string()];
                defined.extend(self.webhooks.keys().map(|n| format!("webhook:{n}")));
                return Err(ConfigError::Invalid {
                    key: "routing.routes".into(),
                    value: destination,
                    problem: format!("names no destination; defined: {}", defined.join(", ")),
                    fix: "name `rabbitmq` or `webhook:NAME` for a [webhooks.NAME] section".into(),
                });
            }
        }
        Ok(())
    }

    /// The routing table of this config.
    pub fn router(&self) -> Result<Router, String> {
        let rules: Vec<(Vec<String>, Vec<String>)> = self
            .routing
            .routes
            .iter()
            .map(|r| (r.event_types.clone(), r.destinations.clone()))
            .collect();
        Router::new(&rules, self.routing.unrouted)
    }
}

fn validate_webhook(name: &str, webhook: &WebhookConfig) -> Result<(), ConfigError> {
    let bad = |key: &str, value: String, problem: String| ConfigError::Invalid {
        key: format!("webhooks.{name}.{key}"),
        value,
        problem,
        fix: format!(
            "set `{key}` under [webhooks.{name}] in outboxd.toml or the environment variable {}",
            webhook_env_name(name, key)
        ),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        return Err(bad(
            "url",
            name.to_string(),
            "a webhook name may hold only a-z, 0-9, '_' and '-'".into(),
        ));
    }
    crate::sink::webhook::check_url(&webhook.url)
        .map_err(|problem| bad("url", webhook.url.clone(), problem))?;
    if webhook.secrets.is_empty() {
        return Err(bad(
            "secrets",
            "[]".into(),
            "needs at least one Standard Webhooks secret (whsec_<base64>) to sign with".into(),
        ));
    }
    for secret in &webhook.secrets {
        crate::sink::webhook::decode_secret(secret.expose())
            .map_err(|problem| bad("secrets", "***".into(), problem))?;
    }
    if webhook.timeout.is_zero() {
        return Err(bad(
            "timeout",
            show(webhook.timeout),
            "must be greater than zero".into(),
        ));
    }
    if !(1..=1024).contains(&webhook.max_in_flight) {
        return Err(bad(
            "max_in_flight",
            webhook.max_in_flight.to_string(),
            "must be between 1 and 1024".into(),
        ));
    }
    if webhook.failures_to_open == 0 {
        return Err(bad(
            "failures_to_open",
            "0".into(),
            "must be at least 1".into(),
        ));
    }
    if webhook.cool_down.is_zero() {
        return Err(bad(
            "cool_down",
            show(webhook.cool_down),
            "must be greater than zero".into(),
        ));
    }
    for (header, value) in &webhook.headers {
        crate::sink::webhook::check_header(header, value)
            .map_err(|problem| bad("headers", header.clone(), problem))?;
    }
    Ok(())
}

/// The environment variable that overrides `key` of webhook `name`.
pub fn webhook_env_name(name: &str, key: &str) -> String {
    format!(
        "OUTBOXD_WEBHOOK_{}_{}",
        name.to_uppercase().replace('-', "_"),
        key.to_uppercase()
    )
}

fn in_range<T>(
    section: &str,
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    let problem = format!("must be between {} and {}", range.start(), range.end());
    Err(invalid(section, key, value, problem))
}

/// `reconnect_min_delay` must be positive and not above `reconnect_max_delay`.
fn backoff_bounds(section: &str, min: Duration, max: Duration) -> Result<(), ConfigError> {
    positive(section, "reconnect_min_delay", min)?;
    if max < min {
        return Err(invalid(
            section,
            "reconnect_max_delay",
            show(max),
            format!("must not be below {section}.reconnect_min_delay"),
        ));
    }
    Ok(())
}

fn positive(section: &str, key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(
            section,
            key,
            show(value),
            "must be greater than zero (e.g. \"500ms\", \"30s\", \"5m\")",
        ));
    }
    Ok(())
}

fn show(d: Duration) -> String {
    duration_text::format(d)
}

/// Hides the password of a connection URL (`scheme://user:secret@host` becomes
/// `scheme://user:***@host`), so it can be logged or printed.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value form: hide password=...
        return url
            .split_whitespace()
            .map(|part| {
                if part.starts_with("password=") {
                    "password=***"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}://{}:***{}",
                    &url[..scheme_end],
                    &userinfo[..colon],
                    &rest[at..]
                ),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// Applies `OUTBOXD_<SECTION>_<KEY>` and `DATABASE_URL` to the file's table. A value is
/// parsed as the type of the key's default (integer, boolean, text), so a typo fails here
/// with the variable's name.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut warnings = Vec::new();
    let mut known = vec![
        "OUTBOXD_CONFIG".to_string(),
        "OUTBOXD_LOG_FORMAT".to_string(),
    ];

    // DATABASE_URL first, so OUTBOXD_DATABASE_URL wins over it.
    if let Some((_, url)) = env.iter().find(|(name, _)| name == "DATABASE_URL") {
        section_mut(table, "database").insert("url".into(), toml::Value::String(url.clone()));
    }
    for (section, keys) in &defaults {
        let toml::Value::Table(keys) = keys else {
            continue;
        };
        for (key, default) in keys {
            let name = env_name(section, key);
            known.push(name.clone());
            let Some((_, raw)) = env.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            let value = match default {
                toml::Value::Integer(_) => raw
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| ConfigError::Invalid {
                        key: format!("{section}.{key}"),
                        value: raw.clone(),
                        problem: "is not a whole number".into(),
                        fix: format!("set {name} to a whole number, e.g. {default}"),
                    })?,
                toml::Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                    "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                    _ => {
                        return Err(ConfigError::Invalid {
                            key: format!("{section}.{key}"),
                            value: raw.clone(),
                            problem: "is not a boolean".into(),
                            fix: format!("set {name} to true or false"),
                        });
                    }
                },
                toml::Value::Array(_) if section == "routing" && key == "routes" => {
                    parse_routes(raw).map_err(|problem| ConfigError::Invalid {
                        key: "routing.routes".into(),
                        value: raw.clone(),
                        problem,
                        fix: format!(
                            "write {name} as \"order.*=rabbitmq,webhook:billing; *=rabbitmq\" (rules in order, patterns joined with |)"
                        ),
                    })?
                }
                _ => toml::Value::String(raw.clone()),
            };
            section_mut(table, section).insert(key.clone(), value);
        }
    }
    apply_webhook_env(table, &env, &mut known)?;
    for (name, _) in &env {
        if name.starts_with("OUTBOXD_") && !known.contains(name) {
            warnings.push(format!(
                "environment variable {name} is not a known setting and was ignored (settings are OUTBOXD_<SECTION>_<KEY>, e.g. OUTBOXD_RELAY_BATCH_SIZE)"
            ));
        }
    }
    Ok(warnings)
}

/// `OUTBOXD_ROUTING_ROUTES`: `"order.*|invoice.*=rabbitmq,webhook:billing; *=rabbitmq"`.
fn parse_routes(raw: &str) -> Result<toml::Value, String> {
    let mut routes = Vec::new();
    for rule in raw.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (patterns, destinations) = rule
            .split_once('=')
            .ok_or_else(|| format!("rule {rule:?} has no '='"))?;
        let list = |text: &str, separator: char| -> toml::Value {
            toml::Value::Array(
                text.split(separator)
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| toml::Value::String(t.to_string()))
                    .collect(),
            )
        };
        let mut route = toml::Table::new();
        route.insert("event_types".into(), list(patterns, '|'));
        route.insert("destinations".into(), list(destinations, ','));
        routes.push(toml::Value::Table(route));
    }
    Ok(toml::Value::Array(routes))
}

/// `OUTBOXD_WEBHOOK_<NAME>_<KEY>` defines or overrides webhook `name` (lowercased):
/// `URL`, `SECRET`/`SECRETS` (several separated by spaces or commas), `TIMEOUT`,
/// `MAX_IN_FLIGHT`, `FAILURES_TO_OPEN`, `COOL_DOWN`.
fn apply_webhook_env(
    table: &mut toml::Table,
    env: &[(String, String)],
    known: &mut Vec<String>,
) -> Result<(), ConfigError> {
    const KEYS: [&str; 7] = [
        "_MAX_IN_FLIGHT",
        "_FAILURES_TO_OPEN",
        "_COOL_DOWN",
        "_SECRETS",
        "_SECRET",
        "_TIMEOUT",
        "_URL",
    ];
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("OUTBOXD_WEBHOOK_") else {
            continue;
        };
        let Some(suffix) = KEYS.iter().find(|k| rest.ends_with(*k)) else {
            continue;
        };
        let webhook = rest[..rest.len() - suffix.len()].to_lowercase();
        if webhook.is_empty() {
            continue;
        }
        known.push(name.clone());
        let key = suffix[1..].to_lowercase();
        let value = match key.as_str() {
            "secret" | "secrets" => toml::Value::Array(
                raw.split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            "max_in_flight" | "failures_to_open" => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| ConfigError::Invalid {
                    key: format!("webhooks.{webhook}.{key}"),
                    value: raw.clone(),
                    problem: "is not a whole number".into(),
                    fix: format!("set {name} to a whole number"),
                })?)
            }
            _ => toml::Value::String(raw.clone()),
        };
        let key = if key == "secret" {
            "secrets".to_string()
        } else {
            key
        };
        let webhooks = section_mut(table, "webhooks");
        let entry = webhooks
            .entry(webhook)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(entry) = entry.as_table_mut() {
            entry.insert(key, value);
        }
    }
    Ok(())
}

fn section_mut<'a>(table: &'a mut toml::Table, section: &str) -> &'a mut toml::Table {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    entry.as_table_mut().expect("just made a table")
}

/// Durations as text: `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`.
pub mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                format!("{text:?} has no unit: write it like \"500ms\", \"30s\", \"5m\", \"1h\"")
            })?;
        let (number, unit) = text.split_at(split);
        let number: f64 = number.parse().map_err(|_| {
            format!("{text:?} is not a duration: write it like \"500ms\", \"30s\", \"5m\", \"1h\"")
        })?;
        let seconds = match unit.trim() {
            "ms" => number / 1000.0,
            "s" => number,
            "m" | "min" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86400.0,
            other => {
                return Err(format!(
                    "{text:?} has an unknown unit {other:?}: use ms, s, m, h or d"
                ));
            }
        };
        if !seconds.is_finite() || seconds > 10.0 * 365.0 * 86400.0 {
            return Err(format!("{text:?} is too long"));
        }
        Ok(Duration::from_secs_f64(seconds))
    }

    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if !ms.is_multiple_of(1000) {
            format!("{ms}ms")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            format!("{}m", ms / 60_000)
        } else {
            format!("{}s", ms / 1000)
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let (config, warnings) = Config::load(None, env(&[])).unwrap();
        assert_eq!(config, Config::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn env_overrides_file_and_database_url_is_honoured() {
        let dir = std::env::temp_dir().join(format!("outboxd-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outboxd.toml");
        std::fs::write(&path, "[relay]\nbatch_size = 50\nlease = \"10s\"\n").unwrap();
        let (config, _) = Config::load(
            Some(&path),
            env(&[
                ("DATABASE_URL", "postgres://a@h/db1"),
                ("OUTBOXD_RELAY_BATCH_SIZE", "70"),
                ("OUTBOXD_RABBITMQ_DECLARE_EXCHANGE", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(config.relay.batch_size, 70);
        assert_eq!(config.relay.lease, Duration::from_secs(10));
        assert_eq!(config.database.url, "postgres://a@h/db1");
        assert!(!config.rabbitmq.declare_exchange);
        let (config, _) = Config::load(
            None,
            env(&[
                ("DATABASE_URL", "postgres://a@h/db1"),
                ("OUTBOXD_DATABASE_URL", "postgres://b@h/db2"),
            ]),
        )
        .unwrap();
        assert_eq!(config.database.url, "postgres://b@h/db2");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn invalid_values_name_key_value_and_fix() {
        let error = Config::load(None, env(&[("OUTBOXD_RELAY_BATCH_SIZE", "0")])).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("relay.batch_size"), "{text}");
        assert!(text.contains("\"0\""), "{text}");
        assert!(text.contains("OUTBOXD_RELAY_BATCH_SIZE"), "{text}");

        let error = Config::load(None, env(&[("OUTBOXD_RELAY_BATCH_SIZE", "many")])).unwrap_err();
        assert!(error.to_string().contains("not a whole number"), "{error}");

        let error = Config::load(None, env(&[("OUTBOXD_RELAY_LEASE", "10 parsecs")])).unwrap_err();
        assert!(error.to_string().contains("unknown unit"), "{error}");

        let error = Config::load(None, env(&[("OUTBOXD_RABBITMQ_URL", "http://x")])).unwrap_err();
        assert!(error.to_string().contains("rabbitmq.url"), "{error}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_and_unknown_env_is_warned() {
        let dir = std::env::temp_dir().join(format!("outboxd-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outboxd.toml");
        std::fs::write(&path, "[relay]\nbatchsize = 50\n").unwrap();
        let error = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(error.to_string().contains("batchsize"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();

        let (_, warnings) = Config::load(None, env(&[("OUTBOXD_RELAY_BATCHSIZE", "5")])).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("OUTBOXD_RELAY_BATCHSIZE"));
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(
            duration_text::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            duration_text::parse("1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            duration_text::parse("5m").unwrap(),
            Duration::from_secs(300)
        );
        assert_eq!(
            duration_text::parse("1h").unwrap(),
            Duration::from_secs(3600)
        );
        assert!(duration_text::parse("30").is_err());
        assert!(duration_text::parse("").is_err());
        assert_eq!(duration_text::format(Duration::from_millis(250)), "250ms");
        assert_eq!(duration_text::format(Duration::from_secs(300)), "5m");
        assert_eq!(duration_text::format(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("host=h password=x user=u"),
            "host=h password=*** user=u"
        );
    }

    #[test]
    fn routes_and_webhooks_come_from_the_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("outboxd-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outboxd.toml");
        std::fs::write(
            &path,
            r#"
[routing]
unrouted = "skip"

[[routing.routes]]
event_types = ["order.*"]
destinations = ["rabbitmq", "webhook:billing"]

[webhooks.billing]
url = "https://billing.example/hooks"
secrets = ["whsec_aGVsbG8="]
timeout = "3s"
headers = { "x-env" = "test" }
"#,
        )
        .unwrap();
        let (config, warnings) = Config::load(Some(&path), env(&[])).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(config.routing.unrouted, Unrouted::Skip);
        assert_eq!(config.webhooks["billing"].timeout, Duration::from_secs(3));
        assert_eq!(config.webhooks["billing"].max_in_flight, 16);
        assert!(
            !format!("{config:?}").contains("aGVsbG8"),
            "secrets are never shown"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let (config, warnings) = Config::load(
            None,
            env(&[
                ("OUTBOXD_WEBHOOK_CRM_URL", "http://127.0.0.1:9/in"),
                (
                    "OUTBOXD_WEBHOOK_CRM_SECRETS",
                    "whsec_aGVsbG8= whsec_d29ybGQ=",
                ),
                ("OUTBOXD_WEBHOOK_CRM_MAX_IN_FLIGHT", "4"),
                (
                    "OUTBOXD_ROUTING_ROUTES",
                    "order.*|invoice.*=rabbitmq,webhook:crm; *=rabbitmq",
                ),
            ]),
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.webhooks["crm"].secrets.len(), 2);
        assert_eq!(config.webhooks["crm"].max_in_flight, 4);
        assert_eq!(config.routing.routes.len(), 2);
        assert_eq!(
            config.routing.routes[0].event_types,
            vec!["order.*", "invoice.*"]
        );
        assert_eq!(config.routing.routes[1].destinations, vec!["rabbitmq"]);
    }

    #[test]
    fn routes_to_undefined_webhooks_and_bad_secrets_are_refused() {
        let error =
            Config::load(None, env(&[("OUTBOXD_ROUTING_ROUTES", "*=webhook:nope")])).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("webhook:nope") && text.contains("defined: rabbitmq"),
            "{text}"
        );

        let error = Config::load(
            None,
            env(&[
                ("OUTBOXD_WEBHOOK_CRM_URL", "http://127.0.0.1:9/in"),
                ("OUTBOXD_WEBHOOK_CRM_SECRET", "whsec_topsecret!!"),
            ]),
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("webhooks.crm.secrets"), "{text}");
        assert!(
            !text.contains("topsecret"),
            "the secret is not shown: {text}"
        );
        assert!(text.contains("OUTBOXD_WEBHOOK_CRM_SECRETS"), "{text}");

        let error = Config::load(
            None,
            env(&[
                ("OUTBOXD_WEBHOOK_CRM_URL", "ftp://x/"),
                ("OUTBOXD_WEBHOOK_CRM_SECRET", "whsec_aGVsbG8="),
            ]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("webhooks.crm.url"), "{error}");
    }

    mod properties {
        use super::super::{Config, duration_text};
        use proptest::prelude::*;
        use std::time::Duration;

        proptest! {
            #[test]
            fn durations_round_trip(ms in 1u64..100_000_000) {
                let d = Duration::from_millis(ms);
                prop_assert_eq!(duration_text::parse(&duration_text::format(d)).unwrap(), d);
            }

            #[test]
            fn batch_sizes_are_accepted_or_refused_with_the_key(value in "[-0-9a-z ]{0,8}") {
                let env = vec![("OUTBOXD_RELAY_BATCH_SIZE".to_string(), value.clone())];
                match Config::load(None, env) {
                    Ok((config, _)) => prop_assert!((1..=10_000).contains(&config.relay.batch_size)),
                    Err(error) => prop_assert!(error.to_string().contains("relay.batch_size"), "{}", error),
                }
            }

            #[test]
            fn any_duration_text_parses_or_is_refused_without_panicking(text in ".{0,16}") {
                let _ = duration_text::parse(&text);
            }
        }
    }
}
