//! Property: for random sequences of adds, quantity changes, deletes, waits past the session
//! timeout and device switches, ending in a submit, CDP (the fake) ends with exactly one order,
//! equal to the final cart.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::world::*;

#[derive(Debug, Clone)]
enum Op {
    /// A new line of product `product` (several lines may share a product).
    Add { product: u8, quantity: i64, cents: i64 },
    /// Change the quantity of the n-th line (modulo the cart's size).
    SetQuantity { line: usize, quantity: i64 },
    /// Remove the n-th line.
    Delete { line: usize },
    /// Switch between the web and the app client of the same user.
    SwitchDevice,
    /// Let every CDP session time out.
    Wait,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..4, 1i64..4, 100i64..5000).prop_map(|(product, quantity, cents)| Op::Add { product, quantity, cents }),
        2 => (0usize..8, 1i64..5).prop_map(|(line, quantity)| Op::SetQuantity { line, quantity }),
        2 => (0usize..8).prop_map(|line| Op::Delete { line }),
        2 => Just(Op::SwitchDevice),
        1 => Just(Op::Wait),
    ]
}

async fn run(case: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let world = World::start_with(Duration::from_secs(2), |_| {}).await;
    let order_id = format!("PROP-{case}");
    let mut shopper = world.registered("buyer", &format!("prop{case}"), WEB_CLIENT);
    shopper.open_cart(&order_id);
    let mut next_line = 0;
    let mut on_app = false;
    for op in ops {
        match op {
            Op::Add {
                product,
                quantity,
                cents,
            } => {
                next_line += 1;
                let price = cents as f64 / 100.0;
                shopper
                    .add(&format!("L{next_line}"), &format!("P{product}"), quantity, price)
                    .await;
            }
            Op::SetQuantity { line, quantity } if !shopper.lines.is_empty() => {
                let id = shopper.lines[line % shopper.lines.len()]["ID"]
                    .as_str()
                    .unwrap()
                    .to_string();
                shopper.set_quantity(&id, quantity).await;
            }
            Op::Delete { line } if !shopper.lines.is_empty() => {
                let id = shopper.lines[line % shopper.lines.len()]["ID"]
                    .as_str()
                    .unwrap()
                    .to_string();
                shopper.delete(&id).await;
            }
            Op::SwitchDevice => {
                on_app = !on_app;
                shopper = shopper.on_device(if on_app { APP_CLIENT } else { WEB_CLIENT });
            }
            Op::Wait => world.sessions_closed().await,
            _ => {}
        }
    }
    if shopper.lines.is_empty() {
        shopper.add("L-last", "P9", 1, 1.0).await;
    }
    // The expected order: the final cart grouped by product.
    let mut expected: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in &shopper.lines {
        let entry = expected
            .entry(line["ProductID"].as_str().unwrap().to_string())
            .or_default();
        entry.0 += line["Quantity"].as_f64().unwrap();
        entry.1 += line["LineTotal"].as_f64().unwrap();
    }
    let revenue = shopper.submit().await;
    let order = world.order(&order_id).await;
    world.drained().await;

    prop_assert_eq!(world.cdp.orders().len(), 1, "exactly one order");
    let got: Vec<(String, f64)> = order.lines.iter().map(|l| (l.item_id.clone(), l.quantity)).collect();
    let want: Vec<(String, f64)> = expected.iter().map(|(k, (q, _))| (k.clone(), *q)).collect();
    prop_assert_eq!(got, want);
    prop_assert!(
        (order.revenue - revenue).abs() < 0.005,
        "revenue {} != {}",
        order.revenue,
        revenue
    );
    Ok(())
}

#[test]
fn random_carts_across_devices_and_timeouts_end_in_exactly_the_final_order() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(16);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let case = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..8), |ops| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(run(n, ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
