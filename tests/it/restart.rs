//! The real binary killed (SIGKILL) during a backlog and started again on the same store.

use std::time::Duration;

use serde_json::json;

use crate::fakes::cdp::{Answer, CdpFake};
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;
use crate::world::{CLIENT_KEY, POS};

#[tokio::test]
async fn killed_during_a_backlog_and_restarted_every_order_completes() {
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    // CDP is down at first, so a backlog builds up behind retries.
    cdp.script_all((0..40).map(|_| Answer::status(503)).collect());
    let dir = tempfile::tempdir().unwrap();
    let mut env = store_env(dir.path());
    env.extend([
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY.to_string()),
        ("FORWARDER__ORDERCLOUD__API_URLS", oc.base_url()),
        ("FORWARDER__CDP__BASE_URL", cdp.base_url()),
        ("FORWARDER__CDP__CLIENT_KEY", CLIENT_KEY.to_string()),
        ("FORWARDER__CDP__POS", POS.to_string()),
        ("FORWARDER__DELIVERY__INITIAL_BACKOFF_MS", "20".to_string()),
        ("FORWARDER__DELIVERY__MAX_BACKOFF_MS", "100".to_string()),
        ("FORWARDER__DELIVERY__POLL_INTERVAL_MS", "20".to_string()),
        ("FORWARDER__DELIVERY__REQUEST_TIMEOUT_MS", "1000".to_string()),
        ("FORWARDER__DELIVERY__LEASE_SECS", "2".to_string()),
    ]);
    let first = Binary::start(dir.path(), &env).await;
    let shoppers = 12;
    for i in 0..shoppers {
        let order = format!("KILL-{i}");
        let token = anon_token(&order, "web-client", &oc.base_url());
        oc.register_anon_token(&token, &order);
        let line = line_item("L1", &format!("SKU-{i}"), 1, 10.0 + i as f64);
        oc.set_cart(&token, json!({"ID": order, "Currency": "USD"}), vec![line.clone()]);
        assert_eq!(first.post(&line_created(&order, &token, &line)).await, 200);
        oc.submit(&order);
        let submit = envelope(
            "POST",
            "v1/orders/{direction}/{orderID}/submit",
            json!({"direction": "Outgoing", "orderID": order}),
            Some(&token),
            serde_json::Value::Null,
            json!({"ID": order, "Currency": "USD", "Total": 10.0 + i as f64}),
        );
        assert_eq!(first.post(&submit).await, 200);
    }
    // Kill it while CDP still fails, with deliveries claimed and in flight.
    eventually("deliveries in flight", Duration::from_secs(10), || async {
        (cdp.requests().len() >= 10).then_some(())
    })
    .await;
    first.kill();
    assert!(cdp.orders().len() < shoppers, "the backlog was not yet delivered");

    let _second = Binary::start(dir.path(), &env).await;
    for i in 0..shoppers {
        let reference = format!("KILL-{i}");
        let order = eventually(&format!("order {reference}"), Duration::from_secs(30), || async {
            cdp.orders().into_iter().find(|o| o.reference_id == reference)
        })
        .await;
        assert_eq!(order.revenue, 10.0 + i as f64);
    }
    let refs: std::collections::HashSet<_> = cdp.orders().into_iter().map(|o| o.reference_id).collect();
    assert_eq!(refs.len(), shoppers, "one order per shopper");
}
