//! Configuration: defaults, then `outboxd.toml`, then `OUTBOXD_<SECTION>_<KEY>` (and
//! `DATABASE_URL`) environment variables, then CLI flags. Every value is checked at start;
//! an invalid one fails with the key, the value and the fix, before anything runs.

use crate::duration_text;
use crate::ordering::{OnDeadLetter, OrderRule, Ordering};
use crate::routing::{Router, Unrouted};
use crate::sink::DestinationConfig;
use crate::validate::{Setting, backoff_bounds, show};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub use crate::secret::{Secret, redact};
pub use crate::sink::rabbitmq::RabbitMqConfig;
pub use crate::sink::webhook::WebhookConfig;
pub use crate::store::DatabaseConfig;
pub use crate::store::retention::OnExpiry;
pub use crate::validate::{ConfigError, env_name};

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
    /// This route's own ordering (`none` or `per_aggregate`); unset: `relay.ordering`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
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
pub struct ListenerConfig {
    /// An idle listener sends one cheap statement this often, so a half-open TCP
    /// connection is noticed.
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    /// While other instances share the database, this instance renews its membership
    /// and reads who else is live this often (alone: every `ping_interval`). A member
    /// that stopped renewing for four intervals is dropped and its share of the
    /// notified events taken over; one whose process died is dropped at once.
    #[serde(with = "duration_text")]
    pub heartbeat_interval: Duration,
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
    /// `per_aggregate`: at most one event of an aggregate in flight, each destination
    /// receiving an aggregate's events in id order; `none`: no promise about order.
    /// Database-wide: every instance of a database must say the same.
    pub ordering: Ordering,
    /// With ordering, what a dead letter does to the later events of its aggregate:
    /// `block` (they wait until it is redriven or discarded) or `skip` (they go on).
    pub ordering_dead_letters: OnDeadLetter,
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
pub struct PartitionsConfig {
    /// Daily partitions are kept created this many days ahead of today (UTC).
    pub days_ahead: u32,
    /// How often `run` checks them, empties the DEFAULT partition and applies the
    /// retention.
    #[serde(with = "duration_text")]
    pub check_interval: Duration,
    /// A daily partition this much older than its last day is dropped (or detached)
    /// once every row in it is PUBLISHED or a dead letter (dead letters are kept apart).
    #[serde(with = "duration_text")]
    pub retention: Duration,
    /// `drop` or `detach` (the table stays, outside outbox, for an archive job).
    pub on_expiry: OnExpiry,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(2),
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
            ordering: Ordering::None,
            ordering_dead_letters: OnDeadLetter::Block,
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

impl Default for PartitionsConfig {
    fn default() -> Self {
        Self {
            days_ahead: 7,
            check_interval: Duration::from_secs(3600),
            retention: Duration::from_secs(7 * 86400),
            on_expiry: OnExpiry::Drop,
        }
    }
}

/// A loaded config and the layers it was made of.
#[derive(Debug, Clone)]
pub struct Layers {
    pub config: Config,
    /// Warnings such as unknown `OUTBOXD_*` variables.
    pub warnings: Vec<String>,
    /// What the file set (empty without a file).
    pub file: toml::Table,
    /// What the environment set.
    pub from_env: toml::Table,
}

impl Config {
    /// Reads `path` (if given, it must exist; `None` reads nothing), then applies the
    /// environment `env` (name, value pairs) on top, then validates.
    /// Returns the config and warnings (such as unknown `OUTBOXD_*` variables).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let layers = Config::load_layers(path, env)?;
        Ok((layers.config, layers.warnings))
    }

