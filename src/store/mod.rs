//! The only place outboxd runs SQL. One named statement a file under `sql/`; each verb
//! (claim, complete, schedule_retry, bury, reap, extend_lease) is one round trip for a
//! whole batch. Every outcome is fenced by the claim's `lock_token` (invariant 3): a
//! worker whose lease was reaped changes nothing.
//!
//! Lease and due times use the database clock (`now()`), the one clock that every
//! instance, on whatever host, agrees on.

pub mod connect;
pub mod high_load;
pub mod history;
pub mod listen;
pub mod migrate;
pub mod operations;
pub mod partitions;
pub mod replays;
pub mod retention;
pub mod tls;

pub use connect::{DatabaseConfig, connect_once, describe_target};

use crate::event::{Claim, Event};
use crate::notification::Created;
use crate::ordering::OrderRule;
use connect::{Purpose, prepare};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use uuid::Uuid;

const CLAIM_IDS: &str = include_str!("../../sql/claim_ids.sql");
const CLAIM_DUE: &str = include_str!("../../sql/claim_due.sql");
const CLAIM_DUE_RETRIES: &str = include_str!("../../sql/claim_due_retries.sql");
const COMPLETE: &str = include_str!("../../sql/complete.sql");
const SCHEDULE_RETRY: &str = include_str!("../../sql/schedule_retry.sql");
const BURY: &str = include_str!("../../sql/bury.sql");
const EXTEND_LEASE: &str = include_str!("../../sql/extend_lease.sql");
const RELEASE: &str = include_str!("../../sql/release.sql");
const NEXT_RETRY: &str = include_str!("../../sql/next_retry.sql");
const RELEASE_CRASHED: &str = include_str!("../../sql/release_crashed.sql");
const REAP: &str = include_str!("../../sql/reap.sql");
const CLAIM_HELD: &str = include_str!("../../sql/claim_held.sql");
const UNHOLD_AGGREGATES: &str = include_str!("../../sql/unhold_aggregates.sql");
const HELD_AGGREGATES: &str = include_str!("../../sql/held_aggregates.sql");
const STATUS: &str = include_str!("../../sql/status.sql");
const DEFAULT_PARTITION_ROWS: &str = include_str!("../../sql/default_partition_rows.sql");

/// A database problem, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot connect to PostgreSQL at {target}: {reason}; check that it is running and that DATABASE_URL (or database.url) is right"
    )]
    Unreachable { target: String, reason: String },
    #[error(
        "the outbox table does not exist in database {database:?}: run `outboxd migrate` first"
    )]
    SchemaMissing { database: String },
    #[error(
        "the outbox schema in database {database:?} is older than this outboxd (missing migrations: {missing}): run `outboxd migrate` (or start with `run --migrate`)"
    )]
    SchemaOutdated { database: String, missing: String },
    #[error(
        "the outbox schema in database {database:?} is recorded at migration {recorded:04}, newer than this outboxd knows (up to {known:04}): run the outboxd that applied it, or a newer one; this one would run its code on a schema it does not know"
    )]
    SchemaNewer {
        database: String,
        recorded: i32,
        known: i32,
    },
    #[error(
        "database {database:?} has outbox objects that outboxd_schema_migrations does not account for (was the schema applied by hand?): found {found}. If those were applied from outboxd's migrations, record them with: {record} Then run `outboxd migrate` again to apply the rest"
    )]
    SchemaUnrecorded {
        database: String,
        found: String,
        record: String,
    },
    #[error(
        "migration {migration} could not take the table lock it needs within {timeout}, {tries} times: a long-running transaction holds it (find it in pg_stat_activity: state 'idle in transaction' or an old xact_start). Nothing of it was applied and producers were never held up for longer than {timeout} at a time; run `outboxd migrate` again when that transaction has ended"
    )]
    MigrationLocked {
        migration: String,
        tries: u32,
        timeout: String,
    },
    #[error(
        "this instance is configured with {configured}, but the database keeps {recorded} (set by {set_by} at {set_at}): every instance of a database must claim by the same ordering rule. Configure this instance the same way (relay.ordering, relay.ordering_dead_letters, each route's ordering), or, to change the rule, stop every instance and run `outboxd ordering adopt` with the new configuration"
    )]
    OrderingDiffers {
        configured: String,
        recorded: String,
        set_by: String,
        set_at: String,
    },
    #[error(
        "{in_flight} events are being delivered right now (live leases): stop every outboxd instance of this database before changing its ordering, then run `outboxd ordering adopt` again"
    )]
    OrderingInUse { in_flight: i64 },
    #[error("{statement} failed: {}", error_text(.source))]
    Query {
        statement: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no database connection available: {0}")]
    Pool(String),
}

