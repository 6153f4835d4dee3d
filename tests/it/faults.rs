//! Delivery under faults: a lease lost mid-intent, a store that refuses one shopper's records, a
//! CDP host that redirects, payloads the store or delivery cannot take. Each has a named outcome,
//! never a second order or a stall.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ordercloud_cdp_forwarder::store::Write;
use serde_json::{json, Value};

use crate::fakes::cdp::Answer;
use crate::fakes::faulty_store::Faults;
use crate::helpers::*;
use crate::world::*;

/// Every accepted CDP event of `identity`'s browsers, keyed by what it is (channel, browser, type,
/// item): counted, not collected in a set, so a duplicate shows.
fn accepted_events(world: &World, identity: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in world.cdp.requests() {
        if r.answered >= 300 || r.answered == 0 || r.shopper.as_deref() != Some(identity) {
            continue;
        }
        let item = r.event["product"]["item_id"].as_str().unwrap_or_default().to_string();
        *counts
            .entry(format!("{} {} {} {item}", r.channel, r.browser_id, r.event_type))
            .or_insert(0) += 1;
    }
    counts
}

/// The renewals of a lease fail while CDP is slow: the worker stops before the lease runs out,
/// another claim takes the intent over and resumes with the next unsent event. No event is sent
/// twice, and the order lands once.
#[tokio::test]
async fn a_lease_lost_mid_intent_sends_nothing_more_and_the_order_lands_once() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.lease_secs = 2;
        s.delivery.request_timeout_ms = 1_500;
    })
    .await;
    let mut web = world.registered("buyer1", "lease", WEB_CLIENT);
    web.open_cart("O-LEASE");
    web.add("L1", "HAT", 1, 10.0).await;
    web.add("L2", "CAP", 1, 11.0).await;
    web.add("L3", "BAG", 1, 12.0).await;
    world.drained().await;

    // From now on no lease can be renewed, and CDP takes 0.6 s per event: the submit from the app
    // (IDENTITY, three ADDs, CONFIRM, CHECKOUT, then CLEAR_CART on the web) outlasts any one lease.
    store.set_everyone(Faults {
        extend_fails: true,
        ..Faults::default()
    });
    world
        .cdp
        .script("buyer1-lease", vec![Answer::delayed(Duration::from_millis(600)); 7]);
    let mut app = web.on_device(APP_CLIENT);
    app.submit().await;
    world.order("O-LEASE").await;
    world.drained().await;

    let submit = world.cdp.orders();
    assert_eq!(
        submit.iter().filter(|o| o.reference_id == "O-LEASE").count(),
        1,
        "one order"
    );
    let twice: Vec<_> = accepted_events(&world, "buyer1-lease")
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "events sent twice: {twice:?}");
    let checkouts = world.cdp.sent("CHECKOUT");
    assert_eq!(checkouts, 1, "one CHECKOUT request in all");
    // The submit (the intent claimed last) was claimed more than once: its leases ran out mid-intent.
    let submit = store.claimed_intents().last().copied().unwrap();
    let submit_claims = store.claims_of(submit).len();
    assert!(submit_claims >= 2, "claimed {submit_claims} time(s)");
}

/// A delivery that outlasts its lease keeps its claim while the renewals succeed: the submit (seven
/// events at 0.7 s each against a 4-second lease) is claimed once, and every event is sent once.
/// The lease is renewed every third of it, so a renewal may come up to about 1.6 s late (a slow
/// disk under a loaded CI) before the window falls under `MIN_WINDOW`; with a 2-second lease that
/// slack was 0.3 s, and CI once saw the submit given up and claimed again.
#[tokio::test]
async fn a_delivery_longer_than_its_lease_keeps_its_claim_while_renewals_succeed() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.lease_secs = 4;
        s.delivery.request_timeout_ms = 1_500;
    })
    .await;
    let mut web = world.registered("buyer1", "renewed", WEB_CLIENT);
    web.open_cart("O-RENEWED");
    web.add("L1", "HAT", 1, 10.0).await;
    web.add("L2", "CAP", 1, 11.0).await;
    web.add("L3", "BAG", 1, 12.0).await;
    world.drained().await;

    world
        .cdp
        .script("buyer1-renewed", vec![Answer::delayed(Duration::from_millis(700)); 7]);
    let mut app = web.on_device(APP_CLIENT);
    app.submit().await;
    world.order("O-RENEWED").await;
    world.drained().await;

    let submit = store.claimed_intents().last().copied().unwrap();
    assert_eq!(store.claims_of(submit).len(), 1, "the submit was taken over");
    let twice: Vec<_> = accepted_events(&world, "buyer1-renewed")
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "events sent twice: {twice:?}");
}

