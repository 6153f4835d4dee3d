//! Delivery to CDP: mapping, identities, browsers, retries, dead letters, per-shopper order.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::fakes::cdp::Answer;
use crate::fakes::faulty_store::Faults;
use crate::helpers::*;
use crate::world::*;

#[tokio::test]
async fn anonymous_checkout_with_a_deleted_line_holds_exactly_the_remaining_lines() {
    let world = World::start().await;
    let mut shopper = world.anonymous("ANON-ORDER-1", WEB_CLIENT);
    shopper.add("L1", "SHOE", 2, 59.95).await;
    shopper.add("L2", "SOCK", 1, 4.99).await;
    shopper.set_quantity("L2", 3).await;
    shopper.add("L3", "HAT", 1, 19.00).await;
    shopper.delete("L3").await;
    let revenue = shopper.submit().await;

    let order = world.order("ANON-ORDER-1").await;
    assert_eq!(
        lines(&order),
        vec![("SHOE".into(), 2.0, 59.95), ("SOCK".into(), 3.0, 4.99)]
    );
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.revenue, 134.87);
    assert_eq!(order.shopper.as_deref(), Some("anon-ANON-ORDER-1"));
    assert!(world.cdp.failed_events().is_empty(), "{:?}", world.cdp.failed_events());
    assert!(world.cdp.finish().is_empty(), "no abandoned cart");

    let types: Vec<String> = world.cdp.requests().iter().map(|r| r.event_type.clone()).collect();
    let expected = [
        "IDENTITY",
        "ADD",
        "ADD",
        "ADD",
        "ADD",
        "CLEAR_CART",
        "ADD",
        "ADD",
        "CONFIRM",
        "CHECKOUT",
    ];
    assert_eq!(
        types, expected,
        "IDENTITY once per session; a quantity change is an ADD; delete = CLEAR_CART + ADD of the rest"
    );
    assert_eq!(
        world.cdp.requests()[3].event["product"]["quantity"],
        3,
        "the PATCH sent the new quantity"
    );
    let add = &world.cdp.requests()[1].event;
    assert_eq!(add["product"]["item_id"], "SHOE");
    assert_eq!(add["product"]["referenceId"], "L1");
    assert_eq!(add["product"]["type"], "PRODUCT");
    assert_eq!(add["product"]["currency"], "USD");
    assert_eq!(add["channel"], "WEB");
    assert_eq!(add["pos"], POS);
    assert_eq!(add["language"], "EN");
    assert!(
        add["product"]["orderedAt"].as_str().unwrap().ends_with(".123Z"),
        "{add}"
    );
    world.drained().await;
}

#[tokio::test]
async fn registered_checkout_through_cart_api_routes() {
    let world = World::start().await;
    let mut shopper = world.registered("buyer1", "user42", WEB_CLIENT);
    shopper.open_cart("CART-42");
    shopper.cart_add("L1", "BOOK", 1, 12.50).await;
    shopper.cart_add("L2", "PEN", 4, 1.25).await;
    shopper.cart_delete("L2").await;
    shopper.cart_add("L3", "LAMP", 1, 30.00).await;
    let revenue = shopper.cart_submit().await;

    let order = world.order("CART-42").await;
    assert_eq!(
        lines(&order),
        vec![("BOOK".into(), 1.0, 12.5), ("LAMP".into(), 1.0, 30.0)]
    );
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.shopper, Some(shopper.identity()));
    let identity = world
        .cdp
        .requests()
        .into_iter()
        .find(|r| r.event_type == "IDENTITY")
        .unwrap();
    assert_eq!(
        identity.event["identifiers"],
        json!([{"provider": "ordercloud", "id": "buyer1-user42"}])
    );
    assert_eq!(identity.event["email"], "user42@example.com", "email lower-cased");
    assert_eq!(identity.event["firstname"], "Fname");
    let me_calls = world.oc.calls().iter().filter(|c| c.starts_with("GET /v1/me")).count();
    assert_eq!(
        me_calls,
        1,
        "the identity is cached per shopper: {:?}",
        world.oc.calls()
    );
    assert!(world.cdp.finish().is_empty());
}

