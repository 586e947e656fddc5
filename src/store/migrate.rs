//! Embedded, numbered migrations (`migrations/NNNN_name.sql`), applied in order, each in
//! its own transaction, under a session advisory lock so instances that start together
//! do not race: the second waits, then finds nothing left to do.

use super::{StoreError, error_text};

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

/// Applies every pending migration; returns those it applied (none the second time).
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Vec<Migration>, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&ADVISORY_LOCK_KEY])
        .await
        .map_err(StoreError::query("migrate"))?;
    let result = apply_pending(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&ADVISORY_LOCK_KEY])
        .await
        .map_err(StoreError::query("migrate"));
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<Vec<Migration>, StoreError> {
    client
        .batch_execute(BOOKKEEPING)
        .await
        .map_err(StoreError::query("migrate"))?;
    let mut applied = Vec::new();
    for migration in pending(client).await? {
        let tx = client
            .transaction()
            .await
            .map_err(StoreError::query("migrate"))?;
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| migration_failed(migration, e))?;
        tx.execute(
            "INSERT INTO outboxd_schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(StoreError::query("migrate"))?;
        tx.commit().await.map_err(StoreError::query("migrate"))?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        applied.push(migration);
    }
    Ok(applied)
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
