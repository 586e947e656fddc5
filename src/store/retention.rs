//! Retention: a daily partition older than `partitions.retention` whose rows are all
//! finished (PUBLISHED, or DEAD_LETTER kept apart in `outbox_dead_letters`) is dropped,
//! or detached for archiving. One instance at a time does it, under a lease kept in
//! `outbox_leases` (not a session advisory lock: `database.url` may be a pooler).
//!
//! A drop locks the parent, checks the partition again and drops it in one transaction,
//! so an event redriven or retried between the first look and the drop is seen and the
//! partition waits. The lock is taken under a short `lock_timeout`: a producer waits at
//! most that long behind it, and a drop that cannot get it is tried again later.

use super::{Store, StoreError, error_text};
use crate::retry::Backoff;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

const PARTITIONS: &str = include_str!("../../sql/partitions.sql");
const TAKE_LEASE: &str = include_str!("../../sql/take_lease.sql");
const RELEASE_LEASE: &str = include_str!("../../sql/release_lease.sql");
const TRIM_TRACKING_IDS: &str = include_str!("../../sql/trim_tracking_ids.sql");

/// The lease name of partition maintenance (DEFAULT emptied, retention) in
/// `outbox_leases`.
pub const PARTITIONS_LEASE: &str = "partitions";
/// How long a retention pass holds its lease before another instance may take over (a
/// pass renews it before each partition).
const LEASE_FOR: Duration = Duration::from_secs(600);
/// How long a drop waits for its lock on `outbox`; producers queue behind the waiting
/// drop for at most this long.
pub const DROP_LOCK_TIMEOUT: Duration = Duration::from_millis(100);
/// Tries per partition within one pass when the lock is not granted in time.
const DROP_TRIES: u32 = 5;

/// What retention does with an expired partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    /// `DROP TABLE`: the rows are gone.
    #[default]
    Drop,
    /// `ALTER TABLE outbox DETACH PARTITION`: the table stays, outside outbox, for an
    /// archive job to dump and drop.
    Detach,
}

impl OnExpiry {
    pub fn verb(self) -> &'static str {
        match self {
            OnExpiry::Drop => "dropped",
            OnExpiry::Detach => "detached",
        }
    }
}

/// One partition as retention sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionState {
    pub name: String,
    #[serde(serialize_with = "super::operations::rfc3339")]
    pub from: SystemTime,
    #[serde(serialize_with = "super::operations::rfc3339")]
    pub to: SystemTime,
    pub bytes: i64,
    /// PostgreSQL's estimate (`reltuples`, as of the last ANALYZE).
    pub rows_estimate: i64,
    /// Older than the retention.
    pub expired: bool,
    /// PENDING or PROCESSING rows.
    pub unfinished: i64,
    /// Undiscarded dead letters (kept apart: they survive the drop).
    pub dead_letters: i64,
    /// Dead letters holding back a later unfinished event of their aggregate.
    pub blocking: i64,
}

/// What retention does with one partition now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Within the retention.
    Keep,
    /// Expired and finished: dropped (or detached) at the next pass.
    Expire,
    /// Expired, but it must wait: why.
    Wait(String),
}

impl PartitionState {
    pub fn verdict(&self) -> Verdict {
        if !self.expired {
            Verdict::Keep
        } else if self.unfinished > 0 {
            Verdict::Wait(format!(
                "{} event(s) still PENDING or PROCESSING; dropped once they are delivered or dead letters",
                self.unfinished
            ))
        } else if self.blocking > 0 {
            Verdict::Wait(format!(
                "{} dead letter(s) hold back later events of their aggregates; redrive or discard them (outboxd dead-letters)",
                self.blocking
            ))
        } else {
            Verdict::Expire
        }
    }
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetentionReport {
    /// Another holder has the lease (a running instance): this pass did nothing.
    pub lease_held_by: Option<String>,
    /// Days moved out of the DEFAULT partition (or left there, and why).
    pub default: super::partitions::DefaultReport,
    /// Partitions dropped or detached.
    pub expired: Vec<String>,
    /// For each of them, how long its transaction held the lock on outbox (producers
    /// wait at most this long, plus the lock's wait), in milliseconds.
    pub lock_held_ms: Vec<f64>,
    /// Expired partitions that wait, and why.
    pub waiting: Vec<(String, String)>,
    /// Expired partitions that could not be dropped this time (lock not granted), and why.
    pub failed: Vec<(String, String)>,
    /// tracking_id records forgotten with the dropped partitions.
    pub tracking_ids_trimmed: u64,
    /// Failed attempts older than the retention forgotten from the delivery history.
    pub attempts_trimmed: u64,
}

impl Store {
    /// Every partition of outbox (DEFAULT apart), oldest first, with retention's view.
    pub async fn partitions(&self, retention: Duration) -> Result<Vec<PartitionState>, StoreError> {
        let client = self.pooled().await?;
        states(&client, retention).await
    }

    /// Takes (or renews) the lease `name` for `holder`; returns the holder afterwards
    /// (`holder` when taken).
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        let client = self.pooled().await?;
        let row = client
            .query_one(TAKE_LEASE, &[&name, &holder, &ttl.as_secs_f64()])
            .await
            .map_err(StoreError::query("take_lease"))?;
        Ok(row.get(0))
    }

