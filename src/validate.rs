//! The words of a configuration error: [`ConfigError`], and the checks every part of the
//! configuration uses to build one. Each error names the key, the value, the problem and
//! the fix (the key in outboxd.toml and its environment variable), so whoever reads it
//! knows what to change without reading code. Shared by the top-level config and every
//! destination's own config, so neither imports the other.

use crate::duration_text;
use std::time::Duration;

/// A configuration problem, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("config file {path} is not valid: {reason}")]
    Malformed { path: String, reason: String },
    #[error("the configuration from the environment is not valid: {reason}")]
    EnvironmentInvalid { reason: String },
    #[error("invalid config {key} = {value:?}: {problem}; fix: {fix}")]
    Invalid {
        key: String,
        value: String,
        problem: String,
        fix: String,
    },
}

/// A deserializer's complaint in the operator's words: Rust type names become what they
/// mean (`expected usize` is `expected a whole number`).
pub fn plain_words(reason: &str) -> String {
    let mut text = reason.trim().replace('\n', " ");
    for (rust, plain) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected a string", "expected text in quotes"),
        ("expected a sequence", "expected a list [...]"),
        ("expected struct", "expected a table of"),
        ("expected a map", "expected a table"),
    ] {
        text = text.replace(rust, plain);
    }
    text
}

/// The environment variable that overrides `section.key`.
pub fn env_name(section: &str, key: &str) -> String {
    format!("OUTBOXD_{}_{}", section.to_uppercase(), key.to_uppercase())
}

/// Where a setting lives: its key in outboxd.toml and the environment variable that
/// overrides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// `relay.batch_size`, `webhooks.billing.url`.
    pub key: String,
    /// The table it sits under in the file: `[relay]`, `[webhooks.billing]`.
    pub table: String,
    /// The last part of the key: `batch_size`.
    pub name: String,
    pub env: String,
}

impl Setting {
    /// `key` under `[section]`, overridden by `OUTBOXD_<SECTION>_<KEY>`.
    pub fn at(section: &str, key: &str) -> Setting {
        Setting {
            key: format!("{section}.{key}"),
            table: section.to_string(),
            name: key.to_string(),
            env: env_name(section, key),
        }
    }

    /// A setting with its own table and environment variable.
    pub fn new(table: &str, key: &str, env: String) -> Setting {
        Setting {
            key: format!("{table}.{key}"),
            table: table.to_string(),
            name: key.to_string(),
            env,
        }
    }

    /// `value` of this setting is wrong because of `problem`.
    pub fn invalid(&self, value: impl ToString, problem: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            key: self.key.clone(),
            value: value.to_string(),
            problem: problem.to_string(),
            fix: format!(
                "set `{}` under [{}] in outboxd.toml or the environment variable {}",
                self.name, self.table, self.env
            ),
        }
    }

    /// `value` must lie in `range`.
    pub fn in_range<T>(
        &self,
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
        Err(self.invalid(value, problem))
    }

    /// A duration that must be greater than zero.
    pub fn positive(&self, value: Duration) -> Result<(), ConfigError> {
        if value.is_zero() {
            return Err(self.invalid(
                show(value),
                "must be greater than zero (e.g. \"500ms\", \"30s\", \"5m\")",
            ));
        }
        Ok(())
    }
}

/// `reconnect_min_delay` under `[section]` must be positive and not above
/// `reconnect_max_delay`.
pub fn backoff_bounds(section: &str, min: Duration, max: Duration) -> Result<(), ConfigError> {
    Setting::at(section, "reconnect_min_delay").positive(min)?;
    if max < min {
        return Err(Setting::at(section, "reconnect_max_delay").invalid(
            show(max),
            format!("must not be below {section}.reconnect_min_delay"),
        ));
    }
    Ok(())
}

/// A duration as the config file writes it.
pub fn show(d: Duration) -> String {
    duration_text::format(d)
}
