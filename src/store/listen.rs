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

    /// One empty statement, answered within `timeout`, or the connection is lost.
    pub async fn ping(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.client.simple_query("")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("ping failed: {}", error_text(&e))),
            Err(_) => Err("ping timed out (half-open connection?)".into()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
