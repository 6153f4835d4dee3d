//! The store contract, written once and run on every backend in the same `cargo test` (the way
//! apalis runs its `sql_storage_tests!` against each backend): SQLite always, PostgreSQL whenever
//! `TEST_DATABASE_URL` is set (each test in a schema of its own; it says so when it skips).

use std::time::{Duration, Instant};

use ordercloud_cdp_forwarder::config::StoreSettings;
use ordercloud_cdp_forwarder::domain::intent::{Intent, IntentKind, IntentSecrets, RouteFamily};
use ordercloud_cdp_forwarder::domain::{now_ms, CartLine, SessionFacts, ShopperState};
use ordercloud_cdp_forwarder::store::{
    self, CheckOutcome, Claim, DynStore, EnqueueOutcome, NewIntent, OrderCheck, Role, Settle, StoreError, Write,
};
use serde_json::json;

use crate::helpers::*;

/// A backend the contract runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A place for stores of one test: a SQLite file, or a PostgreSQL schema.
pub struct Place {
    pub backend: Backend,
    pub settings: StoreSettings,
    _dir: tempfile::TempDir,
}

/// A service's takeover in these tests: short, so that takeover tests are quick.
const TAKEOVER: Duration = Duration::from_secs(4);

impl Backend {
    /// A fresh place, or `None` (said) when the backend is not available.
    pub fn place(self, test: &str) -> Option<Place> {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = StoreSettings::default();
        match self {
            Backend::Sqlite => settings.url = format!("sqlite://{}", dir.path().join("store.db").display()),
            Backend::Postgres => {
                settings.url = postgres_url(&format!("store contract {test} on PostgreSQL"))?;
                settings.schema = Some(fresh_schema());
            }
        }
        Some(Place {
            backend: self,
            settings,
            _dir: dir,
        })
    }
}

impl Place {
    /// The store as the service opens it.
    pub async fn service(&self) -> DynStore {
        store::open(&self.settings, Role::Service { takeover: TAKEOVER })
            .await
            .unwrap()
    }

    /// The store as an operator's command opens it.
    pub async fn tool(&self) -> DynStore {
        store::open(&self.settings, Role::Tool).await.unwrap()
    }

    /// Runs SQL on the place's database behind the store's back.
    pub async fn execute(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let path = self.settings.url.trim_start_matches("sqlite://").to_string();
                rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
            }
            Backend::Postgres => {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&self.settings.url).await.unwrap();
                let schema = self.settings.schema.as_deref().unwrap();
                sqlx::raw_sql(&format!("SET search_path TO \"{schema}\"; {sql}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }
}

/// Instantiates each contract test once per backend.
macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await
                }
            )*
        }
    };
}

contract!(
    only_the_head_of_each_shoppers_queue_is_claimed,
    an_expired_lease_is_taken_over_and_the_stale_workers_writes_are_refused,
    writes_under_a_claim_land_together_and_progress_comes_back_with_the_next_claim,
    an_ack_does_not_write_the_progress_it_deletes_but_a_retry_does,
    a_replayed_dead_letter_waits_while_a_newer_intent_of_its_shopper_is_claimed,
    dead_letters_replay_in_their_shoppers_order_and_purge,
    a_dead_letter_replayed_after_its_shoppers_queue_emptied_goes_first,
    a_dead_letter_replayed_by_another_process_keeps_its_shoppers_intents_in_one_queue,
    a_batch_with_the_same_key_twice_stores_it_once,
    enrichment_jobs_are_leased_retried_and_settled,
    a_stale_enrichment_claim_writes_nothing,
    an_unreadable_row_is_dead_lettered_alone_and_the_rest_of_the_batch_is_claimed,
    the_claims_of_a_dead_service_are_taken_over_before_their_lease_ends,
    the_dedupe_says_which_keys_it_knows_and_an_enrichment_given_at_intake_comes_back,
    one_reconciler_holds_the_window_and_only_its_holder_moves_the_watermark,
    a_landing_check_is_written_with_the_claim_leased_and_settled,
    a_database_error_keeps_its_source,
    a_value_the_database_refuses_is_told_from_a_database_it_cannot_use,
    an_enrichment_records_each_identity_once_and_keeps_the_rest_of_the_shoppers_record,
    a_closed_store_answers_no_more_reads_or_writes,
    a_lookup_sees_every_write_answered_before_it_and_what_the_file_holds,
    a_record_changed_by_another_process_is_seen_once_the_store_writes_again,
    writes_made_together_land_or_fail_each_alone,
    a_webhook_the_database_refuses_fails_alone_not_the_webhooks_committed_with_it,
    the_ledger_begins_with_the_stores_migration_to_it,
    what_shoppers_left_is_forgotten_past_its_retention_but_not_a_queued_shoppers_record,
    delivery_reads_answer_as_the_three_reads_apart,
    the_queue_lists_its_oldest_pending_intents_in_order_enriched_or_not,
);

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
        enrichment: None,
    }
}

const LONG: Duration = Duration::from_secs(60);

async fn queued(store: &DynStore, shopper: &str, dedupe: &str) -> i64 {
    match store.enqueue(intent(shopper, dedupe)).await.unwrap() {
        EnqueueOutcome::Queued(id) => id,
        other => panic!("{dedupe} not queued: {other:?}"),
    }
}

/// Heads claimed until none is left, each acknowledged at once: the intent ids in claim order.
/// Fails if two intents of one shopper are claimable together.
async fn drain_in_claim_order(store: &DynStore) -> Vec<(String, i64)> {
    let mut order = Vec::new();
    loop {
        let claimed = store.claim(10, LONG).await.unwrap();
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

async fn only_the_head_of_each_shoppers_queue_is_claimed(backend: Backend) {
    let Some(place) = backend.place("only_the_head") else {
        return;
    };
    let store = place.service().await;
    for (shopper, key) in [("s1", "a"), ("s1", "b"), ("s2", "c")] {
        queued(&store, shopper, key).await;
    }
    let claimed = store.claim(10, LONG).await.unwrap();
    let shoppers: Vec<_> = claimed.iter().map(|c| c.shopper_key.as_str()).collect();
    assert_eq!(shoppers, ["s1", "s2"], "one intent per shopper, the oldest");
    assert!(
        store.claim(10, LONG).await.unwrap().is_empty(),
        "both shoppers are in flight"
    );
    store.ack(&claimed[0].claim).await.unwrap();
    let next = store.claim(10, LONG).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].shopper_key, "s1",
        "s1's second intent follows once the first is done"
    );
    assert!(next[0].claim.intent_id > claimed[0].claim.intent_id);
    store.close().await;
}

async fn an_expired_lease_is_taken_over_and_the_stale_workers_writes_are_refused(backend: Backend) {
    let Some(place) = backend.place("expired_lease") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "lease").await;
    let lease = Duration::from_millis(200);
    let stale = store.claim(1, lease).await.unwrap().remove(0);
    // The worker holding `stale` stalls: after its lease another claim takes the intent over.
    let fresh = eventually("the lease to expire", Duration::from_secs(10), || async {
        store.claim(1, lease).await.unwrap().pop()
    })
    .await;
    assert_eq!(fresh.claim.intent_id, stale.claim.intent_id);
    assert_ne!(fresh.claim.claim_id, stale.claim.claim_id);
    assert_eq!(
        (stale.attempts, fresh.attempts),
        (1, 2),
        "the attempt whose lease ran out counts"
    );
    let stale_record = Write::Shopper {
        key: "stale-writer".into(),
        state: ShopperState::default(),
    };
    for settle in [
        None,
        Some(Settle::Ack),
        Some(Settle::Retry {
            at_ms: 0,
            error: "x".into(),
        }),
        Some(Settle::Dead { reason: "x".into() }),
    ] {
        let refused = store
            .apply(&stale.claim, vec![Write::Sent(1), stale_record.clone()], settle.clone())
            .await;
        assert!(
            matches!(refused, Err(StoreError::StaleClaim(_))),
            "{settle:?}: {refused:?}"
        );
    }
    assert!(matches!(
        store.extend(&stale.claim, lease).await,
        Err(StoreError::StaleClaim(_))
    ));
    assert_eq!(
        store.shopper("stale-writer").await.unwrap(),
        None,
        "nothing of the stale worker landed"
    );
    store.ack(&fresh.claim).await.unwrap();
    assert!(store.pending(10).await.unwrap().is_empty());
    store.close().await;
}