#[tokio::test]
async fn outage_then_recovery() {
    let world = World::start().await;
    world
        .cdp
        .script_all(vec![Answer::status(503), Answer::status(503), Answer::status(201)]);
    let mut shopper = world.anonymous("OUTAGE-1", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;
    let revenue = shopper.submit().await;
    let order = world.order("OUTAGE-1").await;
    assert_eq!(order.revenue, revenue);
    let answered: Vec<u16> = world.cdp.requests().iter().map(|r| r.answered).collect();
    assert_eq!(&answered[..3], &[503, 503, 201]);
    assert_eq!(
        world.cdp.requests()[0].event,
        world.cdp.requests()[2].event,
        "the same event is retried"
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let world = World::start().await;
    world.cdp.script_all(vec![Answer::retry_after(429, "1")]);
    let mut shopper = world.anonymous("RATE-1", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;
    eventually("the retried event", Duration::from_secs(10), || async {
        (world.cdp.requests().len() >= 2).then_some(())
    })
    .await;
    let requests = world.cdp.requests();
    assert_eq!(requests[0].answered, 429);
    let gap = requests[1].at - requests[0].at;
    // Without Retry-After the backoff here is 20 ms; CDP asked for a second.
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
}

#[tokio::test]
async fn a_bad_request_dead_letters_one_shopper_while_another_completes() {
    let world = World::start().await;
    world.cdp.script(
        "anon-BAD-1",
        vec![
            Answer::status(201),
            Answer::status(400).with_body(json!({"error_msg": "product.type is invalid"})),
        ],
    );
    let mut bad = world.anonymous("BAD-1", WEB_CLIENT);
    let mut good = world.anonymous("GOOD-1", WEB_CLIENT);
    bad.add("L1", "SKU", 1, 1.0).await;
    good.add("L1", "SKU", 2, 3.0).await;
    good.submit().await;
    world.order("GOOD-1").await;
    let dead = world.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].shopper_key, "anon-BAD-1");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("product.type is invalid"),
        "{:?}",
        dead[0]
    );
    assert!(dead[0].dead_at_ms.is_some() && dead[0].attempts >= 1);
}

#[tokio::test]
async fn unknown_browser_is_re_minted_and_the_order_completes() {
    let world = World::start().await;
    let mut shopper = world.anonymous("LOST-BROWSER", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 5.0).await;
    world.drained().await;
    let first_browser = world.cdp.requests()[0].browser_id.clone();
    world.cdp.forget_browser(&first_browser);
    shopper.add("L2", "OTHER", 2, 2.5).await;
    let revenue = shopper.submit().await;
    let order = world.order("LOST-BROWSER").await;
    assert_ne!(order.browser_id, first_browser, "the order lands on a new browser");
    assert_eq!(world.cdp.browsers_created(), 2);
    assert_eq!(order.revenue, revenue);
    assert_eq!(lines(&order).len(), 2, "the new session was rebuilt with every line");
}

/// RudderStack-style barrier: scripted per-shopper answers; CDP must see each shopper's accepted
/// events in order and none twice.
#[tokio::test]
async fn per_shopper_order_under_scripted_failures() {
    let world = World::start().await;
    let scripts: [(&str, Vec<u16>); 4] = [
        ("S1", vec![500, 500, 201]),
        ("S2", vec![201]),
        ("S3", vec![400]),
        ("S4", vec![500, 400]),
    ];
    for (name, answers) in &scripts {
        world.cdp.script(
            &format!("anon-{name}"),
            answers.iter().map(|s| Answer::status(*s)).collect(),
        );
    }
    let mut shoppers: Vec<_> = scripts
        .iter()
        .map(|(name, _)| world.anonymous(name, WEB_CLIENT))
        .collect();
    for round in 0..3 {
        for s in shoppers.iter_mut() {
            s.add(&format!("L{round}"), &format!("P{round}"), round + 1, 1.0).await;
        }
    }
    for s in shoppers.iter_mut() {
        s.submit().await;
    }
    world.drained().await;

    let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
    for r in world.cdp.requests().into_iter().filter(|r| r.answered < 300) {
        let key = match r.event_type.as_str() {
            "ADD" => format!(
                "ADD {}x{}",
                r.event["product"]["item_id"].as_str().unwrap(),
                r.event["product"]["quantity"]
            ),
            other => other.to_string(),
        };
        accepted.entry(r.shopper.clone().unwrap()).or_default().push(key);
    }
    let clean = ["IDENTITY", "ADD P0x1", "ADD P1x2", "ADD P2x3", "CONFIRM", "CHECKOUT"];
    // The first intent (add P0) dead-lettered on its 400; the next intent opens with IDENTITY, and the
    // submit finds P0 missing from the session and replays every line before CONFIRM.
    let after_dead_letter = [
        "IDENTITY", "ADD P1x2", "ADD P2x3", "IDENTITY", "ADD P0x1", "ADD P1x2", "ADD P2x3", "CONFIRM", "CHECKOUT",
    ];
    assert_eq!(accepted["anon-S1"], clean, "retried events are accepted once, in order");
    assert_eq!(accepted["anon-S2"], clean);
    assert_eq!(accepted["anon-S3"], after_dead_letter);
    assert_eq!(accepted["anon-S4"], after_dead_letter);
    for name in ["S1", "S2", "S3", "S4"] {
        let order = world.order(name).await;
        assert_eq!(order.lines.len(), 3, "{name}: the submit still builds the whole order");
    }
    let dead = world.app.store.dead_letters(None, 10).await.unwrap();
    let mut dead_shoppers: Vec<_> = dead.iter().map(|d| d.shopper_key.as_str()).collect();
    dead_shoppers.sort();
    assert_eq!(
        dead_shoppers,
        ["anon-S3", "anon-S4"],
        "each 400 costs exactly one intent"
    );
}

