//! Bloat health: the gauges that say why claims get slower. Dead row versions in the
//! outbox partitions, the oldest snapshot a session of this database holds (an idle
//! transaction left open keeps vacuum from removing anything deleted after it), and what
//! each replication slot holds back. On a cluster of the test's own: a replication slot
//! is cluster-wide state.

mod support;

use outboxd::maintenance::GaugeRefresher;
use outboxd::metrics::Metrics;
use outboxd::store::Store;
use std::time::{Duration, Instant};
use support::private_pg::PrivateCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bloat_gauges_show_dead_tuples_a_held_snapshot_and_a_slots_wal() {
    let cluster = PrivateCluster::start();
    let url = cluster.migrated_database("bloat").await;
    let timeout = Duration::from_secs(5);
    let client = outboxd::store::connect_once(&url, timeout, "test")
        .await
        .unwrap();
    let store = Store::connect(&outboxd::config::DatabaseConfig {
        url: url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let metrics = Metrics::new();
    let health = outboxd::health::Health::new(Duration::from_secs(1), Vec::new());
    let gauges = GaugeRefresher::new(store, Duration::from_secs(1), metrics.clone(), health);
    gauges.run_once().await.unwrap();
    assert_eq!(
        metrics.xmin_horizon_age.get(),
        0,
        "nothing holds a snapshot"
    );
    assert_eq!(metrics.oldest_transaction_age.get(), 0.0);

    // A forgotten transaction holding a snapshot, then work that leaves dead rows.
    let mut forgotten = outboxd::store::connect_once(&url, timeout, "test")
        .await
        .unwrap();
    let held = forgotten
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    held.query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', g::text, 'order.created', '{}' FROM generate_series(1, 2000) AS g;",
        )
        .await
        .unwrap();
    for _ in 0..20 {
        client
            .batch_execute("UPDATE outbox SET attempts = attempts + 1 WHERE id % 10 = 0")
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "SELECT pg_create_physical_replication_slot('outboxd_test_slot', true);
             CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) AS g;",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        gauges.run_once().await.unwrap();
        if metrics.partition_dead_tuples.get() >= 2000 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        metrics.partition_dead_tuples.get() >= 2000,
        "dead tuples {}",
        metrics.partition_dead_tuples.get()
    );
    assert!(
        metrics.xmin_horizon_age.get() >= 20,
        "the held snapshot is {} transactions old",
        metrics.xmin_horizon_age.get()
    );
    assert!(metrics.oldest_transaction_age.get() >= 1.0);
    let wal = metrics
        .slot_retained_wal
        .with_label_values(&["outboxd_test_slot"])
        .get();
    assert!(wal > 1_000_000.0, "the slot keeps {wal} bytes of WAL");

    // Let go: the horizon is young again and a dropped slot leaves no series.
    held.rollback().await.unwrap();
    client
        .batch_execute("SELECT pg_drop_replication_slot('outboxd_test_slot')")
        .await
        .unwrap();
    gauges.run_once().await.unwrap();
    assert!(metrics.xmin_horizon_age.get() < 20);
    assert!(!metrics.render().contains("outboxd_test_slot"));
}