/// The plan and count an ack carries (its last event's progress) are deleted with the intent: they
/// are not written first (on SQLite that rewrote the intent's whole row, webhook and plan). A retry
/// carrying them (an ack that could not be recorded) writes them. Watched by a trigger that refuses
/// any write of progress once the first is stored.
async fn an_ack_does_not_write_the_progress_it_deletes_but_a_retry_does(backend: Backend) {
    let Some(place) = backend.place("ack_progress") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "a").await;
    queued(&store, "s2", "b").await;
    let claimed = store.claim(2, LONG).await.unwrap();
    let plan = || Write::Plan(Some(json!([{"event": 1}, {"event": 2}]).to_string()));
    for c in &claimed {
        store.apply(&c.claim, vec![plan(), Write::Sent(1)], None).await.unwrap();
    }
    place
        .execute(match backend {
            Backend::Sqlite => {
                "CREATE TRIGGER refuse BEFORE UPDATE OF progress, sent ON intents \
                 BEGIN SELECT RAISE(ABORT, 'progress written'); END"
            }
            Backend::Postgres => {
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'progress written'; END $$; \
                 CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON intent_progress FOR EACH ROW EXECUTE FUNCTION refuse()"
            }
        })
        .await;

    let retried = store
        .apply(
            &claimed[1].claim,
            vec![Write::Sent(2)],
            Some(Settle::Retry {
                at_ms: 0,
                error: "the ack was not recorded".into(),
            }),
        )
        .await
        .unwrap_err();
    assert!(retried.to_string().contains("progress written"), "{retried}");

    store
        .apply(
            &claimed[0].claim,
            vec![plan(), Write::Sent(2), Write::Durable],
            Some(Settle::Ack),
        )
        .await
        .unwrap();
    let left: Vec<String> = store
        .pending(10)
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.dedupe_key)
        .collect();
    assert_eq!(left, ["b"]);
    store.close().await;
}

async fn writes_under_a_claim_land_together_and_progress_comes_back_with_the_next_claim(backend: Backend) {
    let Some(place) = backend.place("writes_under_a_claim") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "w").await;
    let first = store.claim(1, LONG).await.unwrap().remove(0);
    assert_eq!((first.plan.clone(), first.sent), (None, 0));
    let plan = json!([{"event": 1}, {"event": 2}, {"event": 3}]);
    let facts = SessionFacts {
        channel: "WEB".into(),
        browser_id: "b1".into(),
        shopper_key: "s1".into(),
        last_event_at_ms: 1_000,
        ..SessionFacts::default()
    };
    let shopper = ShopperState {
        identity: Some("anon-o1".into()),
        browsers: [("WEB".to_string(), "b1".to_string())].into(),
        ..ShopperState::default()
    };
    let line = CartLine {
        order_id: "o1".into(),
        line_id: "L1".into(),
        shopper_key: "s1".into(),
        line: json!({"ID": "L1"}),
        updated_at_ms: 1,
    };
    store
        .apply(
            &first.claim,
            vec![
                Write::Plan(Some(plan.to_string())),
                Write::Sent(1),
                Write::Session(facts.clone()),
                Write::Shopper {
                    key: "s1".into(),
                    state: shopper.clone(),
                },
                Write::CartLine(line.clone()),
            ],
            None,
        )
        .await
        .unwrap();
    store.apply(&first.claim, vec![Write::Sent(2)], None).await.unwrap();
    assert_eq!(store.session("WEB", "b1").await.unwrap(), Some(facts));
    assert_eq!(store.shopper("s1").await.unwrap(), Some(shopper));
    assert_eq!(store.cart_lines("o1").await.unwrap(), [line]);
    // Released (a crash, a shutdown): the next claim resumes where CDP stopped acknowledging.
    store.reschedule(&first.claim, 0, "released").await.unwrap();
    let again = store.claim(1, LONG).await.unwrap().remove(0);
    assert_eq!((again.plan.clone(), again.sent), (Some(plan), 2));
    assert_eq!(again.attempts, 2);
    // A new plan starts its count again; a forgotten one is gone.
    store.apply(&again.claim, vec![Write::Plan(None)], None).await.unwrap();
    store
        .apply(
            &again.claim,
            vec![Write::MoveCart {
                order_id: "o1".into(),
                to_shopper: "s2".into(),
            }],
            Some(Settle::Retry {
                at_ms: 0,
                error: "x".into(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(store.cart_lines("o1").await.unwrap()[0].shopper_key, "s2");
    let third = store.claim(1, LONG).await.unwrap().remove(0);
    assert_eq!((third.plan, third.sent), (None, 0));
    store
        .apply(
            &third.claim,
            vec![Write::DeleteCart { order_id: "o1".into() }],
            Some(Settle::Ack),
        )
        .await
        .unwrap();
    assert!(store.cart_lines("o1").await.unwrap().is_empty());
    assert!(store.pending(10).await.unwrap().is_empty());
    store.close().await;
}

/// The race a replay opens: a dead letter replayed while a newer intent of its shopper is in flight
/// is older, so it heads the queue again — but it must wait until the newer one is settled.
async fn a_replayed_dead_letter_waits_while_a_newer_intent_of_its_shopper_is_claimed(backend: Backend) {
    let Some(place) = backend.place("replay_waits") else {
        return;
    };
    let store = place.service().await;
    let first = queued(&store, "s1", "first").await;
    let claimed = store.claim(1, LONG).await.unwrap().remove(0);
    store.dead_letter(&claimed.claim, "CDP said 400").await.unwrap();
    let second = queued(&store, "s1", "second").await;
    let in_flight = store.claim(1, LONG).await.unwrap().remove(0);
    assert_eq!(in_flight.claim.intent_id, second);

    assert_eq!(store.replay_dead_letters(Some(&[first]), None).await.unwrap(), 1);
    assert!(
        store.claim(10, LONG).await.unwrap().is_empty(),
        "the replayed intent must not run beside the one in flight"
    );
    store.ack(&in_flight.claim).await.unwrap();
    let next = store.claim(10, LONG).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.claim.intent_id).collect::<Vec<_>>(),
        [first],
        "then the replayed one, in its original place"
    );
    store.close().await;
}

async fn dead_letters_replay_in_their_shoppers_order_and_purge(backend: Backend) {
    let Some(place) = backend.place("replay_and_purge") else {
        return;
    };
    let store = place.service().await;
    let first = queued(&store, "s1", "first").await;
    queued(&store, "s1", "second").await;
    let claimed = store.claim(1, LONG).await.unwrap().remove(0);
    store.dead_letter(&claimed.claim, "CDP said 400").await.unwrap();
    assert_eq!(
        store.dead_letters(None, 10).await.unwrap()[0].last_error.as_deref(),
        Some("CDP said 400")
    );
    // Replayed while "second" waits (not claimed): it goes ahead of it, and of anything newer.
    assert_eq!(store.replay_dead_letters(Some(&[first]), None).await.unwrap(), 1);
    queued(&store, "s1", "third").await;
    let order: Vec<i64> = drain_in_claim_order(&store)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(order.len(), 3);
    assert_eq!(order[0], first, "the replayed intent is the head again");
    assert!(order[1] < order[2]);

    queued(&store, "s1", "fourth").await;
    let again = store.claim(1, LONG).await.unwrap().remove(0);
    store.dead_letter(&again.claim, "again").await.unwrap();
    assert_eq!(store.purge_dead_letters(now_ms() + 1).await.unwrap(), 1);
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    store.close().await;
}

async fn a_batch_with_the_same_key_twice_stores_it_once(backend: Backend) {
    let Some(place) = backend.place("same_key_twice") else {
        return;
    };
    let store = place.service().await;
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

/// The order ledger's look-up: the dedupe tells which keys it holds (also just stored ones), and an
/// intent stored with its enrichment (a reconciled submit) is claimed enriched, with it.
async fn the_dedupe_says_which_keys_it_knows_and_an_enrichment_given_at_intake_comes_back(backend: Backend) {
    let Some(place) = backend.place("known_keys") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "order-submit:O1").await;
    let mut given = intent("s2", "order-submit:O2");
    given.enrichment = Some(json!({"identity": "b-u", "lines": [{"ID": "L1"}]}));
    assert!(matches!(store.enqueue(given).await.unwrap(), EnqueueOutcome::Queued(_)));
    let asked: Vec<String> = ["order-submit:O1", "order-submit:O3", "order-submit:O2"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    let mut known = store.known_dedupe_keys(&asked).await.unwrap();
    known.sort();
    assert_eq!(known, ["order-submit:O1", "order-submit:O2"]);
    assert!(store.known_dedupe_keys(&[]).await.unwrap().is_empty());
    let claimed = store.claim(10, LONG).await.unwrap();
    let s2 = claimed.iter().find(|c| c.shopper_key == "s2").expect("s2 claimed");
    assert_eq!(s2.enrichment, Some(json!({"identity": "b-u", "lines": [{"ID": "L1"}]})));
    store.close().await;
}

/// One holder at a time: another is refused while the lease runs, takes over once it ran out and
/// reads the watermark the first left; the first holder can then move nothing.
async fn one_reconciler_holds_the_window_and_only_its_holder_moves_the_watermark(backend: Backend) {
    let Some(place) = backend.place("reconciler_lease") else {
        return;
    };
    let store = place.service().await;
    let first = store.lease_reconciler("a", LONG).await.unwrap().expect("a holds it");
    let since_migration = now_ms() - first.expect("the migration's time");
    assert!(
        (0..60_000).contains(&since_migration),
        "the first pass starts at the migration: {since_migration} ms ago"
    );
    assert_eq!(store.lease_reconciler("b", LONG).await.unwrap(), None, "a holds it");
    assert!(store.advance_reconciler("a", 1_000).await.unwrap());
    assert!(
        !store.advance_reconciler("b", 2_000).await.unwrap(),
        "b does not hold it"
    );
    assert_eq!(
        store.lease_reconciler("a", Duration::from_millis(50)).await.unwrap(),
        Some(Some(1_000))
    );
    let taken = eventually("a's short lease to run out", Duration::from_secs(5), || async {
        store.lease_reconciler("b", LONG).await.unwrap()
    })
    .await;
    assert_eq!(taken, Some(1_000), "b goes on from a's watermark");
    assert!(!store.advance_reconciler("a", 3_000).await.unwrap(), "a lost it");
    assert!(store.advance_reconciler("b", 4_000).await.unwrap());
    assert_eq!(store.lease_reconciler("b", LONG).await.unwrap(), Some(Some(4_000)));
    store.close().await;
}

fn check(order: &str, due_at_ms: i64) -> OrderCheck {
    OrderCheck {
        order_id: order.into(),
        shopper_key: "s1".into(),
        intent: json!({"kind": "order_submitted", "order_id": order}),
        enrichment: Some(json!({"identity": "anon-x"})),
        due_at_ms,
        since_ms: 0,
        repairs: 0,
        attempts: 0,
    }
}

/// The landing check rides with the write that records the CHECKOUT (refused with a stale claim),
/// is leased while it runs, keeps its count of repairs, waits out a retry, and goes when done.
async fn a_landing_check_is_written_with_the_claim_leased_and_settled(backend: Backend) {
    let Some(place) = backend.place("order_checks") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "k1").await;
    let claimed = store.claim(10, LONG).await.unwrap().remove(0);
    let due = now_ms() - 1;
    store
        .apply(&claimed.claim, vec![Write::CheckOrder(check("O1", due))], None)
        .await
        .unwrap();
    let stale = Claim {
        intent_id: claimed.claim.intent_id,
        claim_id: "not-the-claim".into(),
    };
    let refused = store
        .apply(&stale, vec![Write::CheckOrder(check("O2", due))], None)
        .await;
    assert!(matches!(refused, Err(StoreError::StaleClaim(_))), "{refused:?}");
    store.ack(&claimed.claim).await.unwrap();

    let due_now = store.claim_order_checks(10, LONG).await.unwrap();
    assert_eq!(due_now.len(), 1, "O2 was never written: {due_now:?}");
    assert_eq!(due_now[0].order_id, "O1");
    assert_eq!(due_now[0].intent, json!({"kind": "order_submitted", "order_id": "O1"}));
    assert_eq!(due_now[0].enrichment, Some(json!({"identity": "anon-x"})));
    assert!(store.claim_order_checks(10, LONG).await.unwrap().is_empty(), "leased");

    store
        .settle_order_check(
            "O1",
            CheckOutcome::Repaired {
                due_at_ms: now_ms() - 1,
            },
        )
        .await
        .unwrap();
    let again = store.claim_order_checks(10, LONG).await.unwrap();
    assert_eq!(again[0].repairs, 1);
    store
        .settle_order_check(
            "O1",
            CheckOutcome::Retry {
                due_at_ms: now_ms() + 60_000,
                error: "CDP down".into(),
            },
        )
        .await
        .unwrap();
    assert!(
        store.claim_order_checks(10, LONG).await.unwrap().is_empty(),
        "not due yet"
    );
    store.settle_order_check("O1", CheckOutcome::Done).await.unwrap();
    store
        .settle_order_check("O1", CheckOutcome::Repaired { due_at_ms: 0 })
        .await
        .unwrap();
    assert!(store.claim_order_checks(10, LONG).await.unwrap().is_empty(), "gone");
    store.close().await;
}

/// The database's own error, found at the end of the error's sources: what an operator reads in
/// the log, and what code can match on.
fn database_error_of(e: &StoreError) -> String {
    let mut source: &dyn std::error::Error = e;
    let mut database = None;
    while let Some(next) = source.source() {
        if next.downcast_ref::<sqlx::Error>().is_some() || next.downcast_ref::<rusqlite::Error>().is_some() {
            database = Some(next.to_string());
        }
        source = next;
    }
    database.unwrap_or_else(|| panic!("no database error among the sources of {e:?}"))
}

async fn a_database_error_keeps_its_source(backend: Backend) {
    let Some(place) = backend.place("error_source") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "e").await;
    let claimed = store.claim(1, LONG).await.unwrap().remove(0);
    place.execute("DROP TABLE cdp_sessions").await;

    // A read.
    let read = store.session("WEB", "b1").await.unwrap_err();
    assert!(database_error_of(&read).contains("cdp_sessions"), "{read}");
    // A write under a claim.
    let facts = SessionFacts {
        channel: "WEB".into(),
        browser_id: "b1".into(),
        shopper_key: "s1".into(),
        ..SessionFacts::default()
    };
    let write = store
        .apply(&claimed.claim, vec![Write::Session(facts)], Some(Settle::Ack))
        .await
        .unwrap_err();
    assert!(database_error_of(&write).contains("cdp_sessions"), "{write}");
    assert!(write.to_string().starts_with("store unavailable"), "{write}");
}

