//! Orders CDP can assemble: several devices, stale sessions, anonymous-to-registered logins.

use std::time::Duration;

use ordercloud_cdp_forwarder::config::OrderEvents;

use crate::world::*;

fn identities_on(world: &World, browser: &str) -> Vec<String> {
    world
        .cdp
        .requests()
        .into_iter()
        .filter(|r| r.event_type == "IDENTITY" && r.browser_id == browser && r.answered < 300)
        .map(|r| r.event["identifiers"][0]["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn cart_filled_on_the_web_submitted_from_the_app() {
    let world = World::start().await;
    let mut web = world.registered("buyer1", "jane", WEB_CLIENT);
    web.open_cart("O-WEB-APP");
    web.add("L1", "JACKET", 1, 120.00).await;
    web.add("L2", "SCARF", 2, 15.50).await;
    world.drained().await;

    let mut app = web.on_device(APP_CLIENT);
    let revenue = app.submit().await;

    let order = world.order("O-WEB-APP").await;
    assert_eq!(order.channel, "MOBILE_APP");
    assert_eq!(
        lines(&order),
        vec![("JACKET".into(), 1.0, 120.0), ("SCARF".into(), 2.0, 15.5)]
    );
    assert_eq!(order.revenue, revenue);
    world.drained().await;
    let abandoned = world.cdp.finish();
    assert!(
        abandoned.is_empty(),
        "the web session was cleared, not abandoned: {abandoned:?}"
    );
    let web_events: Vec<String> = world
        .cdp
        .requests()
        .into_iter()
        .filter(|r| r.channel == "WEB")
        .map(|r| r.event_type)
        .collect();
    assert_eq!(web_events.last().map(String::as_str), Some("CLEAR_CART"));
}

#[tokio::test]
async fn a_cart_older_than_the_session_timeout_still_becomes_an_order() {
    let world = World::start_with(Duration::from_secs(2), |_| {}).await;
    let mut shopper = world.anonymous("O-STALE-SESSION", WEB_CLIENT);
    shopper.add("L1", "KETTLE", 1, 39.99).await;
    world.sessions_closed().await;
    assert_eq!(
        world.cdp.abandoned_carts().len(),
        1,
        "CDP saw the first session close with the cart in it"
    );

    let revenue = shopper.submit().await;
    let order = world.order("O-STALE-SESSION").await;
    assert_eq!(lines(&order), vec![("KETTLE".into(), 1.0, 39.99)]);
    assert_eq!(order.revenue, revenue);
    let types: Vec<String> = world.cdp.requests().into_iter().map(|r| r.event_type).collect();
    assert_eq!(
        types,
        ["IDENTITY", "ADD", "IDENTITY", "ADD", "CONFIRM", "CHECKOUT"],
        "the submit replays the cart into the new session"
    );
}

#[tokio::test]
async fn anonymous_cart_register_then_submit_with_the_new_token() {
    for with_query_token in [true, false] {
        let world = World::start().await;
        let mut anon = world.anonymous(&format!("O-REG-{with_query_token}"), WEB_CLIENT);
        anon.add("L1", "MUG", 2, 8.00).await;
        anon.add("L2", "TEA", 1, 6.50).await;
        let mut registered = anon.register("buyer1", "newbie", with_query_token).await;
        let revenue = registered.submit().await;

        let order = world.order(&anon.order_id).await;
        assert_eq!(lines(&order), vec![("MUG".into(), 2.0, 8.0), ("TEA".into(), 1.0, 6.5)]);
        assert_eq!(order.revenue, revenue);
        assert_eq!(order.shopper.as_deref(), Some("buyer1-newbie"));
        world.drained().await;
        let anon_browser = world.cdp.requests()[0].browser_id.clone();
        let ids = identities_on(&world, &anon_browser);
        let shared_browser = ids.contains(&anon.identity()) && ids.contains(&"buyer1-newbie".to_string());
        let replayed = world
            .cdp
            .requests()
            .iter()
            .any(|r| r.browser_id != anon_browser && r.event_type == "ADD");
        assert!(
            shared_browser || replayed,
            "IDENTITY for both identities on {anon_browser}: {ids:?}"
        );
        assert!(world.cdp.finish().is_empty(), "no abandoned cart");
        assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn anonymous_cart_login_with_an_existing_session_transfer_submit() {
    for with_query_token in [true, false] {
        let world = World::start().await;
        // The user has a session of their own on the web, with something in it.
        let mut user = world.registered("buyer7", "returning", WEB_CLIENT);
        user.open_cart("O-OWN-CART");
        user.add("L9", "OLD-ITEM", 1, 1.00).await;
        world.drained().await;
        let own_browser = world.cdp.requests()[0].browser_id.clone();

        // On another browser, not logged in, they fill an anonymous cart.
        let mut anon = world.anonymous(&format!("O-ANON-{with_query_token}"), WEB_CLIENT);
        anon.add("L1", "BIKE", 1, 499.00).await;
        anon.add("L2", "BELL", 1, 9.99).await;
        world.drained().await;

        // They log in and OrderCloud transfers the anonymous order.
        let mut logged_in = world.login("buyer7", "returning", WEB_CLIENT);
        logged_in.transfer_from(&anon, with_query_token).await;
        let revenue = logged_in.submit().await;

        let order = world.order(&anon.order_id).await;
        assert_eq!(
            lines(&order),
            vec![("BELL".into(), 1.0, 9.99), ("BIKE".into(), 1.0, 499.0)]
        );
        assert_eq!(order.revenue, revenue);
        assert_eq!(order.shopper.as_deref(), Some("buyer7-returning"));
        world.drained().await;
        let anon_browser = world
            .cdp
            .requests()
            .into_iter()
            .find(|r| r.shopper.as_deref() == Some(anon.identity().as_str()))
            .unwrap()
            .browser_id;
        assert_ne!(anon_browser, own_browser);
        assert!(
            identities_on(&world, &anon_browser).contains(&"buyer7-returning".to_string()),
            "the anonymous guest is linked to the registered identity"
        );
        let abandoned = world.cdp.finish();
        assert!(abandoned.is_empty(), "no abandoned cart: {abandoned:?}");
    }
}

#[tokio::test]
async fn the_storefronts_browser_id_is_the_one_the_order_lands_on() {
    let world = World::start().await;
    let browser = world.storefront_browser().await;
    let mut shopper = world.anonymous("O-STOREFRONT", WEB_CLIENT);
    shopper.storefront_browser = Some(browser.clone());
    shopper.add("L1", "LAMP", 1, 25.0).await;
    shopper.submit().await;
    let order = world.order("O-STOREFRONT").await;
    assert_eq!(order.browser_id, browser);
    assert_eq!(world.cdp.browsers_created(), 1, "the forwarder minted none");
    assert!(world.cdp.requests().iter().all(|r| r.browser_id == browser));
}

#[tokio::test]
async fn order_checkout_mode_yields_the_order_through_one_event() {
    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.cdp.order_events = OrderEvents::OrderCheckout;
        s.cdp.payment_type = "Card".into();
        s.cdp.card_type = Some("Visa".into());
    })
    .await;
    let mut shopper = world.registered("b1", "oc-user", WEB_CLIENT);
    shopper.open_cart("O-ONE-EVENT");
    shopper.add("L1", "TV", 1, 899.0).await;
    shopper.add("L2", "CABLE", 2, 12.5).await;
    let revenue = shopper.submit().await;
    let order = world.order("O-ONE-EVENT").await;
    assert_eq!(order.via, "order_checkout");
    assert_eq!(order.revenue, revenue);
    assert_eq!(
        lines(&order),
        vec![("CABLE".into(), 2.0, 12.5), ("TV".into(), 1.0, 899.0)]
    );
    let last_two: Vec<String> = world
        .cdp
        .requests()
        .iter()
        .rev()
        .take(2)
        .map(|r| r.event_type.clone())
        .collect();
    assert_eq!(last_two, ["ORDER_CHECKOUT", "IDENTITY"]);
    let sent = world.cdp.requests().last().unwrap().event.clone();
    assert_eq!(sent["order"]["paymentType"], "Card");
    assert_eq!(sent["order"]["cardType"], "Visa");
}

#[tokio::test]
async fn guest_details_are_sent_with_identity() {
    let world = World::start().await;
    let mut shopper = world.anonymous("O-GUEST", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 1.0).await;
    shopper.guest_details("Guest@Example.COM", "Gina", "Guest").await;
    world.drained().await;
    let identity = world
        .cdp
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.event_type == "IDENTITY")
        .unwrap();
    assert_eq!(identity.event["email"], "guest@example.com");
    assert_eq!(identity.event["firstname"], "Gina");
    assert_eq!(identity.event["lastname"], "Guest");
    assert_eq!(identity.event["identifiers"][0]["id"], "anon-O-GUEST");
}
