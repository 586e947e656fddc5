//! Claim: what to lease next (the most urgent sweep, else the notified ids, a batch at a
//! time), leased under one `lock_token` with `FOR UPDATE SKIP LOCKED` so instances never
//! share an event, and handed to a delivery task per route. A failed claim waits a
//! backoff; its ids are kept and claimed once the database answers.

use super::Relay;
use super::inbox::Sweep;
use crate::event::Claim;
use crate::store::{ClaimFilter, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The most held events one safety sweep reads (ordering's safety net).
const UNHOLD_STALE_LIMIT: i64 = 10_000;

/// In drain mode, ordered instances leave the events of others' aggregates to them
/// unless they have been due this long.
const UNCLAIMED_BY_OWNER: Duration = Duration::from_secs(1);

impl Relay {
    /// Claims while there is work and a destination with room for another batch, and
    /// starts the deliveries. A destination whose batches are all in flight, or whose
    /// circuit is open, is left out of the claims (its events stay PENDING, untouched);
    /// after a cool-down one event is claimed to probe it; once it takes events again, a
    /// sweep picks up what the claims left behind. Returns how many events it claimed.
    pub(super) async fn fill(&mut self) -> usize {
        let mut claimed = 0;
        while self.claims_blocked_until.is_none() {
            let gates = self.gates();
            if gates.everything_waits {
                break;
            }
            let mut probing = None;
            let result = if let Some(probe) = gates.probe {
                let avoid: Vec<String> = gates
                    .avoid
                    .iter()
                    .filter(|d| **d != probe)
                    .cloned()
                    .collect();
                let filter = self.deliverer.router.claim_filter(&avoid, Some(&probe));
                let result = self
                    .deliverer
                    .store
                    .claim_due(1, Duration::ZERO, self.deliverer.relay.lease, &filter)
                    .await;
                match &result {
                    Ok(claim) if claim.events.is_empty() => {
                        // Nothing waits for it: claims take its events again, and the
                        // circuit lets the first one through as its probe.
                        self.gates.nothing_to_probe.insert(probe);
                    }
                    Ok(_) => {
                        self.gates.probing.insert(probe.clone());
                        probing = Some(probe);
                    }
                    Err(_) => {}
                }
                result.map(Some)
            } else {
                let filter = self.deliverer.router.claim_filter(&gates.avoid, None);
                if !filter.is_all() {
                    self.gates.left_out.extend(gates.avoid.iter().cloned());
                }
                self.claim_next(&filter).await
            };
            let Some(result) = result.transpose() else {
                break;
            };
            match result {
                Ok(claim) => {
                    self.claim_backoff.succeeded();
                    claimed += claim.events.len();
                    self.dispatch(claim, probing);
                }
                Err(error) => {
                    let delay = self.claim_backoff.failed();
                    tracing::error!(%error, retry_in_ms = delay.as_millis() as u64, "claim failed");
                    self.claims_blocked_until = Some(Instant::now() + delay);
                }
            }
        }
        claimed
    }

    /// The next claim the inbox asks for (`None`: nothing to claim): a suspect alone,
    /// else the oldest sweep, else a batch of notified ids.
    async fn claim_next(&mut self, filter: &ClaimFilter) -> Result<Option<Claim>, StoreError> {
        let lease = self.deliverer.relay.lease;
        if let Some(suspect) = self.inbox.take_suspect() {
            let result = self
                .deliverer
                .store
                .claim_ids(&[suspect], None, lease, filter, None)
                .await;
            if result.is_err() {
                self.inbox.suspect(vec![suspect]);
            }
            result.map(Some)
        } else if let Some(sweep) = self.inbox.sweep() {
            self.claim_sweep(sweep, filter).await.map(Some)
        } else if self.inbox.has_ids() {
            let (ids, created) = self.inbox.take_ids(self.deliverer.relay.batch_size);
            let shards = self.inbox.aggregate_shards();
            let result = self
                .deliverer
                .store
                .claim_ids(&ids, created, lease, filter, shards.as_deref())
                .await;
            if result.is_err() {
                self.inbox.put_back(ids, created);
            }
            result.map(Some)
        } else {
            Ok(None)
        }
    }

    /// One claim for `sweep`. A drain-mode poll goes on until a claim comes back empty;
    /// other sweeps end with the first short claim. What a counted sweep finds is counted.
    async fn claim_sweep(
        &mut self,
        sweep: Sweep,
        filter: &ClaimFilter,
    ) -> Result<Claim, StoreError> {
        let d = Arc::clone(&self.deliverer);
        let batch = d.relay.batch_size;
        let shards = self.inbox.aggregate_shards();
        let claim = match sweep {
            Sweep::Retry => {
                d.store
                    .claim_due_retries(batch, d.relay.lease, filter)
                    .await?
            }
            Sweep::Safety => {
                if d.store.order().any() {
                    // Ordering's safety net: holds nothing holds back any more.
                    match d.store.unhold_stale(UNHOLD_STALE_LIMIT).await {
                        Ok(0) => {}
                        Ok(released) => tracing::warn!(
                            events = released,
                            "safety sweep released held events whose predecessor ended unannounced"
                        ),
                        Err(error) => tracing::warn!(%error, "could not check held events"),
                    }
                }
                d.store
                    .claim_due(batch, d.relay.safety_sweep_grace, d.relay.lease, filter)
                    .await?
            }
            Sweep::Drain if shards.is_some() && !self.high_load.is_leaving() => {
                // Ordered instances in drain mode poll their own aggregates' events, so
                // their claims never wait on each other's; events due for a while that
                // their owner has not claimed (it is gone, or has not read the latest
                // members) are anyone's. Leaving drain mode, every event is claimed
                // again, until no producer that read drain mode can still commit.
                let mine = d
                    .store
                    .claim_due_of(
                        batch,
                        Duration::ZERO,
                        d.relay.lease,
                        filter,
                        shards.as_deref(),
                    )
                    .await?;
                if mine.events.len() + mine.held > 0 {
                    mine
                } else {
                    d.store
                        .claim_due(batch, UNCLAIMED_BY_OWNER, d.relay.lease, filter)
                        .await?
                }
            }
            Sweep::Drain
            | Sweep::Requested
            | Sweep::Reconnect
            | Sweep::Resumed
            | Sweep::Rebalanced => {
                d.store
                    .claim_due(batch, Duration::ZERO, d.relay.lease, filter)
                    .await?
            }
        };
        // Held candidates count: a batch full of them is not the end of what is due.
        let taken = claim.events.len() + claim.held;
        let more = if sweep == Sweep::Drain {
            taken > 0
        } else {
            taken == batch
        };
        if more {
            self.inbox.sweep_continues(sweep);
        } else {
            self.inbox.sweep_done(sweep);
            if sweep != Sweep::Retry && sweep != Sweep::Drain {
                self.arm_retry_timer().await;
            }
        }
        let found = claim.events.len() as u64;
        if sweep.is_counted() && found > 0 {
            d.metrics
                .sweep_recovered
                .with_label_values(&[sweep.label()])
                .inc_by(found);
            if sweep == Sweep::Safety {
                tracing::warn!(
                    events = found,
                    "safety sweep found events no notification delivered"
                );
            }
        }
        Ok(claim)
    }

    /// Arms the retry timer for the earliest rescheduled event in the table, whoever
    /// scheduled it: retries of an instance that stopped or crashed are claimed when
    /// they fall due. Read after each sweep (the reconnect sweep runs at start).
    async fn arm_retry_timer(&mut self) {
        match self.deliverer.store.next_retry().await {
            Ok(Some(due_in)) => self.inbox.schedule_retries(&[due_in]),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "could not read the next retry; the sweeps find it")
            }
        }
    }

    /// Starts one delivery task per route group of `claim`; each holds a slot of every
    /// destination it still sends to (`probe`: the claim is that destination's probe).
    fn dispatch(&mut self, claim: Claim, probe: Option<String>) {
        if let Some(highest) = claim.events.iter().map(|e| e.id).max() {
            self.high_load.saw(highest);
        }
        let token = claim.lock_token;
        for (plan, events) in super::deliver::plan(&self.deliverer.router, claim.events) {
            let destinations = plan.still_needed(&events);
            let slots = self.gates.slots.take(&destinations);
            let held = super::Held {
                lock_token: token,
                events: events.iter().map(|e| (e.id, e.created_at)).collect(),
                probe: probe.clone().filter(|p| destinations.contains(p)),
            };
            let deliverer = Arc::clone(&self.deliverer);
            let handle = self
                .in_flight
                .spawn(async move { deliverer.deliver(token, plan, events, slots).await });
            self.held.insert(handle.id(), held);
        }
    }
}
