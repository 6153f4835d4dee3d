//! What one reconciliation pass costs (`cargo bench --bench reconcile`): 10,000 orders submitted in
//! the window, of which 1 % never had their submit webhook (the others' submits are in the store, as
//! intake leaves them); an OrderCloud stand-in on 127.0.0.1 answers the token, the order list pages,
//! the API clients and the lost orders' lines at once. Reports the pass's wall time, the service's
//! CPU, the requests made to OrderCloud and the submits it stored.
//!
//! Usage: cargo bench --bench reconcile -- [--store sqlite|postgres] [--orders N] [--lost-per-mille M]
//! PostgreSQL comes from BENCH_DATABASE_URL or TEST_DATABASE_URL (a fresh schema per run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ordercloud_cdp_forwarder::config::{Secret, Settings};
use ordercloud_cdp_forwarder::domain::intent::{submit_dedupe_key, Intent, IntentKind, IntentSecrets, RouteFamily};
use ordercloud_cdp_forwarder::store::{self, NewIntent};
use ordercloud_cdp_forwarder::{health, reconcile};
use serde_json::{json, Value};

#[path = "procfs.rs"]
mod procfs;

struct StandIn {
    orders: Vec<Value>,
    requests: AtomicU64,
}

fn order(n: u64, submitted: chrono::DateTime<chrono::Utc>) -> Value {
    json!({"ID": format!("R{n:06}"), "FromCompanyID": "buyer1",
           "FromUser": {"ID": format!("u{}", n % 500), "Username": format!("user{}", n % 500), "Email": "x@example.com"},
           "Status": "Open", "IsSubmitted": true, "Currency": "USD", "Total": 20.0, "Subtotal": 20.0,
           "LineItemCount": 2, "DateSubmitted": submitted.to_rfc3339(), "xp": {}})
}

fn page(items: &[Value], params: &std::collections::HashMap<String, String>) -> Value {
    let page: usize = params.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let size: usize = params.get("pageSize").and_then(|p| p.parse().ok()).unwrap_or(20);
    let total_pages = items.len().div_ceil(size);
    let slice: Vec<Value> = items.iter().skip((page - 1) * size).take(size).cloned().collect();
    json!({"Meta": {"Page": page, "PageSize": size, "TotalCount": items.len(), "TotalPages": total_pages},
           "Items": slice})
}