#[tokio::test]
async fn refused_client_key_pauses_delivery_burns_nothing_and_resumes() {
    let world = World::start_with(Duration::from_secs(1200), |s| s.delivery.auth_pause_secs = 1).await;
    world.cdp.script_all(vec![Answer::status(401), Answer::status(401)]);
    let mut shopper = world.anonymous("PAUSED-1", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;
    let body = eventually("readiness to report CDP", Duration::from_secs(10), || async {
        let r = world.app.ops_get("/health/ready").await;
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        body["warnings"].is_array().then_some((status, body))
    })
    .await;
    // A warning: the replica stays ready, so the load balancer keeps sending it webhooks (every
    // replica has the same key: not ready, all would leave at once and OrderCloud's webhooks be lost).
    assert_eq!(body.0, 200, "{}", body.1);
    assert!(
        body.1["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("cdp: CDP refused the client key"),
        "{}",
        body.1
    );
    let public = world.app.get("/health/ready").await;
    assert_eq!(public.status(), 200);
    assert_eq!(
        public.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "ready", "warnings": ["cdp"]}),
        "the public readiness names the warning, not its text"
    );
    shopper.submit().await;
    world.order("PAUSED-1").await;
    let ready = world.app.get("/health/ready").await;
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "ready"}),
        "the warning goes once CDP accepts the key"
    );
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "nothing burned"
    );
    let refused = world.cdp.requests().iter().filter(|r| r.answered == 401).count();
    assert_eq!(refused, 2, "probes, not a retry storm");
    let gap = world.cdp.requests()[2].at - world.cdp.requests()[1].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "the second probe waits twice as long: {gap:?}"
    );
}

/// Shoppers' events refused (401) while a pause begins make one pause, not one doubling each;
/// while paused, one intent at a time probes CDP — the next request waits for the pause after the
/// last probe's answer — not a burst of them.
#[tokio::test]
async fn a_refused_key_is_probed_by_one_intent_at_a_time() {
    let world = World::start_with(Duration::from_secs(1200), |s| s.delivery.auth_pause_secs = 1).await;
    let mut shoppers: Vec<_> = (0..5)
        .map(|i| world.anonymous(&format!("PROBE-{i}"), WEB_CLIENT))
        .collect();
    // Their browsers minted first: a browser/create CDP accepts says the key works and ends the
    // pause, which is not what is watched here.
    for shopper in &mut shoppers {
        shopper.add("L1", "SKU", 1, 10.0).await;
    }
    world.drained().await;
    let before = world.cdp.requests().len();
    world.cdp.script_all((0..3).map(|_| Answer::status(401)).collect());
    for shopper in &mut shoppers {
        shopper.add("L2", "SKU2", 1, 10.0).await;
    }
    world.drained().await;
    let requests = world.cdp.requests().split_off(before);
    assert_eq!(requests.iter().filter(|r| r.answered == 401).count(), 3);
    // Refusals of requests already on their way when the first came may follow it at once; from
    // half a second on, every request is a probe, until CDP accepts one.
    let first = requests.iter().find(|r| r.answered == 401).unwrap().at;
    let mut previous = first;
    for request in &requests {
        if request.at < first + Duration::from_millis(500) {
            previous = previous.max(request.at);
            continue;
        }
        let gap = request.at - previous;
        assert!(
            gap >= Duration::from_millis(900),
            "a request {gap:?} after the one before: {requests:?}"
        );
        assert!(
            gap < Duration::from_millis(4_500),
            "the pause grew past its doubling: {gap:?}"
        );
        if request.answered != 401 {
            break;
        }
        previous = request.at;
    }
}

