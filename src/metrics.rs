//! Prometheus metrics of one outboxd instance (names from design.md section 4). Counters
//! and the latency histogram are per instance; gauges computed from the database are true
//! across instances.

use crate::relay::Sweep;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `kind` label of `outbox_delivery_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Failed; retried later (an attempt was used).
    Retry,
    /// Failed for good: the event is a dead letter.
    Rejected,
    /// Not attempted: the destination was unavailable (no attempt used).
    Deferred,
}

impl FailureKind {
    pub const ALL: [FailureKind; 3] = [
        FailureKind::Retry,
        FailureKind::Rejected,
        FailureKind::Deferred,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Retry => "retry",
            FailureKind::Rejected => "rejected",
            FailureKind::Deferred => "deferred",
        }
    }
}

/// The `class` label of `outbox_webhook_responses_total`: the status class of the
/// answer, or why none came.
pub const WEBHOOK_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "5xx", "timeout", "error"];

/// The class of HTTP status `status` (`1xx` answers end a request only when they are
/// malformed: counted with the errors).
pub fn webhook_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "error",
    }
}

/// Buckets of the latency histograms, in seconds.
const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// Every metric of the instance, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    names: std::sync::Arc<Vec<String>>,
    pub published: IntCounterVec,
    pub delivery_failures: IntCounterVec,
    pub reaped: IntCounter,
    pub delivery_latency: Histogram,
    pub destination_latency: HistogramVec,
    pub webhook_responses: IntCounterVec,
    pub listener_connected: IntGauge,
    pub instances: IntGauge,
    pub shards_owned: IntGauge,
    pub batches_allowed: IntGauge,
    pub notifications: IntCounter,
    pub malformed_notifications: IntCounter,
    pub fenced_outcomes: IntCounter,
    pub sweep_recovered: IntCounterVec,
    pub default_partition_rows: IntGauge,
    pub destination_circuit_open: IntGaugeVec,
    pub unrouted: IntCounter,
    pub events_pending: IntGauge,
    pub oldest_pending_age: Gauge,
    pub events_dead_letter: IntGauge,
    pub events_held: IntGauge,
    pub dead_letters_blocking: IntGauge,
    pub ordering_skipped: IntCounter,
    pub notification_queue_usage: Gauge,
    pub high_load_mode: IntGauge,
    pub high_load_switches: IntCounterVec,
    pub high_load_claims: IntCounter,
    pub replays_running: IntGauge,
    pub partition_dead_tuples: IntGauge,
    pub xmin_horizon_age: IntGauge,
    pub oldest_transaction_age: Gauge,
    pub slot_xmin_age: IntGaugeVec,
    pub slot_retained_wal: GaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let published = IntCounterVec::new(
            Opts::new(
                "outbox_events_published_total",
                "Events acknowledged by a destination (broker confirm ack or HTTP 2xx).",
            ),
            &["destination"],
        )
        .expect("metric");
        let delivery_failures = IntCounterVec::new(
            Opts::new(
                "outbox_delivery_failures_total",
                "Failed deliveries by destination and kind (retry, rejected, deferred).",
            ),
            &["destination", "kind"],
        )
        .expect("metric");
        let reaped = IntCounter::new(
            "outbox_events_reaped_total",
            "Events whose lease expired (worker crashed or stalled) returned by the reaper.",
        )
        .expect("metric");
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_delivery_latency_seconds",
                "From insert (created_at) to the last destination's acknowledgement.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric");
        let destination_latency = HistogramVec::new(
            HistogramOpts::new(
                "outbox_destination_latency_seconds",
                "From insert (created_at) to this destination's acknowledgement.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["destination"],
        )
        .expect("metric");
        let webhook_responses = IntCounterVec::new(
            Opts::new(
                "outbox_webhook_responses_total",
                "Webhook requests by what came back: the status class (2xx, 3xx, 4xx, 5xx), or timeout / error (no answer: connection, TLS or protocol failure).",
            ),
            &["destination", "class"],
        )
        .expect("metric");
        let listener_connected = IntGauge::new(
            "outbox_listener_connected",
            "1 while the LISTEN connection is up, 0 while it reconnects.",
        )
        .expect("metric");
        let instances = IntGauge::new(
            "outbox_instances",
            "Live outboxd instances on this database (listening, heartbeat current), as this instance last read them; they divide the notified events among them.",
        )
        .expect("metric");
        let shards_owned = IntGauge::new(
            "outbox_shards_owned",
            "Shards of the notified event ids this instance claims (of 256; all of them while alone).",
        )
        .expect("metric");
        let batches_allowed = IntGauge::new(
            "outbox_batches_in_flight_allowed",
            "Batches this instance may have in flight per destination: relay.max_in_flight_batches split among the live instances on its host.",
        )
        .expect("metric");
        let notifications = IntCounter::new(
            "outbox_notifications_total",
            "Notifications received on channel outbox_events.",
        )
        .expect("metric");
        let malformed_notifications = IntCounter::new(
            "outbox_notifications_malformed_total",
            "Notifications whose payload could not be parsed (answered with a sweep).",
        )
        .expect("metric");
        let fenced_outcomes = IntCounter::new(
            "outbox_fenced_outcomes_total",
            "Outcomes refused because the event's lease had moved on to another owner.",
        )
        .expect("metric");
        let sweep_recovered = IntCounterVec::new(
            Opts::new(
                "outbox_sweep_recovered_total",
                "Events claimed by a sweep rather than by a notification.",
            ),
            &["sweep"],
        )
        .expect("metric");
        let replays_running = IntGauge::new(
            "outbox_replays_running",
            "Replays (outboxd replay) waiting for an instance or being sent.",
        )
        .expect("metric");
        let partition_dead_tuples = IntGauge::new(
            "outbox_partition_dead_tuples",
            "Dead row versions in the outbox partitions, not yet vacuumed (statistics collector).",
        )
        .expect("metric");
        let xmin_horizon_age = IntGauge::new(
            "outbox_xmin_horizon_age_transactions",
            "Age in transactions of the oldest snapshot a session or prepared transaction of this database holds: vacuum cannot remove rows deleted after it.",
        )
        .expect("metric");
        let oldest_transaction_age = Gauge::new(
            "outbox_oldest_transaction_age_seconds",
            "Seconds since the oldest open transaction of this database (another session's) began.",
        )
        .expect("metric");
        let slot_xmin_age = IntGaugeVec::new(
            Opts::new(
                "outbox_replication_slot_xmin_age_transactions",
                "Age in transactions of the xmin (catalog_xmin for a logical slot) a replication slot keeps.",
            ),
            &["slot"],
        )
        .expect("metric");
        let slot_retained_wal = GaugeVec::new(
            Opts::new(
                "outbox_replication_slot_retained_wal_bytes",
                "WAL the server keeps for a replication slot.",
            ),
            &["slot"],
        )
        .expect("metric");
        let default_partition_rows = IntGauge::new(
            "outbox_default_partition_rows",
            "Rows in the DEFAULT partition (should be 0: a daily partition is missing).",
        )
        .expect("metric");
        let destination_circuit_open = IntGaugeVec::new(
            Opts::new(
                "outbox_destination_circuit_open",
                "1 while a destination is unreachable and its events are deferred.",
            ),
            &["destination"],
        )
        .expect("metric");
        let unrouted = IntCounter::new(
            "outbox_events_unrouted_total",
            "Events no routing rule matched (dead-lettered or skipped, as configured).",
        )
        .expect("metric");
        let events_pending = IntGauge::new(
            "outbox_events_pending",
            "Events PENDING or PROCESSING, counted from the database (all instances).",
        )
        .expect("metric");
        let oldest_pending_age = Gauge::new(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest PENDING or PROCESSING event (0 when none), from the database.",
        )
        .expect("metric");
        let events_dead_letter = IntGauge::new(
            "outbox_events_dead_letter",
            "Events in DEAD_LETTER, from the database.",
        )
        .expect("metric");
        let events_held = IntGauge::new(
            "outbox_events_held",
            "Events waiting for an earlier event of their aggregate (ordering), from the database; counted in outbox_events_pending too.",
        )
        .expect("metric");
        let dead_letters_blocking = IntGauge::new(
            "outbox_dead_letters_blocking",
            "Dead letters holding back later events of their aggregate (ordering_dead_letters = block), from the database: redrive or discard them.",
        )
        .expect("metric");
        let ordering_skipped = IntCounter::new(
            "outbox_ordering_skipped_total",
            "Ordered events dead-lettered while ordering_dead_letters = skip: the later events of their aggregate went on without them.",
        )
        .expect("metric");
        let notification_queue_usage = Gauge::new(
            "outbox_notification_queue_usage_ratio",
            "pg_notification_queue_usage(): when the queue fills, producers' commits fail.",
        )
        .expect("metric");
        let high_load_mode = IntGauge::new(
            "outbox_high_load_mode",
            "This instance's mode: 0 notify, 1 drain (claiming back to back), 2 leaving drain mode.",
        )
        .expect("metric");
        let high_load_switches = IntCounterVec::new(
            Opts::new(
                "outbox_high_load_switches_total",
                "Switches of this instance into drain mode and back to notify mode.",
            ),
            &["to"],
        )
        .expect("metric");
        let high_load_claims = IntCounter::new(
            "outbox_high_load_claims_total",
            "Claims made because of drain mode (polls), not because of a notification.",
        )
        .expect("metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "outbox_build_info",
                "Always 1; its version label says which outboxd this instance runs.",
            ),
            &["version"],
        )
        .expect("metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let mut names = Vec::new();
        for collector in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(published.clone()),
            Box::new(delivery_failures.clone()),
            Box::new(reaped.clone()),
            Box::new(delivery_latency.clone()),
            Box::new(destination_latency.clone()),
            Box::new(webhook_responses.clone()),
            Box::new(listener_connected.clone()),
            Box::new(instances.clone()),
            Box::new(shards_owned.clone()),
            Box::new(batches_allowed.clone()),
            Box::new(notifications.clone()),
            Box::new(malformed_notifications.clone()),
            Box::new(fenced_outcomes.clone()),
            Box::new(sweep_recovered.clone()),
            Box::new(default_partition_rows.clone()),
            Box::new(replays_running.clone()),
            Box::new(partition_dead_tuples.clone()),
            Box::new(xmin_horizon_age.clone()),
            Box::new(oldest_transaction_age.clone()),
            Box::new(slot_xmin_age.clone()),
            Box::new(slot_retained_wal.clone()),
            Box::new(destination_circuit_open.clone()),
            Box::new(unrouted.clone()),
            Box::new(events_pending.clone()),
            Box::new(oldest_pending_age.clone()),
            Box::new(events_dead_letter.clone()),
            Box::new(events_held.clone()),
            Box::new(dead_letters_blocking.clone()),
            Box::new(ordering_skipped.clone()),
            Box::new(notification_queue_usage.clone()),
            Box::new(high_load_mode.clone()),
            Box::new(high_load_switches.clone()),
            Box::new(high_load_claims.clone()),
        ] {
            register(&registry, &mut names, collector);
        }
        // CPU, memory and open files of this process (Linux).
        #[cfg(target_os = "linux")]
        register(
            &registry,
            &mut names,
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        );
        for sweep in Sweep::COUNTED {
            sweep_recovered.with_label_values(&[sweep.label()]);
        }
        for to in ["drain", "notify"] {
            high_load_switches.with_label_values(&[to]);
        }
        names.sort();
        Self {
            registry,
            names: std::sync::Arc::new(names),
            published,
            delivery_failures,
            reaped,
            delivery_latency,
            destination_latency,
            webhook_responses,
            listener_connected,
            instances,
            shards_owned,
            batches_allowed,
            notifications,
            malformed_notifications,
            fenced_outcomes,
            sweep_recovered,
            default_partition_rows,
            replays_running,
            partition_dead_tuples,
            xmin_horizon_age,
            oldest_transaction_age,
            slot_xmin_age,
            slot_retained_wal,
            destination_circuit_open,
            unrouted,
            events_pending,
            oldest_pending_age,
            events_dead_letter,
            events_held,
            dead_letters_blocking,
            ordering_skipped,
            notification_queue_usage,
            high_load_mode,
            high_load_switches,
            high_load_claims,
        }
    }

    /// The name of every metric this instance exports (histograms without their
    /// `_bucket`/`_sum`/`_count` suffixes).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Exports every series of `destination` at zero (published, each failure kind, its
    /// circuit), so a dashboard or an `absent()` alert sees a healthy destination as 0,
    /// not as "no data". Called once per destination when the destinations are built.
    pub fn add_destination(&self, destination: &str) {
        self.published.with_label_values(&[destination]);
        self.destination_latency.with_label_values(&[destination]);
        for kind in FailureKind::ALL {
            self.delivery_failures
                .with_label_values(&[destination, kind.label()]);
        }
        self.destination_circuit_open
            .with_label_values(&[destination])
            .set(0);
    }

    /// Exports webhook `destination`'s response classes at zero; returns their counters
    /// in the order of [`WEBHOOK_CLASSES`], for the sink to keep.
    pub fn add_webhook(&self, destination: &str) -> Vec<IntCounter> {
        WEBHOOK_CLASSES
            .iter()
            .map(|class| {
                self.webhook_responses
                    .with_label_values(&[destination, class])
            })
            .collect()
    }

    /// Counts one failed delivery.
    pub fn failed(&self, destination: &str, kind: FailureKind) {
        self.delivery_failures
            .with_label_values(&[destination, kind.label()])
            .inc();
    }

    /// Events a counted sweep (`Sweep::COUNTED`) recovered so far.
    pub fn recovered(&self, sweep: Sweep) -> u64 {
        self.sweep_recovered
            .with_label_values(&[sweep.label()])
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

fn register(
    registry: &Registry,
    names: &mut Vec<String>,
    collector: Box<dyn prometheus::core::Collector>,
) {
    names.extend(collector.desc().iter().map(|d| d.fq_name.clone()));
    registry.register(collector).expect("unique metric names");
}
