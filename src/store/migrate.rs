//! Embedded, numbered migrations (`migrations/NNNN_name.sql`), applied in order, each in
//! its own transaction, under a session advisory lock so instances that start together
//! do not race: the second waits, then finds nothing left to do.

use super::{StoreError, error_text};
use crate::retry::Backoff;
use std::time::Duration;

/// One embedded migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    /// What it adds, for an error that says what is missing.
    pub adds: &'static str,
    /// A SQL condition that holds once it was applied (by outboxd or by hand).
    pub present: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// `0004_notify_ids (function outbox_notify_ids)`.
    pub fn describe(&self) -> String {
        format!("{:04}_{} ({})", self.version, self.name, self.adds)
    }
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox",
        present: "to_regclass('outbox') IS NOT NULL",
        adds: "table outbox, its partitions and the notify trigger",
        sql: include_str!("../../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "redrives",
        present: "to_regclass('outbox_redrives') IS NOT NULL",
        adds: "table outbox_redrives",
        sql: include_str!("../../migrations/0002_redrives.sql"),
    },
    Migration {
        version: 3,
        name: "high_load",
        present: "to_regclass('outbox_mode') IS NOT NULL",
        adds: "table outbox_mode",
        sql: include_str!("../../migrations/0003_high_load.sql"),
    },
    Migration {
        version: 4,
        name: "notify_ids",
        present: "to_regprocedure('outbox_notify_ids(int8[])') IS NOT NULL",
        adds: "function outbox_notify_ids",
        sql: include_str!("../../migrations/0004_notify_ids.sql"),
    },
    Migration {
        version: 5,
        name: "redact_stored_urls",
        // Data only, and safe to run twice: counted as applied with the ones before it.
        present: "true",
        adds: "URLs in stored errors without path or query",
        sql: include_str!("../../migrations/0005_redact_stored_urls.sql"),
    },
    Migration {
        version: 6,
        name: "unique_tracking_ids",
        present: "to_regclass('outbox_tracking_ids') IS NOT NULL",
        adds: "table outbox_tracking_ids",
        sql: include_str!("../../migrations/0006_unique_tracking_ids.sql"),
    },
    Migration {
        version: 7,
        name: "retry_due_index",
        present: "to_regclass('outbox_retry_due_idx') IS NOT NULL",
        adds: "index outbox_retry_due_idx",
        sql: include_str!("../../migrations/0007_retry_due_index.sql"),
    },
    Migration {
        version: 8,
        name: "notify_created_bounds",
        present: "to_regprocedure('outbox_notify_ids(int8[],timestamptz,timestamptz)') IS NOT NULL",
        adds: "function outbox_notify_ids(ids, since, until)",
        sql: include_str!("../../migrations/0008_notify_created_bounds.sql"),
    },
    Migration {
        version: 9,
        name: "event_lookup",
        present: "to_regclass('outbox_aggregate_idx') IS NOT NULL",
        adds: "index outbox_aggregate_idx, ids in outbox_tracking_ids",
        sql: include_str!("../../migrations/0009_event_lookup.sql"),
    },
    Migration {
        version: 10,
        name: "ordering",
        present: "to_regclass('outbox_settings') IS NOT NULL",
        adds: "table outbox_settings, column outbox.discarded_at, indexes outbox_unfinished_idx and outbox_held_idx",
        sql: include_str!("../../migrations/0010_ordering.sql"),
    },
    Migration {
        version: 11,
        name: "instances",
        present: "to_regclass('outbox_instances') IS NOT NULL",
        adds: "table outbox_instances",
        sql: include_str!("../../migrations/0011_instances.sql"),
    },
    Migration {
        version: 12,
        name: "dead_letters_apart",
        present: "to_regclass('outbox_dead_letters') IS NOT NULL",
        adds: "table outbox_dead_letters and its trigger, table outbox_leases",
        sql: include_str!("../../migrations/0012_dead_letters_apart.sql"),
    },
    Migration {
        version: 13,
        name: "delivery_history",
        present: "to_regclass('outbox_attempts') IS NOT NULL",
        adds: "table outbox_attempts",
        sql: include_str!("../../migrations/0013_delivery_history.sql"),
    },
    Migration {
        version: 14,
        name: "replays",
        present: "to_regclass('outbox_replays') IS NOT NULL",
        adds: "table outbox_replays",
        sql: include_str!("../../migrations/0014_replays.sql"),
    },
];