/// A refusal that comes while the dispatcher waits for slots to free (most of them busy, an intent
/// queued) starts a pause like any other: the queued intent probes at the pause's end, not as soon
/// as the refused deliveries free their slots.
#[tokio::test]
async fn a_pause_that_begins_while_slots_are_awaited_probes_at_its_end() {
    let world = World::start_with(Duration::from_secs(1200), |s| {
        // A claim waits for two free slots of eight, for up to three seconds.
        s.delivery.concurrency = 8;
        s.delivery.poll_interval_ms = 3_000;
        s.delivery.auth_pause_secs = 2;
    })
    .await;
    // Seven deliveries in flight (one slot free, fewer than a claim waits for), refused together,
    // and an intent queued while the dispatcher waits for a second slot.
    let refusal = Answer::status(401).after(Duration::from_millis(700));
    let before = seven_in_flight_then_one_queued(&world, "WAIT-PROBE", refusal).await;
    let requests = world.cdp.requests().split_off(before);
    let refused: Vec<_> = requests.iter().filter(|r| r.answered == 401).collect();
    assert_eq!(refused.len(), 7, "{requests:?}");
    // The first request after the refusals is the probe, at the pause's end: two seconds after the
    // first refusal (a request's time is its answer's).
    let first_refused = refused.iter().map(|r| r.at).min().unwrap();
    let probe = requests
        .iter()
        .filter(|r| r.answered != 401)
        .map(|r| r.at)
        .min()
        .expect("delivered after the pause");
    assert!(
        probe >= first_refused + Duration::from_millis(1_800),
        "the probe went {:?} after the first refusal: {requests:?}",
        probe - first_refused
    );
}

/// Deliveries in flight that are slow hold up no other shopper for longer than the poll interval:
/// with seven of eight slots held by slow CDP answers, a claim waits for a second free slot only
/// that long, and the shopper queued meanwhile is delivered before the slow answers come.
#[tokio::test]
async fn slow_deliveries_in_flight_hold_a_queued_shopper_no_longer_than_the_poll_interval() {
    let world = World::start_with(Duration::from_secs(1200), |s| {
        // A claim waits for two free slots of eight, for up to 100 ms.
        s.delivery.concurrency = 8;
        s.delivery.poll_interval_ms = 100;
    })
    .await;
    let slow = Answer::delayed(Duration::from_millis(1_500));
    let before = seven_in_flight_then_one_queued(&world, "SLOW-HOLD", slow).await;
    // Requests are recorded when answered: the queued shopper's comes before the slow ones'.
    let shoppers_in_order: Vec<_> = world
        .cdp
        .requests()
        .split_off(before)
        .into_iter()
        .map(|r| r.shopper.unwrap_or_default())
        .collect();
    assert_eq!(shoppers_in_order.len(), 8, "{shoppers_in_order:?}");
    assert_eq!(
        shoppers_in_order[0], "anon-SLOW-HOLD-7",
        "the queued shopper waited for the slow ones: {shoppers_in_order:?}"
    );
}

/// Eight anonymous shoppers, their browsers minted first (a browser/create CDP accepts would end a
/// pause); then seven send a line each, whose requests CDP holds and gives `answer` (seven of eight
/// slots busy), and the eighth sends one while those are in flight. Returns how many requests CDP
/// had seen before the seven.
async fn seven_in_flight_then_one_queued(world: &World, prefix: &str, answer: Answer) -> usize {
    let mut shoppers: Vec<_> = (0..8)
        .map(|i| world.anonymous(&format!("{prefix}-{i}"), WEB_CLIENT))
        .collect();
    for shopper in &mut shoppers {
        shopper.add("L1", "SKU", 1, 10.0).await;
    }
    world.drained().await;
    let before = world.cdp.requests().len();
    world.cdp.script_all(vec![answer; 7]);
    for shopper in &mut shoppers[..7] {
        shopper.add("L2", "SKU2", 1, 10.0).await;
    }
    eventually("seven requests in flight", Duration::from_secs(10), || async {
        (world.cdp.held() == 7).then_some(())
    })
    .await;
    shoppers[7].add("L2", "SKU2", 1, 10.0).await;
    world.drained().await;
    before
}

