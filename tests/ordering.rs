//! Per-aggregate ordering (`relay.ordering = "per_aggregate"`): the claim statements
//! hand out an aggregate's events one at a time in id order, whoever runs them and
//! however they race; a dead letter holds back exactly its own aggregate (`block`) or is
//! passed (`skip`); every destination receives each aggregate's events in id order
//! through failures, two instances and a kill -9.

mod support;

use support::route;

use outboxd::config::{Config, RouteConfig};
use outboxd::ordering::{OnDeadLetter, OrderRule, Ordering};
use outboxd::store::{ClaimFilter, CompleteItem, Store};
use outboxd::{NewEvent, enqueue, enqueue_many};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::webhook::{Endpoint, Hit, Reply};
use support::{TestBroker, TestDb};

const LEASE: Duration = Duration::from_secs(60);
static ALL: ClaimFilter = ClaimFilter::ALL;

fn per_aggregate(on_dead_letter: OnDeadLetter) -> OrderRule {
    OrderRule::new(Ordering::PerAggregate, on_dead_letter, &[]).unwrap()
}

async fn ordered_store(db: &TestDb) -> Store {
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.database.pool_size = 4;
    Store::connect(&config.database)
        .await
        .unwrap()
        .with_order(per_aggregate(OnDeadLetter::Block))
}

/// Commits one event per aggregate id given, in this order, each in its own
/// transaction; returns their ids.
async fn commit(_db: &TestDb, client: &tokio_postgres::Client, keys: &[&str]) -> Vec<i64> {
    let mut ids = Vec::new();
    for key in keys {
        let tracking_id = enqueue(
            client,
            &NewEvent::new("order", *key, "order.created", json!({})),
        )
        .await
        .unwrap();
        let row = client
            .query_one(
                "SELECT id FROM outbox WHERE tracking_id = $1",
                &[&tracking_id],
            )
            .await
            .unwrap();
        ids.push(row.get(0));
    }
    ids
}

