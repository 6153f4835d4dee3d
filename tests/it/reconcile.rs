//! The order ledger's reconciliation with OrderCloud: orders submitted in OrderCloud whose webhook
//! never came reach CDP once, whichever path brings them first.

use std::time::Duration;

use ordercloud_cdp_forwarder::config::Secret;
use serde_json::{json, Value};

use crate::fakes::cdp::Answer;
use crate::fakes::faulty_store::Faults;
use crate::helpers::eventually;
use crate::world::{World, ANON_TEMPLATE_USERNAME};

const CLIENT: &str = "reconcile-client";
const SECRET: &str = "reconcile-secret-0001";
const WEB_CLIENT: &str = "web-client";

/// A world whose service reconciles every second, counting an order lost after a second.
async fn reconciling_world(secret: &str) -> World {
    reconciling_world_lagging(secret, 1).await
}

/// A world whose service reconciles every second, counting an order lost after `lag_secs`.
async fn reconciling_world_lagging(secret: &str, lag_secs: u64) -> World {
    let secret = secret.to_string();
    let world = World::start_with(Duration::from_secs(1200), move |s| {
        s.ordercloud.client_id = Some(CLIENT.into());
        s.ordercloud.client_secret = Secret::new(secret);
        s.reconcile.interval_secs = 1;
        s.reconcile.lag_secs = lag_secs;
        s.reconcile.lookback_secs = 3600;
    })
    .await;
    world.oc.add_api_client(CLIENT, SECRET, ANON_TEMPLATE_USERNAME);
    // The ledger begins at the end of the second its migration ran in (SQLite records it to the
    // second): orders the tests submit from now on are in it.
    let store = world.app.store.clone();
    eventually("the ledger begun", Duration::from_secs(5), || async {
        let since = store.ledger_since().await.unwrap().expect("the ledger's migration ran");
        (chrono::Utc::now().timestamp_millis() > since).then_some(())
    })
    .await;
    world
}

/// An anonymous shopper's order as OrderCloud lists it to the marketplace (one line).
fn lost_order(id: &str) -> Value {
    json!({"ID": id, "FromCompanyID": "anon-buyer",
           "FromUser": {"ID": "anon-template-user", "Username": ANON_TEMPLATE_USERNAME},
           "Currency": "USD", "Total": 1.0, "Subtotal": 1.0, "LineItemCount": 1, "xp": {}})
}

/// The one line of a [`lost_order`].
fn lost_line() -> Value {
    json!({"ID": "L1", "ProductID": "SKU-1", "Quantity": 1, "UnitPrice": 1.0, "LineSubtotal": 1.0,
           "LineTotal": 1.0, "Product": {"ID": "SKU-1", "Name": "Thing"}, "xp": {}})
}

fn orders_of(world: &World, reference: &str) -> usize {
    world
        .cdp
        .orders()
        .iter()
        .filter(|o| o.reference_id == reference)
        .count()
}

fn checkouts_of(world: &World, reference: &str) -> usize {
    world
        .cdp
        .requests()
        .iter()
        .filter(|r| r.event_type == "CHECKOUT" && r.event.get("reference_id") == Some(&json!(reference)))
        .count()
}

/// A submit whose webhook never arrives lands within lag + interval, once, with every line, under
/// the anonymous shopper's identity; its late webhook then changes nothing.
#[tokio::test]
async fn a_submit_whose_webhook_never_came_lands_once_and_its_late_webhook_changes_nothing() {
    let world = reconciling_world(SECRET).await;
    let mut shopper = world.anonymous("O-LOST", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 10.0).await;
    shopper.add("L2", "SKU-2", 2, 5.0).await;
    world.drained().await;
    let revenue = shopper.submit_without_webhook();

    let order = world.order("O-LOST").await;
    assert_eq!(order.lines.len(), 2, "every line: {order:?}");
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.shopper.as_deref(), Some("anon-O-LOST"));
    world.drained().await;

    // The webhook comes after all: 200, and nothing more is sent.
    shopper.submit().await;
    world.drained().await;
    // Two more passes list the order again (its submit time moved): they find it known.
    let passes_before = world
        .oc
        .calls()
        .iter()
        .filter(|c| c.starts_with("GET /v1/orders/Incoming?"))
        .count();
    eventually("two more reconciliation passes", Duration::from_secs(10), || async {
        let passes = world
            .oc
            .calls()
            .iter()
            .filter(|c| c.starts_with("GET /v1/orders/Incoming?"))
            .count();
        (passes >= passes_before + 2).then_some(())
    })
    .await;
    world.drained().await;
    assert_eq!(orders_of(&world, "O-LOST"), 1, "one CDP order");
    assert_eq!(checkouts_of(&world, "O-LOST"), 1, "one CHECKOUT sent");
}