/// One shopper's OrderCloud reads are slow (1.5 s each): the shoppers whose webhooks come after are
/// enriched and delivered meanwhile, not held until the slow reads end.
#[tokio::test]
async fn a_shopper_whose_reads_are_slow_holds_up_no_other_shopper() {
    let world = World::start().await;
    let mut slow = world.registered("buyer1", "slow-reads", WEB_CLIENT);
    world.oc.set_token_delay(&slow.token, Duration::from_millis(1500));
    slow.open_cart("O-SLOW");
    let mut fast = world.registered("buyer1", "fast-reads", WEB_CLIENT);
    fast.open_cart("O-FAST");
    slow.add("L1", "SKU", 1, 10.0).await;
    fast.add("L1", "SKU", 1, 10.0).await;
    world.drained().await;
    let first_of = |user: &str| {
        world
            .cdp
            .requests()
            .iter()
            .position(|r| r.shopper.as_deref() == Some(&format!("buyer1-{user}")))
            .unwrap_or_else(|| panic!("no event of {user}"))
    };
    assert!(
        first_of("fast-reads") < first_of("slow-reads"),
        "the fast shopper waited for the slow one: {:?}",
        world
            .cdp
            .requests()
            .iter()
            .map(|r| r.shopper.clone())
            .collect::<Vec<_>>()
    );
}

/// CDP refuses one shopper's event (403: a rule of CDP's or of a firewall in front of it) while
/// accepting the others': the first refusal pauses delivery like a refused key; refused again once
/// CDP has accepted other events since, it is that event's own — a dead letter that says so — and
/// no longer pauses every shopper again and again.
#[tokio::test]
async fn an_event_cdp_alone_refuses_becomes_a_dead_letter_after_others_are_accepted() {
    let world = World::start_with(Duration::from_secs(1200), |s| s.delivery.auth_pause_secs = 1).await;
    world
        .cdp
        .script("anon-REFUSED-1", (0..20).map(|_| Answer::status(403)).collect());
    let mut refused = world.anonymous("REFUSED-1", WEB_CLIENT);
    refused.add("L1", "SKU", 1, 10.0).await;
    let mut others: Vec<_> = (0..3)
        .map(|i| world.anonymous(&format!("ACCEPTED-{i}"), WEB_CLIENT))
        .collect();
    for shopper in &mut others {
        shopper.add("L1", "SKU", 1, 10.0).await;
        shopper.submit().await;
    }
    for i in 0..3 {
        world.order(&format!("ACCEPTED-{i}")).await;
    }
    let dead = eventually("the refused event's dead letter", Duration::from_secs(20), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].shopper_key, "anon-REFUSED-1");
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(reason.contains("403") && reason.contains("own refusal"), "{reason}");
    let refusals = world.cdp.requests().iter().filter(|r| r.answered == 403).count();
    assert!(refusals <= 3, "refused {refusals} times");
}

#[tokio::test]
async fn dry_run_delivers_without_calling_cdp() {
    let world = World::start_with(Duration::from_secs(1200), |s| s.cdp.dry_run = true).await;
    let mut shopper = world.anonymous("DRY-1", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;
    shopper.submit().await;
    world.drained().await;
    assert!(world.cdp.requests().is_empty());
    assert_eq!(world.cdp.browsers_created(), 0);
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
    let metrics = world.app.ops_get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("forwarder_deliveries_total{outcome=\"delivered\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn get_transport_delivers_the_order() {
    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.cdp.transport = ordercloud_cdp_forwarder::config::Transport::Get
    })
    .await;
    let mut shopper = world.anonymous("GET-1", WEB_CLIENT);
    shopper.add("L1", "SKU", 2, 7.25).await;
    let revenue = shopper.submit().await;
    assert_eq!(world.order("GET-1").await.revenue, revenue);
    assert!(world.cdp.requests().iter().all(|r| r.via == "get"));
}