/// A delivery that panics is settled like any other failure: retried, then a dead letter after
/// `delivery.max_age_secs` with the panic's message; its slot is given back and other shoppers flow.
#[tokio::test]
async fn a_delivery_that_panics_ages_out_to_a_dead_letter_while_others_flow() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.max_age_secs = 2;
        s.delivery.concurrency = 1;
    })
    .await;
    store.set(
        "anon-O-PANIC",
        Faults {
            read_panics: true,
            ..Faults::default()
        },
    );
    let mut broken = world.anonymous("O-PANIC", WEB_CLIENT);
    broken.add("L1", "ROCK", 1, 1.0).await;
    let mut fine = world.anonymous("O-CALM", WEB_CLIENT);
    fine.add("L1", "PAPER", 1, 2.0).await;
    fine.submit().await;
    world.order("O-CALM").await;

    let dead = eventually("the panicking intent to age out", Duration::from_secs(20), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].shopper_key, "anon-O-PANIC");
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("delivery panicked") && reason.contains("(FaultyStore)"),
        "{reason}"
    );
}

/// An enrichment that panics (a bug, as the enricher sees it) is settled like a failure: retried,
/// then a dead letter after `delivery.max_age_secs` that says it panicked — not run again at each
/// lease's end with its shopper's queue stalled behind it.
#[tokio::test]
async fn an_enrichment_that_panics_ages_out_to_a_dead_letter() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.max_age_secs = 2;
    })
    .await;
    let host = world
        .oc
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    store.set(
        &format!("user:{host}:enrich-panic-login"),
        Faults {
            read_panics: true,
            ..Faults::default()
        },
    );
    let mut broken = world.registered("buyer1", "enrich-panic", WEB_CLIENT);
    broken.open_cart("O-ENRICH-PANIC");
    broken.add("L1", "ROCK", 1, 1.0).await;
    let dead = eventually(
        "the panicking enrichment to age out",
        Duration::from_secs(20),
        || async {
            let dead = world.app.store.dead_letters(None, 10).await.unwrap();
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("enrichment panicked") && reason.contains("(FaultyStore)"),
        "{reason}"
    );
}

/// A panic in the loops themselves (the claims of delivery and enrichment, outside any intent's
/// task) does not stop them for good: each loop starts again, and orders still land.
#[tokio::test]
async fn a_delivery_loop_that_panics_starts_again() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    store.panic_next_claims(4);
    let mut shopper = world.registered("buyer1", "loop-panic", WEB_CLIENT);
    shopper.open_cart("O-LOOP-PANIC");
    shopper.add("L1", "ROCK", 1, 1.0).await;
    let revenue = shopper.submit().await;
    let order = world.order("O-LOOP-PANIC").await;
    assert_eq!(order.revenue, revenue);
    let metrics = world.app.ops_get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("forwarder_worker_restarts_total"), "{metrics}");
}