/// Indexes of the partitioned outbox that migrations create on the parent alone and
/// `run` builds on each partition without blocking producers: (parent index, what each
/// partition's index covers).
const PARTITION_INDEXES: &[(&str, &str)] = &[
    (
        "outbox_retry_due_idx",
        "(next_attempt_at) WHERE status = 'PENDING' AND last_error IS NOT NULL",
    ),
    ("outbox_aggregate_idx", "(aggregate_type, aggregate_id, id)"),
    (
        "outbox_unfinished_idx",
        "(aggregate_type, aggregate_id, id) WHERE status <> 'PUBLISHED'",
    ),
    (
        "outbox_held_idx",
        "(aggregate_type, aggregate_id, id) WHERE status = 'PENDING' AND next_attempt_at = 'infinity'",
    ),
];

/// The advisory lock key migrations (and partition maintenance) take: "outboxd" in ASCII.
pub const ADVISORY_LOCK_KEY: i64 = 0x006f_7574_626f_7864;

const BOOKKEEPING_ONE_LINE: &str = "CREATE TABLE IF NOT EXISTS outboxd_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())";

const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS outboxd_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Versions already applied (empty when the bookkeeping table does not exist yet).
pub async fn applied(client: &tokio_postgres::Client) -> Result<Vec<i32>, StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('outboxd_schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(StoreError::query("migrate"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT version FROM outboxd_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(StoreError::query("migrate"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Migrations not applied yet, in order.
pub async fn pending(client: &tokio_postgres::Client) -> Result<Vec<Migration>, StoreError> {
    let done = recorded(client).await?;
    Ok(MIGRATIONS
        .iter()
        .filter(|m| !done.contains(&m.version))
        .copied()
        .collect())
}

/// The newest migration this outboxd knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The versions recorded as applied, refused when they cannot be built on: a schema
/// recorded as newer than this outboxd (a rollback would run old code on a schema it
/// does not know), or an outbox table that no record accounts for (applied by hand, so
/// a migration would fail on objects that exist).
pub async fn recorded(client: &tokio_postgres::Client) -> Result<Vec<i32>, StoreError> {
    let done = applied(client).await?;
    let database = || async {
        client
            .query_one("SELECT current_database()", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .map_err(StoreError::query("migrate"))
    };
    if let Some(&newest) = done.iter().max()
        && newest > latest()
    {
        return Err(StoreError::SchemaNewer {
            database: database().await?,
            recorded: newest,
            known: latest(),
        });
    }
    if done.is_empty() {
        let mut found = Vec::new();
        for migration in MIGRATIONS {
            let present: bool = client
                .query_one(&format!("SELECT {}", migration.present), &[])
                .await
                .map_err(StoreError::query("migrate"))?
                .get(0);
            if !present {
                break;
            }
            found.push(migration);
        }
        if !found.is_empty() {
            let rows: Vec<String> = found
                .iter()
                .map(|m| format!("({}, '{}')", m.version, m.name))
                .collect();
            return Err(StoreError::SchemaUnrecorded {
                database: database().await?,
                found: found
                    .iter()
                    .map(|m| m.describe())
                    .collect::<Vec<_>>()
                    .join(", "),
                record: format!(
                    "{BOOKKEEPING_ONE_LINE}; INSERT INTO outboxd_schema_migrations (version, name) VALUES {};",
                    rows.join(", ")
                ),
            });
        }
    }
    Ok(done)
}

/// How long a migration waits for a table lock, and how often it tries.
///
/// A migration that alters a table producers write to needs a lock their open
/// transactions hold. Waiting for it without limit would queue every producer behind
/// the migration (PostgreSQL grants locks in order) for as long as the longest open
/// transaction lasts. So each try waits `timeout` at most, rolls back, steps aside, and
/// tries again; producers are held up for `timeout` at most per try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockWait {
    pub timeout: Duration,
    pub tries: u32,
}

impl Default for LockWait {
    /// 500 ms a try, 40 tries (with the pauses between them, about a minute and a half).
    fn default() -> Self {
        LockWait {
            timeout: Duration::from_millis(500),
            tries: 40,
        }
    }
}

/// Applies every pending migration; returns those it applied (none the second time).
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Vec<Migration>, StoreError> {
    run_waiting(client, LockWait::default()).await
}

/// [`run`], waiting for table locks as `wait` says.
pub async fn run_waiting(
    client: &mut tokio_postgres::Client,
    wait: LockWait,
) -> Result<Vec<Migration>, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&ADVISORY_LOCK_KEY])
        .await
        .map_err(StoreError::query("migrate"))?;
    let result = apply_pending(client, wait).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&ADVISORY_LOCK_KEY])
        .await
        .map_err(StoreError::query("migrate"));
    let applied = result?;
    unlock?;
    // Not under the lock above: CREATE INDEX CONCURRENTLY waits for every statement
    // running in the database, a migrate waiting for that lock included. One migrate at
    // a time builds (two builds of one partition deadlock); another finds the lock taken
    // and leaves it to the first.
    let building: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&INDEX_LOCK_KEY])
        .await
        .map_err(StoreError::query("migrate"))?
        .get(0);
    if building {
        let built = index_partitions(client).await;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&INDEX_LOCK_KEY])
            .await
            .map_err(StoreError::query("migrate"))?;
        built?;
    } else {
        tracing::info!("another migrate is building the partition indexes");
    }
    Ok(applied)
}