#[tokio::test]
async fn ordercloud_5xx_is_retried_and_an_expired_token_without_cache_is_a_dead_letter() {
    let world = World::start().await;
    world.oc.script(vec![500, 503]);
    let mut shopper = world.registered("b1", "u1", WEB_CLIENT);
    shopper.open_cart("O-RETRY");
    shopper.add("L1", "SKU", 1, 3.0).await;
    world.drained().await;
    let me_calls = world.oc.calls().iter().filter(|c| c.starts_with("GET /v1/me")).count();
    assert_eq!(me_calls, 3, "two failures then success: {:?}", world.oc.calls());
    assert!(world
        .cdp
        .requests()
        .iter()
        .any(|r| r.shopper.as_deref() == Some("b1-u1")));

    let mut stale = world.registered("b2", "u2", WEB_CLIENT);
    stale.open_cart("O-STALE");
    world.oc.expire_token(&stale.token);
    stale.add("L1", "SKU", 1, 3.0).await;
    let dead = world.dead_letters().await;
    assert!(
        dead[0].last_error.as_deref().unwrap().contains("refused the token"),
        "{:?}",
        dead[0]
    );
}

#[tokio::test]
async fn a_token_audience_outside_api_urls_is_never_called() {
    let world = World::start().await;
    let token = user_token("someone", WEB_CLIENT, "http://127.0.0.1:1");
    let webhook = line_created("O-EVIL", &token, &line_item("L1", "SKU", 1, 1.0));
    world.app.deliver(&webhook).await;
    let dead = world.dead_letters().await;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("not in ordercloud.api_urls"),
        "{:?}",
        dead[0]
    );
    assert!(world.cdp.requests().is_empty());
}

/// Enrich early: the OrderCloud reads run while CDP is down, so an outage longer than the token's
/// life still delivers the order as it was when the shopper submitted.
#[tokio::test]
async fn a_cdp_outage_longer_than_the_token_still_delivers() {
    let world = World::start().await;
    world.cdp.script_all((0..1000).map(|_| Answer::status(503)).collect());
    let mut shopper = world.registered("b9", "u9", WEB_CLIENT);
    shopper.open_cart("O-LONG");
    shopper.add("L1", "A", 1, 10.0).await;
    shopper.add("L2", "B", 1, 5.0).await;
    shopper.delete("L2").await;
    let revenue = shopper.submit().await;
    eventually("every intent enriched", Duration::from_secs(10), || async {
        let pending = world.app.store.pending(10).await.unwrap();
        (pending.len() == 4 && pending.iter().all(|p| p.enriched)).then_some(())
    })
    .await;
    world.oc.expire_token(&shopper.token);
    world.oc.set_lines("O-LONG", vec![]);
    world.cdp.clear_script_all();
    let order = world.order("O-LONG").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.lines.len(), 1);
}

#[tokio::test]
async fn a_delete_after_the_token_expired_uses_the_forwarders_record() {
    let world = World::start().await;
    let mut shopper = world.anonymous("REC-1", WEB_CLIENT);
    shopper.add("L1", "KEEP", 1, 4.0).await;
    shopper.add("L2", "DROP", 1, 6.0).await;
    world.drained().await;
    world.oc.expire_token(&shopper.token);
    shopper.delete("L2").await;
    shopper.submit().await;
    let order = world.order("REC-1").await;
    assert_eq!(lines(&order), vec![("KEEP".into(), 1.0, 4.0)]);
}

/// A submit's enrichment stores of OrderCloud's lines what planning reads (IDs, quantity, totals,
/// the product's ID, name and xp), not the whole LineItems: they are written with the intent, read
/// back at every claim of it, and kept again with the order's landing check. The order lands as
/// OrderCloud holds it.
#[tokio::test]
async fn a_submits_enrichment_keeps_of_each_line_what_planning_reads() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    let mut shopper = world.registered("buyer1", "lean", WEB_CLIENT);
    shopper.open_cart("O-LEAN");
    shopper.add("L1", "HAT", 2, 10.0).await;
    shopper.add("L2", "CAP", 1, 11.5).await;
    let revenue = shopper.submit().await;
    let order = world.order("O-LEAN").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(
        lines(&order),
        vec![("CAP".into(), 1.0, 11.5), ("HAT".into(), 2.0, 10.0)]
    );
    let saved = store.saved_enrichments();
    let submit = saved
        .iter()
        .find(|e| e["lines"].is_array())
        .unwrap_or_else(|| panic!("no enrichment with lines: {saved:?}"));
    assert_eq!(
        submit["lines"],
        json!([
            {"ID": "L1", "ProductID": "HAT", "Quantity": 2, "LineTotal": 20.0, "LineSubtotal": 20.0,
             "UnitPrice": 10.0, "Product": {"ID": "HAT", "Name": "Product HAT", "xp": {}}, "Variant": null},
            {"ID": "L2", "ProductID": "CAP", "Quantity": 1, "LineTotal": 11.5, "LineSubtotal": 11.5,
             "UnitPrice": 11.5, "Product": {"ID": "CAP", "Name": "Product CAP", "xp": {}}, "Variant": null},
        ])
    );
}

