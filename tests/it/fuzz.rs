//! Property tests over the whole intake chain — signature check, envelope parse, route classify,
//! token claims, intent building, store round trip — with arbitrary bytes and arbitrary JSON (deep
//! nesting, numbers out of range, odd Unicode, NULs, unpaired surrogates). Every input gets a clear
//! 4xx or a 200 whose stored intent decodes; never a panic, never a row that cannot be read back.
//! Cases are bounded (`FUZZ_CASES`, 48 by default) so CI runs them on every change.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use ordercloud_cdp_forwarder::config::Settings;
use ordercloud_cdp_forwarder::http::{router, AppState};
use ordercloud_cdp_forwarder::ordercloud::signature;
use ordercloud_cdp_forwarder::store::{self, DynStore, Role};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tower::ServiceExt as _;

use crate::helpers::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(48)
}

/// The intake chain in-process: the router on a store of its own, no delivery (the test reads the
/// stored intents back itself).
async fn intake() -> (tempfile::TempDir, axum::Router, DynStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings: Settings = test_settings(dir.path());
    settings.ordercloud.api_urls = vec!["https://api.ordercloud.io".into()];
    let role = Role::Service {
        takeover: settings.delivery.takeover(),
    };
    let store = store::open(&settings.store, role).await.unwrap();
    let state = AppState::new(
        Arc::new(settings),
        store.clone(),
        Default::default(),
        Arc::new(tokio::sync::Notify::new()),
    );
    (dir, router(state), store)
}

async fn post(app: &axum::Router, body: Vec<u8>) -> u16 {
    let request = Request::post("/webhooks/ordercloud")
        .header("X-oc-hash", signature::sign(KEY.as_bytes(), &body))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status().as_u16()
}

/// Reads back every intent stored so far, the way enrichment and delivery do, and settles it:
/// returns the reasons of those that could not be read.
async fn read_back(store: &DynStore) -> Vec<String> {
    let lease = Duration::from_secs(60);
    for job in store.claim_enrichment(1000, lease).await.unwrap() {
        store.dead_letter_enrichment(&job.claim, "read back").await.unwrap();
    }
    for claimed in store.claim(1000, lease).await.unwrap() {
        store.ack(&claimed.claim).await.unwrap();
    }
    store
        .dead_letters(None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|d| d.last_error)
        .filter(|reason| reason.contains("cannot be read back"))
        .collect()
}

/// JSON text, not a `Value`: so that it can hold what a `Value` cannot (1e400, "\ud800").
fn json_text() -> impl Strategy<Value = String> {
    let string = any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap());
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::to_string(&f).unwrap()),
        prop_oneof![
            Just("1e400"),
            Just("-1e999"),
            Just("123456789012345678901234567890123"),
            Just("1e-400"),
            Just(r#""\ud800""#),
            Just(r#""\u0000""#),
            Just(r#""\udbff\udfff""#),
        ]
        .prop_map(str::to_string),
        string.clone(),
    ];
    let nested = leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((any::<String>(), inner), 0..5).prop_map(|entries| {
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
                    .collect();
                format!("{{{}}}", entries.join(","))
            }),
        ]
    });
    // Some of it nested deep, around the limit.
    (nested, prop_oneof![3 => Just(0usize), 1 => 100usize..140])
        .prop_map(|(text, depth)| format!("{}{text}{}", "[".repeat(depth), "]".repeat(depth)))
}

/// A webhook-shaped JSON text: a handled route, arbitrary claims in its token, arbitrary bodies,
/// query parameters and LogID.
fn webhook_text() -> impl Strategy<Value = String> {
    let route = prop::sample::select(vec![
        ("POST", "v1/orders/{direction}/{orderID}/lineitems"),
        ("PATCH", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}"),
        ("DELETE", "v1/cart/lineitems/{lineItemID}"),
        ("POST", "v1/orders/{direction}/{orderID}/submit"),
        ("PUT", "v1/me/register"),
        ("PUT", "v1/me/orders"),
        ("POST", "v1/cart/lineitems"),
        ("GET", "v1/unknown/{thing}"),
    ]);
    let token = (
        prop::option::of(any::<String>()),
        prop::option::of(any::<String>()),
        prop::option::of(any::<String>()),
    )
        .prop_map(|(orderid, usr, aud)| {
            jwt(serde_json::json!({"orderid": orderid, "usr": usr, "aud": aud, "cid": "c", "exp": 4_000_000_000i64}))
        });
    (
        route,
        token,
        any::<String>(),
        any::<String>(),
        json_text(),
        json_text(),
        json_text(),
    )
        .prop_map(|((verb, route), token, log_id, order_id, request, response, query)| {
            let query = if query.starts_with('{') { query } else { "{}".to_string() };
            format!(
                r#"{{"Route":"{route}","Verb":"{verb}","RouteParams":{{"direction":"Outgoing","orderID":{},"lineItemID":"L1"}},"QueryParams":{query},"Date":"2026-11-22T10:15:30.1234567+00:00","LogID":{},"UserToken":"{token}","Request":{{"Body":{request},"Headers":null}},"Response":{{"Body":{response},"Headers":null}}}}"#,
                serde_json::to_string(&order_id).unwrap(),
                serde_json::to_string(&log_id).unwrap(),
            )
        })
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bytes_get_a_clear_answer() {
    let (_dir, app, store) = intake().await;
    let mut runner = runner();
    let strategy = prop::collection::vec(any::<u8>(), 0..2048);
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |bytes| {
            let status = handle.block_on(post(&app, bytes));
            prop_assert!([200, 400].contains(&status), "answered {status}");
            Ok(())
        })
    });
    result.unwrap();
    assert!(read_back(&store).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_webhooks_are_refused_clearly_or_stored_readably() {
    let (_dir, app, store) = intake().await;
    let mut runner = runner();
    let handle = tokio::runtime::Handle::current();
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let result = tokio::task::block_in_place(|| {
        runner.run(&webhook_text(), |text| {
            let status = handle.block_on(post(&app, text.clone().into_bytes()));
            prop_assert!([200, 400].contains(&status), "answered {status} to {text}");
            if status == 200 {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let unreadable = handle.block_on(read_back(&store));
                prop_assert!(
                    unreadable.is_empty(),
                    "stored but unreadable: {unreadable:?} from {text}"
                );
            }
            Ok(())
        })
    });
    result.unwrap();
    let accepted = accepted.into_inner();
    assert!(
        accepted > 0,
        "no case was accepted: the generator makes no valid webhooks"
    );
}
