//! Embedded, numbered migrations (`migrations/NNNN_name.sql`), applied in order, each in
//! its own transaction, under a session advisory lock so instances that start together
//! do not race: the second waits, then finds nothing left to do.

use super::{StoreError, error_text};

/// One embedded migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox",
        sql: include_str!("../../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "redrives",
        sql: include_str!("../../migrations/0002_redrives.sql"),
    },
    Migration {
        version: 3,
        name: "high_load",
        sql: include_str!("../../migrations/0003_high_load.sql"),
    },
];

/// The advisory lock key migrations (and partition maintenance) take: "outboxd" in ASCII.
pub const ADVISORY_LOCK_KEY: i64 = 0x006f_7574_626f_7864;

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
    let done = applied(client).await?;
    Ok(MIGRATIONS
        .iter()
        .filter(|m| !done.contains(&m.version))
        .copied()
        .collect())
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
