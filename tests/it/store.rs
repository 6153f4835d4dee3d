//! The store contract, on whichever store the suite runs on (SQLite, or PostgreSQL with TEST_STORE).

use std::time::Duration;

use ordercloud_cdp_forwarder::intent::{Intent, IntentKind, IntentSecrets, RouteFamily};
use ordercloud_cdp_forwarder::store::{self, EnqueueOutcome, NewIntent, StoreError};
use serde_json::json;

use crate::helpers::*;

fn intent(shopper: &str, dedupe: &str) -> NewIntent {
    NewIntent {
        dedupe_key: dedupe.into(),
        shopper_key: shopper.into(),
        intent: Intent {
            kind: IntentKind::LinesUpserted,
            family: RouteFamily::Cart,
            verb: "POST".into(),
            route: "v1/cart/lineitems".into(),
            direction: None,
            order_id: None,
            line_item_id: None,
            occurred_at_ms: 0,
            request_body: serde_json::value::to_raw_value(&json!({})).unwrap(),
            response_body: serde_json::value::to_raw_value(&json!({})).unwrap(),
            query_params: Default::default(),
            client_id: None,
            api_url: None,
            anonymous: true,
            anon_order_id: None,
            token_expires_at: None,
        },
        secrets: IntentSecrets::default(),
        dead_reason: None,
        needs_enrichment: false,
    }
}

async fn open() -> (tempfile::TempDir, store::DynStore) {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(dir.path());
    let store = store::open(&settings.store).await.unwrap();
    (dir, store)
}

/// Heads claimed until none is left, each acknowledged at once: the intent ids in claim order.
/// Fails if two intents of one shopper are claimable together.
async fn drain_in_claim_order(store: &store::DynStore) -> Vec<(String, i64)> {
    let mut order = Vec::new();
    loop {
        let claimed = store.claim(10, Duration::from_secs(30)).await.unwrap();
        if claimed.is_empty() {
            return order;
        }
        for c in &claimed {
            let same = claimed.iter().filter(|o| o.shopper_key == c.shopper_key).count();
            assert_eq!(same, 1, "two intents of {} claimable at once", c.shopper_key);
            order.push((c.shopper_key.clone(), c.claim.intent_id));
            store.ack(&c.claim).await.unwrap();
        }
    }
}

#[tokio::test]
async fn only_the_head_of_each_shoppers_queue_is_claimed() {
    let (_dir, store) = open().await;
    for (shopper, key) in [("s1", "a"), ("s1", "b"), ("s2", "c")] {
        assert!(matches!(
            store.enqueue(intent(shopper, key)).await.unwrap(),
            EnqueueOutcome::Queued(_)
        ));
    }
    let claimed = store.claim(10, Duration::from_secs(30)).await.unwrap();
    let shoppers: Vec<_> = claimed.iter().map(|c| c.shopper_key.as_str()).collect();
    assert_eq!(shoppers, ["s1", "s2"], "one intent per shopper, the oldest");
    assert!(
        store.claim(10, Duration::from_secs(30)).await.unwrap().is_empty(),
        "both shoppers are in flight"
    );
    store.ack(&claimed[0].claim).await.unwrap();
    let next = store.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].shopper_key, "s1",
        "s1's second intent follows once the first is done"
    );
    assert!(next[0].claim.intent_id > claimed[0].claim.intent_id);
    store.close().await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_stale_workers_writes_are_refused() {
    let (_dir, store) = open().await;
    store.enqueue(intent("s1", "lease")).await.unwrap();
    let lease = Duration::from_millis(200);
    let stale = store.claim(1, lease).await.unwrap().remove(0);
    // The worker holding `stale` dies: after its lease another claim takes the intent over.
    let fresh = eventually("the lease to expire", Duration::from_secs(10), || async {
        store.claim(1, lease).await.unwrap().pop()
    })
    .await;
    assert_eq!(fresh.claim.intent_id, stale.claim.intent_id);
    assert_ne!(fresh.claim.claim_id, stale.claim.claim_id);
    assert!(matches!(store.ack(&stale.claim).await, Err(StoreError::StaleClaim(_))));
    assert!(matches!(
        store.save_progress(&stale.claim, &json!({})).await,
        Err(StoreError::StaleClaim(_))
    ));
    assert!(matches!(
        store.extend(&stale.claim, lease).await,
        Err(StoreError::StaleClaim(_))
    ));
    assert!(matches!(
        store.reschedule(&stale.claim, 0, "x").await,
        Err(StoreError::StaleClaim(_))
    ));
    assert!(matches!(
        store.dead_letter(&stale.claim, "x").await,
        Err(StoreError::StaleClaim(_))
    ));
    store.ack(&fresh.claim).await.unwrap();
    assert!(store.pending(10).await.unwrap().is_empty());
    store.close().await;
}

