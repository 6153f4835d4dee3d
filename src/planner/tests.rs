//! One test per planner rule.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::config::ItemIdSource;
use crate::domain::ItemFingerprint;

fn cdp() -> CdpSettings {
    CdpSettings {
        pos: "shop".into(),
        item_id: ItemIdSource::Product,
        ..CdpSettings::default()
    }
}

fn ctx(cdp: &CdpSettings) -> Context<'_> {
    Context {
        cdp,
        identity: "buyer1-user1".into(),
        profile: Profile {
            email: Some("Jane@Example.com".into()),
            firstname: Some("Jane".into()),
            ..Profile::default()
        },
        currency: "EUR".into(),
        ordered_at: "2026-11-22T10:00:00.000Z".into(),
    }
}

fn session(browser: &str) -> SessionRef {
    SessionRef {
        channel: "WEB".into(),
        browser_id: browser.into(),
        pos: "shop".into(),
    }
}

fn line(id: &str, product: &str, qty: i64, total: f64) -> Line {
    Line::from_json(
        &json!({"ID": id, "ProductID": product, "Quantity": qty, "LineTotal": total}),
        &cdp(),
    )
    .unwrap()
}

fn open_session(browser: &str, identified: Option<&str>, items: &[(&str, i64, f64)]) -> SessionState {
    SessionState {
        session: session(browser),
        items: items
            .iter()
            .map(|(id, q, p)| {
                (
                    id.to_string(),
                    ItemFingerprint {
                        quantity: *q,
                        price: *p,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        identified_as: identified.map(str::to_string),
        open: true,
    }
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

#[test]
fn identity_precedes_the_first_event_of_a_session_only() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let l = [line("L1", "P1", 1, 5.0)];
    let fresh = SessionState::fresh(session("b1"));
    assert_eq!(kinds(&plan_lines_upserted(&ctx, &fresh, &l, &l)), ["IDENTITY", "ADD"]);
    let identified = open_session("b1", Some("buyer1-user1"), &[]);
    assert_eq!(kinds(&plan_lines_upserted(&ctx, &identified, &l, &l)), ["ADD"]);
    let other_identity = open_session("b1", Some("anon-X"), &[]);
    assert_eq!(
        kinds(&plan_lines_upserted(&ctx, &other_identity, &l, &l)),
        ["IDENTITY", "ADD"]
    );
    let wire = plan_identify(&ctx, &fresh)[0].to_wire();
    assert_eq!(wire["email"], "jane@example.com", "email is lower-cased");
    assert_eq!(
        wire["identifiers"],
        json!([{"provider": "ordercloud", "id": "buyer1-user1"}])
    );
}

#[test]
fn an_upsert_adds_every_line_sharing_the_item_id() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let state = open_session("b1", Some("buyer1-user1"), &[]);
    let order = [
        line("L1", "P1", 1, 10.0),
        line("L2", "P1", 2, 30.0),
        line("L3", "P2", 1, 1.0),
    ];
    let events = plan_lines_upserted(&ctx, &state, &order, &[order[1].clone()]);
    assert_eq!(kinds(&events), ["ADD"]);
    let EventKind::Add { product } = &events[0].kind else {
        panic!()
    };
    assert_eq!((product.item_id.as_str(), product.quantity), ("P1", 3));
    assert!((product.price * 3.0 - 40.0).abs() < 1e-9);
}

#[test]
fn a_delete_clears_then_re_adds_the_remaining_lines() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let state = open_session("b1", Some("buyer1-user1"), &[("P1", 1, 1.0), ("P2", 1, 2.0)]);
    let events = plan_line_deleted(&ctx, &state, &[line("L2", "P2", 1, 2.0)]);
    assert_eq!(kinds(&events), ["CLEAR_CART", "ADD"]);
}

#[test]
fn a_deleted_cart_is_cleared() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let state = open_session("b1", Some("buyer1-user1"), &[("P1", 1, 1.0)]);
    assert_eq!(kinds(&plan_cart_deleted(&ctx, &state)), ["CLEAR_CART"]);
}

#[test]
fn submit_in_a_session_holding_every_line_is_confirm_and_checkout() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let state = open_session("b1", Some("buyer1-user1"), &[("P1", 2, 5.0)]);
    let order = OrderFacts {
        id: "O1".into(),
        total: Some(10.0),
    };
    let events = plan_submit(&ctx, &state, &order, &[line("L1", "P1", 2, 10.0)], &[]);
    assert_eq!(kinds(&events), ["CONFIRM", "CHECKOUT"]);
    assert_eq!(
        events[0].to_wire()["product"],
        json!([{"item_id": "P1"}]),
        "CONFIRM product is an array"
    );
    assert_eq!(events[1].to_wire()["reference_id"], "O1");
    assert_eq!(events[1].to_wire()["status"], "PURCHASED");
}

#[test]
fn submit_replays_when_a_line_is_missing_stale_or_the_session_closed() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let order = OrderFacts {
        id: "O1".into(),
        total: None,
    };
    let lines = [line("L1", "P1", 2, 10.0), line("L2", "P2", 1, 3.0)];
    let replay = ["IDENTITY", "ADD", "ADD", "CONFIRM", "CHECKOUT"];
    let missing = open_session("b1", Some("buyer1-user1"), &[("P1", 2, 5.0)]);
    assert_eq!(kinds(&plan_submit(&ctx, &missing, &order, &lines, &[])), replay);
    let stale_quantity = open_session("b1", Some("buyer1-user1"), &[("P1", 1, 5.0), ("P2", 1, 3.0)]);
    assert_eq!(kinds(&plan_submit(&ctx, &stale_quantity, &order, &lines, &[])), replay);
    let closed = SessionState::fresh(session("b1"));
    assert_eq!(kinds(&plan_submit(&ctx, &closed, &order, &lines, &[])), replay);
}