/// An enrichment's lease is not renewed: OrderCloud reads that take longer than three quarters of
/// it are given up and tried again later (counted, then aged out to a dead letter that says why),
/// before another enricher could take the job over and run it twice at once, for ever.
#[tokio::test]
async fn enrichment_reads_longer_than_their_lease_allows_are_retried_and_age_out() {
    let (world, _store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.lease_secs = 2;
        s.delivery.request_timeout_ms = 1_000;
        s.delivery.max_age_secs = 2;
    })
    .await;
    let mut slow = world.registered("buyer1", "slow-enrich", WEB_CLIENT);
    world.oc.set_token_delay(&slow.token, Duration::from_secs(3));
    slow.open_cart("O-SLOW-ENRICH");
    slow.add("L1", "ROCK", 1, 1.0).await;
    let dead = eventually("the slow enrichment to age out", Duration::from_secs(20), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(reason.contains("took longer than 1500 ms"), "{reason}");
}

/// A store that refuses one shopper's records (a value it cannot take, every time) makes that
/// intent fail like any other failure: retried, then a dead letter after `delivery.max_age_secs`
/// with the reason. The other shopper's order lands meanwhile.
#[tokio::test]
async fn a_store_failure_on_one_shopper_ages_out_to_a_dead_letter_while_others_flow() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.max_age_secs = 2;
    })
    .await;
    store.set(
        "anon-O-STUCK",
        Faults {
            records_fail: true,
            ..Faults::default()
        },
    );
    let mut stuck = world.anonymous("O-STUCK", WEB_CLIENT);
    stuck.add("L1", "ROCK", 1, 1.0).await;
    let mut fine = world.anonymous("O-FINE", WEB_CLIENT);
    fine.add("L1", "PAPER", 1, 2.0).await;
    fine.submit().await;
    world.order("O-FINE").await;

    let dead = eventually("the stuck intent to age out", Duration::from_secs(20), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].shopper_key, "anon-O-STUCK");
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(reason.contains("store error"), "{reason}");
    assert!(reason.contains("gave up after delivery.max_age_secs"), "{reason}");
    assert!(dead[0].attempts > 1, "retried before giving up: {}", dead[0].attempts);
    world.drained().await;
}

/// A store that refuses an order's records from its submit on (the sessions' facts: a value it
/// cannot take, every time): the progress of each acknowledged event is still recorded, alone, with
/// each retry, so CDP gets each event of the order once and one order, and the intent leaves the
/// queue (aged out or acknowledged) instead of sending the order again at every attempt.
#[tokio::test]
async fn a_store_that_refuses_an_orders_records_still_records_its_progress() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.max_age_secs = 3;
    })
    .await;
    let mut shopper = world.anonymous("O-RECORDS", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    shopper.add("L2", "SKU2", 2, 6.0).await;
    world.drained().await;
    store.set(
        "anon-O-RECORDS",
        Faults {
            records_fail: true,
            ..Faults::default()
        },
    );
    shopper.submit().await;
    world.order("O-RECORDS").await;
    world.drained().await;
    assert_eq!(world.cdp.sent("CONFIRM"), 1, "the CONFIRM was sent again");
    assert_eq!(world.cdp.sent("CHECKOUT"), 1, "the CHECKOUT was sent again");
    assert_eq!(world.cdp.orders().len(), 1);
}

/// The writes that record a CONFIRM's or a CHECKOUT's acknowledgement wait for the disk (a crash of
/// the machine or the database must not lose them: the order would be sent again); the others need
/// not.
#[tokio::test]
async fn the_progress_of_a_confirm_and_a_checkout_is_committed_to_disk() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    let mut shopper = world.anonymous("O-DISK", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    world.drained().await;
    assert!(
        store.durable_applies().is_empty(),
        "a line's ADD needs no wait for the disk"
    );
    shopper.submit().await;
    world.order("O-DISK").await;
    world.drained().await;
    let durable = store.durable_applies();
    assert_eq!(
        durable.len(),
        2,
        "the CONFIRM's and the CHECKOUT's progress: {durable:?}"
    );
}