#[tokio::test]
async fn dead_letters_replay_in_their_shoppers_order_and_purge() {
    let (_dir, store) = open().await;
    store.enqueue(intent("s1", "first")).await.unwrap();
    store.enqueue(intent("s1", "second")).await.unwrap();
    let first = store.claim(1, Duration::from_secs(30)).await.unwrap().remove(0);
    store.dead_letter(&first.claim, "CDP said 400").await.unwrap();
    let second = store.claim(1, Duration::from_secs(30)).await.unwrap().remove(0);
    assert_eq!(
        store.dead_letters(None, 10).await.unwrap()[0].last_error.as_deref(),
        Some("CDP said 400")
    );
    // Replayed while the second is in flight: it waits for its turn, ahead of anything newer.
    assert_eq!(
        store
            .replay_dead_letters(Some(&[first.claim.intent_id]), None)
            .await
            .unwrap(),
        1
    );
    store.ack(&second.claim).await.unwrap();
    store.enqueue(intent("s1", "third")).await.unwrap();
    let again = store.claim(1, Duration::from_secs(30)).await.unwrap().remove(0);
    assert_eq!(
        again.claim.intent_id, first.claim.intent_id,
        "the replayed intent is the head again"
    );
    store.dead_letter(&again.claim, "again").await.unwrap();
    assert_eq!(store.purge_dead_letters(store::now_ms() + 1).await.unwrap(), 1);
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    store.close().await;
}

#[tokio::test]
async fn a_batch_with_the_same_key_twice_stores_it_once() {
    let (_dir, store) = open().await;
    let (a, b) = tokio::join!(store.enqueue(intent("s1", "same")), store.enqueue(intent("s1", "same")));
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, EnqueueOutcome::Queued(_)))
            .count(),
        1
    );
    assert_eq!(outcomes.iter().filter(|o| **o == EnqueueOutcome::Duplicate).count(), 1);
    assert_eq!(store.pending(10).await.unwrap().len(), 1);
    store.close().await;
}

/// SQLite keys GUID LogIDs by their 16 bytes (migration 0004 converts those stored before as text):
/// a redelivery is recognised whichever way its LogID was stored, and in either letter case.
#[tokio::test]
async fn sqlite_recognises_log_ids_stored_before_and_after_the_guid_key_migration() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    let path = dir.path().join("guid-keys.db");
    (settings.store.url, settings.store.schema) = (format!("sqlite://{}", path.display()), None);
    let store = store::open(&settings.store).await.unwrap();
    let old_guid = "71CE120A-17D5-4833-89F6-4F9A33DDD42F";
    let old_other = "sha256:00ff";
    {
        // Keys as a version before 0004 stored them, then that migration run over them.
        let conn = rusqlite::Connection::open(&path).unwrap();
        for key in [old_guid, old_other] {
            conn.execute("INSERT INTO seen_webhooks (dedupe_key, seen_at) VALUES (?1, 0)", [key])
                .unwrap();
        }
        conn.execute_batch(include_str!("../../migrations/sqlite/0004_guid_dedupe_keys.sql"))
            .unwrap();
        let types: Vec<String> = conn
            .prepare("SELECT typeof(dedupe_key) FROM seen_webhooks ORDER BY 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            types,
            ["blob", "text"],
            "the GUID converted, the other key left as text"
        );
    }
    // Opened again, as a new version starts over a file an older one wrote (the LogID filter is
    // built from the table at start).
    store.close().await;
    let store = store::open(&settings.store).await.unwrap();
    for key in [old_guid.to_lowercase().as_str(), old_other] {
        assert_eq!(
            store.enqueue(intent("s1", key)).await.unwrap(),
            EnqueueOutcome::Duplicate,
            "{key} was seen before the migration"
        );
    }
    let new_guid = "0b7f8c3e-5d2a-4e61-9c0f-2a4b6d8e1f37";
    assert!(matches!(
        store.enqueue(intent("s1", new_guid)).await.unwrap(),
        EnqueueOutcome::Queued(_)
    ));
    for redelivery in [new_guid.to_string(), new_guid.to_uppercase()] {
        assert_eq!(
            store.enqueue(intent("s1", &redelivery)).await.unwrap(),
            EnqueueOutcome::Duplicate
        );
    }
    // A LogID that is not a GUID is keyed by its text, exactly.
    assert!(matches!(
        store.enqueue(intent("s1", "log-7")).await.unwrap(),
        EnqueueOutcome::Queued(_)
    ));
    assert_eq!(
        store.enqueue(intent("s1", "log-7")).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
    assert!(matches!(
        store.enqueue(intent("s1", "LOG-7")).await.unwrap(),
        EnqueueOutcome::Queued(_)
    ));
    assert_eq!(store.pending(10).await.unwrap().len(), 3);
    store.close().await;
}