/// A write the database refuses for its value (a constraint) says so, and one it cannot make for
/// another reason (a table gone) does not: delivery drops records only for the first kind.
async fn a_value_the_database_refuses_is_told_from_a_database_it_cannot_use(backend: Backend) {
    let Some(place) = backend.place("refused_value") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "e").await;
    let claimed = store.claim(1, LONG).await.unwrap().remove(0);
    place
        .execute(match backend {
            Backend::Sqlite => {
                "CREATE TRIGGER refuse BEFORE INSERT ON cdp_sessions WHEN NEW.browser_id = 'refused' \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END"
            }
            Backend::Postgres => "ALTER TABLE cdp_sessions ADD CONSTRAINT refuse CHECK (browser_id <> 'refused')",
        })
        .await;
    let facts = |browser: &str| SessionFacts {
        channel: "WEB".into(),
        browser_id: browser.into(),
        shopper_key: "s1".into(),
        ..SessionFacts::default()
    };
    let refused = store
        .apply(&claimed.claim, vec![Write::Session(facts("refused"))], None)
        .await
        .unwrap_err();
    assert!(refused.refuses_value(), "{refused:?}");

    place.execute("DROP TABLE cdp_sessions").await;
    let unusable = store
        .apply(&claimed.claim, vec![Write::Session(facts("b1"))], None)
        .await
        .unwrap_err();
    assert!(!unusable.refuses_value(), "{unusable:?}");
    assert!(!StoreError::Unavailable("closed".into()).refuses_value());
}

