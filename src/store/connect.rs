//! The one way outboxd connects to PostgreSQL: `[database]`, the URL parsed with its TLS
//! mode (`tls.rs`), a password never shown, keepalives set, and an error that says what
//! to check. The pool, one-off connections (migrate, the CLI) and the listener's own
//! connection all come from here.

use super::StoreError;
use super::tls::parse_url;
use crate::duration_text;
use crate::secret::redact;
use crate::validate::{ConfigError, Setting};
use postgres_native_tls::MakeTlsConnector;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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

impl DatabaseConfig {
    /// The URL the listener connects to.
    pub fn listen_url(&self) -> &str {
        if self.listen_url.is_empty() {
            &self.url
        } else {
            &self.listen_url
        }
    }

    /// Checks every value's range and shape.
    pub fn check(&self) -> Result<(), ConfigError> {
        let at = |key| Setting::at("database", key);
        if self.url.trim().is_empty() {
            return Err(at("url").invalid(&self.url, "is empty (DATABASE_URL is honoured too)"));
        }
        parse_url(&self.url).map_err(|e| at("url").invalid(redact(&self.url), e))?;
        if !self.listen_url.is_empty() {
            parse_url(&self.listen_url)
                .map_err(|e| at("listen_url").invalid(redact(&self.listen_url), e))?;
        }
        at("pool_size").in_range(self.pool_size, 1..=256)?;
        at("connect_timeout").positive(self.connect_timeout)?;
        Ok(())
    }
}

/// What a connection is for: its `application_name` (unless the URL sets one) and its
/// TCP keepalive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Purpose<'a> {
    pub application_name: &'a str,
    /// TCP keepalive idle time; `None`: the OS default. The listener notices a dead
    /// server in a few of these, even when it sends nothing.
    pub keepalive_idle: Option<Duration>,
}

/// A connection's settings and TLS connector, ready to connect (or to build a pool).
pub(crate) struct Prepared {
    pub config: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
}

impl Prepared {
    /// Where it connects, without the password, for errors and logs.
    pub fn describe(&self) -> String {
        describe_target(&self.config)
    }
}

/// Parses `url` and applies `purpose`.
pub(crate) fn prepare(
    url: &str,
    connect_timeout: Duration,
    purpose: Purpose<'_>,
) -> Result<Prepared, StoreError> {
    let bad_url = |reason| StoreError::BadUrl {
        url: redact(url),
        reason,
    };
    let target = parse_url(url).map_err(bad_url)?;
    let tls = target.connector().map_err(bad_url)?;
    let mut config = target.config;
    config.connect_timeout(connect_timeout);
    if config.get_application_name().is_none() {
        config.application_name(purpose.application_name);
    }
    if let Some(idle) = purpose.keepalive_idle {
        config
            .keepalives(true)
            .keepalives_idle(idle)
            .keepalives_interval((idle / 2).max(Duration::from_secs(1)))
            .keepalives_retries(3)
            .tcp_user_timeout(idle * 3);
    }
    Ok(Prepared { config, tls })
}

/// Connects once; the caller drives (or spawns) the connection.
pub(crate) async fn connect(
    prepared: &Prepared,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<
            tokio_postgres::Socket,
            postgres_native_tls::TlsStream<tokio_postgres::Socket>,
        >,
    ),
    StoreError,
> {
    prepared
        .config
        .connect(prepared.tls.clone())
        .await
        .map_err(|e| StoreError::Unreachable {
            target: prepared.describe(),
            reason: super::error_text(&e),
        })
}

/// Opens a single connection (not pooled) and drives it on a task. For migrations and
/// one-off commands.
pub async fn connect_once(
    url: &str,
    connect_timeout: Duration,
    application_name: &str,
) -> Result<tokio_postgres::Client, StoreError> {
    let prepared = prepare(
        url,
        connect_timeout,
        Purpose {
            application_name,
            keepalive_idle: None,
        },
    )?;
    let (client, connection) = connect(&prepared).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection closed");
        }
    });
    Ok(client)
}

/// Describes the database a URL points at, without its password.
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port} (database {:?}, user {:?})",
        config.get_dbname().unwrap_or(""),
        config.get_user().unwrap_or("")
    )
}