/// Once enrichment has stored a registered shopper's identity, intake stores that shopper's later
/// line changes on the order's route enriched already: they skip the enrichment round (a claim and
/// a rewrite of the intent), and are delivered under the same identity. A line change through the
/// Cart API still goes through enrichment (OrderCloud names the order).
#[tokio::test]
async fn a_known_shoppers_line_changes_skip_the_enrichment_round() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |_| {}).await;
    let mut shopper = world.registered("buyer1", "known", WEB_CLIENT);
    shopper.open_cart("O-KNOWN");
    shopper.add("L1", "HAT", 1, 10.0).await;
    world.drained().await;
    assert_eq!(store.enrichments_saved(), 1, "the first intent is enriched");

    shopper.add("L2", "CAP", 2, 11.0).await;
    shopper.set_quantity("L1", 3).await;
    world.drained().await;
    assert_eq!(
        store.enrichments_saved(),
        1,
        "the later line changes were enriched at intake"
    );
    let adds: Vec<(String, String)> = world
        .cdp
        .requests()
        .iter()
        .filter(|r| r.event_type == "ADD" && r.answered < 300)
        .map(|r| {
            (
                r.shopper.clone().unwrap_or_default(),
                r.event["product"]["item_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        adds,
        vec![
            ("buyer1-known".to_string(), "HAT".to_string()),
            ("buyer1-known".to_string(), "CAP".to_string()),
            ("buyer1-known".to_string(), "HAT".to_string()),
        ]
    );
    let me_calls = world.oc.calls().iter().filter(|c| c.starts_with("GET /v1/me")).count();
    assert_eq!(me_calls, 1, "{:?}", world.oc.calls());
    let revenue = shopper.submit().await;
    assert_eq!(world.order("O-KNOWN").await.revenue, revenue);

    // The Cart API names no order: OrderCloud is asked for it, through enrichment.
    let mut cart = world.login("buyer1", "known", WEB_CLIENT);
    cart.open_cart("O-KNOWN-2");
    cart.cart_add("C1", "BOOK", 1, 12.5).await;
    world.drained().await;
    assert_eq!(
        store.enrichments_saved(),
        3,
        "the submit and the Cart API change are enriched"
    );

    // A known shopper's whole order deleted is enriched at intake too, and clears the cart in CDP.
    let mut again = world.registered("buyer1", "known", WEB_CLIENT);
    again.open_cart("O-KNOWN-3");
    again.add("L1", "SCARF", 1, 9.0).await;
    again.delete_cart().await;
    world.drained().await;
    assert_eq!(
        store.enrichments_saved(),
        3,
        "the line and the deletion were enriched at intake"
    );
    let clears: Vec<String> = world
        .cdp
        .requests()
        .iter()
        .filter(|r| r.event_type == "CLEAR_CART" && r.answered < 300)
        .map(|r| r.shopper.clone().unwrap_or_default())
        .collect();
    assert_eq!(clears, ["buyer1-known"], "{clears:?}");
}

/// A backlog (a queue built up behind an outage, or faster intake than delivery) is claimed in
/// batches: while fewer than a quarter of the delivery slots are free, the dispatcher waits until a
/// quarter are before claiming again, instead of one claim — a store round trip, on PostgreSQL its walk of the queue —
/// per slot as it frees. Every claim asks for at least a quarter of `delivery.concurrency`, and
/// every event is still delivered once.
#[tokio::test]
async fn a_backlog_is_claimed_in_batches_not_one_slot_at_a_time() {
    const SHOPPERS: usize = 96;
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.concurrency = 16;
        // The wait for more free slots ends at the poll interval: far beyond a delivery here.
        s.delivery.poll_interval_ms = 5_000;
    })
    .await;
    store.delivery_claims.hold(true);
    let mut shoppers: Vec<_> = (0..SHOPPERS)
        .map(|n| world.anonymous(&format!("O-BATCH-{n}"), WEB_CLIENT))
        .collect();
    for shopper in &mut shoppers {
        shopper.add("L1", "SKU", 1, 10.0).await;
    }
    eventually("the backlog queued and enriched", Duration::from_secs(20), || async {
        let pending = world.app.store.pending(SHOPPERS + 1).await.unwrap();
        (pending.len() == SHOPPERS && pending.iter().all(|i| i.enriched)).then_some(())
    })
    .await;
    store.delivery_claims.hold(false);
    world.drained().await;

    claimed_in_batches_of_4_or_more(&store.delivery_claims.calls(), SHOPPERS, "delivery");
    let adds = world.cdp.sent("ADD");
    assert_eq!(adds, SHOPPERS, "one ADD per shopper");
}