/// What shoppers left (cart records, session facts, shoppers' records) is forgotten once nothing
/// touched it since the cutoff; a shopper with an intent in its queue keeps its record.
async fn what_shoppers_left_is_forgotten_past_its_retention_but_not_a_queued_shoppers_record(backend: Backend) {
    let Some(place) = backend.place("prune_shoppers") else {
        return;
    };
    let store = place.service().await;
    let now = now_ms();
    for key in ["old", "new", "busy"] {
        queued(&store, key, &format!("prune-{key}")).await;
    }
    let claimed = store.claim(3, LONG).await.unwrap();
    assert_eq!(claimed.len(), 3);
    for c in &claimed {
        let key = c.shopper_key.clone();
        let writes = vec![
            Write::Shopper {
                key: key.clone(),
                state: ShopperState {
                    identity: Some(format!("id-{key}")),
                    browsers: [("WEB".to_string(), format!("b-{key}"))].into(),
                    ..ShopperState::default()
                },
            },
            Write::Session(SessionFacts {
                channel: "WEB".into(),
                browser_id: format!("b-{key}"),
                shopper_key: key.clone(),
                last_event_at_ms: now,
                ..SessionFacts::default()
            }),
            Write::CartLine(CartLine {
                order_id: format!("o-{key}"),
                line_id: "L1".into(),
                shopper_key: key.clone(),
                line: json!({"ID": "L1"}),
                updated_at_ms: now,
            }),
        ];
        let mut writes = writes;
        if key == "old" {
            // More than a batch of the pruning: 600 sessions gone for long.
            writes.extend((0..600).map(|i| {
                Write::Session(SessionFacts {
                    channel: "APP".into(),
                    browser_id: format!("b-old-{i}"),
                    shopper_key: key.clone(),
                    last_event_at_ms: 1_000,
                    ..SessionFacts::default()
                })
            }));
        }
        if key == "new" {
            // A cart touched lately keeps its lines, the older ones too.
            writes.push(Write::CartLine(CartLine {
                order_id: format!("o-{key}"),
                line_id: "L0".into(),
                shopper_key: key.clone(),
                line: json!({"ID": "L0"}),
                updated_at_ms: 1_000,
            }));
        }
        let settle = (key != "busy").then_some(Settle::Ack);
        store.apply(&c.claim, writes, settle).await.unwrap();
    }
    place
        .execute(
            "UPDATE shoppers SET updated_at = 1000 WHERE shopper_key IN ('old', 'busy'); \
             UPDATE cdp_sessions SET last_event_at = 1000 WHERE shopper_key IN ('old', 'busy'); \
             UPDATE cart_lines SET updated_at = 1000 WHERE shopper_key IN ('old', 'busy')",
        )
        .await;
    // Read before the pruning (a write first, so that the store has seen the change above): what a
    // lookup keeps in memory must go with the rows.
    store.prune_dedupe(0).await.unwrap();
    assert!(store.shopper("old").await.unwrap().is_some());
    assert!(store.session("WEB", "b-old").await.unwrap().is_some());
    assert_eq!(store.cart_lines("o-old").await.unwrap().len(), 1);
    let deleted = store.prune_shoppers(now - 3_600_000).await.unwrap();
    assert_eq!(
        deleted, 605,
        "old's three rows and 600 sessions, busy's cart and session"
    );
    assert!(store.shopper("old").await.unwrap().is_none());
    assert!(store.session("WEB", "b-old").await.unwrap().is_none());
    assert!(store.cart_lines("o-old").await.unwrap().is_empty());
    assert!(store.shopper("busy").await.unwrap().is_some(), "its intent is queued");
    assert!(store.session("WEB", "b-busy").await.unwrap().is_none());
    assert!(store.cart_lines("o-busy").await.unwrap().is_empty());
    assert!(store.shopper("new").await.unwrap().is_some());
    assert!(store.session("WEB", "b-new").await.unwrap().is_some());
    assert_eq!(
        store.cart_lines("o-new").await.unwrap().len(),
        2,
        "a cart goes whole or not at all"
    );
    assert!(store.session("APP", "b-old-599").await.unwrap().is_none());
    assert_eq!(store.prune_shoppers(now - 3_600_000).await.unwrap(), 0, "nothing more");
}

/// A store says when it began keying submits by their order (its migration to the ledger): for a
/// new one, not before it was created (a submit taken before the migration is keyed by its LogID,
/// and would look lost), and at most a second after (SQLite records the migration to the second).
async fn the_ledger_begins_with_the_stores_migration_to_it(backend: Backend) {
    let Some(place) = backend.place("ledger_since") else {
        return;
    };
    let before = now_ms();
    let store = place.service().await;
    let since = store.ledger_since().await.unwrap().expect("the ledger's migration ran");
    assert!(
        (before..=now_ms() + 1_000).contains(&since),
        "{since} not within {before}..{}",
        now_ms() + 1_000
    );
}

/// Webhooks arriving together are committed together (PostgreSQL's group commit, SQLite's writer);
/// one whose value the database refuses is refused alone: the others are stored, their shoppers
/// undisturbed.
async fn a_webhook_the_database_refuses_fails_alone_not_the_webhooks_committed_with_it(backend: Backend) {
    let Some(place) = backend.place("refused_webhook") else {
        return;
    };
    let store = place.service().await;
    place
        .execute(match backend {
            Backend::Sqlite => {
                "CREATE TRIGGER refuse BEFORE INSERT ON intents WHEN NEW.shopper_key = 'refused' \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END"
            }
            Backend::Postgres => "ALTER TABLE intents ADD CONSTRAINT refuse CHECK (shopper_key <> 'refused')",
        })
        .await;
    for round in 0..3 {
        let mut enqueues = tokio::task::JoinSet::new();
        for i in 0..40 {
            let store = store.clone();
            let shopper = if i == 20 {
                "refused".to_string()
            } else {
                format!("s{i}")
            };
            let item = intent(&shopper, &format!("together-{round}-{i}"));
            enqueues.spawn(async move { (shopper, store.enqueue(item).await) });
        }
        let mut queued = 0;
        while let Some(joined) = enqueues.join_next().await {
            match joined.unwrap() {
                (shopper, Err(e)) if shopper == "refused" => assert!(e.refuses_value(), "{e:?}"),
                (shopper, outcome) => {
                    assert!(
                        matches!(outcome, Ok(EnqueueOutcome::Queued(_))),
                        "round {round}, {shopper}: {outcome:?}"
                    );
                    queued += 1;
                }
            }
        }
        assert_eq!(queued, 39, "round {round}");
    }
}

/// A shopper whose queue emptied starts a new one; a dead letter replayed then still goes first.
async fn a_dead_letter_replayed_after_its_shoppers_queue_emptied_goes_first(backend: Backend) {
    let Some(place) = backend.place("replay_after_empty") else {
        return;
    };
    let store = place.service().await;
    let first = queued(&store, "s1", "first").await;
    let claimed = store.claim(1, LONG).await.unwrap().remove(0);
    store.dead_letter(&claimed.claim, "CDP said 400").await.unwrap();
    // The queue is empty now: these two start another.
    queued(&store, "s1", "second").await;
    queued(&store, "s1", "third").await;
    queued(&store, "s2", "other").await;
    store.replay_dead_letters(Some(&[first]), None).await.unwrap();
    let order: Vec<i64> = drain_in_claim_order(&store)
        .await
        .into_iter()
        .filter(|(shopper, _)| shopper == "s1")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(order.len(), 3);
    assert_eq!(order[0], first, "the replayed intent first");
    assert!(order[1] < order[2], "then the others in their order");
    store.close().await;
}

/// The `dead-letters` command opens the store beside the running service: a dead letter it replays
/// joins the queue the service holds for that shopper, and the service, which keeps its shoppers'
/// queues in memory (SQLite), still sends that shopper's intents one at a time afterwards.
async fn a_dead_letter_replayed_by_another_process_keeps_its_shoppers_intents_in_one_queue(backend: Backend) {
    let Some(place) = backend.place("replay_by_command") else {
        return;
    };
    let service = place.service().await;
    let first = queued(&service, "s1", "first").await;
    let claimed = service.claim(1, LONG).await.unwrap().remove(0);
    service.dead_letter(&claimed.claim, "CDP said 400").await.unwrap();
    queued(&service, "s1", "second").await;

    let command = place.tool().await;
    assert_eq!(command.replay_dead_letters(Some(&[first]), None).await.unwrap(), 1);
    command.close().await;

    // The replayed intent goes first; once it is acknowledged, "second" is still pending, so the
    // next webhook of s1 must queue behind it rather than start a queue of its own.
    let head = service.claim(10, LONG).await.unwrap();
    assert_eq!(head.len(), 1);
    assert_eq!(head[0].claim.intent_id, first);
    service.ack(&head[0].claim).await.unwrap();
    queued(&service, "s1", "third").await;
    let order = drain_in_claim_order(&service).await;
    assert_eq!(order.len(), 2, "{order:?}");
    assert!(order[0].1 < order[1].1, "second, then third: {order:?}");
    service.close().await;
}

