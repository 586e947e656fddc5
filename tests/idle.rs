//! Idle means idle: with default settings and no events, outboxd sends only its few
//! timers' statements, counted on the wire by a proxy in front of PostgreSQL. A relay
//! that polled would fail here.

mod support;

use outboxd::{Outboxd, enqueue};
use std::time::{Duration, Instant};
use support::proxy::CountingProxy;
use support::{TestBroker, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_outboxd_sends_at_most_six_statements_in_twenty_seconds() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let proxy = CountingProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    // Default settings, but every connection goes through the counting proxy.
    let mut config = outboxd::Config::default();
    config.database.url = proxy.url(&db.name);
    config.rabbitmq.exchange = broker.exchange.clone();
    config.rabbitmq.declare_exchange = false;
    config.http.listen = "127.0.0.1:0".into();
    let service = Outboxd::start(config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.metrics().listener_connected.get() != 1 {
        assert!(Instant::now() < deadline, "listener did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the start-up work (partitions, LISTEN, reconnect sweep) finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = proxy.statements();
    assert!(before > 0, "the proxy counts what outboxd sends");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let idle = proxy.statements() - before;
    println!("statements sent in 20 s of idleness: {idle} (start-up sent {before})");
    assert!(idle <= 6, "{idle} statements in 20 s while idle");

    // Still alive: an event is delivered at once.
    let producer = db.client().await;
    let tracking_id = enqueue(
        &producer,
        &outboxd::NewEvent::new("order", "1", "order.created", serde_json::json!({})),
    )
    .await
    .unwrap();
    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].message_id, tracking_id.to_string());
    service.stop().await;
}