/// A shopper whose queue emptied starts a new one; a dead letter replayed then still goes first.
#[tokio::test]
async fn a_dead_letter_replayed_after_its_shoppers_queue_emptied_goes_first() {
    let (_dir, store) = open().await;
    store.enqueue(intent("s1", "first")).await.unwrap();
    let first = store.claim(1, Duration::from_secs(30)).await.unwrap().remove(0);
    store.dead_letter(&first.claim, "CDP said 400").await.unwrap();
    // The queue is empty now: these two start another.
    store.enqueue(intent("s1", "second")).await.unwrap();
    store.enqueue(intent("s1", "third")).await.unwrap();
    store.enqueue(intent("s2", "other")).await.unwrap();
    store
        .replay_dead_letters(Some(&[first.claim.intent_id]), None)
        .await
        .unwrap();
    let order: Vec<i64> = drain_in_claim_order(&store)
        .await
        .into_iter()
        .filter(|(shopper, _)| shopper == "s1")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(order.len(), 3);
    assert_eq!(order[0], first.claim.intent_id, "the replayed intent first");
    assert!(order[1] < order[2], "then the others in their order");
    store.close().await;
}

/// The `dead-letters` command opens the store beside the running service: a dead letter it replays
/// joins the queue the service holds for that shopper, and the service, which keeps its shoppers'
/// queues in memory (SQLite), still sends that shopper's intents one at a time afterwards.
#[tokio::test]
async fn a_dead_letter_replayed_by_another_process_keeps_its_shoppers_intents_in_one_queue() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(dir.path());
    let service = store::open(&settings.store).await.unwrap();
    service.enqueue(intent("s1", "first")).await.unwrap();
    let first = service.claim(1, Duration::from_secs(30)).await.unwrap().remove(0);
    service.dead_letter(&first.claim, "CDP said 400").await.unwrap();
    service.enqueue(intent("s1", "second")).await.unwrap();

    let command = store::open(&settings.store).await.unwrap();
    assert_eq!(
        command
            .replay_dead_letters(Some(&[first.claim.intent_id]), None)
            .await
            .unwrap(),
        1
    );
    command.close().await;

    // The replayed intent goes first; once it is acknowledged, "second" is still pending, so the
    // next webhook of s1 must queue behind it rather than start a queue of its own.
    let head = service.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(head.len(), 1);
    assert_eq!(head[0].claim.intent_id, first.claim.intent_id);
    service.ack(&head[0].claim).await.unwrap();
    service.enqueue(intent("s1", "third")).await.unwrap();
    let order = drain_in_claim_order(&service).await;
    assert_eq!(order.len(), 2, "{order:?}");
    assert!(order[0].1 < order[1].1, "second, then third: {order:?}");
    service.close().await;
}

/// An intent waiting for its OrderCloud reads is handed to one enrichment job at a time: again
/// only once its lease has run out or it was given back for a retry (which counts the attempt),
/// and never once its enrichment is saved; then it can be delivered, with the enrichment.
#[tokio::test]
async fn enrichment_jobs_are_leased_retried_and_settled() {
    let (_dir, store) = open().await;
    let mut item = intent("s1", "needs-reads");
    item.needs_enrichment = true;
    let EnqueueOutcome::Queued(id) = store.enqueue(item).await.unwrap() else {
        panic!("queued")
    };
    let lease = Duration::from_secs(30);
    let jobs = store.claim_enrichment(10, lease).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.intent_id, j.attempts)).collect::<Vec<_>>(),
        [(id, 1)]
    );
    assert!(store.claim_enrichment(10, lease).await.unwrap().is_empty(), "leased");
    assert!(
        store.claim(10, lease).await.unwrap().is_empty(),
        "not deliverable before its reads"
    );

    store
        .retry_enrichment(id, store::now_ms() - 1, "OrderCloud unavailable")
        .await
        .unwrap();
    let jobs = store.claim_enrichment(10, Duration::from_millis(50)).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.intent_id, j.attempts)).collect::<Vec<_>>(),
        [(id, 2)]
    );
    // A job that never reports back: its lease runs out and the intent is handed out again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        let jobs = store.claim_enrichment(10, lease).await.unwrap();
        if !jobs.is_empty() {
            break jobs;
        }
        assert!(std::time::Instant::now() < deadline, "the lease never ran out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(again[0].intent_id, id);

    store
        .save_enrichment(id, &json!({"identity": "anon-o1"}))
        .await
        .unwrap();
    assert!(store.claim_enrichment(10, Duration::ZERO).await.unwrap().is_empty());
    let claimed = store.claim(10, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].enrichment, Some(json!({"identity": "anon-o1"})));
    store.close().await;
}
