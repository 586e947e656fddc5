//! Wires one outboxd instance: store, destinations, listener, relay, reaper, partition
//! keeper, gauge refresher and HTTP listener, all ended by one cancellation token.

use crate::config::Config;
use crate::health::Health;
use crate::high_load::HighLoad;
use crate::http::AppState;
use crate::listener::Listener;
use crate::maintenance::{GaugeRefresher, PartitionKeeper, Reaper};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::replay::Replayer;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid destination: {0}")]
    Destination(String),
    #[error("{0}")]
    Http(String),
}

/// A running instance.
pub struct Outboxd {
    metrics: Metrics,
    store: Store,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    http_addr: Option<SocketAddr>,
}

impl Outboxd {
    /// Connects, checks the schema, brings partitions up to date and starts every loop.
    pub async fn start(config: Config) -> Result<Outboxd, StartError> {
        config.validate()?;
        let metrics = Metrics::new();
        let order = config.order_rule().map_err(StartError::Destination)?;
        // With ordering, the instances divide the notified events by aggregate, without
        // it by id block (src/membership.rs).
        let by_aggregate = order.any();
        // This instance's name: in outbox_mode.holder, outbox_settings and
        // outbox_instances.
        let name = instance_name();
        let store = Store::connect(&config.database)
            .await?
            .adopt_order(order, &name)
            .await?;
        let http = if config.http.listen.is_empty() {
            None
        } else {
            Some(
                crate::http::bind(&config.http.listen)
                    .await
                    .map_err(StartError::Http)?,
            )
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let keeper = PartitionKeeper::new(
            store.clone(),
            config.partitions.clone(),
            name.clone(),
            metrics.clone(),
        );
        if let Err(error) = keeper.create_ahead().await {
            tracing::error!(%error, "partition upkeep failed at start; producers' rows go to outbox_default meanwhile");
        }
        let router = config.router().map_err(StartError::Destination)?;
        let destinations =
            crate::sink::build(&config.destinations(), &router.destinations(), &metrics)
                .map_err(StartError::Destination)?;
        let health = Health::new(config.http.gauge_refresh_interval, destinations.clone());
        let replays = Arc::new(Notify::new());
        let gauges = GaugeRefresher::new(
            store.clone(),
            config.http.gauge_refresh_interval,
            metrics.clone(),
            health.clone(),
        )
        .waking_replays(replays.clone());
        if let Err(error) = gauges.run_once().await {
            tracing::error!(%error, "could not read the gauges at start");
        }

        let shutdown = CancellationToken::new();
        let (wakes_tx, wakes_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        // Connect to each destination now, so a wrong address is reported at start,
        // without holding the start up while one is unreachable.
        for destination in &destinations {
            let destination = destination.clone();
            let checking = shutdown.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = checking.cancelled() => {}
                    checked = destination.connect() => if let Err(error) = checked {
                        tracing::error!(destination = destination.name(), %error, "destination not reachable at start; its events wait in PENDING until it is");
                    }
                }
            });
        }
        let replayer = Replayer::new(store.clone(), &destinations, name.clone(), replays.clone());
        let destination_names: Vec<String> =
            destinations.iter().map(|d| d.name().to_string()).collect();
        let relay = Relay::new(
            store.clone(),
            router,
            destinations,
            config.relay.clone(),
            config.retry.clone(),
            metrics.clone(),
            wakes_rx,
        )
        .dividing_by_aggregate(by_aggregate)
        .with_high_load(HighLoad::new(
            config.high_load.clone(),
            name.clone(),
            metrics.clone(),
        ));
        tasks.spawn(relay.run(shutdown.clone()));
        tasks.spawn(replayer.run(shutdown.clone()));
        let reaper = Reaper::new(
            store.clone(),
            config.relay.lease,
            config.retry.max_attempts,
            wakes_tx.clone(),
            metrics.clone(),
        );
        tasks.spawn(reaper.run(shutdown.clone()));
        tasks.spawn(keeper.run(shutdown.clone()));
        tasks.spawn(gauges.run(shutdown.clone()));
        let listener = Listener::new(&config, name, wakes_tx, metrics.clone());
        tasks.spawn(listener.run(shutdown.clone()));
        if let Some(http) = http {
            let state = AppState {
                metrics: metrics.clone(),
                health: health.clone(),
                store: store.clone(),
                admin_token: config.http.admin_token.clone(),
                destinations: destination_names,
                replays,
            };
            tasks.spawn(crate::http::serve(http, state, shutdown.clone()));
        }
        Ok(Outboxd {
            metrics,
            store,
            shutdown,
            tasks,
            http_addr,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where `/metrics` is served (`None`: HTTP listener off).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A token that stops this instance when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops claiming, lets in-flight deliveries finish (within `relay.shutdown_grace`),
    /// releases what is left and returns when every loop has ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "a background loop failed");
            }
        }
    }

    /// Runs until the shutdown token is cancelled, then stops as [`Outboxd::stop`].
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.stop().await;
    }
}

/// This instance's name: host, process id and a random part (several instances may
/// share a process in tests).
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "outboxd".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &random[..8])
}