async fn stand_in(orders: Vec<Value>) -> (String, Arc<StandIn>) {
    let state = Arc::new(StandIn {
        orders,
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route(
            "/oauth/token",
            post(|State(s): State<Arc<StandIn>>| async move {
                s.requests.fetch_add(1, Ordering::Relaxed);
                Json(json!({"access_token": "bench-token", "token_type": "bearer", "expires_in": 600}))
            }),
        )
        .route(
            "/v1/orders/Incoming",
            get(
                |State(s): State<Arc<StandIn>>, Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    Json(page(&s.orders, &q))
                },
            ),
        )
        .route(
            "/v1/orders/Incoming/{id}/lineitems",
            get(
                |State(s): State<Arc<StandIn>>,
                 Path(id): Path<String>,
                 Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    let lines: Vec<Value> = (0..2)
                        .map(|i| json!({"ID": format!("{id}-L{i}"), "ProductID": format!("SKU{i}"), "Quantity": 1,
                                       "UnitPrice": 10.0, "LineTotal": 10.0, "Product": {"ID": format!("SKU{i}"), "Name": "Thing"}}))
                        .collect();
                    Json(page(&lines, &q))
                },
            ),
        )
        .route(
            "/v1/apiclients",
            get(
                |State(s): State<Arc<StandIn>>, Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    Json(page(&[json!({"ID": "storefront", "DefaultContextUserName": "anon-template"})], &q))
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, state)
}

/// The submit intake stores for an order whose webhook came.
fn submit(order: &Value) -> NewIntent {
    let id = order["ID"].as_str().unwrap();
    NewIntent {
        dedupe_key: submit_dedupe_key(id),
        shopper_key: format!("user:bench:{}", order["FromUser"]["Username"].as_str().unwrap()),
        intent: Intent {
            kind: IntentKind::OrderSubmitted,
            family: RouteFamily::Orders,
            verb: "POST".into(),
            route: "v1/orders/{direction}/{orderID}/submit".into(),
            direction: Some("Outgoing".into()),
            order_id: Some(id.into()),
            line_item_id: None,
            occurred_at_ms: 0,
            request_body: serde_json::value::to_raw_value(&json!({})).unwrap(),
            response_body: serde_json::value::to_raw_value(order).unwrap(),
            query_params: Default::default(),
            client_id: None,
            api_url: None,
            anonymous: false,
            anon_order_id: None,
            token_expires_at: None,
        },
        secrets: IntentSecrets::default(),
        dead_reason: Some("bench: delivered long ago".into()),
        needs_enrichment: false,
        enrichment: None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let kind = value("--store").unwrap_or_else(|| "sqlite".into());
    let total: u64 = value("--orders").and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let lost_per_mille: u64 = value("--lost-per-mille").and_then(|v| v.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now();
        let orders: Vec<Value> = (0..total)
            .map(|n| {
                order(
                    n,
                    now - chrono::Duration::seconds(3_600) + chrono::Duration::milliseconds(n as i64),
                )
            })
            .collect();
        let (base, oc) = stand_in(orders.clone()).await;
        let mut s = Settings::default();
        s.ordercloud.hash_keys = vec![Secret::new("bench-hash-key-0001")];
        s.ordercloud.api_urls = vec![base.clone()];
        s.ordercloud.client_id = Some("ledger".into());
        s.ordercloud.client_secret = Secret::new("ledger-secret-0001");
        s.reconcile.lag_secs = 60;
        s.reconcile.lookback_secs = 7_200;
        if kind == "postgres" {
            s.store.url = std::env::var("BENCH_DATABASE_URL")
                .or_else(|_| std::env::var("TEST_DATABASE_URL"))
                .expect("--store postgres needs BENCH_DATABASE_URL or TEST_DATABASE_URL");
            s.store.schema = Some(format!("bench_reconcile_{}", uuid::Uuid::new_v4().simple()));
        } else {
            s.store.url = format!("sqlite://{}", dir.path().join("reconcile.db").display());
        }
        let settings = Arc::new(s);
        let role = store::Role::Service {
            takeover: settings.delivery.takeover(),
        };
        let store = store::open(&settings.store, role).await.unwrap();
        // The orders whose webhook came: their submits are in the store (as dead letters here, so
        // that nothing delivers them meanwhile; the dedupe is the same).
        let came: Vec<NewIntent> = orders
            .iter()
            .enumerate()
            .filter(|(n, _)| (*n as u64 % 1000) >= lost_per_mille)
            .map(|(_, order)| submit(order))
            .collect();
        let lost = total - came.len() as u64;
        let mut writers = tokio::task::JoinSet::new();
        for chunk in came.chunks(came.len().div_ceil(64).max(1)) {
            let (store, chunk) = (store.clone(), chunk.to_vec());
            writers.spawn(async move {
                for item in chunk {
                    store.enqueue(item).await.unwrap();
                }
            });
        }
        while writers.join_next().await.is_some() {}
        // The window starts before the orders (a fresh store's starts at its migration).
        store
            .lease_reconciler("bench", std::time::Duration::from_millis(200))
            .await
            .unwrap();
        store
            .advance_reconciler("bench", (now - chrono::Duration::seconds(7_200)).timestamp_millis())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let reconciler = reconcile::Reconciler::new(
            settings.clone(),
            store.clone(),
            health::Health::default(),
            Arc::new(tokio::sync::Notify::new()),
        )
        .unwrap();
        let cpu_before = procfs::cpu_secs("/proc/self/stat");
        let started = Instant::now();
        let report = reconcile::run_pass(&reconciler).await.unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let cpu = procfs::cpu_secs("/proc/self/stat") - cpu_before;
        let out = json!({
            "store": kind,
            "orders_in_window": total,
            "lost": lost,
            "listed": report.listed,
            "submits_stored": report.sent,
            "ordercloud_requests": oc.requests.load(Ordering::Relaxed),
            "pass_seconds": (seconds * 1000.0).round() / 1000.0,
            "cpu_seconds_incl_stand_in": (cpu * 1000.0).round() / 1000.0,
        });
        println!("{out}");
        store.close().await;
    });
}