/// A registered shopper's lost submit is sent as `<Buyer>-<User>`, in the shopper's own queue.
#[tokio::test]
async fn a_registered_order_found_by_reconciliation_keeps_its_buyer_and_user() {
    let world = reconciling_world(SECRET).await;
    let mut shopper = world.registered("buyer1", "jo", WEB_CLIENT);
    shopper.open_cart("O-REG");
    shopper.add("L1", "SKU-1", 3, 2.5).await;
    world.drained().await;
    shopper.submit_without_webhook();
    let order = world.order("O-REG").await;
    assert_eq!(order.shopper.as_deref(), Some("buyer1-jo"));
    assert_eq!(order.lines.len(), 1);
    world.drained().await;
    assert_eq!(orders_of(&world, "O-REG"), 1);
}

/// A submit whose webhook names no shopper (no UserToken) is a dead letter that does not stand for
/// the order: reconciliation still finds the order in OrderCloud and sends it, once, under the
/// shopper it names.
#[tokio::test]
async fn a_submit_webhook_that_names_no_shopper_leaves_the_order_to_reconciliation() {
    let world = reconciling_world(SECRET).await;
    let mut shopper = world.registered("buyer1", "notoken", WEB_CLIENT);
    shopper.open_cart("O-NOTOKEN");
    shopper.add("L1", "SKU-1", 1, 7.0).await;
    world.drained().await;
    let revenue = shopper.submit_without_user_token().await;
    let dead = world.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("cannot tell which shopper acted"),
        "{dead:?}"
    );
    let order = world.order("O-NOTOKEN").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.shopper.as_deref(), Some("buyer1-notoken"));
    world.drained().await;
    assert_eq!(orders_of(&world, "O-NOTOKEN"), 1, "one CDP order");
}

/// A webhook that arrives in time is the only path: reconciliation finds its order known and
/// reads no lines for it.
#[tokio::test]
async fn an_order_whose_webhook_came_is_not_sent_again() {
    let world = reconciling_world(SECRET).await;
    let mut shopper = world.anonymous("O-ONTIME", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 10.0).await;
    shopper.submit().await;
    world.order("O-ONTIME").await;
    let listed = |world: &World| {
        world
            .oc
            .calls()
            .iter()
            .filter(|c| c.starts_with("GET /v1/orders/Incoming?"))
            .count()
    };
    let before = listed(&world);
    eventually("two more reconciliation passes", Duration::from_secs(10), || async {
        (listed(&world) >= before + 2).then_some(())
    })
    .await;
    world.drained().await;
    assert_eq!(orders_of(&world, "O-ONTIME"), 1);
    let line_reads = world
        .oc
        .calls()
        .iter()
        .filter(|c| c.starts_with("GET /v1/orders/Incoming/O-ONTIME/lineitems"))
        .count();
    assert_eq!(line_reads, 0, "a known order costs no line reads");
}

/// More than a page of orders, and an order with more than a page of lines: every order lands
/// once, with every line.
#[tokio::test]
async fn orders_and_lines_are_read_across_pages() {
    let world = reconciling_world(SECRET).await;
    // After the store was created: the first pass looks no further back than its migration.
    let submitted = chrono::Utc::now();
    let line = |i: usize| {
        json!({"ID": format!("L{i}"), "ProductID": format!("SKU-{i}"), "Quantity": 1, "UnitPrice": 1.0,
               "LineSubtotal": 1.0, "LineTotal": 1.0, "Product": {"ID": format!("SKU-{i}"), "Name": "Thing"}, "xp": {}})
    };
    let order = |id: &str, lines: usize| {
        json!({"ID": id, "FromCompanyID": "anon-buyer",
               "FromUser": {"ID": "anon-template-user", "Username": ANON_TEMPLATE_USERNAME},
               "Currency": "USD", "Total": lines as f64, "Subtotal": lines as f64, "LineItemCount": lines, "xp": {}})
    };
    world
        .oc
        .put_submitted(order("P-BIG", 130), (0..130).map(line).collect(), submitted);
    for n in 0..119 {
        let id = format!("P-{n:03}");
        world.oc.put_submitted(
            order(&id, 1),
            vec![line(0)],
            submitted + chrono::Duration::milliseconds(n),
        );
    }
    eventually("120 orders in CDP", Duration::from_secs(60), || async {
        (world.cdp.orders().len() >= 120).then_some(())
    })
    .await;
    world.drained().await;
    let orders = world.cdp.orders();
    assert_eq!(orders.len(), 120, "each order once");
    let big = orders.iter().find(|o| o.reference_id == "P-BIG").unwrap();
    assert_eq!(big.lines.len(), 130, "every line of the order with two pages of them");
    let pages: Vec<String> = world
        .oc
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("GET /v1/orders/Incoming?") && c.contains("page=2"))
        .collect();
    assert!(!pages.is_empty(), "the second page of orders was read");
}

/// Waits until CDP holds as many orders as `ids`, then checks each of them is there once and no
/// other is.
async fn each_lands_once(world: &World, ids: &[String], deadline: Duration) {
    eventually("every order in CDP", deadline, || async {
        (world.cdp.orders().len() >= ids.len()).then_some(())
    })
    .await;
    world.drained().await;
    for id in ids {
        assert_eq!(orders_of(world, id), 1, "order {id} once");
    }
    assert_eq!(world.cdp.orders().len(), ids.len());
}