/// Partitions up to this many pages (8 MiB) are indexed with a plain CREATE INDEX.
const SMALL_PARTITION_PAGES: i32 = 1024;

/// A deadlock or a lock timeout: the statement may pass when tried again.
fn is_lock_conflict(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|c| c.code() == "40P01" || c.code() == "55P03")
}

/// Builds `index` on `partition` (dropping an invalid one a failed concurrent build left)
/// and attaches it to `parent`.
async fn build_index(
    client: &tokio_postgres::Client,
    parent: &str,
    index: &str,
    partition: &str,
    definition: &str,
    concurrently: &str,
) -> Result<(), tokio_postgres::Error> {
    let invalid: bool = client
        .query_one(
            "SELECT coalesce((SELECT NOT indisvalid FROM pg_index
                               WHERE indexrelid = to_regclass($1)), false)",
            &[&index],
        )
        .await?
        .get(0);
    if invalid {
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
            .await?;
    }
    client
        .batch_execute(&format!(
            "CREATE INDEX {concurrently}IF NOT EXISTS {index} ON {partition} {definition}"
        ))
        .await?;
    client
        .batch_execute(&format!("ALTER INDEX {parent} ATTACH PARTITION {index}"))
        .await
}

/// The advisory lock of the partition index builds: "outboxi" in ASCII.
const INDEX_LOCK_KEY: i64 = 0x006f_7574_626f_7869;

