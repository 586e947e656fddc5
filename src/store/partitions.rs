//! Daily partitions of `outbox`, kept created days ahead. Each is created as a plain
//! table and then ATTACHed (which takes SHARE UPDATE EXCLUSIVE on the parent, not the
//! ACCESS EXCLUSIVE that `CREATE TABLE ... PARTITION OF` takes) under a short
//! `lock_timeout`, retried, so partition upkeep never queues producers behind it.
//! A day whose rows already sit in DEFAULT cannot get a partition: that is reported
//! loudly and skipped; the rows stay deliverable in DEFAULT.

use super::{Store, StoreError, error_text};
use crate::retry::Backoff;
use std::time::Duration;

const PARTITION_DAYS: &str = include_str!("../../sql/partition_days.sql");
const DEFAULT_PARTITION_ROWS: &str = include_str!("../../sql/default_partition_rows.sql");

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionReport {
    /// Partitions created and attached in this pass.
    pub created: Vec<String>,
    /// Days that could not get a partition, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Rows in the DEFAULT partition (capped at 100,000).
    pub default_rows: i64,
}

/// Attempts per partition when the ATTACH waits for a lock longer than `lock_timeout`.
const ATTACH_TRIES: i32 = 5;
const LOCK_TIMEOUT: &str = "1s";

impl Store {
    /// Makes sure partitions exist for today (UTC) and the next `days_ahead` days.
    pub async fn ensure_partitions(&self, days_ahead: u32) -> Result<PartitionReport, StoreError> {
        let mut client = self.pooled().await?;
        ensure(&mut client, days_ahead).await
    }
}

/// Makes sure partitions exist for today (UTC) and the next `days_ahead` days, on any
/// connection (`outboxd migrate` runs it on its own).
pub async fn ensure(
    client: &mut tokio_postgres::Client,
    days_ahead: u32,
) -> Result<PartitionReport, StoreError> {
    let days = client
        .query(PARTITION_DAYS, &[&(days_ahead as i32)])
        .await
        .map_err(StoreError::query("partition_days"))?;
    let mut report = PartitionReport::default();
    for day in days {
        let suffix: String = day.get(0);
        let from: String = day.get(1);
        let to: String = day.get(2);
        let attached: bool = day.get(3);
        if attached {
            continue;
        }
        let name = format!("outbox_p{suffix}");
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match attach_day(client, &name, &from, &to).await {
                Ok(true) => {
                    tracing::info!(partition = %name, "partition created");
                    report.created.push(name);
                    break;
                }
                Ok(false) => break,
                Err(error) => {
                    let code = error.code().map(|c| c.code().to_string());
                    let conflict = matches!(code.as_deref(), Some("55P03") | Some("40P01"));
                    if conflict && backoff.failures() + 1 < ATTACH_TRIES {
                        // lock_timeout (a long transaction holds the table) or a deadlock
                        // lost to an index build: try again.
                        tokio::time::sleep(backoff.failed()).await;
                        continue;
                    }
                    let reason = error_text(&error);
                    tracing::error!(
                        partition = %name,
                        error = %reason,
                        "cannot create partition; rows for that day will go to outbox_default"
                    );
                    report.skipped.push((name, reason));
                    break;
                }
            }
        }
    }
    report.default_rows = client
        .query_one(DEFAULT_PARTITION_ROWS, &[])
        .await
        .map_err(StoreError::query("default_partition_rows"))?
        .get(0);
    if report.default_rows > 0 {
        tracing::error!(
            rows = report.default_rows,
            "rows found in partition outbox_default: a daily partition was missing when they were inserted; they are still delivered, but retention cannot drop them and no partition can be created for their days until they are moved"
        );
    }
    Ok(report)
}

/// Creates and attaches one day's partition in one short transaction. `Ok(false)`: another
/// instance attached it first.
async fn attach_day(
    client: &mut tokio_postgres::Client,
    name: &str,
    from: &str,
    to: &str,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::migrate::ADVISORY_LOCK_KEY],
    )
    .await?;
    let already: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                             WHERE i.inhparent = 'outbox'::regclass AND c.relname = $1)",
            &[&name],
        )
        .await?
        .get(0);
    if already {
        tx.rollback().await?;
        return Ok(false);
    }
    // `name`, `from` and `to` come from partition_days.sql (digits and dashes only).
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {name} (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         ALTER TABLE outbox ATTACH PARTITION {name}
             FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00');"
    ))
    .await?;
    tx.commit().await?;
    Ok(true)
}
