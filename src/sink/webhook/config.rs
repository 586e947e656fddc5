//! `[webhooks.NAME]`: one endpoint's URL, secrets, limits and circuit, with its defaults,
//! its checks and its environment variables (`OUTBOXD_WEBHOOK_<NAME>_<KEY>`).

use super::signature::decode_secret;
use crate::duration_text;
use crate::secret::Secret;
use crate::sink::circuit::CircuitSettings;
use crate::validate::{ConfigError, Setting, show};
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

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

    /// Checks every value of webhook `name`.
    pub fn check(&self, name: &str) -> Result<(), ConfigError> {
        let at = |key: &str| Setting::new(&format!("webhooks.{name}"), key, env_name(name, key));
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(
                at("url").invalid(name, "a webhook name may hold only a-z, 0-9, '_' and '-'")
            );
        }
        check_url(&self.url).map_err(|problem| at("url").invalid(shown(&self.url), problem))?;
        if self.secrets.is_empty() {
            return Err(at("secrets").invalid(
                "[]",
                "needs at least one Standard Webhooks secret (whsec_<base64>) to sign with",
            ));
        }
        for secret in &self.secrets {
            decode_secret(secret.expose())
                .map_err(|problem| at("secrets").invalid("***", problem))?;
        }
        at("timeout").positive(self.timeout)?;
        at("max_in_flight").in_range(self.max_in_flight, 1..=1024)?;
        if self.failures_to_open == 0 {
            return Err(at("failures_to_open").invalid(0, "must be at least 1"));
        }
        if self.cool_down.is_zero() {
            return Err(at("cool_down").invalid(show(self.cool_down), "must be greater than zero"));
        }
        for (header, value) in &self.headers {
            check_header(header, value)
                .map_err(|problem| at("headers").invalid(header, problem))?;
        }
        Ok(())
    }

    /// The circuit around this endpoint.
    pub fn circuit(&self) -> CircuitSettings {
        CircuitSettings {
            failures_to_open: self.failures_to_open,
            cool_down: self.cool_down,
            max_cool_down: self.cool_down * 6,
            probe_timeout: self.timeout + Duration::from_secs(5),
        }
    }
}

/// A URL as outboxd shows it (logs, errors, `last_error`): scheme, host and port only.
/// Webhook URLs often carry their credentials in the path or the query
/// (`.../services/T000/B000/XXXX`, `?token=...`), so neither is ever shown, nor a
/// password.
pub fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let host = parsed.host_str().unwrap_or("");
            let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
            let rest = if parsed.path() != "/" || parsed.query().is_some() {
                "/…"
            } else {
                "/"
            };
            format!("{}://{host}{port}{rest}", parsed.scheme())
        }
        Err(_) => "(a URL that does not parse)".into(),
    }
}

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

/// The environment variable that overrides `key` of webhook `name`.
pub fn env_name(name: &str, key: &str) -> String {
    format!(
        "OUTBOXD_WEBHOOK_{}_{}",
        name.to_uppercase().replace('-', "_"),
        key.to_uppercase()
    )
}

/// The `_<KEY>` endings of `OUTBOXD_WEBHOOK_<NAME>_<KEY>`, longest first where one ends
/// another.
pub const ENV_KEYS: [&str; 7] = [
    "_MAX_IN_FLIGHT",
    "_FAILURES_TO_OPEN",
    "_COOL_DOWN",
    "_SECRETS",
    "_SECRET",
    "_TIMEOUT",
    "_URL",
];

/// Applies `OUTBOXD_WEBHOOK_<NAME>_<KEY>` to the `[webhooks]` table of the config file:
/// defines or overrides webhook `name` (lowercased). Keys: `URL`, `SECRET`/`SECRETS`
/// (several separated by spaces or commas), `TIMEOUT`, `MAX_IN_FLIGHT`,
/// `FAILURES_TO_OPEN`, `COOL_DOWN`. Returns the variables it used.
pub fn apply_env(
    webhooks: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<String>, ConfigError> {
    const KEYS: [&str; 7] = ENV_KEYS;
    let mut used = Vec::new();
    for (variable, raw) in env {
        let Some(rest) = variable.strip_prefix("OUTBOXD_WEBHOOK_") else {
            continue;
        };
        let Some(suffix) = KEYS.iter().find(|k| rest.ends_with(*k)) else {
            continue;
        };
        let webhook = rest[..rest.len() - suffix.len()].to_lowercase();
        if webhook.is_empty() {
            continue;
        }
        used.push(variable.clone());
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
                    fix: format!("set {variable} to a whole number"),
                })?)
            }
            _ => toml::Value::String(raw.clone()),
        };
        let key = if key == "secret" {
            "secrets".to_string()
        } else {
            key
        };
        let entry = webhooks
            .entry(webhook)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(entry) = entry.as_table_mut() {
            entry.insert(key, value);
        }
    }
    Ok(used)
}