/// An intent waiting for its OrderCloud reads is handed to one enrichment job at a time: again
/// only once its lease has run out or it was given back for a retry (which counts the attempt),
/// and never once its enrichment is saved; then it can be delivered, with the enrichment.
async fn an_enrichment_records_each_identity_once_and_keeps_the_rest_of_the_shoppers_record(backend: Backend) {
    let Some(place) = backend.place("enrichment_identities") else {
        return;
    };
    let store = place.service().await;
    // The registered shopper's record as delivery left it: a browser.
    queued(&store, "buyer-u1", "earlier").await;
    let earlier = store.claim(1, LONG).await.unwrap().remove(0);
    let record = ShopperState {
        browsers: [("WEB".to_string(), "b-reg".to_string())].into(),
        ..ShopperState::default()
    };
    let write = Write::Shopper {
        key: "buyer-u1".into(),
        state: record.clone(),
    };
    store
        .apply(&earlier.claim, vec![write], Some(Settle::Ack))
        .await
        .unwrap();

    let mut item = intent("anon-o1", "needs-reads");
    item.needs_enrichment = true;
    queued_item(&store, item).await;
    let job = store.claim_enrichment(1, LONG).await.unwrap().remove(0);
    // The same shopper twice (the last identity wins), and another.
    let identities = [
        ("buyer-u1".to_string(), "buyer-first".to_string()),
        ("anon-o1".to_string(), "anon-o1".to_string()),
        ("buyer-u1".to_string(), "buyer-u1".to_string()),
    ];
    store
        .save_enrichment(&job.claim, &json!({"identity": "anon-o1"}), &identities)
        .await
        .unwrap();
    let registered = store.shopper("buyer-u1").await.unwrap().expect("recorded");
    assert_eq!(registered.identity.as_deref(), Some("buyer-u1"));
    assert_eq!(registered.browsers, record.browsers, "the rest of the record stays");
    let anonymous = store.shopper("anon-o1").await.unwrap().expect("recorded");
    assert_eq!(anonymous.identity.as_deref(), Some("anon-o1"));
    let claimed = store.claim(1, LONG).await.unwrap();
    assert_eq!(claimed.len(), 1, "enriched, so deliverable");
    assert_eq!(claimed[0].enrichment, Some(json!({"identity": "anon-o1"})));
    store.close().await;
}

async fn a_closed_store_answers_no_more_reads_or_writes(backend: Backend) {
    let Some(place) = backend.place("closed") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "before").await;
    assert!(store.shopper("s1").await.unwrap().is_none());
    store.close().await;
    assert!(store.shopper("s1").await.is_err(), "a lookup after close");
    assert!(store.cart_lines("o1").await.is_err(), "a lookup after close");
    assert!(
        store.enqueue(intent("s1", "after")).await.is_err(),
        "a write after close"
    );
}

/// Delivery's lookups (which SQLite answers from memory for recent records) against writes made
/// meanwhile: a writer applies numbered records of three shoppers, sessions and carts (and an
/// enrichment's identities, a failed write and a stale worker's refused one), while two readers
/// look them up. A lookup started after a write was answered never sees an older record; at the
/// end every lookup answers what the file holds (read by an operator's command, which keeps
/// nothing in memory).
async fn a_lookup_sees_every_write_answered_before_it_and_what_the_file_holds(backend: Backend) {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let Some(place) = backend.place("lookups_see_writes") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "writer", "w").await;
    let claim = store.claim(1, LONG).await.unwrap().remove(0).claim;
    queued(&store, "stale", "s").await;
    let stale = store.claim(1, Duration::from_millis(1)).await.unwrap().remove(0).claim;
    eventually(
        "the stale worker's lease to be taken over",
        Duration::from_secs(10),
        || async { store.claim(1, LONG).await.unwrap().pop() },
    )
    .await;
    let mut needs = intent("enriched", "e");
    needs.needs_enrichment = true;
    queued_item(&store, needs).await;
    let job = store.claim_enrichment(1, LONG).await.unwrap().remove(0);

    const KEYS: usize = 3;
    const ROUNDS: i64 = 300;
    let records = |n: i64| {
        let i = n as usize % KEYS;
        let shopper = ShopperState {
            email: Some(format!("{n}@example.com")),
            browsers: [("WEB".to_string(), format!("b{i}"))].into(),
            ..ShopperState::default()
        };
        let facts = SessionFacts {
            channel: "WEB".into(),
            browser_id: format!("b{i}"),
            shopper_key: format!("s{i}"),
            last_event_at_ms: n,
            ..SessionFacts::default()
        };
        let line = CartLine {
            order_id: format!("o{i}"),
            line_id: "L1".into(),
            shopper_key: format!("s{i}"),
            line: json!({"ID": "L1", "n": n}),
            updated_at_ms: n,
        };
        vec![
            Write::Shopper {
                key: format!("s{i}"),
                state: shopper,
            },
            Write::Session(facts),
            Write::CartLine(line),
        ]
    };
    // The number of the last record of each key whose write was answered.
    let answered: Arc<Vec<AtomicI64>> = Arc::new((0..KEYS).map(|_| AtomicI64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let number_of = |shopper: &Option<ShopperState>| {
        shopper
            .as_ref()
            .and_then(|s| s.email.as_deref())
            .and_then(|e| e.trim_end_matches("@example.com").parse::<i64>().ok())
            .unwrap_or(0)
    };
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (store, answered, done) = (store.clone(), answered.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut lookups = 0;
            while !done.load(Ordering::SeqCst) {
                for i in 0..KEYS {
                    let floor = answered[i].load(Ordering::SeqCst);
                    let shopper = store.shopper(&format!("s{i}")).await.unwrap();
                    let session = store.session("WEB", &format!("b{i}")).await.unwrap();
                    let cart = store.cart_lines(&format!("o{i}")).await.unwrap();
                    let seen = [
                        number_of(&shopper),
                        session.map_or(0, |s| s.last_event_at_ms),
                        cart.first().map_or(0, |l| l.updated_at_ms),
                    ];
                    assert!(
                        seen.iter().all(|n| *n >= floor),
                        "key {i}: record {floor} was written before the lookup, which saw {seen:?}"
                    );
                    lookups += 1;
                }
                tokio::task::yield_now().await;
            }
            lookups
        }));
    }
    for n in 1..=ROUNDS {
        store.apply(&claim, records(n), None).await.unwrap();
        answered[n as usize % KEYS].store(n, Ordering::SeqCst);
        if n % 50 == 0 {
            // A stale worker's writes are refused and change nothing that is looked up.
            let refused = store.apply(&stale, records(n + 1000), None).await;
            assert!(matches!(refused, Err(StoreError::StaleClaim(_))), "{refused:?}");
        }
    }
    // An enrichment's identity lands on a shopper's record.
    store
        .save_enrichment(
            &job.claim,
            &json!({"identity": "buyer-s0"}),
            &[("s0".into(), "buyer-s0".into())],
        )
        .await
        .unwrap();
    done.store(true, Ordering::SeqCst);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "a reader looked nothing up");
    }
    let file = place.tool().await;
    for i in 0..KEYS {
        let (shopper, session, order) = (format!("s{i}"), format!("b{i}"), format!("o{i}"));
        assert_eq!(
            store.shopper(&shopper).await.unwrap(),
            file.shopper(&shopper).await.unwrap()
        );
        assert_eq!(
            store.session("WEB", &session).await.unwrap(),
            file.session("WEB", &session).await.unwrap()
        );
        assert_eq!(
            store.cart_lines(&order).await.unwrap(),
            file.cart_lines(&order).await.unwrap()
        );
    }
    assert_eq!(
        store.shopper("s0").await.unwrap().and_then(|s| s.identity).as_deref(),
        Some("buyer-s0")
    );
    file.close().await;
    store.close().await;
}

/// Another process (an operator's command, a migration) changes a shopper's record behind the
/// service's back: the service's lookups see the change once it has written anything since (every
/// delivery starts with a claim, a write), not the record it looked up before.
async fn a_record_changed_by_another_process_is_seen_once_the_store_writes_again(backend: Backend) {
    let Some(place) = backend.place("changed_behind") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "first").await;
    let claim = store.claim(1, LONG).await.unwrap().remove(0).claim;
    let record = |email: &str| ShopperState {
        email: Some(email.into()),
        ..ShopperState::default()
    };
    let write = Write::Shopper {
        key: "s1".into(),
        state: record("before@example.com"),
    };
    store.apply(&claim, vec![write], None).await.unwrap();
    assert_eq!(store.shopper("s1").await.unwrap(), Some(record("before@example.com")));
    place
        .execute(r#"UPDATE shoppers SET state = '{"email": "after@example.com"}' WHERE shopper_key = 's1'"#)
        .await;
    queued(&store, "s2", "next").await;
    assert_eq!(store.shopper("s1").await.unwrap(), Some(record("after@example.com")));
    store.close().await;
}