impl StoreError {
    /// A connection problem that may pass (as opposed to a statement the server refuses).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Pool(_) | StoreError::Unreachable { .. } => true,
            StoreError::Query { source, .. } => {
                source.is_closed()
                    || source.as_db_error().is_none_or(|db| {
                        let code = db.code().code();
                        // connection exception, operator intervention (shutdown),
                        // insufficient resources
                        code.starts_with("08") || code.starts_with("57") || code.starts_with("53")
                    })
            }
            StoreError::BadUrl { .. }
            | StoreError::SchemaMissing { .. }
            | StoreError::SchemaOutdated { .. }
            | StoreError::SchemaNewer { .. }
            | StoreError::SchemaUnrecorded { .. }
            | StoreError::MigrationLocked { .. }
            | StoreError::OrderingDiffers { .. }
            | StoreError::OrderingInUse { .. } => false,
        }
    }

    fn query(statement: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Query { statement, source }
    }
}

/// The full text of a driver error, including the server's message and hint.
pub fn error_text(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} ({})", db.message(), db.code().code());
        if let Some(hint) = db.hint() {
            text.push_str("; hint: ");
            text.push_str(hint);
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// An event whose delivery failed and will be tried again.
/// Which events a claim may take, by the destinations they still need (those not yet in
/// `delivered_to`). The routing rules travel with it as SQL `LIKE` patterns, each with
/// its destinations comma-joined, in rule order (the first match is the route; see
/// `Router::claim_filter`). `avoid`: leave out events that need any of these (saturated
/// or parked destinations). `want`: take only events that need this one (a probe).
/// [`ClaimFilter::ALL`] takes everything, and costs the claim nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimFilter {
    pub patterns: Vec<String>,
    pub routes: Vec<String>,
    pub avoid: Vec<String>,
    pub want: Option<String>,
}

impl ClaimFilter {
    /// Takes every due event.
    pub const ALL: ClaimFilter = ClaimFilter {
        patterns: Vec::new(),
        routes: Vec::new(),
        avoid: Vec::new(),
        want: None,
    };

    /// Whether it leaves anything out.
    pub fn is_all(&self) -> bool {
        self.avoid.is_empty() && self.want.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct RetryItem {
    pub id: i64,
    pub created_at: SystemTime,
    pub delay: Duration,
    pub last_error: String,
    /// Deferred (not attempted): give back the attempt counted at claim.
    pub give_back_attempt: bool,
    /// Destinations that acknowledged in this attempt.
    pub acked: Vec<String>,
}

/// An event that goes to DEAD_LETTER.
#[derive(Debug, Clone)]
pub struct BuryItem {
    pub id: i64,
    pub created_at: SystemTime,
    pub last_error: String,
    pub acked: Vec<String>,
}

/// An event that every destination acknowledged.
#[derive(Debug, Clone)]
pub struct CompleteItem {
    pub id: i64,
    pub created_at: SystemTime,
    pub acked: Vec<String>,
}

/// What the reaper did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reaped {
    /// Back to PENDING, ready to claim.
    pub returned: Vec<i64>,
    /// Out of attempts: DEAD_LETTER.
    pub buried: Vec<i64>,
    /// The buried events' (aggregate_type, aggregate_id, event_type).
    pub buried_aggregates: Vec<(String, String, String)>,
}

/// One line of `outboxd status`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRow {
    pub status: String,
    pub events: i64,
    pub oldest_age_seconds: Option<f64>,
}

/// Access to the outbox table through a connection pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// The claim rule of ordering (none by default: see [`Store::with_order`]).
    order: Arc<OrderRule>,
}

