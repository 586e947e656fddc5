//! Readiness: the database answers (the last gauge refresh succeeded recently), the
//! listener is connected, and every destination says it is available (its circuit is
//! closed). Judged from what the loops already do, so a readiness probe sends no query.

use crate::metrics::Metrics;
use crate::sink::Sink;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One part that is down, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Down {
    pub part: String,
    pub reason: String,
}

/// Shared by the gauge refresher (which reports the database) and `/readyz`.
#[derive(Clone)]
pub struct Health {
    database: Arc<Mutex<Result<Instant, String>>>,
    stale_after: Duration,
    destinations: Arc<Vec<Arc<dyn Sink>>>,
}

impl Health {
    /// `refresh_every`: how often the database is checked; `destinations`: every
    /// destination this instance delivers to.
    pub fn new(refresh_every: Duration, destinations: Vec<Arc<dyn Sink>>) -> Health {
        Health {
            database: Arc::new(Mutex::new(Err("not checked yet".into()))),
            stale_after: refresh_every * 2 + Duration::from_secs(5),
            destinations: Arc::new(destinations),
        }
    }

    pub fn database_answered(&self) {
        *self.database.lock().expect("health") = Ok(Instant::now());
    }

    pub fn database_failed(&self, reason: String) {
        *self.database.lock().expect("health") = Err(reason);
    }

    /// Everything that is down now; empty when ready.
    pub fn down(&self, metrics: &Metrics) -> Vec<Down> {
        let mut down = Vec::new();
        match &*self.database.lock().expect("health") {
            Ok(at) if at.elapsed() <= self.stale_after => {}
            Ok(at) => down.push(Down {
                part: "database".into(),
                reason: format!("no successful query for {:?}", at.elapsed()),
            }),
            Err(reason) => down.push(Down {
                part: "database".into(),
                reason: reason.clone(),
            }),
        }
        if metrics.listener_connected.get() != 1 {
            down.push(Down {
                part: "listener".into(),
                reason: "the LISTEN connection is down; reconnecting".into(),
            });
        }
        for destination in self.destinations.iter() {
            if let Err(reason) = destination.available() {
                down.push(Down {
                    part: destination.name().to_string(),
                    reason,
                });
            }
        }
        down
    }
}