/// Now, in whole milliseconds: the times the service reads from OrderCloud and writes back to it.
fn now_in_whole_ms() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis()).unwrap()
}

/// Orders submitted at one instant, across a page boundary: a search index returns orders tied on
/// its sort field in no fixed order, so two pages of one listing can show some of them twice and
/// others never. Sorted by ID after the time, every order is on exactly one page, and each lands once.
#[tokio::test]
async fn orders_submitted_at_one_instant_across_pages_each_land_once() {
    let world = reconciling_world(SECRET).await;
    let submitted = chrono::Utc::now();
    let ids: Vec<String> = (0..150).map(|n| format!("TIE-{n:03}")).collect();
    for id in &ids {
        world.oc.put_submitted(lost_order(id), vec![lost_line()], submitted);
    }
    each_lands_once(&world, &ids, Duration::from_secs(60)).await;
}

/// A window holding more orders than a pass reads with one query goes on from the time of the last
/// order read: the orders submitted at that same instant that the query did not reach are read by
/// the next one (from that time, inclusive), not passed over for good.
#[tokio::test]
async fn orders_tied_with_the_last_one_a_query_read_are_read_by_the_next() {
    let world = reconciling_world(SECRET).await;
    // One query reads 100 pages: with two orders a page, 200 orders.
    world.oc.cap_order_pages(2);
    // A hundred orders at one instant, then 102 at the next millisecond: one query reads the first
    // 200, ending inside the second instant. (Two instants, so that no pass's window can begin
    // between the orders and read past the cut by chance.)
    let submitted = now_in_whole_ms();
    let mut ids = Vec::new();
    for n in 0..202 {
        let id = format!("W-{n:03}");
        let time = submitted + chrono::Duration::milliseconds(i64::from(n >= 100));
        world.oc.put_submitted(lost_order(&id), vec![lost_line()], time);
        ids.push(id);
    }
    each_lands_once(&world, &ids, Duration::from_secs(90)).await;
}

/// More orders at one instant than one query reads (ten thousand in a millisecond, here 201 with
/// two a page): the listing goes on after that instant, so the orders after it are still read;
/// only the rest of that instant is not (said in a warning).
#[tokio::test]
async fn a_listing_stuck_on_one_instant_goes_on_after_it() {
    let world = reconciling_world(SECRET).await;
    world.oc.cap_order_pages(2);
    let at = now_in_whole_ms();
    for n in 0..201 {
        world
            .oc
            .put_submitted(lost_order(&format!("I-{n:03}")), vec![lost_line()], at);
    }
    world.oc.put_submitted(
        lost_order("AFTER"),
        vec![lost_line()],
        at + chrono::Duration::milliseconds(1),
    );
    eventually(
        "the order after the instant in CDP",
        Duration::from_secs(60),
        || async { (orders_of(&world, "AFTER") > 0).then_some(()) },
    )
    .await;
    world.drained().await;
    assert_eq!(orders_of(&world, "AFTER"), 1);
    let at_the_instant: Vec<usize> = (0..201).map(|n| orders_of(&world, &format!("I-{n:03}"))).collect();
    assert!(at_the_instant.iter().all(|&n| n <= 1), "none twice");
    assert_eq!(at_the_instant.iter().sum::<usize>(), 200, "the first 200 by ID");
}

/// Orders submitted before the store's migration to the order ledger were taken by a version that
/// keyed submits by LogID, not by order: the first passes never look before that migration — not
/// even over the lag they look back — so none is sent a second time. An order submitted after it
/// lands.
#[tokio::test]
async fn orders_submitted_before_the_ledger_began_are_not_sent_again() {
    let started = chrono::Utc::now();
    let world = reconciling_world_lagging(SECRET, 3).await;
    // Taken (and sent to CDP) by the version before, two seconds before this store began.
    world.oc.put_submitted(
        lost_order("P-BEFORE"),
        vec![lost_line()],
        started - chrono::Duration::seconds(2),
    );
    world
        .oc
        .put_submitted(lost_order("P-SINCE"), vec![lost_line()], chrono::Utc::now());
    world.order("P-SINCE").await;
    assert_eq!(
        orders_of(&world, "P-BEFORE"),
        0,
        "an order from before the ledger was sent again"
    );
}

/// A lost order whose lines cannot be read any more (deleted after it was listed) is left out; the
/// other lost orders of the pass still land, and the pass does not start over forever.
#[tokio::test]
async fn an_order_whose_lines_are_gone_does_not_hold_up_the_others() {
    let world = reconciling_world(SECRET).await;
    let now = chrono::Utc::now();
    world.oc.put_submitted(lost_order("P-GONE"), vec![lost_line()], now);
    world.oc.lose_lines("P-GONE");
    world.oc.put_submitted(
        lost_order("P-AFTER"),
        vec![lost_line()],
        now + chrono::Duration::milliseconds(5),
    );
    world.order("P-AFTER").await;
    assert_eq!(orders_of(&world, "P-GONE"), 0);
}

