//! The real binary killed (SIGKILL) during a backlog and started again on the same store.

use std::time::Duration;

use crate::fakes::cdp::{Answer, CdpFake};
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;
use crate::world::{binary_env, post_orders, CLIENT_KEY, POS};

#[tokio::test]
async fn killed_during_a_backlog_and_restarted_every_order_completes() {
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    // CDP is down at first, so a backlog builds up behind retries.
    cdp.script_all((0..40).map(|_| Answer::status(503)).collect());
    let dir = tempfile::tempdir().unwrap();
    let mut env = binary_env(dir.path(), &oc, &cdp);
    env.extend([
        ("FORWARDER__DELIVERY__REQUEST_TIMEOUT_MS", "1000".to_string()),
        ("FORWARDER__DELIVERY__LEASE_SECS", "2".to_string()),
    ]);
    let first = Binary::start(dir.path(), &env).await;
    let shoppers = 12;
    post_orders(&first, &oc, "KILL", shoppers).await;
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