/// The CONFIRM's progress cannot be written once (a connection the database dropped, between the
/// CONFIRM that CDP acknowledged and the CHECKOUT): the progress is kept with the retry, so the next
/// attempt goes on with the CHECKOUT — CDP gets each event once and one order.
#[tokio::test]
async fn a_progress_write_that_fails_once_mid_order_sends_nothing_twice() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    let mut shopper = world.anonymous("O-MID", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    world.drained().await;
    store.set(
        "anon-O-MID",
        Faults {
            progress_fails_once: true,
            ..Faults::default()
        },
    );
    shopper.submit().await;
    world.order("O-MID").await;
    world.drained().await;
    assert_eq!(store.progress_faults(), 1, "the CONFIRM's progress write failed once");
    // The retry's settlement carried the CONFIRM's progress and its session's facts.
    let retried = store
        .settled_writes()
        .into_iter()
        .find(|w| w.contains(&Write::Durable))
        .expect("a settlement carried the order's progress");
    assert!(retried.iter().any(|w| matches!(w, Write::Sent(_))), "{retried:?}");
    assert!(retried.iter().any(|w| matches!(w, Write::Session(_))), "{retried:?}");
    assert_eq!(world.cdp.sent("CONFIRM"), 1, "the CONFIRM was sent again");
    assert_eq!(world.cdp.sent("CHECKOUT"), 1);
    assert_eq!(world.cdp.orders().len(), 1);
}

/// An ack the store refuses every time (a record only the ack carries): the intent is not tried
/// forever, resending nothing — it ages out to a dead letter, and CDP got each event once.
#[tokio::test]
async fn an_ack_the_store_refuses_every_time_ages_out_without_resending_the_order() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.max_age_secs = 2;
    })
    .await;
    let mut shopper = world.anonymous("O-ACK", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    world.drained().await;
    store.set(
        "anon-O-ACK",
        Faults {
            ack_fails: true,
            ..Faults::default()
        },
    );
    shopper.submit().await;
    world.order("O-ACK").await;
    let dead = world.dead_letters().await;
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(reason.contains("store error"), "{reason}");
    assert!(reason.contains("gave up after delivery.max_age_secs"), "{reason}");
    let checkouts = world.cdp.sent("CHECKOUT");
    assert_eq!(checkouts, 1, "the order was not sent again");
    assert_eq!(world.cdp.orders().len(), 1);
}