/// Every claim (the most intents it asked for, how many it got) asked for 4 or more (a quarter of
/// 16 slots), and together they took each of `intents` once.
fn claimed_in_batches_of_4_or_more(calls: &[(usize, usize)], intents: usize, loop_name: &str) {
    let small: Vec<_> = calls.iter().filter(|(limit, _)| *limit < 4).collect();
    assert!(
        small.is_empty(),
        "{loop_name} claims asked for fewer than 4 intents: {small:?} of {calls:?}"
    );
    let claimed: usize = calls.iter().map(|(_, got)| got).sum();
    assert_eq!(claimed, intents, "{loop_name}: each intent claimed once: {calls:?}");
}

/// Enrichment claims in batches too: a backlog of registered shoppers' first webhooks (each needs
/// its identity from OrderCloud) is claimed a quarter of the enricher's slots at a time or more,
/// each intent enriched once and every event delivered.
#[tokio::test]
async fn an_enrichment_backlog_is_claimed_in_batches_not_one_slot_at_a_time() {
    const SHOPPERS: usize = 96;
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        s.delivery.concurrency = 16;
        // The wait for more free slots ends at the poll interval: far beyond an enrichment here.
        s.delivery.poll_interval_ms = 3_000;
    })
    .await;
    store.enrichment_claims.hold(true);
    let mut shoppers: Vec<_> = (0..SHOPPERS)
        .map(|n| world.registered("buyer1", &format!("batch-{n}"), WEB_CLIENT))
        .collect();
    for (n, shopper) in shoppers.iter_mut().enumerate() {
        shopper.open_cart(&format!("O-EBATCH-{n}"));
        shopper.add("L1", "SKU", 1, 10.0).await;
    }
    eventually("the backlog queued", Duration::from_secs(20), || async {
        (world.app.store.pending(SHOPPERS + 1).await.unwrap().len() == SHOPPERS).then_some(())
    })
    .await;
    store.enrichment_claims.hold(false);
    world.drained().await;

    claimed_in_batches_of_4_or_more(&store.enrichment_claims.calls(), SHOPPERS, "enrichment");
    assert_eq!(store.enrichments_saved(), SHOPPERS, "each intent enriched once");
    assert_eq!(world.cdp.sent("ADD"), SHOPPERS, "one ADD per shopper");
}

/// A bug that panics a shopper's enrichment task outside a job's reads (here, saving the result)
/// frees the slots of every job that task held. With all of the enricher's slots in that task, the
/// enricher must still notice them free: its jobs are claimed again after their lease and enriched,
/// and the shopper's events delivered — not a silent stall.
#[tokio::test]
async fn an_enrichment_task_that_panics_holding_every_slot_does_not_stall_enrichment() {
    let (world, store) = World::start_faulty(Duration::from_secs(1200), |s| {
        // Four enrichment slots (the fewest), all for one shopper's four jobs.
        s.delivery.concurrency = 4;
        s.delivery.lease_secs = 3;
        s.delivery.request_timeout_ms = 1_000;
        s.delivery.poll_interval_ms = 50;
    })
    .await;
    store.enrichment_claims.hold(true);
    let mut shopper = world.registered("buyer1", "panics-saving", WEB_CLIENT);
    shopper.open_cart("O-SAVE-PANIC");
    for line in ["L1", "L2", "L3", "L4"] {
        shopper.add(line, "SKU", 1, 10.0).await;
    }
    eventually("four jobs queued", Duration::from_secs(20), || async {
        let pending = world.app.store.pending(10).await.unwrap();
        (pending.iter().filter(|i| !i.enriched).count() == 4).then_some(())
    })
    .await;
    store.set_everyone(Faults {
        save_panics_once: true,
        ..Faults::default()
    });
    store.enrichment_claims.hold(false);
    world.drained().await;
    assert_eq!(world.cdp.sent("ADD"), 4, "each line added once");
    let calls = store.enrichment_claims.calls();
    assert_eq!(calls.first(), Some(&(4, 4)), "one claim took the four jobs: {calls:?}");
}