impl Store {
    /// Builds the pool, checks that the database answers and that the schema is there.
    pub async fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let prepared = prepare(
            &config.url,
            config.connect_timeout,
            Purpose {
                application_name: "outboxd",
                keepalive_idle: Some(Duration::from_secs(10)),
            },
        )?;
        let described = prepared.describe();
        let manager = Manager::from_config(
            prepared.config,
            prepared.tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(config.connect_timeout))
            .wait_timeout(Some(config.connect_timeout * 2))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = Store {
            pool,
            order: Arc::new(OrderRule::default()),
        };
        let client = store
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Unreachable {
                target: described.clone(),
                reason: pool_error_text(&e),
            })?;
        let exists: bool = client
            .query_one("SELECT to_regclass('outbox') IS NOT NULL", &[])
            .await
            .map_err(StoreError::query("schema check"))?
            .get(0);
        if !exists {
            let database: String = client
                .query_one("SELECT current_database()", &[])
                .await
                .map_err(StoreError::query("schema check"))?
                .get(0);
            return Err(StoreError::SchemaMissing { database });
        }
        let applied = migrate::recorded(&client).await?;
        let missing: Vec<String> = migrate::MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| m.describe())
            .collect();
        if !missing.is_empty() {
            let database: String = client
                .query_one("SELECT current_database()", &[])
                .await
                .map_err(StoreError::query("schema check"))?
                .get(0);
            return Err(StoreError::SchemaOutdated {
                database,
                missing: missing.join(", "),
            });
        }
        Ok(store)
    }

    /// The same store, claiming under `order` (which must be the database's: see
    /// [`Store::adopt_order`]).
    pub fn with_order(mut self, order: OrderRule) -> Store {
        self.order = Arc::new(order);
        self
    }

    /// Claims under `order` once the database agrees: the first instance records its
    /// rule in `outbox_settings`; one configured otherwise is refused
    /// ([`StoreError::OrderingDiffers`]).
    pub async fn adopt_order(self, order: OrderRule, set_by: &str) -> Result<Store, StoreError> {
        let client = self.client().await?;
        // Two instances starting at once: the second one's INSERT waits for the first's
        // and does nothing, and its SELECT, on a snapshot older than that commit, finds
        // nothing either; the next statement sees the row.
        let mut tries = 0;
        let row = loop {
            let found = client
                .query_opt(
                    "WITH added AS (
                         INSERT INTO outbox_settings (name, value, set_by) VALUES ('ordering', $1, $2)
                         ON CONFLICT (name) DO NOTHING
                         RETURNING value, set_by, set_at)
                     SELECT value, set_by, set_at::text FROM added
                     UNION ALL
                     SELECT value, set_by, set_at::text FROM outbox_settings
                      WHERE name = 'ordering' AND NOT EXISTS (SELECT 1 FROM added)",
                    &[&order.setting(), &set_by],
                )
                .await
                .map_err(StoreError::query("ordering setting"))?;
            tries += 1;
            match found {
                Some(row) => break row,
                None if tries < 5 => continue,
                None => {
                    return Err(StoreError::Pool(
                        "the ordering setting could not be read or written (outbox_settings)"
                            .into(),
                    ));
                }
            }
        };
        let recorded: String = row.get(0);
        if OrderRule::from_setting(&recorded).as_ref() != Some(&order) {
            return Err(StoreError::OrderingDiffers {
                configured: order.describe(),
                recorded: OrderRule::describe_setting(&recorded),
                set_by: row.get(1),
                set_at: row.get(2),
            });
        }
        drop(client);
        Ok(self.with_order(order))
    }

    /// The ordering setting the database keeps, if any (as stored).
    pub async fn recorded_order_setting(&self) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT value FROM outbox_settings WHERE name = 'ordering'",
                &[],
            )
            .await
            .map_err(StoreError::query("ordering setting"))?
            .map(|row| row.get(0)))
    }

    /// The same store, claiming under the rule the database keeps (none when it keeps
    /// none yet), for tools that release held events (a discard).
    pub async fn with_recorded_order(self) -> Result<Store, StoreError> {
        let recorded = self
            .recorded_order_setting()
            .await?
            .and_then(|setting| OrderRule::from_setting(&setting));
        Ok(match recorded {
            Some(order) => self.with_order(order),
            None => self,
        })
    }

    /// `outboxd ordering adopt`: makes `order` the database's rule. Refused while
    /// events are leased (an instance is running). Every held event is released (the
    /// new rule may not hold it) and a sweep is asked for. Returns the previous setting.
    pub async fn set_order(
        &self,
        order: &OrderRule,
        set_by: &str,
    ) -> Result<Option<String>, StoreError> {
        let mut client = self.client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(StoreError::query("ordering adopt"))?;
        let in_flight: i64 = transaction
            .query_one(
                "SELECT count(*) FROM outbox WHERE status = 'PROCESSING' AND locked_until > now()",
                &[],
            )
            .await
            .map_err(StoreError::query("ordering adopt"))?
            .get(0);
        if in_flight > 0 {
            return Err(StoreError::OrderingInUse { in_flight });
        }
        let previous: Option<String> = transaction
            .query_opt(
                "SELECT value FROM outbox_settings WHERE name = 'ordering' FOR UPDATE",
                &[],
            )
            .await
            .map_err(StoreError::query("ordering adopt"))?
            .map(|row| row.get(0));
        transaction
            .execute(
                "INSERT INTO outbox_settings (name, value, set_by) VALUES ('ordering', $1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, set_by = excluded.set_by,
                                                  set_at = now()",
                &[&order.setting(), &set_by],
            )
            .await
            .map_err(StoreError::query("ordering adopt"))?;
        transaction
            .batch_execute(
                "UPDATE outbox SET next_attempt_at = now()
                  WHERE status = 'PENDING' AND next_attempt_at = 'infinity';
                 SELECT pg_notify('outbox_events', '');",
            )
            .await
            .map_err(StoreError::query("ordering adopt"))?;
        transaction
            .commit()
            .await
            .map_err(StoreError::query("ordering adopt"))?;
        Ok(previous)
    }

    /// The ordering rule this store claims under.
    pub fn order(&self) -> &OrderRule {
        &self.order
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Pool(pool_error_text(&e)))
    }

    /// claim: lease the given ids if they are still due PENDING (the push path), leaving
    /// out what `filter` leaves out. With `created` (the notification's bounds) only the
    /// partitions they fall in are read.
    pub async fn claim_ids(
        &self,
        ids: &[i64],
        created: Option<Created>,
        lease: Duration,
        filter: &ClaimFilter,
        aggregate_shards: Option<&[bool]>,
    ) -> Result<Claim, StoreError> {
        let token = Uuid::new_v4();
        let (since, until) = created.map_or((f64::NEG_INFINITY, f64::INFINITY), |c| {
            (c.since as f64, c.until as f64)
        });
        let (lease_secs, limit) = (lease.as_secs_f64(), ids.len() as i64);
        let mut params = self.with_order_params(&[
            &ids,
            &lease_secs,
            &token,
            &limit,
            &filter.patterns,
            &filter.routes,
            &filter.avoid,
            &filter.want,
            &since,
            &until,
        ]);
        params.push(&aggregate_shards);
        self.claim_with("claim_ids", CLAIM_IDS, token, lease, &params)
            .await
    }

    /// claim: lease up to `limit` due PENDING events due for at least `grace` (sweeps).
    pub async fn claim_due(
        &self,
        limit: usize,
        grace: Duration,
        lease: Duration,
        filter: &ClaimFilter,
    ) -> Result<Claim, StoreError> {
        self.claim_due_of(limit, grace, lease, filter, None).await
    }

    /// claim_due, of the events of `aggregate_shards` only (one flag per shard; `None`:
    /// every event).
    pub async fn claim_due_of(
        &self,
        limit: usize,
        grace: Duration,
        lease: Duration,
        filter: &ClaimFilter,
        aggregate_shards: Option<&[bool]>,
    ) -> Result<Claim, StoreError> {
        let token = Uuid::new_v4();
        let (limit, grace_secs, lease_secs) =
            (limit as i64, grace.as_secs_f64(), lease.as_secs_f64());
        let mut params = self.with_order_params(&[
            &limit,
            &grace_secs,
            &lease_secs,
            &token,
            &filter.patterns,
            &filter.routes,
            &filter.avoid,
            &filter.want,
        ]);
        params.push(&aggregate_shards);
        self.claim_with("claim_due", CLAIM_DUE, token, lease, &params)
            .await
    }

    /// claim: lease up to `limit` due retries (events a failed or deferred attempt
    /// rescheduled), for the retry timer.
    pub async fn claim_due_retries(
        &self,
        limit: usize,
        lease: Duration,
        filter: &ClaimFilter,
    ) -> Result<Claim, StoreError> {
        let token = Uuid::new_v4();
        self.claim_with(
            "claim_due_retries",
            CLAIM_DUE_RETRIES,
            token,
            lease,
            &self.with_order_params(&[
                &(limit as i64),
                &lease.as_secs_f64(),
                &token,
                &filter.patterns,
                &filter.routes,
                &filter.avoid,
                &filter.want,
            ]),
        )
        .await
    }

    async fn claim_with(
        &self,
        verb: &'static str,
        sql: &str,
        token: Uuid,
        lease: Duration,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Claim, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(StoreError::query(verb))?;
        let rows = client
            .query(&statement, params)
            .await
            .map_err(StoreError::query(verb))?;
        let mut events = Vec::with_capacity(rows.len());
        let mut held = Vec::new();
        for row in &rows {
            if row.get::<_, bool>(11) {
                held.push(row.get::<_, i64>(0));
            } else {
                events.push(event_from_row(row));
            }
        }
        // The claim has committed (one statement, autocommit): an outcome that
        // committed meanwhile may have missed these holds; this statement sees it, and
        // claims what is free now into the same batch.
        if !held.is_empty() {
            let statement = client
                .prepare_cached(CLAIM_HELD)
                .await
                .map_err(StoreError::query("claim_held"))?;
            let lease = lease.as_secs_f64();
            let freed = client
                .query(
                    &statement,
                    &self.with_order_params(&[&held, &lease, &token]),
                )
                .await
                .map_err(StoreError::query("claim_held"))?;
            events.extend(freed.iter().map(event_from_row));
        }
        Ok(Claim {
            lock_token: token,
            events,
            held: held.len(),
        })
    }

    /// unhold_aggregates: an event of each of these aggregates (type, id) had its
    /// outcome; their next held events are due again. Returns those (id, created_at),
    /// to be claimed at once; with `notify` they are announced as well (for a caller
    /// that does not claim). Nothing to do without ordering.
    pub async fn unhold_aggregates(
        &self,
        aggregates: &[(&str, &str)],
        notify: bool,
    ) -> Result<Vec<(i64, SystemTime)>, StoreError> {
        if aggregates.is_empty() || !self.order.any() {
            return Ok(Vec::new());
        }
        let types: Vec<&str> = aggregates.iter().map(|a| a.0).collect();
        let ids: Vec<&str> = aggregates.iter().map(|a| a.1).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(UNHOLD_AGGREGATES)
            .await
            .map_err(StoreError::query("unhold_aggregates"))?;
        let rows = client
            .query(
                &statement,
                &self.with_order_params(&[&types, &ids, &notify]),
            )
            .await
            .map_err(StoreError::query("unhold_aggregates"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Ordering under `skip`: events the reaper or a crashed delivery dead-lettered no
    /// longer hold back their aggregates; their next held events are released and
    /// announced (whoever claims them). Returns how many were released.
    pub async fn release_after_burial(&self, reaped: &Reaped) -> Result<usize, StoreError> {
        let order = &self.order;
        if order.dead_letters_block || !order.any() {
            return Ok(0);
        }
        let aggregates: Vec<(&str, &str)> = reaped
            .buried_aggregates
            .iter()
            .filter(|(_, _, event_type)| order.is_ordered(event_type))
            .map(|(t, i, _)| (t.as_str(), i.as_str()))
            .collect();
        Ok(self.unhold_aggregates(&aggregates, true).await?.len())
    }

    /// The safety net of ordering (with the safety sweep): held events nothing holds
    /// back any more (the event before them ended unannounced: a row deleted by hand)
    /// are released and announced, through [`Store::unhold_aggregates`], for the
    /// aggregates of at most `limit` held events. Returns how many it released.
    pub async fn unhold_stale(&self, limit: i64) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(HELD_AGGREGATES)
            .await
            .map_err(StoreError::query("held_aggregates"))?;
        let rows = client
            .query(&statement, &[&limit])
            .await
            .map_err(StoreError::query("held_aggregates"))?;
        drop(client);
        let aggregates: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let aggregates: Vec<(&str, &str)> = aggregates
            .iter()
            .map(|(t, i)| (t.as_str(), i.as_str()))
            .collect();
        Ok(self.unhold_aggregates(&aggregates, true).await?.len())
    }

    /// `first`, then the order rule's four parameters (every ordering statement takes
    /// them last: ordered_by_default, patterns, ordered, dead_letters_block).
    fn with_order_params<'a>(
        &'a self,
        first: &[&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
        let order = &*self.order;
        let mut params = first.to_vec();
        params.extend([
            &order.ordered_by_default as &(dyn tokio_postgres::types::ToSql + Sync),
            &order.patterns,
            &order.ordered,
            &order.dead_letters_block,
        ]);
        params
    }

    /// complete: PUBLISHED. Returns the ids actually completed (fewer when fenced).
    pub async fn complete(
        &self,
        lock_token: Uuid,
        items: &[CompleteItem],
    ) -> Result<Vec<i64>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
        let created: Vec<SystemTime> = items.iter().map(|i| i.created_at).collect();
        let acked: Vec<String> = items.iter().map(|i| i.acked.join(",")).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(COMPLETE)
            .await
            .map_err(StoreError::query("complete"))?;
        let rows = client
            .query(&statement, &[&lock_token, &ids, &created, &acked])
            .await
            .map_err(StoreError::query("complete"))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    /// schedule_retry: back to PENDING after each item's delay. Returns the ids rescheduled.
    pub async fn schedule_retry(
        &self,
        lock_token: Uuid,
        items: &[RetryItem],
    ) -> Result<Vec<i64>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
        let created: Vec<SystemTime> = items.iter().map(|i| i.created_at).collect();
        let delays: Vec<f64> = items.iter().map(|i| i.delay.as_secs_f64()).collect();
        let errors: Vec<&str> = items.iter().map(|i| i.last_error.as_str()).collect();
        let give_back: Vec<bool> = items.iter().map(|i| i.give_back_attempt).collect();
        let acked: Vec<String> = items.iter().map(|i| i.acked.join(",")).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(SCHEDULE_RETRY)
            .await
            .map_err(StoreError::query("schedule_retry"))?;
        let rows = client
            .query(
                &statement,
                &[
                    &lock_token,
                    &ids,
                    &created,
                    &delays,
                    &errors,
                    &give_back,
                    &acked,
                ],
            )
            .await
            .map_err(StoreError::query("schedule_retry"))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    /// bury: to DEAD_LETTER with the reason. Returns the ids buried.
    pub async fn bury(&self, lock_token: Uuid, items: &[BuryItem]) -> Result<Vec<i64>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
        let created: Vec<SystemTime> = items.iter().map(|i| i.created_at).collect();
        let errors: Vec<&str> = items.iter().map(|i| i.last_error.as_str()).collect();
        let acked: Vec<String> = items.iter().map(|i| i.acked.join(",")).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(BURY)
            .await
            .map_err(StoreError::query("bury"))?;
        let rows = client
            .query(&statement, &[&lock_token, &ids, &created, &errors, &acked])
            .await
            .map_err(StoreError::query("bury"))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    /// extend_lease: heartbeat. Returns how many events this claim still owns.
    pub async fn extend_lease(
        &self,
        lock_token: Uuid,
        events: &[Event],
        lease: Duration,
    ) -> Result<usize, StoreError> {
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        let created: Vec<SystemTime> = events.iter().map(|e| e.created_at).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(EXTEND_LEASE)
            .await
            .map_err(StoreError::query("extend_lease"))?;
        let rows = client
            .query(
                &statement,
                &[&lock_token, &ids, &created, &lease.as_secs_f64()],
            )
            .await
            .map_err(StoreError::query("extend_lease"))?;
        Ok(rows.len())
    }

    /// release: hand back unfinished claims on shutdown. Returns how many events.
    pub async fn release(&self, lock_tokens: &[Uuid]) -> Result<usize, StoreError> {
        if lock_tokens.is_empty() {
            return Ok(0);
        }
        let client = self.client().await?;
        let rows = client
            .query(RELEASE, &[&lock_tokens])
            .await
            .map_err(StoreError::query("release"))?;
        Ok(rows.len())
    }

    /// release_crashed: a delivery crashed holding `events` (see the SQL file). Returns
    /// what was done: back to PENDING, or buried (a lone event out of attempts).
    pub async fn release_crashed(
        &self,
        lock_token: Uuid,
        events: &[(i64, SystemTime)],
        reason: &str,
        default_max_attempts: i32,
    ) -> Result<Reaped, StoreError> {
        let ids: Vec<i64> = events.iter().map(|e| e.0).collect();
        let created: Vec<SystemTime> = events.iter().map(|e| e.1).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                RELEASE_CRASHED,
                &[&lock_token, &ids, &created, &reason, &default_max_attempts],
            )
            .await
            .map_err(StoreError::query("release_crashed"))?;
        Ok(reaped_from(rows))
    }

    /// next_retry: how long until the earliest rescheduled event falls due (`None`: no
    /// event is waiting for a retry).
    pub async fn next_retry(&self) -> Result<Option<Duration>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(NEXT_RETRY)
            .await
            .map_err(StoreError::query("next_retry"))?;
        let seconds: Option<f64> = client
            .query_one(&statement, &[])
            .await
            .map_err(StoreError::query("next_retry"))?
            .get(0);
        Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// reap: expired leases back to PENDING (or DEAD_LETTER when out of attempts).
    pub async fn reap(&self, default_max_attempts: i32) -> Result<Reaped, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(REAP)
            .await
            .map_err(StoreError::query("reap"))?;
        let rows = client
            .query(&statement, &[&default_max_attempts])
            .await
            .map_err(StoreError::query("reap"))?;
        Ok(reaped_from(rows))
    }

    /// Counts per status and the oldest event's age per status.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(STATUS, &[])
            .await
            .map_err(StoreError::query("status"))?;
        Ok(rows
            .iter()
            .map(|r| StatusRow {
                status: r.get(0),
                events: r.get(1),
                oldest_age_seconds: r.get(2),
            })
            .collect())
    }

    /// Rows in the DEFAULT partition (capped at 100,000).
    pub async fn default_partition_rows(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(DEFAULT_PARTITION_ROWS, &[])
            .await
            .map_err(StoreError::query("default_partition_rows"))?;
        Ok(row.get(0))
    }

    /// A pooled connection, for partition maintenance.
    pub(crate) async fn pooled(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.client().await
    }
}

/// Rows of `(id, status)`: those back in PENDING and those buried.
fn reaped_from(rows: Vec<tokio_postgres::Row>) -> Reaped {
    let mut reaped = Reaped::default();
    for row in rows {
        let id: i64 = row.get(0);
        let status: &str = row.get(1);
        if status == "PENDING" {
            reaped.returned.push(id);
        } else {
            reaped.buried.push(id);
            reaped
                .buried_aggregates
                .push((row.get(2), row.get(3), row.get(4)));
        }
    }
    reaped
}

fn pool_error_text(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => error_text(e),
        other => other.to_string(),
    }
}

pub(crate) fn event_from_row(row: &tokio_postgres::Row) -> Event {
    let metadata: String = row.get(7);
    Event {
        id: row.get(0),
        created_at: row.get(1),
        tracking_id: row.get(2),
        aggregate_type: row.get(3),
        aggregate_id: row.get(4),
        event_type: row.get(5),
        payload: row.get(6),
        metadata: serde_json::from_str(&metadata).unwrap_or(serde_json::Value::Null),
        attempts: row.get(8),
        max_attempts: row.get(9),
        delivered_to: row.get(10),
        replay_id: None,
    }
}