/// Builds each index in [`PARTITION_INDEXES`] on every partition that lacks it, with
/// CREATE INDEX CONCURRENTLY (producers go on inserting), and attaches it to the parent's
/// index, which becomes valid once every partition has its own. Outside any transaction;
/// each step can be run again (a build that failed half-way leaves an invalid index,
/// which is dropped and built again).
pub async fn index_partitions(client: &tokio_postgres::Client) -> Result<(), StoreError> {
    for (parent, definition) in PARTITION_INDEXES {
        let missing = client
            .query(
                "SELECT c.relname, c.relpages
                   FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = 'outbox'::regclass
                    AND NOT EXISTS (
                        SELECT 1 FROM pg_inherits ii
                          JOIN pg_index x ON x.indexrelid = ii.inhrelid
                         WHERE ii.inhparent = to_regclass($1) AND x.indrelid = c.oid)
                  ORDER BY c.relname",
                &[parent],
            )
            .await
            .map_err(StoreError::query("index_partitions"))?;
        for row in missing {
            let partition: String = row.get(0);
            let pages: i32 = row.get(1);
            // Partition names come from the catalog (outbox_pYYYYMMDD, outbox_default).
            let index = format!("{partition}_{}", parent.trim_start_matches("outbox_"));
            // A small partition is indexed at once (its brief lock costs producers
            // milliseconds); a large one concurrently. Either may lose a deadlock to a
            // partition being attached at the same time: then it is tried again.
            let concurrently = if pages > SMALL_PARTITION_PAGES {
                "CONCURRENTLY "
            } else {
                ""
            };
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                let built =
                    build_index(client, parent, &index, &partition, definition, concurrently).await;
                match built {
                    Err(error) if is_lock_conflict(&error) && backoff.failures() < 5 => {
                        tracing::warn!(%partition, error = %error_text(&error), "partition index build lost a lock conflict; trying again");
                        tokio::time::sleep(backoff.failed()).await;
                    }
                    Err(error) => {
                        return Err(StoreError::Query {
                            statement: "index_partitions",
                            source: error,
                        });
                    }
                    Ok(()) => break,
                }
            }
            tracing::info!(%partition, %index, "partition index built");
        }
    }
    Ok(())
}

async fn apply_pending(
    client: &mut tokio_postgres::Client,
    wait: LockWait,
) -> Result<Vec<Migration>, StoreError> {
    client
        .batch_execute(BOOKKEEPING)
        .await
        .map_err(StoreError::query("migrate"))?;
    let mut applied = Vec::new();
    for migration in pending(client).await? {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut tries = 0;
        loop {
            tries += 1;
            match apply_one(client, migration, wait.timeout).await {
                Ok(()) => break,
                Err(error) if is_lock_timeout(&error) && tries < wait.tries => {
                    tracing::warn!(
                        version = migration.version,
                        name = migration.name,
                        tries,
                        "migration waits for a table lock an open transaction holds; stepping aside so producers are not queued behind it, then trying again"
                    );
                    tokio::time::sleep(backoff.failed()).await;
                }
                Err(error) if is_lock_timeout(&error) => {
                    return Err(StoreError::MigrationLocked {
                        migration: migration.describe(),
                        tries,
                        timeout: crate::duration_text::format(wait.timeout),
                    });
                }
                Err(error) => return Err(migration_failed(migration, error)),
            }
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        applied.push(migration);
    }
    Ok(applied)
}

/// One migration and its record, in one transaction whose lock waits end at `timeout`.
async fn apply_one(
    client: &mut tokio_postgres::Client,
    migration: Migration,
    timeout: Duration,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        timeout.as_millis().max(1)
    ))
    .await?;
    tx.batch_execute(migration.sql).await?;
    tx.execute(
        "INSERT INTO outboxd_schema_migrations (version, name) VALUES ($1, $2)",
        &[&migration.version, &migration.name],
    )
    .await?;
    tx.commit().await
}

/// 55P03 lock_not_available: `lock_timeout` ran out.
fn is_lock_timeout(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|c| c.code() == "55P03")
}

fn migration_failed(migration: Migration, error: tokio_postgres::Error) -> StoreError {
    tracing::error!(
        version = migration.version,
        name = migration.name,
        error = %error_text(&error),
        "migration failed; nothing of it was applied"
    );
    StoreError::Query {
        statement: "migration",
        source: error,
    }
}
