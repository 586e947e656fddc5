//! Daily partitions of `outbox`, kept created days ahead. Each is created as a plain
//! table and then ATTACHed (which takes SHARE UPDATE EXCLUSIVE on the parent, not the
//! ACCESS EXCLUSIVE that `CREATE TABLE ... PARTITION OF` takes) under a short
//! `lock_timeout`, retried, so partition upkeep never queues producers behind it.
//! A day whose rows already sit in DEFAULT cannot get a partition: that is reported
//! loudly and skipped; the rows stay deliverable in DEFAULT.

use super::{Store, StoreError, error_text};
use crate::retry::Backoff;
use std::time::{Duration, SystemTime};

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

const DEFAULT_DAYS: &str = include_str!("../../sql/default_days.sql");
const COPY_DEFAULT_PUBLISHED: &str = include_str!("../../sql/copy_default_published.sql");
const MOVE_DEFAULT_REST: &str = include_str!("../../sql/move_default_rest.sql");
const DELETE_DEFAULT_DAY: &str = include_str!("../../sql/delete_default_day.sql");
const DEFAULT_HOLDS_OTHER_DAYS: &str = include_str!("../../sql/default_holds_other_days.sql");
/// Marks a day's table while it is filled from DEFAULT, so a pass that stopped half way
/// is resumed, and a table of that name made by someone else is never touched.
const FILLING: &str = "outboxd: filling from outbox_default";
/// Rows copied per batch transaction.
const COPY_BATCH: i64 = 5_000;

/// What emptying the DEFAULT partition did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DefaultReport {
    /// Days whose rows were moved into their own, now attached, partition.
    pub moved: Vec<MovedDay>,
    /// Days left in DEFAULT this time, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// One day moved out of DEFAULT.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MovedDay {
    pub partition: String,
    /// Rows copied in batches before the locked step (PUBLISHED ones).
    pub copied: u64,
    /// Rows moved in the locked step.
    pub moved_locked: u64,
    /// How long the locked step held outbox_default: claims that read DEFAULT wait
    /// this long; producers do not (they insert into today's partition).
    pub locked_ms: f64,
}

impl Store {
    /// Moves every day's rows out of the DEFAULT partition into that day's partition
    /// (see [`empty_default`]).
    pub async fn empty_default(&self) -> Result<DefaultReport, StoreError> {
        let mut client = self.pooled().await?;
        empty_default(&mut client).await
    }
}

/// Empties the DEFAULT partition day by day: creates the day's table detached (with
/// outbox's columns, indexes and a CHECK of its range, so the ATTACH needs no scan of
/// it), copies the PUBLISHED rows in batches of [`COPY_BATCH`] while producers and
/// workers go on, then in one short transaction under `lock_timeout` moves the rest
/// (live rows keep their lease and lock_token), deletes the day from DEFAULT and
/// attaches the table. A day whose locked step cannot get its locks is tried again
/// next pass; the copied rows wait in the detached table.
pub async fn empty_default(
    client: &mut tokio_postgres::Client,
) -> Result<DefaultReport, StoreError> {
    let days = client
        .query(DEFAULT_DAYS, &[])
        .await
        .map_err(StoreError::query("default_days"))?;
    let mut report = DefaultReport::default();
    for day in days {
        let suffix: String = day.get(0);
        let from: SystemTime = day.get(1);
        let to: SystemTime = day.get(2);
        let comment: Option<String> = day.get(3);
        let exists: bool = day.get(4);
        // Published rows completed from this time on may have escaped the batches; the
        // margin covers a completion whose transaction began before it.
        let read_at: SystemTime = day.get(5);
        let published_since = read_at - Duration::from_secs(600);
        let name = format!("outbox_p{suffix}");
        if exists && comment.as_deref() != Some(FILLING) {
            let why = format!(
                "a table named {name} exists outside outbox (a partition retention detached, or one made by hand): rename or drop it, and its day's rows move out of outbox_default at the next pass"
            );
            tracing::error!(partition = %name, "{why}");
            report.skipped.push((name, why));
            continue;
        }
        match move_day(client, &name, exists, (from, to), published_since).await {
            Ok(moved) => {
                tracing::info!(
                    partition = %name,
                    copied = moved.copied,
                    moved_locked = moved.moved_locked,
                    locked_ms = moved.locked_ms,
                    "rows moved out of outbox_default into their day's partition"
                );
                report.moved.push(moved);
            }
            Err(error) => {
                let why = error_text(&error);
                tracing::warn!(partition = %name, error = %why, "could not move rows out of outbox_default; trying again at the next pass");
                report.skipped.push((name, why));
            }
        }
    }
    Ok(report)
}

