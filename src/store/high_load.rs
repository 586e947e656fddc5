//! The statements of high-load (drain) mode: the one-row `outbox_mode` table the NOTIFY
//! trigger reads, and the two checks that make leaving drain mode race-free.

use super::{Store, StoreError};
use std::time::Duration;

const ENTER: &str = include_str!("../../sql/high_load_enter.sql");
const LEAVE: &str = include_str!("../../sql/high_load_leave.sql");
const READ: &str = include_str!("../../sql/high_load_read.sql");
const FENCE: &str = include_str!("../../sql/high_load_fence.sql");
const HORIZON: &str = include_str!("../../sql/high_load_horizon.sql");

/// Drain mode as the database has it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModeRow {
    /// Notifications are off (mode = 'drain' and the lease runs).
    pub draining: bool,
    /// How much longer the drain lease runs (zero when off).
    pub remaining: Duration,
}

impl Store {
    /// Enters (or renews) drain mode for `lease`, as `holder`, and tells every listening
    /// instance.
    pub async fn enter_drain(&self, holder: &str, lease: Duration) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(ENTER)
            .await
            .map_err(StoreError::query("high_load_enter"))?;
        client
            .execute(&statement, &[&holder, &lease.as_secs_f64()])
            .await
            .map_err(StoreError::query("high_load_enter"))?;
        Ok(())
    }

    /// Back to notify mode if `holder` still holds drain mode. False: another instance
    /// renewed it since (it leaves when its own load falls).
    pub async fn leave_drain(&self, holder: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(LEAVE)
            .await
            .map_err(StoreError::query("high_load_leave"))?;
        let rows = client
            .execute(&statement, &[&holder])
            .await
            .map_err(StoreError::query("high_load_leave"))?;
        Ok(rows > 0)
    }

    /// Drain mode as the database has it now.
    pub async fn read_mode(&self) -> Result<ModeRow, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(READ)
            .await
            .map_err(StoreError::query("high_load_read"))?;
        let row = client
            .query_opt(&statement, &[])
            .await
            .map_err(StoreError::query("high_load_read"))?;
        Ok(match row {
            Some(row) => ModeRow {
                draining: row.get(0),
                remaining: Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0)),
            },
            None => ModeRow {
                draining: false,
                remaining: Duration::ZERO,
            },
        })
    }

    /// N: a transaction id above that of every producer that read drain mode. None when
    /// drain mode is on again.
    pub async fn drain_fence(&self) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(FENCE)
            .await
            .map_err(StoreError::query("high_load_fence"))?;
        let row = client
            .query_opt(&statement, &[])
            .await
            .map_err(StoreError::query("high_load_fence"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// True once no transaction that could have read drain mode before `fence` can
    /// still commit an event (see sql/high_load_horizon.sql).
    pub async fn drain_horizon_passed(&self, fence: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(HORIZON)
            .await
            .map_err(StoreError::query("high_load_horizon"))?;
        let row = client
            .query_one(&statement, &[&fence])
            .await
            .map_err(StoreError::query("high_load_horizon"))?;
        Ok(row.get(0))
    }
}
