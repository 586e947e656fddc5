//! Background upkeep: the reaper (expired leases back to PENDING, every `lease / 2`,
//! invariant 7) and the partition keeper (daily partitions days ahead; under a lease,
//! one instance at a time: DEFAULT emptied into its days' partitions and retention).

use crate::config::PartitionsConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::relay::Wake;
use crate::store::operations::Gauges;
use crate::store::partitions::PartitionReport;
use crate::store::retention::RetentionReport;
use crate::store::{Reaped, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tokio_util::sync::CancellationToken;

/// Returns events whose worker died (lease expired) to PENDING and hands their ids to
/// the relay, so they are claimed at once rather than at the next sweep.
pub struct Reaper {
    store: Store,
    every: Duration,
    default_max_attempts: i32,
    wakes: mpsc::UnboundedSender<Wake>,
    metrics: Metrics,
}

impl Reaper {
    pub fn new(
        store: Store,
        lease: Duration,
        default_max_attempts: i32,
        wakes: mpsc::UnboundedSender<Wake>,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            every: lease / 2,
            default_max_attempts,
            wakes,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        every(self.every, &shutdown, "reap", || self.run_once()).await;
    }

    pub async fn run_once(&self) -> Result<Reaped, StoreError> {
        let reaped = self.store.reap(self.default_max_attempts).await?;
        let total = reaped.returned.len() + reaped.buried.len();
        if total > 0 {
            self.metrics.reaped.inc_by(total as u64);
            tracing::warn!(
                returned = reaped.returned.len(),
                buried = reaped.buried.len(),
                "reaped events whose lease expired (a worker crashed or stalled)"
            );
        }
        if !reaped.returned.is_empty() {
            let _ = self.wakes.send(Wake::Reaped(reaped.returned.clone()));
        }
        if let Err(error) = self.store.release_after_burial(&reaped).await {
            tracing::warn!(%error, "could not release the aggregates of reaped dead letters; the safety sweep does");
        }
        Ok(reaped)
    }
}

/// Reads the database-wide gauges on an interval (one statement, not one per scrape)
/// and tells readiness whether the database answers.
pub struct GaugeRefresher {
    store: Store,
    every: Duration,
    metrics: Metrics,
    health: Health,
    /// Woken when a replay is running (the replayer asks nothing itself while idle).
    replays: Option<Arc<Notify>>,
}

impl GaugeRefresher {
    pub fn new(store: Store, every: Duration, metrics: Metrics, health: Health) -> Self {
        Self {
            store,
            every,
            metrics,
            health,
            replays: None,
        }
    }

    /// Wakes `replays` whenever the gauges count a running replay.
    pub fn waking_replays(mut self, replays: Arc<Notify>) -> Self {
        self.replays = Some(replays);
        self
    }

    pub async fn run(self, shutdown: CancellationToken) {
        every(self.every, &shutdown, "gauge refresh", || self.run_once()).await;
    }

    pub async fn run_once(&self) -> Result<Gauges, StoreError> {
        match self.store.gauges().await {
            Ok(gauges) => {
                self.metrics.events_pending.set(gauges.pending);
                self.metrics
                    .oldest_pending_age
                    .set(gauges.oldest_pending_age_seconds);
                self.metrics.events_dead_letter.set(gauges.dead_letters);
                self.metrics.events_held.set(gauges.held);
                self.metrics
                    .dead_letters_blocking
                    .set(gauges.dead_letters_blocking);
                self.metrics
                    .notification_queue_usage
                    .set(gauges.notification_queue_usage);
                self.metrics
                    .default_partition_rows
                    .set(gauges.default_partition_rows);
                self.metrics.replays_running.set(gauges.replays_running);
                self.metrics
                    .partition_dead_tuples
                    .set(gauges.partition_dead_tuples);
                self.metrics.xmin_horizon_age.set(gauges.xmin_horizon_age);
                self.metrics
                    .oldest_transaction_age
                    .set(gauges.oldest_transaction_age_seconds);
                // A slot dropped since the last read leaves no stale series behind.
                self.metrics.slot_xmin_age.reset();
                self.metrics.slot_retained_wal.reset();
                for slot in &gauges.replication_slots {
                    self.metrics
                        .slot_xmin_age
                        .with_label_values(&[&slot.slot])
                        .set(slot.xmin_age);
                    self.metrics
                        .slot_retained_wal
                        .with_label_values(&[&slot.slot])
                        .set(slot.wal_bytes);
                }
                if gauges.replays_running > 0
                    && let Some(replays) = &self.replays
                {
                    replays.notify_one();
                }
                self.health.database_answered();
                Ok(gauges)
            }
            Err(error) => {
                self.health.database_failed(error.to_string());
                Err(error)
            }
        }
    }
}

/// The partition keeper's first pass after start.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(60);

/// Keeps daily partitions created `days_ahead`, empties DEFAULT into its days'
/// partitions and drops (or detaches) the expired ones.
pub struct PartitionKeeper {
    store: Store,
    config: PartitionsConfig,
    /// This instance's name, as the holder of the maintenance lease.
    holder: String,
    metrics: Metrics,
}

/// What one pass of the partition keeper did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeeperReport {
    pub created: PartitionReport,
    pub maintained: RetentionReport,
}

impl PartitionKeeper {
    pub fn new(store: Store, config: PartitionsConfig, holder: String, metrics: Metrics) -> Self {
        Self {
            store,
            config,
            holder,
            metrics,
        }
    }

    /// A first pass a minute after start (or after `partitions.check_interval`, if
    /// shorter: the start only creates the partitions ahead, and instances restarted
    /// together do not all maintain at once), then one every `check_interval`.
    pub async fn run(self, shutdown: CancellationToken) {
        let first = FIRST_PASS_AFTER.min(self.config.check_interval);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(first) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            done = self.run_once() => if let Err(error) = done {
                tracing::error!(%error, "partition upkeep failed; trying again next round");
            }
        }
        every(
            self.config.check_interval,
            &shutdown,
            "partition upkeep",
            || self.run_once(),
        )
        .await;
    }

    /// Creates the partitions ahead only (what the start waits for).
    pub async fn create_ahead(&self) -> Result<PartitionReport, StoreError> {
        let created = self.store.ensure_partitions(self.config.days_ahead).await?;
        self.metrics
            .default_partition_rows
            .set(created.default_rows);
        Ok(created)
    }

    pub async fn run_once(&self) -> Result<KeeperReport, StoreError> {
        let created = self.create_ahead().await?;
        let maintained = self
            .store
            .maintain_partitions(self.config.retention, self.config.on_expiry, &self.holder)
            .await?;
        if !maintained.default.moved.is_empty() {
            let rows = self.store.default_partition_rows().await?;
            self.metrics.default_partition_rows.set(rows);
        }
        Ok(KeeperReport {
            created,
            maintained,
        })
    }
}

/// Runs `once` every `period` (first after one period) until shutdown; a failure is
/// logged and the next round tries again.
async fn every<T, F, Fut>(period: Duration, shutdown: &CancellationToken, what: &str, mut once: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut tick = interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                if let Err(error) = once().await {
                    tracing::error!(%error, "{what} failed; trying again next round");
                }
            }
        }
    }
}