/// A claimed intent's bodies are read as text and parsed only where a reading needs them (a line's
/// fields, a storefront's browser id). Bodies that text holds but no tree can (stored by another
/// writer; intake refuses them) make that intent a dead letter that says why, at once and alone:
/// the shopper's next intent and other shoppers go on.
#[tokio::test]
async fn an_intent_whose_stored_bodies_cannot_be_parsed_is_a_dead_letter_alone() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    let mut shopper = world.anonymous("O-BODY", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    world.drained().await;
    store.set(
        "anon-O-BODY",
        Faults {
            bodies_unreadable: true,
            ..Faults::default()
        },
    );
    shopper.add("L2", "MUG", 2, 7.0).await;
    let dead = eventually("the dead letter", Duration::from_secs(10), || async {
        Some(world.dead_letters().await).filter(|d| !d.is_empty())
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1, "not retried: it cannot be read any better later");
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(reason.contains("the stored intent cannot be read back"), "{reason}");

    store.set("anon-O-BODY", Faults::default());
    let mut other = world.anonymous("O-FINE", WEB_CLIENT);
    other.add("L1", "CUP", 1, 3.0).await;
    other.submit().await;
    shopper.submit().await;
    world.order("O-FINE").await;
    let order = world.order("O-BODY").await;
    assert_eq!(lines(&order).len(), 2, "the submit carries OrderCloud's lines");
    assert_eq!(world.dead_letters().await.len(), 1);
}

/// An order whose stored plan cannot be read back (a shape another version wrote, a damaged row)
/// after CDP took its CHECKOUT (answered 504) is not planned again — in a new session, a second
/// order — but becomes a dead letter that says why. One order.
#[tokio::test]
async fn an_order_whose_stored_plan_cannot_be_read_is_a_dead_letter_not_a_second_order() {
    let (world, store) = World::start_faulty(Duration::from_secs(2), |_| {}).await;
    let mut shopper = world.anonymous("O-UNREAD", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    world.drained().await;
    store.set(
        "anon-O-UNREAD",
        Faults {
            plan_unreadable: true,
            ..Faults::default()
        },
    );
    world.cdp.script_all(vec![
        Answer::status(201),
        Answer::processed_then(504),
        Answer::retry_after(503, "3"),
    ]);
    shopper.submit().await;
    let dead = world.dead_letters().await;
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(reason.contains("stored plan cannot be read"), "{reason}");
    world.drained().await;
    assert_eq!(world.cdp.orders().len(), 1, "one CDP order");
}

/// A submit whose CHECKOUT CDP acknowledged, dead-lettered on a later event (the CLEAR_CART of the
/// cart's other session refused), replayed after every session closed: it goes on from where it
/// stopped instead of planning the order again, so CDP gets no second order.
#[tokio::test]
async fn a_replayed_submit_whose_order_is_in_cdp_sends_no_second_order() {
    let world = World::start_with(Duration::from_secs(2), |_| {}).await;
    let mut web = world.registered("buyer1", "twice", WEB_CLIENT);
    web.open_cart("O-ONCE");
    web.add("L1", "LAMP", 1, 30.0).await;
    world.drained().await;
    // The submit from the app replays the cart there (IDENTITY, ADD, CONFIRM, CHECKOUT), then
    // clears the web session: CDP refuses that CLEAR_CART.
    let ok = Answer::status(201);
    world.cdp.script(
        "buyer1-twice",
        vec![ok.clone(), ok.clone(), ok.clone(), ok, Answer::status(400)],
    );
    let mut app = web.on_device(APP_CLIENT);
    app.submit().await;
    world.order("O-ONCE").await;
    let dead = world.dead_letters().await;
    assert!(dead[0].last_error.as_deref().unwrap_or_default().contains("400"));
    world.sessions_closed().await;

    let replayed = world
        .app
        .store
        .replay_dead_letters(Some(&[dead[0].id]), None)
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    world.drained().await;
    let orders = world
        .cdp
        .orders()
        .into_iter()
        .filter(|o| o.reference_id == "O-ONCE")
        .count();
    assert_eq!(orders, 1, "one order");
    let checkouts = world
        .cdp
        .requests()
        .into_iter()
        .filter(|r| r.event_type == "CHECKOUT" && (200..300).contains(&r.answered))
        .count();
    assert_eq!(checkouts, 1);
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
}

/// CDP answering 307 to another host: the forwarder follows nowhere (the event and its client key
/// reach no other port), acknowledges nothing, pauses, and readiness says who redirected where.
#[tokio::test]
async fn a_redirect_from_cdp_is_followed_nowhere_and_nothing_is_acknowledged() {
    let world = World::start().await;
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere_port = elsewhere.local_addr().unwrap().port();
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while elsewhere.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let location = format!("http://127.0.0.1:{elsewhere_port}/v1.2/events");
    world
        .cdp
        .script_all((0..50).map(|_| Answer::redirect(307, &location)).collect());
    let mut shopper = world.anonymous("O-REDIRECT", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;

    let reasons = eventually("readiness to name the redirect", Duration::from_secs(10), || async {
        let ready = world.app.ops_get("/health/ready").await;
        let status = ready.status();
        let body: Value = ready.json().await.unwrap();
        // A warning: still ready, webhooks still taken.
        (status == 200 && body["warnings"].is_array()).then_some(body["warnings"].to_string())
    })
    .await;
    assert!(reasons.contains("307"), "{reasons}");
    assert!(reasons.contains(&location), "{reasons}");
    let pending = world.app.store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1, "not acknowledged");
    assert!(world.cdp.orders().is_empty());
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "nothing reached the redirect's target"
    );
}

/// OrderCloud answering a redirect during enrichment: nothing is read from wherever it points, the
/// intent is not taken as enriched, readiness warns (and stays ready: webhooks still come in), and
/// the read is retried until OrderCloud answers.
#[tokio::test]
async fn a_redirect_from_ordercloud_is_a_warning_and_the_read_is_retried() {
    let world = World::start().await;
    world.oc.script(vec![307; 40]);
    let mut shopper = world.registered("buyer1", "moved", WEB_CLIENT);
    shopper.open_cart("O-OC-REDIRECT");
    shopper.add("L1", "SKU", 1, 5.0).await;
    let warning = eventually("readiness to warn of the redirect", Duration::from_secs(10), || async {
        let ready = world.app.ops_get("/health/ready").await;
        let status = ready.status();
        let body = ready.text().await.unwrap();
        body.contains("redirect").then_some((status, body))
    })
    .await;
    assert_eq!(warning.0, 200, "a warning, still ready: {}", warning.1);
    assert!(warning.1.contains("ordercloud"), "{}", warning.1);
    assert!(warning.1.contains("307"), "{}", warning.1);
    eventually(
        "the shopper's ADD once OrderCloud answers",
        Duration::from_secs(30),
        || async {
            world
                .cdp
                .requests()
                .iter()
                .any(|r| r.event_type == "ADD" && r.answered < 300 && r.answered > 0)
                .then_some(())
        },
    )
    .await;
}

/// A scrape of /metrics reads the gauges refreshed in the background: fifty scrapes cost the store
/// no count of its queue.
#[tokio::test]
async fn metrics_scrapes_do_not_count_the_queue() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    let before = store.stats_calls();
    for _ in 0..50 {
        let scrape = world.app.ops_get("/metrics").await;
        assert_eq!(scrape.status(), 200);
        assert!(scrape.text().await.unwrap().contains("forwarder_queue_pending"));
    }
    // The background refresh (every 5 s) may have run once or twice meanwhile.
    assert!(
        store.stats_calls() - before <= 2,
        "{} counts for 50 scrapes",
        store.stats_calls() - before
    );
}