    /// Gives up the lease `name` if `holder` holds it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let client = self.pooled().await?;
        client
            .execute(RELEASE_LEASE, &[&name, &holder])
            .await
            .map_err(StoreError::query("release_lease"))?;
        Ok(())
    }

    /// One maintenance pass as `holder`: empties the DEFAULT partition into its days'
    /// partitions, then drops (or detaches) every expired, finished partition and
    /// reports the ones that wait. Skipped when another holder has the lease.
    pub async fn maintain_partitions(
        &self,
        retention: Duration,
        on_expiry: OnExpiry,
        holder: &str,
    ) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        let owner = self.take_lease(PARTITIONS_LEASE, holder, LEASE_FOR).await?;
        if owner != holder {
            report.lease_held_by = Some(owner);
            return Ok(report);
        }
        let result = self
            .expire_under_lease(retention, on_expiry, holder, &mut report)
            .await;
        if let Err(error) = self.release_lease(PARTITIONS_LEASE, holder).await {
            tracing::warn!(%error, "could not release the retention lease; it expires on its own");
        }
        result.map(|()| report)
    }

    async fn expire_under_lease(
        &self,
        retention: Duration,
        on_expiry: OnExpiry,
        holder: &str,
        report: &mut RetentionReport,
    ) -> Result<(), StoreError> {
        let mut client = self.pooled().await?;
        report.default = super::partitions::empty_default(&mut client).await?;
        report.attempts_trimmed = self.trim_attempts(retention).await?;
        for partition in states(&client, retention).await? {
            match partition.verdict() {
                Verdict::Keep => continue,
                Verdict::Wait(why) => {
                    tracing::warn!(partition = %partition.name, reason = %why, "expired partition kept");
                    report.waiting.push((partition.name, why));
                    continue;
                }
                Verdict::Expire => {}
            }
            // Renewed before each partition, so a long pass keeps it.
            let owner = self.take_lease(PARTITIONS_LEASE, holder, LEASE_FOR).await?;
            if owner != holder {
                report.lease_held_by = Some(owner);
                return Ok(());
            }
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
            loop {
                match expire_one(&mut client, &partition, on_expiry).await {
                    Ok((Verdict::Expire, held)) => {
                        report.lock_held_ms.push(held.as_secs_f64() * 1000.0);
                        tracing::info!(
                            partition = %partition.name,
                            bytes = partition.bytes,
                            "expired partition {}",
                            on_expiry.verb()
                        );
                        report.expired.push(partition.name.clone());
                        let trimmed = client
                            .execute(TRIM_TRACKING_IDS, &[&partition.from, &partition.to])
                            .await
                            .map_err(StoreError::query("trim_tracking_ids"))?;
                        report.tracking_ids_trimmed += trimmed;
                        break;
                    }
                    Ok((Verdict::Wait(why), _)) => {
                        report.waiting.push((partition.name.clone(), why));
                        break;
                    }
                    Ok((Verdict::Keep, _)) => break,
                    Err(error) => {
                        let code = error.code().map(|c| c.code().to_string());
                        let conflict = matches!(code.as_deref(), Some("55P03") | Some("40P01"));
                        if conflict && backoff.failures() + 1 < DROP_TRIES as i32 {
                            tokio::time::sleep(backoff.failed()).await;
                            continue;
                        }
                        let reason = error_text(&error);
                        tracing::warn!(
                            partition = %partition.name,
                            error = %reason,
                            "expired partition not {} this time; trying again at the next pass",
                            on_expiry.verb()
                        );
                        report.failed.push((partition.name.clone(), reason));
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Every partition's state on `client`.
async fn states(
    client: &tokio_postgres::Client,
    retention: Duration,
) -> Result<Vec<PartitionState>, StoreError> {
    let rows = client
        .query(PARTITIONS, &[&retention.as_secs_f64(), &None::<String>])
        .await
        .map_err(StoreError::query("partitions"))?;
    Ok(rows.iter().map(state).collect())
}

fn state(r: &tokio_postgres::Row) -> PartitionState {
    PartitionState {
        name: r.get(0),
        from: r.get(1),
        to: r.get(2),
        bytes: r.get(3),
        rows_estimate: r.get(4),
        expired: r.get(5),
        unfinished: r.get(6),
        dead_letters: r.get(7),
        blocking: r.get(8),
    }
}

/// Locks outbox, reads the partition again and drops (or detaches) it when it is still
/// expired and finished, in one transaction under [`DROP_LOCK_TIMEOUT`]. Returns what it
/// found ([`Verdict::Expire`] when it dropped it) and how long it held the lock.
async fn expire_one(
    client: &mut tokio_postgres::Client,
    partition: &PartitionState,
    on_expiry: OnExpiry,
) -> Result<(Verdict, Duration), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        DROP_LOCK_TIMEOUT.as_millis()
    ))
    .await?;
    // The parent first, then the partition: every statement on outbox locks in that
    // order, so the drop cannot deadlock with one. Producers wait behind this lock
    // until the commit below.
    tx.batch_execute("LOCK TABLE ONLY outbox IN ACCESS EXCLUSIVE MODE")
        .await?;
    let locked = std::time::Instant::now();
    let name = quote_ident(&partition.name);
    tx.batch_execute(&format!("LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE"))
        .await?;
    // This partition alone; a retention of 0 counts it as expired, as it was found.
    let again = tx
        .query(PARTITIONS, &[&0f64, &Some(partition.name.as_str())])
        .await?
        .first()
        .map(state);
    let Some(again) = again else {
        tx.rollback().await?;
        return Ok((
            Verdict::Wait("no longer a partition of outbox".into()),
            locked.elapsed(),
        ));
    };
    let verdict = again.verdict();
    if verdict != Verdict::Expire {
        tx.rollback().await?;
        return Ok((verdict, locked.elapsed()));
    }
    match on_expiry {
        OnExpiry::Drop => tx.batch_execute(&format!("DROP TABLE {name}")).await?,
        OnExpiry::Detach => {
            tx.batch_execute(&format!("ALTER TABLE outbox DETACH PARTITION {name}"))
                .await?
        }
    }
    tx.commit().await?;
    Ok((Verdict::Expire, locked.elapsed()))
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