/// A lost order found by reconciliation is stored without the credentials its order or lines
/// carry (a password or a token in an `xp`), as intake stores a webhook: CDP refuses the order
/// here, so the dead letter shows what was stored.
#[tokio::test]
async fn a_reconciled_order_is_stored_without_the_credentials_it_carries() {
    let world = reconciling_world(SECRET).await;
    world.cdp.script_all((0..4).map(|_| Answer::status(400)).collect());
    let order = json!({"ID": "P-CREDS", "FromCompanyID": "anon-buyer",
        "FromUser": {"ID": "anon-template-user", "Username": ANON_TEMPLATE_USERNAME},
        "Currency": "USD", "Total": 1.0, "Subtotal": 1.0, "LineItemCount": 1,
        "xp": {"Colour": "blue", "payment": {"CardToken": "order-secret-1"}, "Password": "order-secret-2"}});
    let line = json!({"ID": "L1", "ProductID": "SKU-1", "Quantity": 1, "UnitPrice": 1.0, "LineSubtotal": 1.0,
        "LineTotal": 1.0, "Product": {"ID": "SKU-1", "Name": "Thing"}, "xp": {"apiSecret": "line-secret-3"}});
    world.oc.put_submitted(order, vec![line], chrono::Utc::now());
    let dead = eventually("the refused order's dead letter", Duration::from_secs(20), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    let text = serde_json::to_string(&dead).unwrap();
    assert!(text.contains("blue"), "the order is stored: {text}");
    for secret in ["order-secret-1", "order-secret-2"] {
        assert!(!text.contains(secret), "{secret} is stored: {text}");
    }
    // The lines are stored with the order's enrichment, which dead letters do not show: the SQLite
    // files hold none of the secrets either.
    if let Some(path) = world.app.settings.store.url.strip_prefix("sqlite://") {
        let dir = std::path::Path::new(path).parent().unwrap();
        for file in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(file.unwrap().path()).unwrap_or_default();
            for secret in ["order-secret-1", "order-secret-2", "line-secret-3"] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} is in the store's files"
                );
            }
        }
    }
}

/// A lost order whose lines OrderCloud keeps failing to answer (503) holds up no other: the lost
/// orders after it land, readiness names it (still ready), and once OrderCloud answers it lands too.
#[tokio::test]
async fn an_order_whose_lines_keep_failing_does_not_hold_up_the_others() {
    let world = reconciling_world(SECRET).await;
    let now = chrono::Utc::now();
    world.oc.fail_lines("P-STUCK", true);
    world.oc.put_submitted(lost_order("P-STUCK"), vec![lost_line()], now);
    world.oc.put_submitted(
        lost_order("P-NEXT"),
        vec![lost_line()],
        now + chrono::Duration::milliseconds(5),
    );
    world.order("P-NEXT").await;
    let text = world.app.ops_get("/health/ready").await.text().await.unwrap();
    assert!(text.contains("reconciler") && text.contains("P-STUCK"), "{text}");
    assert_eq!(orders_of(&world, "P-STUCK"), 0);
    world.oc.fail_lines("P-STUCK", false);
    world.order("P-STUCK").await;
    world.drained().await;
    assert_eq!(orders_of(&world, "P-STUCK"), 1);
    assert_eq!(orders_of(&world, "P-NEXT"), 1);
}

/// Wrong client credentials: readiness names the reconciler and stays ready; webhooks flow.
#[tokio::test]
async fn bad_client_credentials_show_in_readiness_and_webhooks_keep_flowing() {
    let world = reconciling_world("not-the-secret-0001").await;
    let report: Value = eventually("readiness to name the reconciler", Duration::from_secs(10), || async {
        let ready = world.app.ops_get("/health/ready").await;
        let status = ready.status();
        let body: Value = ready.json().await.unwrap();
        body.to_string().contains("reconciler").then_some((status, body))
    })
    .await
    .1;
    let text = report.to_string();
    assert!(text.contains("ordercloud.client_secret"), "the fix is named: {text}");
    assert!(!text.contains("not-the-secret-0001"), "the secret never shows: {text}");
    assert_eq!(world.app.get("/health/ready").await.status(), 200, "still ready");

    let mut shopper = world.anonymous("O-FLOW", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 10.0).await;
    shopper.submit().await;
    world.order("O-FLOW").await;
}

const CDP_API_TOKEN: &str = "cdp-api-token-0001";