async fn held(client: &tokio_postgres::Client, id: i64) -> bool {
    client
        .query_one(
            "SELECT status = 'PENDING' AND next_attempt_at = 'infinity' FROM outbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

fn complete_items(events: &[outboxd::Event]) -> Vec<CompleteItem> {
    events
        .iter()
        .map(|e| CompleteItem {
            id: e.id,
            created_at: e.created_at,
            acked: vec!["rabbitmq".into()],
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_an_aggregate_s_first_unfinished_event_and_holds_the_rest() {
    let db = TestDb::new().await;
    let store = ordered_store(&db).await;
    let client = db.client().await;
    let a = commit(&db, &client, &["a", "a", "a"]).await;
    let b = commit(&db, &client, &["b"]).await;

    let claim = store
        .claim_due(10, Duration::ZERO, LEASE, &ALL)
        .await
        .unwrap();
    let claimed: Vec<i64> = claim.events.iter().map(|e| e.id).collect();
    assert_eq!(claimed, vec![a[0], b[0]], "the heads of both aggregates");
    assert!(held(&client, a[1]).await && held(&client, a[2]).await);
    // Held events are out of every due path: nothing more to claim.
    let again = store
        .claim_due(10, Duration::ZERO, LEASE, &ALL)
        .await
        .unwrap();
    assert!(again.events.is_empty());
    assert_eq!(
        store.next_retry().await.unwrap(),
        None,
        "a held event is not a retry"
    );

    // The head's outcome releases the next one, and only that one.
    let head: Vec<_> = claim
        .events
        .iter()
        .filter(|e| e.id == a[0])
        .cloned()
        .collect();
    store
        .complete(claim.lock_token, &complete_items(&head))
        .await
        .unwrap();
    let released = store
        .unhold_aggregates(&[("order", "a")], false)
        .await
        .unwrap();
    assert_eq!(released.iter().map(|r| r.0).collect::<Vec<_>>(), vec![a[1]]);
    assert!(held(&client, a[2]).await);
    let next = store
        .claim_ids(&[a[1], a[2]], None, LEASE, &ALL, None)
        .await
        .unwrap();
    assert_eq!(
        next.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![a[1]]
    );

    // An earlier event locked by another claim in progress (SKIP LOCKED passes it by)
    // still holds the later one back.
    let c = commit(&db, &client, &["c", "c"]).await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.query("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", &[&c[0]])
        .await
        .unwrap();
    for claim in [
        store
            .claim_due(10, Duration::ZERO, LEASE, &ALL)
            .await
            .unwrap(),
        store
            .claim_ids(&[c[1]], None, LEASE, &ALL, None)
            .await
            .unwrap(),
    ] {
        assert!(
            claim.events.iter().all(|e| e.id != c[1]),
            "a later event handed out while the earlier one was locked"
        );
    }
    lock.rollback().await.unwrap();
    assert!(held(&client, c[1]).await);

    // Without ordering the same rows are claimed as they come.
    let d = commit(&db, &client, &["d", "d"]).await;
    let unordered = support::store(&support::config(&db, &TestBroker::new(None).await)).await;
    let claim = unordered
        .claim_ids(&d, None, LEASE, &ALL, None)
        .await
        .unwrap();
    assert_eq!(claim.events.len(), 2);
}

/// The claim's exclusion holds whoever runs it and however claims race: two instances
/// claim one aggregate's two events at the same moment, through every claim path, 1,000
/// times; the later event is never handed out while the earlier one is unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_claims_never_hand_out_an_aggregate_s_later_event_first() {
    let db = TestDb::new().await;
    let one = ordered_store(&db).await;
    let two = ordered_store(&db).await;
    let client = db.client().await;
    let mut claimed_first = [0usize; 2];
    for round in 0..1000 {
        let key = format!("k{round}");
        let ids = commit(&db, &client, &[&key, &key]).await;
        let (x, y) = match round % 3 {
            0 => tokio::join!(
                one.claim_due(10, Duration::ZERO, LEASE, &ALL),
                two.claim_due(10, Duration::ZERO, LEASE, &ALL)
            ),
            1 => tokio::join!(
                one.claim_ids(&ids, None, LEASE, &ALL, None),
                two.claim_ids(&ids, None, LEASE, &ALL, None)
            ),
            _ => tokio::join!(
                one.claim_ids(&ids[1..], None, LEASE, &ALL, None),
                two.claim_due(10, Duration::ZERO, LEASE, &ALL)
            ),
        };
        let (x, y) = (x.unwrap(), y.unwrap());
        let handed: Vec<i64> = x.events.iter().chain(&y.events).map(|e| e.id).collect();
        assert!(
            !handed.contains(&ids[1]),
            "round {round}: event {} handed out while {} was unfinished ({handed:?})",
            ids[1],
            ids[0]
        );
        if round % 3 != 2 {
            assert_eq!(handed, vec![ids[0]], "round {round}: the head, once");
        }
        if x.events.iter().any(|e| e.id == ids[0]) {
            claimed_first[0] += 1;
        } else if y.events.iter().any(|e| e.id == ids[0]) {
            claimed_first[1] += 1;
        }
        // Finish the head: both PROCESSING rows out of the way of the next round.
        for claim in [&x, &y] {
            store_complete(&one, claim).await;
        }
    }
    println!(
        "the head went to claim one {} times, to claim two {} times",
        claimed_first[0], claimed_first[1]
    );
    assert!(
        claimed_first[0] > 0 && claimed_first[1] > 0,
        "the claims never raced: {claimed_first:?}"
    );
}

async fn store_complete(store: &Store, claim: &outboxd::event::Claim) {
    if !claim.events.is_empty() {
        store
            .complete(claim.lock_token, &complete_items(&claim.events))
            .await
            .unwrap();
    }
}

/// A claim holds an event while the event before it is being completed by another
/// instance at the same moment: the hold and the release race, 500 times. Whatever the
/// interleaving, once each side has done what the relay does next (the claimer re-reads
/// its holds inside its claim; the completer claims what its release returned), the
/// event is claimed by exactly one of them: never stranded PENDING until a safety sweep
/// (as happened when the re-read only made it due and a claim passed it by while the
/// completer's release held its row for a moment), never claimed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_racing_the_release_of_its_aggregate_is_never_stranded() {
    let db = TestDb::new().await;
    let completer = ordered_store(&db).await;
    let claimer = ordered_store(&db).await;
    let client = db.client().await;
    let mut claimed_by = [0usize; 2];
    for round in 0..500 {
        let key = format!("r{round}");
        let ids = commit(&db, &client, &[&key, &key]).await;
        let head = completer
            .claim_ids(&ids[..1], None, LEASE, &ALL, None)
            .await
            .unwrap();
        assert_eq!(head.events.len(), 1);
        let finish = async {
            store_complete(&completer, &head).await;
            let released = completer
                .unhold_aggregates(&[("order", key.as_str())], false)
                .await
                .unwrap();
            let ids: Vec<i64> = released.iter().map(|r| r.0).collect();
            completer
                .claim_ids(&ids, None, LEASE, &ALL, None)
                .await
                .unwrap()
        };
        let (by_completer, by_claimer) = tokio::join!(
            finish,
            claimer.claim_ids(&ids[1..], None, LEASE, &ALL, None)
        );
        let by_claimer = by_claimer.unwrap();
        let takers = [&by_claimer, &by_completer]
            .iter()
            .filter(|c| c.events.iter().any(|e| e.id == ids[1]))
            .count();
        let status: String = client
            .query_one("SELECT status FROM outbox WHERE id = $1", &[&ids[1]])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (takers, status.as_str()),
            (1, "PROCESSING"),
            "round {round}: event {} after the event before it was published",
            ids[1]
        );
        claimed_by[usize::from(by_completer.events.iter().any(|e| e.id == ids[1]))] += 1;
        store_complete(&claimer, &by_claimer).await;
        store_complete(&completer, &by_completer).await;
    }
    println!("claimed by the claimer / by the completer's release: {claimed_by:?}");
    assert!(
        claimed_by[0] > 0 && claimed_by[1] > 0,
        "no race: {claimed_by:?}"
    );
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// (aggregate_id, outbox_id) of every request `endpoint` answered 2xx, in order.
fn accepted(hits: &[Hit]) -> Vec<(String, i64)> {
    hits.iter()
        .map(|h| {
            (
                h.json["aggregate_id"].as_str().unwrap_or("").to_string(),
                h.json["outbox_id"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

/// An instance ordering per aggregate, everything routed to one webhook that rejects
/// (400: a dead letter at once) events whose payload says `poison` while `refusing`.
async fn poison_rig(
    db: &TestDb,
    on_dead_letter: OnDeadLetter,
) -> (
    outboxd::Outboxd,
    Endpoint,
    Arc<AtomicBool>,
    Arc<Mutex<Vec<Hit>>>,
) {
    let broker = TestBroker::new(None).await;
    let refusing = Arc::new(AtomicBool::new(true));
    let accepted_hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let (flag, record) = (Arc::clone(&refusing), Arc::clone(&accepted_hits));
    let endpoint = Endpoint::start(move |hit: &Hit| {
        if hit.json["payload"]["poison"] == json!(true) && flag.load(AtomicOrdering::SeqCst) {
            Reply::status(400)
        } else {
            record.lock().unwrap().push(hit.clone());
            Reply::ok()
        }
    })
    .await;
    let mut config = support::config(db, &broker);
    config.relay.ordering = Ordering::PerAggregate;
    config.relay.ordering_dead_letters = on_dead_letter;
    config.retry.base_delay = Duration::from_millis(50);
    config.http.gauge_refresh_interval = Duration::from_millis(100);
    config.webhooks.insert(
        "hook".into(),
        outboxd::config::WebhookConfig::new(endpoint.url(), SECRET),
    );
    config.routing.routes = vec![route(&["*"], &["webhook:hook"])];
    let service = support::start(config).await;
    (service, endpoint, refusing, accepted_hits)
}

async fn produce(client: &tokio_postgres::Client, events: &[(&str, bool)]) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    for (key, poison) in events {
        ids.push(
            enqueue(
                client,
                &NewEvent::new("order", *key, "order.created", json!({ "poison": poison })),
            )
            .await
            .unwrap(),
        );
    }
    ids
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn of_key(hits: &Arc<Mutex<Vec<Hit>>>, key: &str) -> Vec<i64> {
    accepted(&hits.lock().unwrap())
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, id)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_holds_back_exactly_its_aggregate_until_redriven_or_discarded() {
    let db = TestDb::new().await;
    let (service, _endpoint, refusing, hits) = poison_rig(&db, OnDeadLetter::Block).await;
    let client = db.client().await;
    let a = produce(&client, &[("a", true), ("a", false), ("a", false)]).await;
    let b = produce(&client, &[("b", false), ("b", false), ("b", false)]).await;
    let (a_ids, b_ids) = (
        [
            db.id_of(a[0]).await,
            db.id_of(a[1]).await,
            db.id_of(a[2]).await,
        ],
        [
            db.id_of(b[0]).await,
            db.id_of(b[1]).await,
            db.id_of(b[2]).await,
        ],
    );
    // Another aggregate is not held up by the dead letter.
    wait_until("b's events", Duration::from_secs(10), async || {
        of_key(&hits, "b").len() == 3
    })
    .await;
    assert_eq!(of_key(&hits, "b"), b_ids.to_vec());
    wait_until(
        "a's head dead-lettered",
        Duration::from_secs(10),
        async || db.count("DEAD_LETTER").await == 1,
    )
    .await;
    // Its own aggregate waits, visibly: held, counted, alertable.
    let metrics = service.metrics().clone();
    wait_until("the gauges", Duration::from_secs(5), async || {
        metrics.events_held.get() == 2 && metrics.dead_letters_blocking.get() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        of_key(&hits, "a").is_empty(),
        "a's later events went past its dead letter"
    );
    let store = service.store();
    let shown = outboxd::events::show(store, outboxd::events::EventKey::Id(a_ids[1]))
        .await
        .unwrap();
    assert_eq!(shown.status, "HELD");

    // Redriven (the endpoint fixed): the head, then the rest, in order.
    refusing.store(false, AtomicOrdering::SeqCst);
    outboxd::dead_letters::redrive(store, &[a_ids[0]], "endpoint fixed", "test")
        .await
        .unwrap();
    wait_until("a's events", Duration::from_secs(10), async || {
        of_key(&hits, "a").len() == 3
    })
    .await;
    assert_eq!(of_key(&hits, "a"), a_ids.to_vec());

    // Discarded: the head is never delivered, the rest goes on at once.
    refusing.store(true, AtomicOrdering::SeqCst);
    let c = produce(&client, &[("c", true), ("c", false), ("c", false)]).await;
    let c_ids = [
        db.id_of(c[0]).await,
        db.id_of(c[1]).await,
        db.id_of(c[2]).await,
    ];
    wait_until(
        "c's head dead-lettered",
        Duration::from_secs(10),
        async || db.count("DEAD_LETTER").await == 1,
    )
    .await;
    let refused = outboxd::dead_letters::discard(store, &[c_ids[0]], " ", "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("reason"), "{refused}");
    let done = outboxd::dead_letters::discard(store, &[c_ids[0], c_ids[1]], "bad data", "test")
        .await
        .unwrap();
    assert_eq!(done.discarded, vec![c_ids[0]]);
    assert_eq!(done.released, vec![c_ids[1]]);
    assert_eq!(done.not_dead_letters, vec![c_ids[1]]);
    wait_until("c's later events", Duration::from_secs(10), async || {
        of_key(&hits, "c").len() == 2
    })
    .await;
    assert_eq!(of_key(&hits, "c"), c_ids[1..].to_vec());
    let shown = outboxd::events::show(store, outboxd::events::EventKey::Id(c_ids[0]))
        .await
        .unwrap();
    assert_eq!(shown.status, "DISCARDED");
    assert_eq!(shown.redrives[0].action, "discard");
    assert_eq!(shown.redrives[0].reason, "bad data");
    wait_until(
        "the gauges after the discard",
        Duration::from_secs(5),
        async || {
            // The gauges are read together: c's last event may still be held, behind the
            // one before it, at the first refresh after the discard.
            metrics.events_dead_letter.get() == 0
                && metrics.dead_letters_blocking.get() == 0
                && metrics.events_held.get() == 0
        },
    )
    .await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_skip_a_dead_letter_is_passed_and_counted() {
    let db = TestDb::new().await;
    let (service, _endpoint, _refusing, hits) = poison_rig(&db, OnDeadLetter::Skip).await;
    let client = db.client().await;
    let a = produce(&client, &[("a", false), ("a", true), ("a", false)]).await;
    let ids = [
        db.id_of(a[0]).await,
        db.id_of(a[1]).await,
        db.id_of(a[2]).await,
    ];
    wait_until("a's good events", Duration::from_secs(10), async || {
        of_key(&hits, "a").len() == 2
    })
    .await;
    assert_eq!(of_key(&hits, "a"), vec![ids[0], ids[2]]);
    assert_eq!(db.count("DEAD_LETTER").await, 1);
    assert_eq!(service.metrics().ordering_skipped.get(), 1);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_configured_with_another_ordering_refuses_to_start() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(None).await;
    let mut ordered = support::config(&db, &broker);
    ordered.relay.ordering = Ordering::PerAggregate;
    let first = support::start(ordered.clone()).await;
    // A second instance of the same rule starts; one of another rule is refused.
    let same = support::start(ordered.clone()).await;
    same.stop().await;
    let mut skipping = ordered.clone();
    skipping.relay.ordering_dead_letters = OnDeadLetter::Skip;
    let unordered = support::config(&db, &broker);
    let mut overriding = ordered.clone();
    overriding.routing.routes = vec![RouteConfig {
        ordering: Some(Ordering::None),
        ..route(&["audit.*"], &["rabbitmq"])
    }];
    for (config, words) in [
        (unordered, "configured with ordering = \"none\""),
        (skipping, "ordering_dead_letters = \"skip\""),
        (overriding, "route orderings [audit.* none]"),
    ] {
        let refused = match outboxd::Outboxd::start(config).await {
            Ok(_) => panic!("started with another ordering rule"),
            Err(error) => error.to_string(),
        };
        for expected in [
            words,
            "the database keeps ordering = \"per_aggregate\"",
            "outboxd ordering adopt",
        ] {
            assert!(refused.contains(expected), "{expected:?} in: {refused}");
        }
    }
    first.stop().await;
}

/// 1,000 aggregates x 20 events from four concurrent producers (through `enqueue_many`,
/// aggregates shuffled across transactions), two instances, a webhook failing 30% of
/// requests at random, one instance killed with SIGKILL midway and restarted: each
/// destination receives every aggregate's events in id order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_destination_receives_each_aggregate_in_id_order_through_failures_and_a_kill() {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    const KEYS: usize = 1000;
    const PER_KEY: usize = 20;
    const TOTAL: usize = KEYS * PER_KEY;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let webhook_arrivals: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let record = Arc::clone(&webhook_arrivals);
    let failing = Mutex::new(StdRng::seed_from_u64(rng.random()));
    let endpoint = Endpoint::start(move |hit: &Hit| {
        if failing.lock().unwrap().random_bool(0.3) {
            return Reply::status(503);
        }
        record
            .lock()
            .unwrap()
            .extend(accepted(std::slice::from_ref(hit)));
        Reply::ok()
    })
    .await;
    let url = endpoint.url();
    let env = [
        ("OUTBOXD_RELAY_ORDERING", "per_aggregate"),
        ("OUTBOXD_ROUTING_ROUTES", "*=rabbitmq,webhook:hook"),
        ("OUTBOXD_WEBHOOK_HOOK_URL", url.as_str()),
        ("OUTBOXD_WEBHOOK_HOOK_SECRET", SECRET),
        ("OUTBOXD_WEBHOOK_HOOK_COOL_DOWN", "200ms"),
        ("OUTBOXD_RETRY_MAX_ATTEMPTS", "100"),
        ("OUTBOXD_RETRY_MAX_DELAY", "500ms"),
        ("OUTBOXD_RELAY_SAFETY_SWEEP_INTERVAL", "5s"),
    ];
    let mut instances = [
        support::fleet::Instance::start(&db.url, &broker, &env),
        support::fleet::Instance::start(&db.url, &broker, &env),
    ];
    for instance in &instances {
        instance.wait_running().await;
    }

    // Every aggregate 20 times, shuffled, in transactions of 10, dealt to 4 producers.
    let mut keys: Vec<usize> = (0..KEYS)
        .flat_map(|k| std::iter::repeat_n(k, PER_KEY))
        .collect();
    keys.shuffle(&mut rng);
    let transactions: Vec<Vec<usize>> = keys.chunks(10).map(<[usize]>::to_vec).collect();
    let mut producers = Vec::new();
    for p in 0..4 {
        let mine: Vec<Vec<usize>> = transactions.iter().skip(p).step_by(4).cloned().collect();
        let client = db.client().await;
        producers.push(tokio::spawn(async move {
            for keys in mine {
                let events: Vec<NewEvent> = keys
                    .iter()
                    .map(|k| {
                        NewEvent::new("account", format!("k{k}"), "account.changed", json!({}))
                    })
                    .collect();
                enqueue_many(&client, &events).await.unwrap();
            }
        }));
    }

    // Midway, instance 0 is killed (its claims wait for their 2 s lease) and restarted.
    let started = Instant::now();
    while broker.count() < TOTAL / 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "too slow: {} delivered",
            broker.count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    instances[0].kill_9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    instances[0] = support::fleet::Instance::start(&db.url, &broker, &env);
    for producer in producers {
        producer.await.unwrap();
    }
    assert!(
        db.wait_settled(Duration::from_secs(120)).await,
        "events still open:\n{}\n{}",
        instances[0].log(),
        instances[1].log()
    );
    assert_eq!(db.count("PUBLISHED").await, TOTAL as i64);

    let mut expected: HashMap<String, Vec<i64>> = HashMap::new();
    for row in db
        .client()
        .await
        .query("SELECT aggregate_id, id FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
    {
        expected.entry(row.get(0)).or_default().push(row.get(1));
    }
    let rabbit: Vec<(String, i64)> = broker
        .received()
        .iter()
        .map(|r| {
            let header = |name: &str| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let position = header("outbox_id");
            let id = position
                .trim_start_matches("LongLongInt(")
                .trim_end_matches(')')
                .parse()
                .unwrap_or_else(|_| panic!("outbox_id header {position:?}"));
            (header("aggregate_id"), id)
        })
        .collect();
    let webhook = webhook_arrivals.lock().unwrap().clone();
    let rabbit_duplicates = support::fleet::audit_order("rabbitmq", &rabbit, &expected);
    let webhook_duplicates = support::fleet::audit_order("webhook:hook", &webhook, &expected);
    println!(
        "{TOTAL} events in order at both destinations in {:.1} s; duplicates: rabbitmq {rabbit_duplicates}, webhook {webhook_duplicates}",
        started.elapsed().as_secs_f64()
    );
    let tries: BTreeMap<usize, usize> = endpoint.hits().iter().fold(BTreeMap::new(), |mut m, h| {
        *m.entry(h.earlier_tries).or_default() += 1;
        m
    });
    println!("webhook requests by earlier tries: {tries:?}");
}

/// Instances starting at the same moment on a database that keeps no rule yet: one
/// records its rule, every one of them reads it (none fails, none records another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_agree_on_the_rule_the_first_one_records() {
    let db = TestDb::new().await;
    let mut stores = Vec::new();
    for _ in 0..6 {
        stores.push(ordered_store(&db).await);
    }
    let client = db.client().await;
    for round in 0..50 {
        client
            .execute("DELETE FROM outbox_settings", &[])
            .await
            .unwrap();
        let adopted = futures_util::future::join_all(stores.iter().map(|store| {
            store
                .clone()
                .adopt_order(per_aggregate(OnDeadLetter::Block), "test")
        }))
        .await;
        for result in adopted {
            if let Err(error) = result {
                panic!("round {round}: {error}");
            }
        }
    }
}

/// Two producers write one aggregate at the same time, A first, B while A's transaction
/// is still open; A commits after B tried to. Through `enqueue`, B waits for A's commit
/// before it draws its id, so the destination receives the events in commit order.
/// With a plain INSERT (no lock) B draws the later id but commits first: B arrives
/// before A, which is in neither id nor commit order for a consumer that keeps the last
/// `outbox_id` it applied (the hazard the README states).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_producers_of_one_aggregate_are_delivered_in_commit_order_through_enqueue() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = support::config(&db, &broker);
    config.relay.ordering = Ordering::PerAggregate;
    let service = support::start(config).await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let event =
        |key: &str, who: &str| NewEvent::new("order", key, "order.created", json!({ "who": who }));
    let arrivals = |key: &str| -> Vec<String> {
        broker
            .received()
            .iter()
            .filter(|m| {
                m.headers
                    .iter()
                    .any(|(k, v)| k == "aggregate_id" && v == key)
            })
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.body).unwrap()["who"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    for round in 0..10 {
        let key = format!("k{round}");
        let ta = a.transaction().await.unwrap();
        enqueue(&ta, &event(&key, "a")).await.unwrap();
        let tb = b.transaction().await.unwrap();
        let b_writes = async {
            enqueue(&tb, &event(&key, "b")).await.unwrap();
            tb.commit().await.unwrap();
        };
        let a_commits_later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ta.commit().await.unwrap();
        };
        tokio::join!(b_writes, a_commits_later);
        let deadline = Instant::now() + Duration::from_secs(10);
        while arrivals(&key).len() != 2 {
            if Instant::now() > deadline {
                let rows: Vec<String> = db
                    .client()
                    .await
                    .query(
                        "SELECT id, status, next_attempt_at::text, attempts, coalesce(last_error, '') FROM outbox WHERE aggregate_id = $1 ORDER BY id",
                        &[&key],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| format!("{} {} {} {} {}", r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, i32>(3), r.get::<_, String>(4)))
                    .collect();
                panic!("round {round}: arrived {:?}; rows {rows:?}", arrivals(&key));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            arrivals(&key),
            vec!["a", "b"],
            "round {round}: commit order"
        );
    }
    // Without the lock: B's later id commits first and is delivered first.
    let key = "plain";
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                  VALUES ('order', $1, 'order.created', jsonb_build_object('who', $2::text))";
    let ta = a.transaction().await.unwrap();
    ta.execute(insert, &[&key, &"a"]).await.unwrap();
    let tb = b.transaction().await.unwrap();
    tb.execute(insert, &[&key, &"b"]).await.unwrap();
    tb.commit().await.unwrap();
    wait_until("b's event", Duration::from_secs(10), async || {
        arrivals(key).len() == 1
    })
    .await;
    ta.commit().await.unwrap();
    wait_until("a's event", Duration::from_secs(10), async || {
        arrivals(key).len() == 2
    })
    .await;
    assert_eq!(arrivals(key), vec!["b", "a"]);
    service.stop().await;
}

/// Events that arrive as a sweep request (a notification too large for its payload),
/// each aggregate's two events side by side: the sweep's batches are half held. The
/// sweep goes on past such batches (it took a batch with held events in it for the end
/// of what was due, and the rest waited for the safety sweep: seen in the benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_goes_on_past_batches_of_held_events() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let mut config = support::config(&db, &broker);
    config.relay.ordering = Ordering::PerAggregate;
    let service = support::start(config).await;
    support::wait_started(&service).await;
    // Committed without the trigger's notification, then announced as "sweep".
    db.client()
        .await
        .batch_execute(
            "SET session_replication_role = replica;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', (g / 2)::text, 'order.created', jsonb_build_object('n', g)
               FROM generate_series(0, 1999) AS g;
             SELECT pg_notify('outbox_events', '');",
        )
        .await
        .unwrap();
    let received = broker.wait_for(2000, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 2000, "events left behind by the sweep");
    service.stop().await;
}

/// A route with its own `ordering = "none"`: its events of an ordered aggregate neither
/// wait for the aggregate's unfinished events nor hold any back, while the aggregate's
/// ordered events keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_ordered_none_neither_waits_nor_is_waited_for() {
    let db = TestDb::new().await;
    let broker = TestBroker::new(Some("#")).await;
    let failing = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&failing);
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let record = Arc::clone(&hits);
    let endpoint = Endpoint::start(move |hit: &Hit| {
        if flag.load(AtomicOrdering::SeqCst) {
            Reply::status(503)
        } else {
            record.lock().unwrap().push(hit.clone());
            Reply::ok()
        }
    })
    .await;
    let mut config = support::config(&db, &broker);
    config.relay.ordering = Ordering::PerAggregate;
    config.retry.base_delay = Duration::from_millis(100);
    config.retry.max_delay = Duration::from_millis(300);
    config.webhooks.insert(
        "hook".into(),
        outboxd::config::WebhookConfig::new(endpoint.url(), SECRET),
    );
    config.routing.routes = vec![
        RouteConfig {
            ordering: Some(Ordering::None),
            ..route(&["audit.*"], &["rabbitmq"])
        },
        route(&["order.*"], &["webhook:hook"]),
    ];
    let service = support::start(config).await;
    let client = db.client().await;
    for (event_type, n) in [("order.created", 1), ("audit.read", 2), ("order.paid", 3)] {
        enqueue(
            &client,
            &NewEvent::new("order", "a", event_type, json!({ "n": n })),
        )
        .await
        .unwrap();
    }
    // The unordered event goes at once, past the failing ordered one before it.
    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].event_type, "audit.read");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hits.lock().unwrap().is_empty());
    // The ordered ones follow in order once the endpoint answers.
    failing.store(false, AtomicOrdering::SeqCst);
    wait_until("the ordered events", Duration::from_secs(10), async || {
        hits.lock().unwrap().len() == 2
    })
    .await;
    let order: Vec<String> = hits
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.event_type().to_string())
        .collect();
    assert_eq!(order, vec!["order.created", "order.paid"]);
    service.stop().await;
}

/// Under `skip`, an ordered event that the reaper dead-letters (its worker died on its
/// last attempt) releases its aggregate at once: the event held behind it is delivered
/// without waiting for a safety sweep (an hour away in this test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_reaper_makes_under_skip_releases_its_aggregate() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ids: Vec<i64> = client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, max_attempts)
             VALUES ('order', 'a', 'order.created', '{\"n\": 1}', 1),
                    ('order', 'a', 'order.paid', '{\"n\": 2}', NULL)
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A worker claims the first event and dies on its only attempt; the second is held.
    let worker = support::store(&support::config(&db, &TestBroker::new(None).await))
        .await
        .with_order(per_aggregate(OnDeadLetter::Skip));
    let head = worker
        .claim_ids(&ids, None, Duration::from_millis(300), &ALL, None)
        .await
        .unwrap();
    assert_eq!(
        head.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    assert!(held(&client, ids[1]).await);

    let broker = TestBroker::new(Some("#")).await;
    let mut config = support::config(&db, &broker);
    config.relay.ordering = Ordering::PerAggregate;
    config.relay.ordering_dead_letters = OnDeadLetter::Skip;
    config.relay.lease = Duration::from_secs(1);
    let service = support::start(config).await;
    let received = broker.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1, "the held event waits for a sweep");
    assert_eq!(received[0].event_type, "order.paid");
    assert_eq!(db.count("DEAD_LETTER").await, 1);
    service.stop().await;
}