async fn queued_item(store: &DynStore, item: NewIntent) -> i64 {
    match store.enqueue(item).await.unwrap() {
        EnqueueOutcome::Queued(id) => id,
        other => panic!("not queued: {other:?}"),
    }
}

async fn enrichment_jobs_are_leased_retried_and_settled(backend: Backend) {
    let Some(place) = backend.place("enrichment_jobs") else {
        return;
    };
    let store = place.service().await;
    let mut item = intent("s1", "needs-reads");
    item.needs_enrichment = true;
    let EnqueueOutcome::Queued(id) = store.enqueue(item).await.unwrap() else {
        panic!("queued")
    };
    let lease = Duration::from_secs(30);
    let jobs = store.claim_enrichment(10, lease).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.claim.intent_id, j.attempts)).collect::<Vec<_>>(),
        [(id, 1)]
    );
    assert!(store.claim_enrichment(10, lease).await.unwrap().is_empty(), "leased");
    assert!(
        store.claim(10, lease).await.unwrap().is_empty(),
        "not deliverable before its reads"
    );

    store
        .retry_enrichment(&jobs[0].claim, now_ms() - 1, "OrderCloud unavailable")
        .await
        .unwrap();
    let jobs = store.claim_enrichment(10, Duration::from_millis(50)).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.claim.intent_id, j.attempts)).collect::<Vec<_>>(),
        [(id, 2)]
    );
    // A job that never reports back: its lease runs out and the intent is handed out again.
    let again = eventually("the enrichment lease to run out", Duration::from_secs(10), || async {
        let jobs = store.claim_enrichment(10, lease).await.unwrap();
        (!jobs.is_empty()).then_some(jobs)
    })
    .await;
    assert_eq!(again[0].claim.intent_id, id);

    store
        .save_enrichment(
            &again[0].claim,
            &json!({"identity": "anon-o1"}),
            &[("s1".to_string(), "anon-o1".to_string())],
        )
        .await
        .unwrap();
    assert_eq!(
        store.shopper("s1").await.unwrap().unwrap().identity.as_deref(),
        Some("anon-o1")
    );
    assert!(store.claim_enrichment(10, Duration::ZERO).await.unwrap().is_empty());
    let claimed = store.claim(10, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].enrichment, Some(json!({"identity": "anon-o1"})));
    store.close().await;
}

/// An enricher whose lease ran out while another took the job over writes nothing: neither its
/// results nor a dead letter of an intent that is, by then, enriched and being delivered.
async fn a_stale_enrichment_claim_writes_nothing(backend: Backend) {
    let Some(place) = backend.place("stale_enricher") else {
        return;
    };
    let store = place.service().await;
    let mut item = intent("s1", "needs-reads");
    item.needs_enrichment = true;
    store.enqueue(item).await.unwrap();
    let stale = store
        .claim_enrichment(1, Duration::from_millis(50))
        .await
        .unwrap()
        .remove(0);
    let fresh = eventually("the enrichment lease to run out", Duration::from_secs(10), || async {
        store.claim_enrichment(1, LONG).await.unwrap().pop()
    })
    .await;
    let identity = [("s1".to_string(), "stale".to_string())];
    assert!(matches!(
        store
            .save_enrichment(&stale.claim, &json!({"identity": "stale"}), &identity)
            .await,
        Err(StoreError::StaleClaim(_))
    ));
    assert!(matches!(
        store.retry_enrichment(&stale.claim, 0, "x").await,
        Err(StoreError::StaleClaim(_))
    ));
    assert_eq!(
        store.shopper("s1").await.unwrap(),
        None,
        "the stale identity did not land"
    );
    store
        .save_enrichment(&fresh.claim, &json!({"identity": "anon-o1"}), &[])
        .await
        .unwrap();
    let delivering = store.claim(1, LONG).await.unwrap().remove(0);
    for claim in [&stale.claim, &fresh.claim] {
        assert!(matches!(
            store.dead_letter_enrichment(claim, "too late").await,
            Err(StoreError::StaleClaim(_))
        ));
    }
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    store.ack(&delivering.claim).await.unwrap();
    store.close().await;
}

/// A row that cannot be read back (here: corrupted behind the store's back) is dead-lettered on its
/// own, with the reason, and shows in the dead-letter listing; the rest of the batch is claimed.
async fn an_unreadable_row_is_dead_lettered_alone_and_the_rest_of_the_batch_is_claimed(backend: Backend) {
    let Some(place) = backend.place("unreadable_row") else {
        return;
    };
    let store = place.service().await;
    let poison = queued(&store, "poisoned", "p").await;
    let healthy = queued(&store, "healthy", "h").await;
    place
        .execute(&format!(
            "UPDATE intents SET intent = '{{\"kind\": [[[' WHERE id = {poison}"
        ))
        .await;
    let claimed = store.claim(10, LONG).await.unwrap();
    assert_eq!(claimed.iter().map(|c| c.claim.intent_id).collect::<Vec<_>>(), [healthy]);
    store.ack(&claimed[0].claim).await.unwrap();
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison);
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(reason.contains("cannot be read back"), "{reason}");
    assert_eq!(dead[0].intent, json!("{\"kind\": [[["), "shown as it is stored");
    assert!(store.claim(10, LONG).await.unwrap().is_empty());
    store.close().await;
}

/// A service that dies holding claims (kill -9: no release, no goodbye) does not hold its
/// shoppers for a whole lease. SQLite: claims live in the serving process's memory and die with it
/// (the next process owns the file's lock). PostgreSQL: another replica takes them over once the dead one has missed its
/// heartbeats for `delivery.takeover_secs`.
async fn the_claims_of_a_dead_service_are_taken_over_before_their_lease_ends(backend: Backend) {
    let Some(place) = backend.place("dead_service") else {
        return;
    };
    let dead = place.service().await;
    queued(&dead, "s1", "held").await;
    let held = dead.claim(1, Duration::from_secs(600)).await.unwrap().remove(0);
    // The process dies: its store is dropped without closing (no claim released, no row removed).
    // SQLite's writer thread must stop before the file can be taken: close only that.
    if backend == Backend::Sqlite {
        dead.close().await;
    }
    drop(dead);

    let started = Instant::now();
    let survivor = place.service().await;
    let taken = eventually(
        "the dead service's claim to be taken over",
        Duration::from_secs(30),
        || async { survivor.claim(1, Duration::from_secs(600)).await.unwrap().pop() },
    )
    .await;
    assert_eq!(taken.claim.intent_id, held.claim.intent_id);
    assert!(
        started.elapsed() < Duration::from_secs(600),
        "taken over long before the lease ran out"
    );
    assert!(matches!(
        dead_claim_ack(&survivor, &held).await,
        Err(StoreError::StaleClaim(_))
    ));
    survivor.ack(&taken.claim).await.unwrap();
    survivor.close().await;
}

async fn dead_claim_ack(
    store: &DynStore,
    held: &ordercloud_cdp_forwarder::store::ClaimedIntent,
) -> Result<(), StoreError> {
    store.ack(&held.claim).await
}

/// One serving process per SQLite file: a second one is refused with a clear message, while the
/// operators' commands still open it.
#[tokio::test]
async fn a_second_service_on_one_sqlite_file_is_refused_and_the_dead_letter_commands_still_work() {
    let place = Backend::Sqlite.place("second_service").unwrap();
    let first = place.service().await;
    let refused = store::open(&place.settings, Role::Service { takeover: TAKEOVER })
        .await
        .err()
        .expect("a second service is refused")
        .to_string();
    assert!(refused.contains("another forwarder serves"), "{refused}");
    assert!(refused.contains("PostgreSQL"), "{refused}");
    let command = place.tool().await;
    assert!(command.dead_letters(None, 10).await.unwrap().is_empty());
    command.close().await;
    first.close().await;
    place.service().await.close().await;
}

/// A dead-letter command of a later version does not migrate a SQLite file an earlier version's
/// service is serving (a migration could change the tables under it: 0007 dropped one): it says
/// which version to run instead, and leaves the file as it was.
#[tokio::test]
async fn a_command_of_a_later_version_does_not_migrate_a_file_an_earlier_service_serves() {
    let place = Backend::Sqlite.place("later_command").unwrap();
    let service = place.service().await;
    // The service as an earlier version: its file lacks the latest migration.
    let path = place.settings.url.trim_start_matches("sqlite://").to_string();
    let latest: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT MAX(version) FROM _sqlx_migrations", [], |r| r.get(0))
        .unwrap();
    place
        .execute(&format!("DELETE FROM _sqlx_migrations WHERE version = {latest}"))
        .await;
    let refused = store::open(&place.settings, Role::Tool)
        .await
        .err()
        .expect("the command is refused")
        .to_string();
    assert!(refused.contains("earlier version"), "{refused}");
    let applied: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM _sqlx_migrations WHERE version = ?1",
            [latest],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(applied, 0, "not migrated");
    service.close().await;
}

