//! Background upkeep: the reaper (expired leases back to PENDING, every `lease / 2`,
//! invariant 7) and the partition keeper (daily partitions days ahead, DEFAULT watched).

use crate::health::Health;
use crate::metrics::Metrics;
use crate::relay::Wake;
use crate::store::operations::Gauges;
use crate::store::partitions::PartitionReport;
use crate::store::{Reaped, Store, StoreError};
use std::time::Duration;
use tokio::sync::mpsc;
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
}

impl GaugeRefresher {
    pub fn new(store: Store, every: Duration, metrics: Metrics, health: Health) -> Self {
        Self {
            store,
            every,
            metrics,
            health,
        }
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

/// Keeps daily partitions created `days_ahead` and reports rows in DEFAULT.
pub struct PartitionKeeper {
    store: Store,
    days_ahead: u32,
    every: Duration,
    metrics: Metrics,
}

impl PartitionKeeper {
    pub fn new(store: Store, days_ahead: u32, every: Duration, metrics: Metrics) -> Self {
        Self {
            store,
            days_ahead,
            every,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        every(self.every, &shutdown, "partition upkeep", || {
            self.run_once()
        })
        .await;
    }

    pub async fn run_once(&self) -> Result<PartitionReport, StoreError> {
        let report = self.store.ensure_partitions(self.days_ahead).await?;
        self.metrics.default_partition_rows.set(report.default_rows);
        Ok(report)
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