/// A world whose service asks CDP for each order 3 s after its CHECKOUT (sessions time out after
/// 2 s, so a repair opens a new one), and sends a missing order again once.
async fn verifying_world() -> World {
    let world = World::start_with(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.reconcile.verify_after_secs = Some(3);
        s.reconcile.repairs = 1;
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    world
}

/// As [`verifying_world`], in `order_checkout` mode (IDENTITY then ORDER_CHECKOUT).
async fn order_checkout_verifying_world() -> World {
    let world = World::start_with(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.cdp.order_events = ordercloud_cdp_forwarder::config::OrderEvents::OrderCheckout;
        s.reconcile.verify_after_secs = Some(3);
        s.reconcile.repairs = 1;
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    world
}

fn lookups_of(world: &World, reference: &str) -> usize {
    let wanted = format!("GET /v2.1/orders?referenceId={reference}&");
    world.cdp.rest_calls().iter().filter(|c| c.starts_with(&wanted)).count()
}

/// CDP answers 201 to the CHECKOUT and builds no order: the landing check finds it missing and
/// sends it again, once; the next check finds it and sends nothing more.
#[tokio::test]
async fn an_order_cdp_acknowledged_but_never_built_is_repaired_once() {
    let world = verifying_world().await;
    world.cdp.lose_order("O-LOSE", 1);
    let mut shopper = world.anonymous("O-LOSE", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    let revenue = shopper.submit().await;
    let order = world.order("O-LOSE").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.lines.len(), 1, "{order:?}");
    eventually(
        "the repaired order to be checked again",
        Duration::from_secs(20),
        || async { (lookups_of(&world, "O-LOSE") >= 2).then_some(()) },
    )
    .await;
    world.drained().await;
    assert_eq!(orders_of(&world, "O-LOSE"), 1, "one CDP order");
    assert_eq!(checkouts_of(&world, "O-LOSE"), 2, "the lost CHECKOUT and the repair's");
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
}

/// A submit whose stored bodies no tree can hold (another writer's row; intake refuses them) would
/// have its order sent without the landing check that keeps its intent. With orders verified, it is
/// a dead letter that says why before any of its events is sent; the shopper's next order lands.
#[tokio::test]
async fn a_submit_whose_bodies_cannot_be_parsed_sends_no_unchecked_order() {
    let (world, store) = World::start_faulty(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.reconcile.verify_after_secs = Some(3);
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    let mut shopper = world.anonymous("O-BODYSUB", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    store.set(
        "anon-O-BODYSUB",
        Faults {
            bodies_unreadable: true,
            ..Faults::default()
        },
    );
    shopper.submit().await;
    let dead = world.dead_letters().await;
    let reason = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(reason.contains("the stored intent cannot be read back"), "{reason}");
    world.drained().await;
    assert_eq!(world.cdp.sent("CONFIRM"), 0, "nothing of the order was sent");
    assert_eq!(world.cdp.sent("CHECKOUT"), 0);
    assert_eq!(orders_of(&world, "O-BODYSUB"), 0);
}

/// The ack of a CHECKOUT CDP acknowledged but never built fails once (the connection dropped as
/// it was written): the retry that records the progress keeps the order's landing check too, so
/// the missing order is still found and repaired, once. Without it the order never reached CDP.
#[tokio::test]
async fn an_ack_that_fails_once_keeps_its_orders_landing_check() {
    let (world, store) = World::start_faulty(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.reconcile.verify_after_secs = Some(3);
        s.reconcile.repairs = 1;
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    world.cdp.lose_order("O-ACKDROP", 1);
    let mut shopper = world.anonymous("O-ACKDROP", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    store.set(
        "anon-O-ACKDROP",
        Faults {
            ack_fails_once: true,
            ..Faults::default()
        },
    );
    let revenue = shopper.submit().await;
    let order = world.order("O-ACKDROP").await;
    assert_eq!(order.revenue, revenue);
    eventually(
        "the repaired order to be checked again",
        Duration::from_secs(20),
        || async { (lookups_of(&world, "O-ACKDROP") >= 2).then_some(()) },
    )
    .await;
    world.drained().await;
    assert_eq!(store.ack_faults(), 1, "the ack failed once");
    assert_eq!(orders_of(&world, "O-ACKDROP"), 1, "one CDP order");
    assert_eq!(
        checkouts_of(&world, "O-ACKDROP"),
        2,
        "the lost CHECKOUT and the repair's"
    );
}

/// The submit's lines could not be read from OrderCloud (gone: 404), so the order was planned from
/// the forwarder's record of the cart, which the ack then deletes; CDP acknowledged the CHECKOUT and
/// built nothing. The landing check's repair still has the lines it was planned from: one order,
/// no dead letter.
#[tokio::test]
async fn an_order_planned_from_the_record_of_its_cart_is_repaired_with_those_lines() {
    let world = verifying_world().await;
    let mut shopper = world.anonymous("O-RECORDED", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    world.oc.lose_lines("O-RECORDED");
    world.cdp.lose_order("O-RECORDED", 1);
    let revenue = shopper.submit().await;
    let order = world.order("O-RECORDED").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.lines.len(), 1, "{order:?}");
    world.drained().await;
    assert_eq!(orders_of(&world, "O-RECORDED"), 1, "one CDP order");
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
}

/// CDP takes an order's CHECKOUT but its answer is lost (a 504 from a gateway), and CDP is then
/// down until the session has closed: the retry sends the CHECKOUT as it stood instead of planning
/// the order again in a new session (which would make a second order); CDP builds nothing from it
/// there, and the landing check finds the order CDP built from the first. One order.
#[tokio::test]
async fn a_checkout_whose_answer_was_lost_is_not_planned_again_after_its_session_closed() {
    let world = verifying_world().await;
    let mut shopper = world.anonymous("O-DOUBT", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    let before = world.cdp.requests().len();
    // The submit's CONFIRM goes through, its CHECKOUT is built but answered 504, and the CHECKOUT
    // sent again at once is refused until after the session's 2 s.
    world.cdp.script_all(vec![
        Answer::status(201),
        Answer::processed_then(504),
        Answer::retry_after(503, "3"),
    ]);
    shopper.submit().await;
    eventually("the order's landing check", Duration::from_secs(20), || async {
        (lookups_of(&world, "O-DOUBT") >= 1).then_some(())
    })
    .await;
    world.drained().await;
    let sent: Vec<String> = world.cdp.requests()[before..]
        .iter()
        .map(|r| r.event_type.clone())
        .collect();
    assert_eq!(
        orders_of(&world, "O-DOUBT"),
        1,
        "one CDP order; the submit sent {sent:?}"
    );
    assert_eq!(
        sent,
        ["CONFIRM", "CHECKOUT", "CHECKOUT", "CHECKOUT"],
        "what the submit sent"
    );
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
}

/// In `order_checkout` mode CDP takes the ORDER_CHECKOUT but its answer is lost (a 504): sent
/// again it would be a second order (it needs no CONFIRM in its session). It is left to the landing
/// check instead, which finds the order CDP built: one order.
#[tokio::test]
async fn an_order_checkout_whose_answer_was_lost_is_not_sent_again() {
    let world = order_checkout_verifying_world().await;
    let mut shopper = world.anonymous("OC-DOUBT", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    let before = world.cdp.requests().len();
    // The submit's IDENTITY goes through; its ORDER_CHECKOUT is built but answered 504.
    world
        .cdp
        .script_all(vec![Answer::status(201), Answer::processed_then(504)]);
    let revenue = shopper.submit().await;
    eventually("the order's landing check", Duration::from_secs(20), || async {
        (lookups_of(&world, "OC-DOUBT") >= 1).then_some(())
    })
    .await;
    world.drained().await;
    let sent: Vec<String> = world.cdp.requests()[before..]
        .iter()
        .map(|r| r.event_type.clone())
        .collect();
    assert_eq!(
        orders_of(&world, "OC-DOUBT"),
        1,
        "one CDP order; the submit sent {sent:?}"
    );
    assert_eq!(world.order("OC-DOUBT").await.revenue, revenue);
    assert_eq!(sent, ["IDENTITY", "ORDER_CHECKOUT"], "what the submit sent");
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
}

/// The service is stopped (a rolling restart) while an order's IDENTITY is in flight: its
/// ORDER_CHECKOUT still goes before delivery stops — left for the next start, it would be an order
/// in doubt, waiting for the landing check instead of landing at once.
#[tokio::test]
async fn a_stop_between_an_orders_events_sends_its_order_checkout_first() {
    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.cdp.order_events = ordercloud_cdp_forwarder::config::OrderEvents::OrderCheckout;
        s.reconcile.verify_after_secs = Some(3600);
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    let mut shopper = world.anonymous("OC-STOP", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    world.cdp.script_all(vec![Answer::delayed(Duration::from_millis(1500))]);
    shopper.submit().await;
    eventually("the IDENTITY in flight", Duration::from_secs(10), || async {
        (world.cdp.held() == 1).then_some(())
    })
    .await;
    let World { app, cdp, oc: _oc } = world;
    app.stop().await;
    assert_eq!(
        cdp.orders().iter().filter(|o| o.reference_id == "OC-STOP").count(),
        1,
        "the order landed before the service stopped"
    );
}

/// As above, but CDP never took the ORDER_CHECKOUT (503): the landing check finds no order and
/// sends it again, once. Nothing lost, one order.
#[tokio::test]
async fn an_order_checkout_cdp_never_took_is_repaired_by_the_landing_check() {
    let world = order_checkout_verifying_world().await;
    let mut shopper = world.anonymous("OC-NEVER", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    world.cdp.script_all(vec![Answer::status(201), Answer::status(503)]);
    let revenue = shopper.submit().await;
    let order = world.order("OC-NEVER").await;
    assert_eq!(order.revenue, revenue);
    world.drained().await;
    assert_eq!(orders_of(&world, "OC-NEVER"), 1, "one CDP order");
    assert!(lookups_of(&world, "OC-NEVER") >= 1, "found missing, then repaired");
}

/// As above, and CDP has meanwhile forgotten the shopper's browser (404 to the CHECKOUT sent as it
/// stood): no browser is minted for the order to be planned again — a second order — the CHECKOUT
/// is left to the landing check, which finds the order CDP built from the first.
#[tokio::test]
async fn a_checkout_whose_answer_was_lost_and_whose_browser_cdp_forgot_is_left_to_the_landing_check() {
    let world = verifying_world().await;
    let mut shopper = world.anonymous("O-FORGOT", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    world.cdp.script_all(vec![
        Answer::status(201),
        Answer::processed_then(504),
        Answer::retry_after(503, "3"),
    ]);
    shopper.submit().await;
    let order = world.order("O-FORGOT").await;
    world.cdp.forget_browser(&order.browser_id);
    eventually("the order's landing check", Duration::from_secs(20), || async {
        (lookups_of(&world, "O-FORGOT") >= 1).then_some(())
    })
    .await;
    world.drained().await;
    assert_eq!(orders_of(&world, "O-FORGOT"), 1, "one CDP order");
    assert_eq!(
        world.cdp.browsers_created(),
        1,
        "no browser minted to plan the order again"
    );
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
}

/// The same, but CDP never took the CHECKOUT (down from its first try until the session closed):
/// the CHECKOUT sent as it stood builds nothing in the new session, and the landing check repairs
/// the order, once. Nothing is lost.
#[tokio::test]
async fn a_checkout_cdp_never_took_before_its_session_closed_is_repaired_once() {
    let world = verifying_world().await;
    let mut shopper = world.anonymous("O-NEVER", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 2, 4.0).await;
    world.drained().await;
    let before = world.cdp.requests().len();
    world
        .cdp
        .script_all(vec![Answer::status(201), Answer::retry_after(503, "3")]);
    let revenue = shopper.submit().await;
    let order = world.order("O-NEVER").await;
    assert_eq!(order.revenue, revenue);
    world.drained().await;
    assert_eq!(orders_of(&world, "O-NEVER"), 1, "one CDP order");
    // The CHECKOUT sent as it stood, then the landing check's repair (not a plan made again at once).
    let sent: Vec<String> = world.cdp.requests()[before..]
        .iter()
        .map(|r| r.event_type.clone())
        .collect();
    assert_eq!(
        sent[..3],
        ["CONFIRM", "CHECKOUT", "CHECKOUT"],
        "what the submit sent: {sent:?}"
    );
    assert!(
        lookups_of(&world, "O-NEVER") >= 1,
        "the landing check asked for the order"
    );
    assert!(
        world.app.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
}

/// Still missing after its repairs: a dead letter with the reason, listed like any other.
#[tokio::test]
async fn an_order_still_missing_after_its_repair_is_a_dead_letter_with_the_reason() {
    let world = verifying_world().await;
    world.cdp.lose_order("O-GONE", 2);
    let mut shopper = world.anonymous("O-GONE", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 4.0).await;
    shopper.submit().await;
    let dead = eventually("the dead letter", Duration::from_secs(30), || async {
        let dead = world.dead_letters().await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert_eq!(
        reason,
        "CDP acknowledged the CHECKOUT of order O-GONE but holds no order"
    );
    assert_eq!(orders_of(&world, "O-GONE"), 0);
    assert_eq!(checkouts_of(&world, "O-GONE"), 2, "sent once, repaired once, no more");
    assert_eq!(lookups_of(&world, "O-GONE"), 2);
}

/// A landing-check dead letter replayed once its cause is fixed is a new round of checks: lost again,
/// it is repaired again (not taken for the first round's repair), and lands once.
#[tokio::test]
async fn a_replayed_landing_check_dead_letter_is_checked_and_repaired_anew() {
    let world = verifying_world().await;
    world.cdp.lose_order("O-AGAIN", 2);
    let mut shopper = world.anonymous("O-AGAIN", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 4.0).await;
    shopper.submit().await;
    world.dead_letters().await;
    world.cdp.lose_order("O-AGAIN", 1);
    assert_eq!(world.app.store.replay_dead_letters(None, None).await.unwrap(), 1);
    world.order("O-AGAIN").await;
    eventually("the repair to be found in CDP", Duration::from_secs(20), || async {
        (lookups_of(&world, "O-AGAIN") >= 4).then_some(())
    })
    .await;
    world.drained().await;
    assert_eq!(orders_of(&world, "O-AGAIN"), 1);
    assert_eq!(
        checkouts_of(&world, "O-AGAIN"),
        4,
        "sent, repaired, replayed, repaired again"
    );
}

/// The landing check's repair of a missing order becomes a dead letter of its own (CDP refuses
/// it): when the check comes due again, that dead letter stands for the order — no second one is
/// written — and replaying every dead letter once the cause is fixed makes one order.
#[tokio::test]
async fn a_repair_that_became_a_dead_letter_is_the_orders_only_dead_letter() {
    let world = World::start_with(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.reconcile.verify_after_secs = Some(2);
        s.reconcile.repairs = 1;
        s.delivery.max_age_secs = 1;
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    world.cdp.lose_order("O-REPAIR-DEAD", 1);
    let mut shopper = world.anonymous("O-REPAIR-DEAD", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 4.0).await;
    shopper.submit().await;
    world.drained().await;
    // The repair's events are refused for good.
    world.cdp.script_all((0..4).map(|_| Answer::status(400)).collect());
    eventually("the repair's dead letter", Duration::from_secs(20), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (!dead.is_empty()).then_some(())
    })
    .await;
    world.cdp.clear_script_all();
    // The check comes due again once the repair could have aged out and been checked.
    eventually("the check to come due again", Duration::from_secs(30), || async {
        let metrics = world.app.ops_get("/metrics").await.text().await.unwrap();
        (metrics.contains("orders_verified_total{outcome=\"missing\"}")
            || metrics.contains("orders_verified_total{outcome=\"repair_dead_letter\"}"))
        .then_some(())
    })
    .await;
    let dead = world.app.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "one dead letter for the order: {dead:?}");
    assert_eq!(world.app.store.replay_dead_letters(None, None).await.unwrap(), 1);
    world.order("O-REPAIR-DEAD").await;
    world.drained().await;
    assert_eq!(orders_of(&world, "O-REPAIR-DEAD"), 1);
}

/// CDP's REST API down: the check is retried without sending the order again, readiness shows
/// why (still ready), and once the API is back the check completes and the warning goes.
#[tokio::test]
async fn an_order_lookup_that_keeps_failing_shows_in_readiness_until_it_succeeds() {
    let world = World::start_with(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.reconcile.verify_after_secs = Some(2);
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    world.cdp.set_rest_down(true);
    let mut shopper = world.anonymous("O-RESTDOWN", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 4.0).await;
    shopper.submit().await;
    world.order("O-RESTDOWN").await;
    eventually("the lookup to be tried again", Duration::from_secs(20), || async {
        (lookups_of(&world, "O-RESTDOWN") >= 2).then_some(())
    })
    .await;
    let ready = world.app.ops_get("/health/ready").await;
    assert_eq!(ready.status(), 200);
    let text = ready.text().await.unwrap();
    assert!(text.contains("order_check") && text.contains("HTTP 503"), "{text}");

    world.cdp.set_rest_down(false);
    eventually("the warning to go", Duration::from_secs(30), || async {
        let text = world.app.ops_get("/health/ready").await.text().await.unwrap();
        (!text.contains("order_check")).then_some(())
    })
    .await;
    assert_eq!(checkouts_of(&world, "O-RESTDOWN"), 1, "the order was not sent again");
    assert_eq!(orders_of(&world, "O-RESTDOWN"), 1);
}

/// The lookup answered 404 by something that is not CDP's REST API (an HTML page: a proxy, a wrong
/// path): that is no answer about the order, which CDP built — it is asked again, never sent a
/// second time.
#[tokio::test]
async fn a_lookup_answered_by_a_not_found_page_is_no_answer_and_sends_nothing() {
    let world = World::start_with(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new(CDP_API_TOKEN));
        s.reconcile.verify_after_secs = Some(2);
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    world.cdp.set_rest_not_found_page(true);
    let mut shopper = world.anonymous("O-404PAGE", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 4.0).await;
    shopper.submit().await;
    world.order("O-404PAGE").await;
    eventually("the lookup to be tried again", Duration::from_secs(20), || async {
        (lookups_of(&world, "O-404PAGE") >= 2).then_some(())
    })
    .await;
    let text = world.app.ops_get("/health/ready").await.text().await.unwrap();
    assert!(text.contains("order_check") && text.contains("404"), "{text}");
    assert_eq!(checkouts_of(&world, "O-404PAGE"), 1, "the order was not sent again");
    assert_eq!(orders_of(&world, "O-404PAGE"), 1);
}

/// CDP's REST API refusing the token: the check is retried (readiness shows it, still ready); the
/// order is not sent again meanwhile.
#[tokio::test]
async fn a_failing_order_lookup_is_retried_and_sends_nothing() {
    let world = World::start_with(Duration::from_secs(2), |s| {
        s.cdp.api_token = Some(Secret::new("not-the-cdp-token-1"));
        s.reconcile.verify_after_secs = Some(2);
    })
    .await;
    world.cdp.set_api_token(CDP_API_TOKEN);
    let mut shopper = world.anonymous("O-CHECK", WEB_CLIENT);
    shopper.add("L1", "SKU-1", 1, 4.0).await;
    shopper.submit().await;
    world.order("O-CHECK").await;
    eventually("the lookup to be tried again", Duration::from_secs(20), || async {
        (lookups_of(&world, "O-CHECK") >= 2).then_some(())
    })
    .await;
    let ready = world.app.ops_get("/health/ready").await;
    let text = ready.text().await.unwrap();
    assert!(text.contains("cdp.api_token"), "{text}");
    assert!(!text.contains("not-the-cdp-token-1"), "{text}");
    assert_eq!(world.app.get("/health/ready").await.status(), 200);
    assert_eq!(checkouts_of(&world, "O-CHECK"), 1);
}
