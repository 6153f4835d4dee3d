//! The real binary killed (SIGKILL) and started again on the same store: nothing lost, nothing
//! sent twice, and delivery resumes at once — not after a lease.

use std::collections::HashMap;
use std::time::Duration;

use crate::fakes::cdp::{Answer, CdpFake};
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;
use crate::world::{binary_env, post_orders, CLIENT_KEY, POS};

/// Accepted events per shopper, in the order CDP accepted them.
fn accepted_by_shopper(cdp: &CdpFake) -> HashMap<String, Vec<String>> {
    let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
    for r in cdp.requests().into_iter().filter(|r| (200..300).contains(&r.answered)) {
        accepted
            .entry(r.shopper.clone().unwrap_or_default())
            .or_default()
            .push(r.event_type);
    }
    accepted
}

#[tokio::test]
async fn killed_during_a_backlog_and_restarted_every_order_completes_once() {
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    // CDP is down at first, so a backlog builds up behind retries.
    cdp.script_all((0..40).map(|_| Answer::status(503)).collect());
    let dir = tempfile::tempdir().unwrap();
    let mut env = binary_env(dir.path(), &oc, &cdp);
    env.extend([
        ("FORWARDER__DELIVERY__REQUEST_TIMEOUT_MS", "1000".to_string()),
        ("FORWARDER__DELIVERY__LEASE_SECS", "2".to_string()),
        ("FORWARDER__DELIVERY__TAKEOVER_SECS", "4".to_string()),
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
    // Counted, not collected in a set: a second order of one reference fails here.
    let mut per_reference: HashMap<String, usize> = HashMap::new();
    for order in cdp.orders() {
        *per_reference.entry(order.reference_id).or_insert(0) += 1;
    }
    assert_eq!(per_reference.len(), shoppers);
    assert!(
        per_reference.values().all(|n| *n == 1),
        "one order per shopper: {per_reference:?}"
    );
}

/// kill -9 while CDP hangs on every shopper's CHECKOUT, after it acknowledged their CONFIRM. The
/// restarted service resumes each intent at its CHECKOUT (the events before it were recorded as
/// acknowledged) within seconds, although the dead process's leases run for a minute: SQLite
/// releases them at start (the file's lock proves their holder gone), PostgreSQL takes them over
/// once the dead replica has missed its heartbeats for `delivery.takeover_secs`.
#[tokio::test]
async fn killed_while_cdp_hangs_on_the_checkout_resumes_at_the_checkout_at_once() {
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    let shoppers = 12;
    for i in 0..shoppers {
        // IDENTITY and ADD (the line), CONFIRM, then the CHECKOUT hangs.
        let ok = Answer::status(201);
        cdp.script(
            &format!("anon-HANG-{i}"),
            vec![ok.clone(), ok.clone(), ok, Answer::hang()],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut env = binary_env(dir.path(), &oc, &cdp);
    // The defaults' minute-long lease; a short takeover for PostgreSQL.
    env.push(("FORWARDER__DELIVERY__TAKEOVER_SECS", "4".to_string()));
    let postgres = env.iter().any(|(_, v)| v.starts_with("postgres"));
    let first = Binary::start(dir.path(), &env).await;
    post_orders(&first, &oc, "HANG", shoppers).await;
    eventually("every CHECKOUT to hang", Duration::from_secs(20), || async {
        let hung = cdp
            .requests()
            .into_iter()
            .filter(|r| r.event_type == "CHECKOUT" && r.answered == 0)
            .count();
        (hung == shoppers).then_some(())
    })
    .await;
    first.kill();
    assert!(cdp.orders().is_empty());

    let _second = Binary::start(dir.path(), &env).await;
    // SQLite: at once (2 s is generous for a dozen local requests). PostgreSQL: the takeover, then
    // the same.
    let deadline = if postgres {
        Duration::from_secs(4 + 4)
    } else {
        Duration::from_secs(2)
    };
    eventually("every order, resumed after the restart", deadline, || async {
        (cdp.orders().len() >= shoppers).then_some(())
    })
    .await;
    let accepted = accepted_by_shopper(&cdp);
    for i in 0..shoppers {
        let shopper = format!("anon-HANG-{i}");
        assert_eq!(
            accepted[&shopper],
            ["IDENTITY", "ADD", "CONFIRM", "CHECKOUT"],
            "{shopper}: each event accepted once, the CHECKOUT after the restart"
        );
        let checkouts = cdp
            .requests()
            .into_iter()
            .filter(|r| r.event_type == "CHECKOUT" && r.shopper.as_deref() == Some(&shopper))
            .count();
        assert_eq!(checkouts, 2, "{shopper}: the hung CHECKOUT, then the one that landed");
    }
    assert_eq!(cdp.orders().len(), shoppers, "one order each");
}
