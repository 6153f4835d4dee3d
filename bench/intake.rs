//! Intake without sockets (`cargo bench --bench intake`): the service's router and store in this
//! process, fed the load bench's webhooks (pre-built and signed, so building them costs nothing
//! measured) by 64 tasks at once, each sending its shoppers' webhooks in order, with the enrichment
//! loop running as in the service and delivery off. It reports the CPU each of the service's
//! threads spends per webhook, which, without the load generator and the kernel's TCP sharing the
//! cores, varies far less from run to run than the load bench's throughput: the figure to compare
//! two versions of the store by (`BENCHMARKS.md`).
//!
//! Usage: cargo bench --bench intake -- [--store sqlite|postgres] [--webhooks N] [--rounds R]
//! PostgreSQL comes from BENCH_DATABASE_URL or TEST_DATABASE_URL (a fresh schema per run).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ordercloud_cdp_forwarder::config::{Secret, Settings};
use ordercloud_cdp_forwarder::http::{router, AppState};
use ordercloud_cdp_forwarder::ordercloud::signature;
use ordercloud_cdp_forwarder::{delivery, health, store};
use serde_json::json;
use tower::ServiceExt as _;

#[path = "procfs.rs"]
mod procfs;
#[path = "workload.rs"]
#[allow(dead_code)] // each benchmark uses part of the workload
mod workload;
use workload::{webhook, KEY, STEPS};

const CONCURRENCY: u64 = 64;

/// CPU seconds used so far by this process's threads, summed by thread name.
fn cpu_by_thread() -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *by_name.entry(name.trim().to_string()).or_insert(0.0) += procfs::cpu_secs(task.path().join("stat"));
    }
    by_name
}

/// (bytes written, write calls) so far by this process, from /proc/self/io: the WAL's frames and
/// the checkpoints' copies, mostly.
fn writes() -> (f64, f64) {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field("wchar:"), field("syscw:"))
}

fn settings(kind: &str, dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.ordercloud.hash_keys = vec![Secret::new(KEY)];
    s.ordercloud.api_urls = vec!["http://127.0.0.1:1".into()];
    if kind == "postgres" {
        s.store.url = std::env::var("BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("TEST_DATABASE_URL"))
            .expect("--store postgres needs BENCH_DATABASE_URL or TEST_DATABASE_URL");
        s.store.schema = Some(format!("bench_intake_{}", uuid::Uuid::new_v4().simple()));
    } else {
        s.store.url = format!("sqlite://{}", dir.join("intake.db").display());
    }
    s
}

/// One shopper's webhooks in order, each with its signature.
type Shopper = Vec<(Vec<u8>, String)>;

/// The webhooks of `shoppers` shoppers, signed, in each shopper's order.
fn signed_webhooks(run: &str, shoppers: u64) -> Vec<Shopper> {
    (0..shoppers)
        .map(|shopper| {
            (0..STEPS)
                .map(|step| {
                    let body = webhook(run, shopper, step);
                    let hash = signature::sign(KEY.as_bytes(), &body);
                    (body, hash)
                })
                .collect()
        })
        .collect()
}

/// Sends every shopper's webhooks through the router, `CONCURRENCY` shoppers at a time.
async fn feed(app: axum::Router, shoppers: Arc<Vec<Shopper>>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (app, shoppers, next) = (app.clone(), shoppers.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(webhooks) = shoppers.get(i) else { return };
                for (body, hash) in webhooks {
                    let request = Request::post("/webhooks/ordercloud")
                        .header("content-type", "application/json")
                        .header("x-oc-hash", hash)
                        .body(Body::from(body.clone()))
                        .unwrap();
                    let response = app.clone().oneshot(request).await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let kind = value("--store").unwrap_or_else(|| "sqlite".into());
    let webhooks: u64 = value("--webhooks").and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let rounds: usize = value("--rounds").and_then(|v| v.parse().ok()).unwrap_or(3);
    let shoppers = webhooks / STEPS as u64;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let settings = Arc::new(settings(&kind, dir.path()));
        let role = store::Role::Service {
            takeover: settings.delivery.takeover(),
        };
        let store = store::open(&settings.store, role).await.unwrap();
        let state = AppState::new(
            settings.clone(),
            store.clone(),
            health::Health::default(),
            Arc::new(tokio::sync::Notify::new()),
        );
        let deps = delivery::Deps::new(
            settings.clone(),
            store.clone(),
            state.health.clone(),
            state.wake.clone(),
            state.identities.clone(),
        )
        .unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let enricher = tokio::spawn(delivery::run_enricher(Arc::new(deps), stopped));
        let app = router(state);
        for round in 0..rounds {
            let batch = Arc::new(signed_webhooks(&format!("round{round}"), shoppers));
            let (before, writes_before) = (cpu_by_thread(), writes());
            let started = Instant::now();
            feed(app.clone(), batch).await;
            let elapsed = started.elapsed().as_secs_f64();
            let (after, writes_after) = (cpu_by_thread(), writes());
            // The last submits' enrichment (a few dozen) runs before the next round, uncounted.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let sent = (shoppers * STEPS as u64) as f64;
            let us_per_webhook = |secs: f64| (secs / sent * 1e7).round() / 10.0;
            let mut threads = serde_json::Map::new();
            let mut total = 0.0;
            for (name, secs) in &after {
                let used = secs - before.get(name).copied().unwrap_or(0.0);
                total += used;
                if used > 0.0 {
                    threads.insert(name.clone(), json!(us_per_webhook(used)));
                }
            }
            println!(
                "{}",
                json!({"store": kind, "round": round, "webhooks": sent, "seconds": (elapsed * 100.0).round() / 100.0,
                       "cpu_us_per_webhook": us_per_webhook(total), "by_thread": threads,
                       "bytes_written_per_webhook": ((writes_after.0 - writes_before.0) / sent).round(),
                       "write_calls_per_webhook": ((writes_after.1 - writes_before.1) / sent * 10.0).round() / 10.0})
            );
        }
        let _ = stop.send(true);
        let _ = enricher.await;
        store.close().await;
    });
}