    /// [`Config::load`], keeping what the file and the environment each set (for
    /// `outboxd config show`, which says where every value came from).
    pub fn load_layers(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Layers, ConfigError> {
        let env = read_secret_files(env.into_iter().collect())?;
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
                        reason: crate::validate::plain_words(&error.to_string()),
                    })?
            }
            None => toml::Table::new(),
        };
        let file = table.clone();
        let mut from_env = toml::Table::new();
        apply_env(&mut from_env, env.iter().cloned())?;
        let warnings = apply_env(&mut table, env)?;
        let config: Config = Config::deserialize(table).map_err(|error| {
            let reason = crate::validate::plain_words(&error.to_string());
            match path {
                Some(path) => ConfigError::Malformed {
                    path: path.display().to_string(),
                    reason,
                },
                None => ConfigError::EnvironmentInvalid { reason },
            }
        })?;
        config.validate()?;
        Ok(Layers {
            config,
            warnings,
            file,
            from_env,
        })
    }

    /// Checks every value's range and shape.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.check()?;

        let l = &self.listener;
        let at = |key| Setting::at("listener", key);
        at("ping_interval").positive(l.ping_interval)?;
        at("heartbeat_interval").positive(l.heartbeat_interval)?;
        at("keepalive_idle").positive(l.keepalive_idle)?;
        backoff_bounds("listener", l.reconnect_min_delay, l.reconnect_max_delay)?;

        let r = &self.relay;
        let at = |key| Setting::at("relay", key);
        at("batch_size").in_range(r.batch_size, 1..=10_000)?;
        at("max_in_flight_batches").in_range(r.max_in_flight_batches, 1..=64)?;
        if r.lease < Duration::from_secs(1) {
            return Err(at("lease").invalid(show(r.lease), "must be at least 1s"));
        }
        at("safety_sweep_interval").positive(r.safety_sweep_interval)?;

        let h = &self.high_load;
        let at = |key| Setting::at("high_load", key);
        at("enter_rate").in_range(h.enter_rate, 1..=10_000_000)?;
        if h.exit_rate >= h.enter_rate {
            return Err(at("exit_rate").invalid(
                h.exit_rate,
                format!(
                    "must be below high_load.enter_rate ({}), or the mode would flap",
                    h.enter_rate
                ),
            ));
        }
        if h.lease < Duration::from_secs(2) {
            return Err(at("lease").invalid(
                show(h.lease),
                "must be at least 2s (drain mode is renewed every second)",
            ));
        }
        if h.poll_interval < Duration::from_millis(1) || h.poll_interval > Duration::from_secs(1) {
            return Err(
                at("poll_interval").invalid(show(h.poll_interval), "must be between 1ms and 1s")
            );
        }

        let t = &self.retry;
        let at = |key| Setting::at("retry", key);
        at("max_attempts").in_range(t.max_attempts, 1..=1000)?;
        at("base_delay").positive(t.base_delay)?;
        if t.max_delay < t.base_delay {
            return Err(
                at("max_delay").invalid(show(t.max_delay), "must not be below retry.base_delay")
            );
        }

        let p = &self.partitions;
        let at = |key| Setting::at("partitions", key);
        at("days_ahead").in_range(p.days_ahead, 1..=365)?;
        at("check_interval").positive(p.check_interval)?;
        if p.retention < Duration::from_secs(86400) {
            return Err(at("retention").invalid(
                show(p.retention),
                "must be at least 1d (partitions hold a day each); write e.g. \"7d\", or \"3650d\" to keep everything",
            ));
        }

        let h = &self.http;
        let at = |key| Setting::at("http", key);
        at("gauge_refresh_interval").positive(h.gauge_refresh_interval)?;
        if !h.admin_token.expose().is_empty() && h.admin_token.expose().len() < 16 {
            return Err(at("admin_token").invalid(
                "***",
                "is shorter than 16 characters; use a long random token (e.g. openssl rand -hex 32)",
            ));
        }
        if !h.listen.is_empty() && h.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(at("listen").invalid(
                &h.listen,
                "is not an address like 127.0.0.1:9187 (empty turns the HTTP listener off)",
            ));
        }

        for destination in self.destinations() {
            destination.validate()?;
        }
        let router = self
            .router()
            .map_err(|e| Setting::at("routing", "routes").invalid("...", e))?;
        let defined = crate::sink::defined(&self.destinations());
        for destination in router.destinations() {
            if !defined.contains(&destination) {
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

    /// Every destination's config. A new destination is one more entry here.
    pub fn destinations(&self) -> [&dyn DestinationConfig; 2] {
        [&self.rabbitmq, &self.webhooks]
    }

    /// The claim rule of this config's ordering (the default and each route's own).
    pub fn order_rule(&self) -> Result<OrderRule, String> {
        let rules: Vec<(Vec<String>, Option<Ordering>)> = self
            .routing
            .routes
            .iter()
            .map(|r| (r.event_types.clone(), r.ordering))
            .collect();
        OrderRule::new(
            self.relay.ordering,
            self.relay.ordering_dead_letters,
            &rules,
        )
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

/// `NAME_FILE=/path` stands for `NAME=<the file's content>` (trailing newlines removed)
/// for every setting variable (`DATABASE_URL_FILE`, `OUTBOXD_RABBITMQ_URL_FILE`,
/// `OUTBOXD_WEBHOOK_BILLING_SECRETS_FILE`, ...), so secrets can come from Docker or
/// Kubernetes secret files. Both forms of one variable at once is an error, and so is a
/// file that cannot be read. A setting whose own name ends in `_FILE`
/// (`OUTBOXD_RABBITMQ_CA_FILE`) is a setting, not a file variant.
fn read_secret_files(env: Vec<(String, String)>) -> Result<Vec<(String, String)>, ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    let settings: Vec<String> = defaults
        .iter()
        .filter_map(|(section, keys)| Some((section, keys.as_table()?)))
        .flat_map(|(section, keys)| keys.keys().map(move |key| env_name(section, key)))
        .chain(["DATABASE_URL".to_string()])
        .collect();
    let is_setting = |name: &str| {
        settings.iter().any(|s| s == name)
            || (name.starts_with("OUTBOXD_WEBHOOK_")
                && crate::sink::webhook::config::ENV_KEYS
                    .iter()
                    .any(|key| name.ends_with(key)))
    };
    let mut out = Vec::with_capacity(env.len());
    for (name, value) in &env {
        let Some(base) = name.strip_suffix("_FILE") else {
            out.push((name.clone(), value.clone()));
            continue;
        };
        if is_setting(name) || !is_setting(base) {
            out.push((name.clone(), value.clone()));
            continue;
        }
        if env.iter().any(|(other, _)| other == base) {
            return Err(ConfigError::Invalid {
                key: base.to_string(),
                value: format!("{base} and {name} are both set"),
                problem: "one value given twice".into(),
                fix: format!("set either {base} or {name}, not both"),
            });
        }
        let content = std::fs::read_to_string(value).map_err(|error| ConfigError::Invalid {
            key: name.clone(),
            value: value.clone(),
            problem: format!("cannot read the file: {error}"),
            fix: format!("point {name} at a readable file holding the value of {base}"),
        })?;
        out.push((
            base.to_string(),
            content.trim_end_matches(['\n', '\r']).to_string(),
        ));
    }
    Ok(out)
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
    known.extend(crate::sink::webhook::config::apply_env(
        section_mut(table, "webhooks"),
        &env,
    )?);
    for (name, _) in &env {
        if name.starts_with("OUTBOXD_") && !known.contains(name) {
            warnings.push(format!(
                "environment variable {name} is not a known setting and was ignored (settings are OUTBOXD_<SECTION>_<KEY>, e.g. OUTBOXD_RELAY_BATCH_SIZE)"
            ));
        }
    }
    Ok(warnings)
}

/// `OUTBOXD_ROUTING_ROUTES`: `"order.*|invoice.*=rabbitmq,webhook:billing; *=rabbitmq"`;
/// a rule's own ordering follows its destinations after `@`: `audit.*=rabbitmq@none`.
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
        let destinations = match destinations.split_once('@') {
            Some((destinations, ordering)) => {
                route.insert(
                    "ordering".into(),
                    toml::Value::String(ordering.trim().to_string()),
                );
                destinations
            }
            None => destinations,
        };
        route.insert("event_types".into(), list(patterns, '|'));
        route.insert("destinations".into(), list(destinations, ','));
        routes.push(toml::Value::Table(route));
    }
    Ok(toml::Value::Array(routes))
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
    fn settings_can_be_read_from_files() {
        let dir = std::env::temp_dir().join(format!("outboxd-files-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = dir.join("database_url");
        std::fs::write(&url, "postgres://app:FROMFILE@db/app\n").unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not read by load").unwrap();
        let path = |p: &std::path::Path| p.display().to_string();
        let (config, warnings) = Config::load(
            None,
            vec![
                ("DATABASE_URL_FILE".to_string(), path(&url)),
                (
                    "OUTBOXD_WEBHOOK_BILLING_URL".to_string(),
                    "https://hooks.example/in".to_string(),
                ),
                (
                    "OUTBOXD_WEBHOOK_BILLING_SECRETS_FILE".to_string(),
                    path(&secret),
                ),
                // A setting of its own, not the file variant of OUTBOXD_RABBITMQ_CA.
                ("OUTBOXD_RABBITMQ_CA_FILE".to_string(), path(&ca)),
                (
                    "OUTBOXD_ROUTING_ROUTES".to_string(),
                    "*=webhook:billing".to_string(),
                ),
            ],
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.database.url, "postgres://app:FROMFILE@db/app");
        assert_eq!(
            config.webhooks["billing"].secrets[0].expose(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        );
        assert_eq!(config.rabbitmq.ca_file, path(&ca));
        let both = Config::load(
            None,
            vec![
                ("DATABASE_URL_FILE".to_string(), path(&url)),
                (
                    "DATABASE_URL".to_string(),
                    "postgres://x@db/app".to_string(),
                ),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            both.contains("either DATABASE_URL or DATABASE_URL_FILE"),
            "{both}"
        );
        let missing = Config::load(
            None,
            vec![(
                "OUTBOXD_RABBITMQ_URL_FILE".to_string(),
                path(&dir.join("nope")),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(
            missing.contains("OUTBOXD_RABBITMQ_URL_FILE") && missing.contains("cannot read"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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

        let error =
            Config::load(None, env(&[("OUTBOXD_PARTITIONS_RETENTION", "12h")])).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("partitions.retention"), "{text}");
        assert!(text.contains("at least 1d"), "{text}");
        let error =
            Config::load(None, env(&[("OUTBOXD_PARTITIONS_ON_EXPIRY", "archive")])).unwrap_err();
        assert!(
            error.to_string().contains("partitions.on_expiry"),
            "{error}"
        );
        let (config, _) = Config::load(
            None,
            env(&[
                ("OUTBOXD_PARTITIONS_RETENTION", "30d"),
                ("OUTBOXD_PARTITIONS_ON_EXPIRY", "detach"),
            ]),
        )
        .unwrap();
        assert_eq!(config.partitions.retention, Duration::from_secs(30 * 86400));
        assert_eq!(config.partitions.on_expiry, OnExpiry::Detach);
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
                    "order.*|invoice.*=rabbitmq,webhook:crm; *=rabbitmq @ none",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(config.routing.routes[0].ordering, None);
        assert_eq!(
            config.routing.routes[1].ordering,
            Some(crate::ordering::Ordering::None)
        );
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
    fn an_unknown_ordering_is_refused_with_the_key_and_the_choices() {
        for (name, value, key) in [
            ("OUTBOXD_RELAY_ORDERING", "sorted", "relay.ordering"),
            (
                "OUTBOXD_RELAY_ORDERING_DEAD_LETTERS",
                "wait",
                "ordering_dead_letters",
            ),
            (
                "OUTBOXD_ROUTING_ROUTES",
                "*=rabbitmq@strict",
                "routing.routes",
            ),
        ] {
            let text = Config::load(None, env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(text.contains(key), "{key} in: {text}");
            let given = value.rsplit('@').next().unwrap_or(value);
            assert!(text.contains(given), "{given} in: {text}");
            let choices = if key == "ordering_dead_letters" {
                ["block", "skip"]
            } else {
                ["none", "per_aggregate"]
            };
            for choice in choices {
                assert!(text.contains(choice), "{choice} in: {text}");
            }
        }
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
        use super::super::Config;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn batch_sizes_are_accepted_or_refused_with_the_key(value in "[-0-9a-z ]{0,8}") {
                let env = vec![("OUTBOXD_RELAY_BATCH_SIZE".to_string(), value.clone())];
                match Config::load(None, env) {
                    Ok((config, _)) => prop_assert!((1..=10_000).contains(&config.relay.batch_size)),
                    Err(error) => prop_assert!(error.to_string().contains("relay.batch_size"), "{}", error),
                }
            }


        }
    }
}