#[test]
fn after_an_order_other_sessions_holding_its_items_are_cleared() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let app = open_session("app", Some("buyer1-user1"), &[]);
    let web = OtherSession {
        state: open_session("web", Some("buyer1-user1"), &[("P1", 1, 5.0)]),
        must_link: false,
    };
    let unrelated = OtherSession {
        state: open_session("tablet", Some("buyer1-user1"), &[("P9", 1, 5.0)]),
        must_link: false,
    };
    let order = OrderFacts {
        id: "O1".into(),
        total: None,
    };
    let events = plan_submit(&ctx, &app, &order, &[line("L1", "P1", 1, 5.0)], &[web, unrelated]);
    assert_eq!(kinds(&events), ["IDENTITY", "ADD", "CONFIRM", "CHECKOUT", "CLEAR_CART"]);
    assert_eq!(events[4].session.browser_id, "web");
}

#[test]
fn an_anonymous_session_to_link_gets_identity_with_the_registered_id() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let state = open_session("reg", Some("buyer1-user1"), &[("P1", 1, 5.0)]);
    let anon = OtherSession {
        state: open_session("anon", Some("anon-O1"), &[]),
        must_link: true,
    };
    let order = OrderFacts {
        id: "O1".into(),
        total: None,
    };
    let events = plan_submit(&ctx, &state, &order, &[line("L1", "P1", 1, 5.0)], &[anon]);
    assert_eq!(kinds(&events), ["CONFIRM", "CHECKOUT", "IDENTITY"]);
    assert_eq!(events[2].session.browser_id, "anon");
    assert_eq!(events[2].to_wire()["identifiers"][0]["id"], "buyer1-user1");
}

#[test]
fn order_checkout_mode_sends_identity_then_one_event() {
    let cdp = CdpSettings {
        order_events: OrderEvents::OrderCheckout,
        card_type: Some("Visa".into()),
        payment_type: "Card".into(),
        ..cdp()
    };
    let ctx = ctx(&cdp);
    let state = SessionState::fresh(session("b1"));
    let order = OrderFacts {
        id: "O1".into(),
        total: Some(12.5),
    };
    let events = plan_submit(&ctx, &state, &order, &[line("L1", "P1", 2, 10.0)], &[]);
    assert_eq!(kinds(&events), ["IDENTITY", "ORDER_CHECKOUT"]);
    let wire = events[1].to_wire();
    assert_eq!(wire["order"]["price"], json!(12.5));
    assert_eq!(wire["order"]["cardType"], "Visa");
    assert_eq!(wire["order"]["orderItems"][0]["quantity"], json!(2));
    assert_eq!(wire["order"]["orderItems"][0]["price"], json!(10.0));
}

#[test]
fn link_adopting_the_anonymous_browser_sends_only_identity() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let anon = open_session("anon", Some("anon-O1"), &[("P1", 1, 5.0)]);
    assert_eq!(
        kinds(&plan_link(&ctx, &anon, None, &[line("L1", "P1", 1, 5.0)])),
        ["IDENTITY"]
    );
}

#[test]
fn link_into_an_existing_session_replays_the_cart_and_clears_the_anonymous_one() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let anon = open_session("anon", Some("anon-O1"), &[("P1", 1, 5.0)]);
    let own = open_session("reg", Some("buyer1-user1"), &[]);
    let events = plan_link(&ctx, &anon, Some(&own), &[line("L1", "P1", 1, 5.0)]);
    assert_eq!(kinds(&events), ["IDENTITY", "ADD", "CLEAR_CART"]);
    assert_eq!(
        events.iter().map(|e| e.session.browser_id.as_str()).collect::<Vec<_>>(),
        ["anon", "reg", "anon"]
    );
}

#[test]
fn session_facts_follow_acknowledged_events() {
    use crate::domain::SessionFacts;
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let state = SessionState::fresh(session("b1"));
    let mut facts = SessionFacts::new(&state.session, "shopper");
    let idle = 1_000;
    for e in plan_lines_upserted(&ctx, &state, &[line("L1", "P1", 2, 4.0)], &[line("L1", "P1", 2, 4.0)]) {
        facts.acknowledge(&e, 10_000, idle);
    }
    assert_eq!(facts.identified_as.as_deref(), Some("buyer1-user1"));
    assert_eq!(facts.items["P1"].quantity, 2);
    let view = SessionState::from_facts(state.session.clone(), Some(&facts), 10_500, idle);
    assert!(view.open);
    let later = SessionState::from_facts(state.session.clone(), Some(&facts), 11_000, idle);
    assert!(
        !later.open && later.items.is_empty(),
        "past the idle timeout the session is closed"
    );
    facts.acknowledge(&plan_cart_deleted(&ctx, &view)[0], 10_600, idle);
    assert!(facts.items.is_empty());
}

#[test]
fn guest_details_are_always_an_identity_even_in_an_identified_session() {
    let cdp = cdp();
    let ctx = ctx(&cdp);
    let identified = open_session("b1", Some("buyer1-user1"), &[]);
    let events = plan_identify(&ctx, &identified);
    assert_eq!(kinds(&events), ["IDENTITY"]);
    assert_eq!(events[0].to_wire()["firstname"], "Jane");
}