/// SQLite keys GUID LogIDs by their 16 bytes (migration 0004 converts those stored before as text):
/// a redelivery is recognised whichever way its LogID was stored, and in either letter case.
#[tokio::test]
async fn sqlite_recognises_log_ids_stored_before_and_after_the_guid_key_migration() {
    let place = Backend::Sqlite.place("guid_keys").unwrap();
    let path = place.settings.url.trim_start_matches("sqlite://").to_string();
    let store = place.service().await;
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
    let store = place.service().await;
    for key in [old_guid.to_lowercase().as_str(), old_other] {
        assert_eq!(
            store.enqueue(intent("s1", key)).await.unwrap(),
            EnqueueOutcome::Duplicate,
            "{key} was seen before the migration"
        );
    }
    let new_guid = "0b7f8c3e-5d2a-4e61-9c0f-2a4b6d8e1f37";
    queued(&store, "s1", new_guid).await;
    for redelivery in [new_guid.to_string(), new_guid.to_uppercase()] {
        assert_eq!(
            store.enqueue(intent("s1", &redelivery)).await.unwrap(),
            EnqueueOutcome::Duplicate
        );
    }
    // A LogID that is not a GUID is keyed by its text, exactly.
    queued(&store, "s1", "log-7").await;
    assert_eq!(
        store.enqueue(intent("s1", "log-7")).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
    queued(&store, "s1", "LOG-7").await;
    assert_eq!(store.pending(10).await.unwrap().len(), 3);
    store.close().await;
}

/// PostgreSQL: a replica that heartbeats keeps its claims however long its CDP call takes; only a
/// silent one loses them.
#[tokio::test]
async fn postgres_a_live_replicas_claim_is_never_taken_over() {
    let Some(place) = Backend::Postgres.place("live_replica") else {
        return;
    };
    let live = place.service().await;
    queued(&live, "s1", "held").await;
    let held = live.claim(1, Duration::from_secs(600)).await.unwrap().remove(0);
    let other = place.service().await;
    // Three takeover periods, looking all along: never claimable.
    let until = Instant::now() + TAKEOVER * 3;
    while Instant::now() < until {
        assert!(
            other.claim(10, LONG).await.unwrap().is_empty(),
            "taken from a live replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    live.ack(&held.claim).await.unwrap();
    other.close().await;
    live.close().await;
}

/// PostgreSQL: a takeover that waits for the stale worker's last write (its progress, committed
/// while the claim waited for the intent's row) claims the intent with that progress, not with
/// what it read before it waited — else the event that write recorded is sent again.
#[tokio::test]
async fn postgres_a_takeover_sees_the_progress_committed_while_it_waited() {
    use sqlx::Connection as _;
    let Some(place) = Backend::Postgres.place("takeover_progress") else {
        return;
    };
    let stale = place.service().await;
    let id = queued(&stale, "s1", "raced").await;
    // A lease of a millisecond: over by the time the other replica claims.
    let first = stale.claim(1, Duration::from_millis(1)).await.unwrap().remove(0);
    assert_eq!(first.sent, 0);
    let schema = place.settings.schema.clone().unwrap();
    // The stale worker's write of its progress, as forwarder_apply makes it: the intent's row held
    // (FOR SHARE) from its check of the claim until its commit.
    let mut apply = sqlx::PgConnection::connect(&place.settings.url).await.unwrap();
    let apply_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut apply)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "SET search_path TO \"{schema}\"; BEGIN; \
         SELECT 1 FROM intents WHERE id = {id} FOR SHARE; \
         INSERT INTO intent_progress (intent_id, sent, plan) VALUES ({id}, 2, '[]')"
    ))
    .execute(&mut apply)
    .await
    .unwrap();

    let other = place.service().await;
    let takeover = tokio::spawn({
        let other = other.clone();
        async move { other.claim(1, LONG).await.unwrap() }
    });
    // The takeover's claim waits for the row the write holds.
    let watch = sqlx::PgPool::connect(&place.settings.url).await.unwrap();
    eventually("the takeover to wait for the row", Duration::from_secs(10), || {
        let watch = watch.clone();
        async move {
            let waiting: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(apply_pid)
                    .fetch_one(&watch)
                    .await
                    .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;
    sqlx::raw_sql("COMMIT").execute(&mut apply).await.unwrap();
    let claimed = takeover.await.unwrap();
    assert_eq!(claimed.len(), 1, "taken over");
    assert_eq!(claimed[0].claim.intent_id, id);
    assert_ne!(claimed[0].claim.claim_id, first.claim.claim_id);
    assert_eq!(claimed[0].sent, 2, "the progress committed while the takeover waited");
    other.close().await;
    stale.close().await;
}

/// PostgreSQL: a database migrated by the release before this one (migrations up to 0004, as they
/// landed) upgrades with the progress of its intents, dead letters' included: a dead letter whose
/// CHECKOUT CDP acknowledged, replayed after the upgrade, goes on from there and plans no second
/// order.
#[tokio::test]
async fn postgres_an_upgrade_keeps_every_intents_progress() {
    use sqlx::migrate::Migrate as _;
    use sqlx::Connection as _;
    let Some(place) = Backend::Postgres.place("upgrade_keeps_progress") else {
        return;
    };
    let schema = place.settings.schema.clone().unwrap();
    let mut conn = sqlx::PgConnection::connect(&place.settings.url).await.unwrap();
    sqlx::raw_sql(&format!("CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    let migrator = sqlx::migrate!("migrations/postgres");
    conn.ensure_migrations_table().await.unwrap();
    for migration in migrator.iter().filter(|m| m.version <= 4) {
        conn.apply(migration).await.unwrap();
    }
    // As the release before stored them: the plan in `progress`, the count in `sent`.
    let stored = serde_json::to_string(&intent("s1", "any").intent).unwrap();
    sqlx::query(
        "INSERT INTO intents (dedupe_key, shopper_key, kind, intent, enriched, state, next_attempt_at, \
           created_at, updated_at, dead_at, progress, sent) \
         VALUES ('dead-one', 's1', 'submit', $1, true, 'dead', 0, 0, 0, 0, '[\"a\",\"b\",\"c\"]', 3), \
                ('pending-one', 's2', 'submit', $1, true, 'pending', 0, 0, 0, NULL, '[\"x\",\"y\"]', 1)",
    )
    .bind(stored)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let store = place.service().await;
    assert_eq!(store.replay_dead_letters(None, None).await.unwrap(), 1);
    let mut claimed = store.claim(10, LONG).await.unwrap();
    claimed.sort_by(|a, b| a.shopper_key.cmp(&b.shopper_key));
    let progress: Vec<(String, Option<serde_json::Value>, usize)> = claimed
        .iter()
        .map(|c| (c.shopper_key.clone(), c.plan.clone(), c.sent))
        .collect();
    assert_eq!(
        progress,
        [
            ("s1".to_string(), Some(json!(["a", "b", "c"])), 3),
            ("s2".to_string(), Some(json!(["x", "y"])), 1)
        ]
    );
    store.close().await;
}

/// Replicas rolled out together onto an empty database (a new deployment with two replicas) all
/// start: the schema and its migrations are made once, the others wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_started_together_on_an_empty_database_all_start() {
    for round in 0..5 {
        let Some(place) = Backend::Postgres.place("started_together") else {
            return;
        };
        let opens: Vec<_> = (0..3)
            .map(|_| {
                let settings = place.settings.clone();
                tokio::spawn(async move { store::open(&settings, Role::Service { takeover: TAKEOVER }).await })
            })
            .collect();
        for open in opens {
            let store = open
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: a replica did not start: {e:#}"));
            store.close().await;
        }
    }
}

/// Delivery workers' writes made at the same moment (SQLite's writer takes them in one transaction;
/// PostgreSQL makes one call each): each lands or fails alone — one made under a claim no longer
/// held, sent among the others, is refused, and the others land with their records and acks.
async fn writes_made_together_land_or_fail_each_alone(backend: Backend) {
    let Some(place) = backend.place("writes_together") else {
        return;
    };
    let store = place.service().await;
    for i in 0..8 {
        queued(&store, &format!("s{i}"), &format!("together-{i}")).await;
    }
    let claimed = store.claim(8, LONG).await.unwrap();
    assert_eq!(claimed.len(), 8);
    let stale = Claim {
        intent_id: claimed[0].claim.intent_id,
        claim_id: "not-ours".into(),
    };
    let mut applies = tokio::task::JoinSet::new();
    for (i, c) in claimed.iter().enumerate() {
        if i == 4 {
            let (store, stale) = (store.clone(), stale.clone());
            applies.spawn(async move {
                let record = Write::Shopper {
                    key: "record-stale".into(),
                    state: ShopperState::default(),
                };
                (false, store.apply(&stale, vec![Write::Sent(1), record], None).await)
            });
        }
        let (store, claim) = (store.clone(), c.claim.clone());
        applies.spawn(async move {
            let record = Write::Shopper {
                key: format!("record-{i}"),
                state: ShopperState::default(),
            };
            (
                true,
                store
                    .apply(&claim, vec![Write::Sent(1), record], Some(Settle::Ack))
                    .await,
            )
        });
    }
    let mut landed = 0;
    while let Some(joined) = applies.join_next().await {
        match joined.unwrap() {
            (true, result) => {
                result.unwrap();
                landed += 1;
            }
            (false, result) => assert!(matches!(result, Err(StoreError::StaleClaim(_))), "{result:?}"),
        }
    }
    assert_eq!(landed, 8);
    for i in 0..8 {
        assert!(
            store.shopper(&format!("record-{i}")).await.unwrap().is_some(),
            "record-{i}"
        );
    }
    assert_eq!(store.shopper("record-stale").await.unwrap(), None);
    assert!(store.pending(10).await.unwrap().is_empty());
    store.close().await;
}

/// Delivery's first reads in one go (one round trip on PostgreSQL) answer what the shopper, cart
/// and session reads answer apart: the session of the stored browser on the channel asked, none for
/// a channel without a browser, the cart's lines oldest first, a submit's open sessions of the
/// shopper; a damaged session of the stored browser is said, and a shopper's record damaged
/// outside the service fails them as the shopper read fails.
async fn delivery_reads_answer_as_the_three_reads_apart(backend: Backend) {
    use ordercloud_cdp_forwarder::store::DeliveryReads;
    let Some(place) = backend.place("delivery_reads") else {
        return;
    };
    let store = place.service().await;
    queued(&store, "s1", "w").await;
    let claim = store.claim(1, LONG).await.unwrap().remove(0).claim;
    let facts = |browser: &str, at: i64| SessionFacts {
        channel: "WEB".into(),
        browser_id: browser.into(),
        shopper_key: "s1".into(),
        last_event_at_ms: at,
        ..SessionFacts::default()
    };
    let line = |id: &str, at: i64| CartLine {
        order_id: "o1".into(),
        line_id: id.into(),
        shopper_key: "s1".into(),
        line: json!({"ID": id, "Quantity": at}),
        updated_at_ms: at,
    };
    let shopper = ShopperState {
        identity: Some("buyer-u1".into()),
        email: Some("u1@example.com".into()),
        browsers: [
            ("WEB".to_string(), "b1".to_string()),
            ("APP".to_string(), "b9".to_string()),
        ]
        .into(),
        ..ShopperState::default()
    };
    store
        .apply(
            &claim,
            vec![
                Write::Shopper {
                    key: "s1".into(),
                    state: shopper.clone(),
                },
                // The stored browser's session, and other browsers' on the same channel (two with
                // one time, written in the other order than their IDs').
                Write::Session(facts("b3", 2_000)),
                Write::Session(facts("b2", 2_000)),
                Write::Session(facts("b1", 1_000)),
                // Written newest first, their IDs in the other order than their times': read back
                // oldest first, then by ID.
                Write::CartLine(line("L1", 20)),
                Write::CartLine(line("L3", 10)),
                Write::CartLine(line("L2", 10)),
                Write::CartLine(CartLine {
                    order_id: "o2".into(),
                    ..line("L9", 5)
                }),
            ],
            None,
        )
        .await
        .unwrap();

    let read = store.delivery_reads("s1", "o1", "WEB", None).await.unwrap();
    let apart = DeliveryReads::read_apart(&*store, "s1", "o1", "WEB", None)
        .await
        .unwrap();
    assert_eq!(read, apart);
    assert_eq!(read.shopper, Some(shopper));
    assert_eq!(read.session, Some(facts("b1", 1_000)), "the stored browser's session");
    assert_eq!(read.cart, vec![line("L2", 10), line("L3", 10), line("L1", 20)]);
    assert_eq!(read.open_sessions, vec![], "not asked");
    // A submit's: the shopper's sessions since a time, oldest first, then by browser.
    let (b1, b2, b3) = (facts("b1", 1_000), facts("b2", 2_000), facts("b3", 2_000));
    for (since, open) in [(0, vec![b1, b2.clone(), b3.clone()]), (1_500, vec![b2, b3])] {
        let read = store.delivery_reads("s1", "o1", "WEB", Some(since)).await.unwrap();
        assert_eq!(read.open_sessions, open, "since {since}");
        let apart = DeliveryReads::read_apart(&*store, "s1", "o1", "WEB", Some(since))
            .await
            .unwrap();
        assert_eq!(read, apart);
    }
    // A channel whose browser has no session yet, a channel without a browser, an unknown shopper.
    let app = store.delivery_reads("s1", "o2", "APP", None).await.unwrap();
    assert_eq!((app.session, app.cart.len()), (None, 1));
    assert_eq!(
        store.delivery_reads("s1", "o9", "POS", None).await.unwrap().session,
        None
    );
    assert_eq!(
        store.delivery_reads("nobody", "o9", "WEB", Some(0)).await.unwrap(),
        DeliveryReads::default()
    );
    drop(store);

    // The stored browser's session damaged behind the store's back: said, not failed (an intent
    // bringing another browser does not need it).
    place
        .execute("UPDATE cdp_sessions SET facts = 'not json' WHERE browser_id = 'b1'")
        .await;
    let store = place.service().await;
    let read = store.delivery_reads("s1", "o1", "WEB", None).await.unwrap();
    assert_eq!((read.session.clone(), read.session_unreadable), (None, true));
    assert_eq!(
        read,
        DeliveryReads::read_apart(&*store, "s1", "o1", "WEB", None)
            .await
            .unwrap()
    );
    drop(store);

    place
        .execute("UPDATE shoppers SET state = 'not json' WHERE shopper_key = 's1'")
        .await;
    let store = place.service().await;
    let read = store
        .delivery_reads("s1", "o1", "WEB", None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let apart = store.shopper("s1").await.map(|_| ()).map_err(|e| e.to_string());
    assert!(apart.is_err());
    assert_eq!(read, apart);
}

/// The operators' list of the queue: the oldest pending intents in id order, those still to be
/// enriched among the others (PostgreSQL reads each kind from an index of its own), no dead letter,
/// and no more than asked for.
async fn the_queue_lists_its_oldest_pending_intents_in_order_enriched_or_not(backend: Backend) {
    let Some(place) = backend.place("queue_list") else {
        return;
    };
    let store = place.service().await;
    let dead = NewIntent {
        dead_reason: Some("refused".into()),
        ..intent("s0", "w0")
    };
    store.enqueue(dead).await.unwrap();
    for (n, needs_enrichment) in [(1, true), (2, false), (3, true), (4, false)] {
        let item = NewIntent {
            needs_enrichment,
            ..intent(&format!("s{n}"), &format!("w{n}"))
        };
        assert!(matches!(store.enqueue(item).await.unwrap(), EnqueueOutcome::Queued(_)));
    }
    let listed: Vec<(String, bool)> = store
        .pending(3)
        .await
        .unwrap()
        .into_iter()
        .map(|q| (q.dedupe_key, q.enriched))
        .collect();
    assert_eq!(
        listed,
        [
            ("w1".to_string(), false),
            ("w2".to_string(), true),
            ("w3".to_string(), false)
        ]
    );
    store.close().await;
}

/// SQLite: a file without the index the claim's walk reads (dropped or damaged by hand) stops the
/// start with the index named, instead of failing every claim once the service runs.
#[tokio::test]
async fn a_sqlite_file_without_the_claims_index_does_not_start() {
    let place = Backend::Sqlite.place("claims_index").unwrap();
    place.service().await.close().await;
    place.execute("DROP INDEX intents_pending_walk").await;
    let error = match store::open(&place.settings, Role::Service { takeover: TAKEOVER }).await {
        Ok(_) => panic!("the store opened without the claim's index"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("intents_pending_walk"), "{error}");
}