/// A storefront browser id that PostgreSQL could not store (a NUL) or CDP would not know is
/// ignored; the shopper gets a minted browser and the order lands.
#[tokio::test]
async fn a_storefront_browser_id_the_store_cannot_take_is_ignored_and_the_order_lands() {
    let world = World::start().await;
    let mut shopper = world.anonymous("O-NUL", WEB_CLIENT);
    shopper.storefront_browser = Some("abc\u{0}def".into());
    shopper.add("L1", "SKU", 1, 5.0).await;
    shopper.submit().await;
    let order = world.order("O-NUL").await;
    assert_ne!(order.browser_id, "abc\u{0}def");
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
}

/// A signed webhook nested deeper than any stored intent could be read back is answered 400 with
/// the reason and stores nothing; the shopper beside it is not disturbed.
#[tokio::test]
async fn a_webhook_nested_deeper_than_the_limit_is_refused_and_stores_nothing() {
    let world = World::start().await;
    let mut other = world.anonymous("O-BESIDE", WEB_CLIENT);
    other.add("L1", "SKU", 1, 5.0).await;
    let token = anon_token("O-DEEP", WEB_CLIENT, &world.oc.base_url());
    let mut line = line_item("L1", "DEEP", 1, 1.0);
    let mut xp = json!(1);
    for _ in 0..200 {
        xp = json!([xp]);
    }
    line["xp"] = json!({ "deep": xp });
    let body = serde_json::to_vec(&line_created("O-DEEP", &token, &line)).unwrap();
    let answer = world.app.post_signed(&body, KEY).await;
    assert_eq!(answer.status(), 400);
    let reason = answer.text().await.unwrap();
    assert!(reason.contains("128 levels"), "{reason}");
    other.submit().await;
    world.order("O-BESIDE").await;
    world.drained().await;
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
}
