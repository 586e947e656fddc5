//! The LISTEN connection: its own direct connection (never pooled), driven with
//! `poll_message` on a task of its own (a plain spawned connection future would drop
//! notifications), `LISTEN` on the channel, the payload of each notification in order,
//! and a ping that notices a half-open connection. What to do with what it hears (and
//! when to reconnect) is the listener's policy, not this file's.

use super::StoreError;
use super::connect::{Purpose, connect, prepare};
use super::error_text;
use futures_util::future::poll_fn;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// A connection that is listening on one channel.
pub struct Listening {
    client: tokio_postgres::Client,
    /// The heartbeat statement, prepared on first use.
    heartbeat: tokio::sync::OnceCell<tokio_postgres::Statement>,
    notes: mpsc::UnboundedReceiver<Result<String, String>>,
    _driver: AbortOnDrop,
}

impl Listening {
    /// Connects to `url` with TCP keepalive lowered to `keepalive_idle`, then runs
    /// `LISTEN channel`. When it returns, every notification committed from now on
    /// reaches [`Listening::next`].
    pub async fn open(
        url: &str,
        connect_timeout: Duration,
        keepalive_idle: Duration,
        channel: &str,
    ) -> Result<Listening, StoreError> {
        let prepared = prepare(
            url,
            connect_timeout,
            Purpose {
                application_name: "outboxd-listener",
                keepalive_idle: Some(keepalive_idle),
            },
        )?;
        let (client, mut connection) = connect(&prepared).await?;
        // Replies and notifications both come through the connection, polled here;
        // notifications go on through `notes`.
        let (notes_tx, notes) = mpsc::unbounded_channel::<Result<String, String>>();
        let driver = tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if notes_tx.send(Ok(n.payload().to_string())).is_err() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {} // notices
                    Some(Err(error)) => {
                        let _ = notes_tx.send(Err(error_text(&error)));
                        break;
                    }
                    None => {
                        let _ = notes_tx.send(Err("connection closed by the server".into()));
                        break;
                    }
                }
            }
        });
        let listening = Listening {
            client,
            heartbeat: tokio::sync::OnceCell::new(),
            notes,
            _driver: AbortOnDrop(driver),
        };
        listening
            .client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|source| StoreError::Query {
                statement: "listen",
                source,
            })?;
        Ok(listening)
    }

    /// The next notification's payload; `Err` when the connection is lost (why).
    pub async fn next(&mut self) -> Result<String, String> {
        match self.notes.recv().await {
            Some(note) => note,
            None => Err("connection task ended".into()),
        }
    }
}

/// Why a heartbeat did not read the members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatError {
    /// The connection is lost (or the server did not answer in time): reconnect.
    Lost(String),
    /// The server answered with an error (e.g. no right to write `outbox_instances`):
    /// the connection is fine, the division of work is not available.
    Refused(String),
}

const HEARTBEAT: &str = include_str!("../../sql/heartbeat.sql");
const LEAVE: &str = include_str!("../../sql/leave.sql");

impl Listening {
    /// heartbeat: renews this instance's membership (joins when its row is missing, and
    /// then every instance is told to read the members again) and returns the live
    /// members' names, this one first. Answered within `timeout`, or the connection
    /// counts as lost: it doubles as the listener's ping.
    pub async fn heartbeat(
        &self,
        name: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Vec<String>, HeartbeatError> {
        let ttl = ttl.as_secs_f64();
        let read = async {
            let statement = self
                .heartbeat
                .get_or_try_init(|| self.client.prepare(HEARTBEAT))
                .await?;
            self.client.query(statement, &[&name, &ttl]).await
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(rows)) => Ok(rows.iter().map(|row| row.get(0)).collect()),
            Ok(Err(error)) if error.as_db_error().is_some() => Err(HeartbeatError::Refused(
                format!("heartbeat failed: {}", error_text(&error)),
            )),
            Ok(Err(error)) => Err(HeartbeatError::Lost(format!(
                "heartbeat failed: {}",
                error_text(&error)
            ))),
            Err(_) => Err(HeartbeatError::Lost(
                "heartbeat timed out (half-open connection?)".into(),
            )),
        }
    }

    /// leave: this instance's membership ends and the others are told, so they take its
    /// share over at once. Best effort within `timeout` (a member that cannot say so
    /// is dropped when its listener backend is gone or its heartbeat expires).
    pub async fn leave(&self, name: &str, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.client.query(LEAVE, &[&name])).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("leave failed: {}", error_text(&error))),
            Err(_) => Err("leave timed out".into()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