async fn move_day(
    client: &mut tokio_postgres::Client,
    name: &str,
    exists: bool,
    (from, to): (SystemTime, SystemTime),
    published_since: SystemTime,
) -> Result<MovedDay, tokio_postgres::Error> {
    // `name` is outbox_pYYYYMMDD (digits from default_days.sql).
    if !exists {
        let (lo, hi) = (
            humantime::format_rfc3339_micros(from),
            humantime::format_rfc3339_micros(to),
        );
        client
            .batch_execute(&format!(
                "CREATE TABLE {name} (LIKE outbox INCLUDING ALL,
                     CONSTRAINT {name}_range CHECK (created_at >= '{lo}' AND created_at < '{hi}'));
                 COMMENT ON TABLE {name} IS '{FILLING}';"
            ))
            .await?;
    }
    let copy = COPY_DEFAULT_PUBLISHED.replace("{table}", name);
    let mut after = 0i64;
    let mut copied = 0u64;
    loop {
        let ids = client
            .query(&copy, &[&from, &to, &after, &COPY_BATCH])
            .await?;
        copied += ids.len() as u64;
        match ids.iter().map(|r| r.get::<_, i64>(0)).max() {
            Some(last) if ids.len() as i64 == COPY_BATCH => after = last,
            _ => break,
        }
    }
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    let started = std::time::Instant::now();
    // The parent first (ATTACH's own level), then DEFAULT, which claims read: they wait
    // for this transaction; producers insert into today's partition and do not.
    tx.batch_execute(
        "LOCK TABLE ONLY outbox IN SHARE UPDATE EXCLUSIVE MODE;
         LOCK TABLE outbox_default IN ACCESS EXCLUSIVE MODE;",
    )
    .await?;
    let moved_locked = tx
        .execute(
            &MOVE_DEFAULT_REST.replace("{table}", name),
            &[&from, &to, &published_since],
        )
        .await?;
    let others: bool = tx
        .query_one(DEFAULT_HOLDS_OTHER_DAYS, &[&from, &to])
        .await?
        .get(0);
    if others {
        tx.execute(DELETE_DEFAULT_DAY, &[&from, &to]).await?;
    } else {
        // Only this day is there: emptied at once instead of row by row (the DELETE of
        // 200,000 rows held claims for about 400 ms). TRUNCATE is not MVCC-safe: every
        // transaction that read outbox_default holds a lock this one waited for, but a
        // REPEATABLE READ snapshot taken earlier that reads outbox only after this
        // commits would miss the day's rows (they are in a table new to it). Claims,
        // outcomes and producers run in READ COMMITTED; pg_dump locks every table first.
        tx.batch_execute("TRUNCATE outbox_default").await?;
    }
    let (lo, hi) = (
        humantime::format_rfc3339_micros(from),
        humantime::format_rfc3339_micros(to),
    );
    tx.batch_execute(&format!(
        "ALTER TABLE outbox ATTACH PARTITION {name} FOR VALUES FROM ('{lo}') TO ('{hi}');
         ALTER TABLE {name} DROP CONSTRAINT {name}_range;
         COMMENT ON TABLE {name} IS NULL;"
    ))
    .await?;
    tx.commit().await?;
    Ok(MovedDay {
        partition: name.to_string(),
        copied,
        moved_locked,
        locked_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}
