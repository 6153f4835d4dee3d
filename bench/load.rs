//! Load generator, CDP sink and intake ceiling for BENCHMARKS.md (`cargo bench --bench load`).
//!
//! One binary plays every part: it runs the CDP sink in-process, starts the real service and a
//! "ceiling" server (a minimal axum server doing only the verification and parsing intake does,
//! storing nothing) as separate processes, and drives them with signed, realistic webhooks in
//! closed loop (fixed concurrency) and open loop (fixed rate, latency measured from the intended
//! send time, so a slow server cannot hide its queueing).
//!
//! Usage: cargo bench --bench load -- [--store sqlite|postgres] [--quick] [--out DIR]
//!        [--only ceiling,alone,intake,e2e,backlog,replicas] [--profile DIR] [--count DIR]
//! PostgreSQL comes from BENCH_DATABASE_URL or TEST_DATABASE_URL (a fresh schema per run).
//! BENCH_SERVICE_BIN names another build of the service to run (A/B comparisons of a change).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use ordercloud_cdp_forwarder::config::Secret;
use ordercloud_cdp_forwarder::ordercloud::envelope::Webhook;
use ordercloud_cdp_forwarder::ordercloud::{routes, signature};
use serde_json::{json, Value};

#[path = "procfs.rs"]
mod procfs;
#[path = "workload.rs"]
#[allow(dead_code)] // each benchmark uses part of the workload
mod workload;
use workload::{is_registered, webhook_mixed, KEY, STEPS};

/// CDP events per shopper: IDENTITY + one ADD per line, then CONFIRM + CHECKOUT.
const EVENTS_PER_SHOPPER: u64 = 1 + workload::LINES_PER_ORDER as u64 + 2;

// ------------------------------------------------------------------------------------------------
// Load generation
// ------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Recorder {
    latencies_us: Mutex<Vec<u64>>,
    errors: AtomicU64,
}

impl Recorder {
    fn record(&self, latency: Duration, ok: bool) {
        self.latencies_us.lock().unwrap().push(latency.as_micros() as u64);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn summary(&self, elapsed: Duration) -> Value {
        let mut l = self.latencies_us.lock().unwrap().clone();
        l.sort_unstable();
        let pct = |p: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1] as f64 / 1000.0
        };
        json!({"requests": l.len(), "errors": self.errors.load(Ordering::Relaxed),
               "throughput_per_s": (l.len() as f64 / elapsed.as_secs_f64()).round(),
               "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
               "max_ms": l.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0)})
    }
}

async fn send(client: &reqwest::Client, url: &str, body: Vec<u8>) -> bool {
    let hash = signature::sign(KEY.as_bytes(), &body);
    match client
        .post(url)
        .header("content-type", "application/json")
        .header("x-oc-hash", hash)
        .body(body)
        .send()
        .await
    {
        Ok(r) => r.status() == StatusCode::OK,
        Err(_) => false,
    }
}

/// Closed loop: `concurrency` workers, each sending whole shoppers (their webhooks in order),
/// until `shoppers` are sent or `duration` is over. Returns (summary, shoppers sent).
async fn closed_loop(url: &str, run: &str, concurrency: usize, shoppers: u64, duration: Duration) -> (Value, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let rec = Arc::new(Recorder::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, run, next, rec) = (
            client.clone(),
            url.to_string(),
            run.to_string(),
            next.clone(),
            rec.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let shopper = next.fetch_add(1, Ordering::Relaxed);
                if shopper >= shoppers || started.elapsed() > duration {
                    return;
                }
                for step in 0..STEPS {
                    let body = webhook_mixed(&run, shopper, step, ordercloud());
                    let t = Instant::now();
                    let ok = send(&client, &url, body).await;
                    rec.record(t.elapsed(), ok);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = next.load(Ordering::Relaxed).min(shoppers);
    (rec.summary(started.elapsed()), sent)
}

/// Open loop: webhooks at `rate` per second for `duration`, each sent at its scheduled time
/// whatever happened to the others; latency counts from that scheduled time.
async fn open_loop(url: &str, run: &str, rate: u64, duration: Duration) -> Value {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    let rec = Arc::new(Recorder::default());
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = started + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (client, url, rec) = (client.clone(), url.to_string(), rec.clone());
        let body = webhook_mixed(run, i / STEPS as u64, (i % STEPS as u64) as usize, ordercloud());
        tasks.push(tokio::spawn(async move {
            let ok = send(&client, &url, body).await;
            rec.record(due.elapsed(), ok);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut s = rec.summary(started.elapsed());
    s["offered_per_s"] = json!(rate);
    s
}

// ------------------------------------------------------------------------------------------------
// CDP sink
// ------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Sink {
    events: AtomicU64,
    browsers: AtomicU64,
    /// Answer 503 to events (CDP down).
    failing: AtomicBool,
    /// Answer 401 to everything (the forwarder then pauses delivery: intake alone is measured).
    refusing: AtomicBool,
    last_event: Mutex<Option<Instant>>,
}

async fn start_sink() -> (Arc<Sink>, String) {
    let sink = Arc::new(Sink::default());
    let s1 = sink.clone();
    let s2 = sink.clone();
    let app = Router::new()
        .route(
            "/v1.2/browser/create.json",
            get(move || {
                let s = s1.clone();
                async move {
                    if s.refusing.load(Ordering::Relaxed) {
                        return (StatusCode::UNAUTHORIZED, "{}".to_string());
                    }
                    let n = s.browsers.fetch_add(1, Ordering::Relaxed);
                    (
                        StatusCode::CREATED,
                        format!(r#"{{"status":"OK","version":"1.2","ref":"bench-browser-{n}"}}"#),
                    )
                }
            }),
        )
        .route(
            "/v1.2/events",
            post(move |_headers: HeaderMap, _body: Bytes| {
                let s = s2.clone();
                async move {
                    if s.refusing.load(Ordering::Relaxed) {
                        return (StatusCode::UNAUTHORIZED, "{}".to_string());
                    }
                    if s.failing.load(Ordering::Relaxed) {
                        return (StatusCode::SERVICE_UNAVAILABLE, "{}".to_string());
                    }
                    s.events.fetch_add(1, Ordering::Relaxed);
                    *s.last_event.lock().unwrap() = Some(Instant::now());
                    (StatusCode::CREATED, r#"{"status":"OK","version":"1.2"}"#.to_string())
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (sink, format!("http://{addr}"))
}

// ------------------------------------------------------------------------------------------------
// OrderCloud stand-in
// ------------------------------------------------------------------------------------------------

/// The OrderCloud stand-in's base URL, named by every token of the workload (`aud`) and in the
/// service's `ordercloud.api_urls`.
static ORDERCLOUD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn ordercloud() -> &'static str {
    ORDERCLOUD.get().expect("the OrderCloud stand-in is started first")
}

/// Reads the service made of the stand-in.
#[derive(Default)]
struct OrderCloudReads {
    me: AtomicU64,
    lines: AtomicU64,
}

impl OrderCloudReads {
    /// (`me` reads, line-item reads) so far.
    fn now(&self) -> (u64, u64) {
        (self.me.load(Ordering::Relaxed), self.lines.load(Ordering::Relaxed))
    }

    /// (`me` reads, line-item reads) since `before` (an earlier [`Self::now`]).
    fn since(&self, before: (u64, u64)) -> (u64, u64) {
        let now = self.now();
        (now.0 - before.0, now.1 - before.1)
    }
}

/// OrderCloud as the service reads it, answering at once: `GET v1/me` for a registered shopper's
/// token (`<BuyerID>-<UserID>` = `buyer-1-user<n>`), and an order's lines (the workload's, found from
/// the order ID) at each submit.
async fn start_ordercloud() -> Arc<OrderCloudReads> {
    use axum::extract::Path;
    let reads = Arc::new(OrderCloudReads::default());
    let (r1, r2) = (reads.clone(), reads.clone());
    let app = Router::new()
        .route(
            "/v1/me",
            get(move |headers: HeaderMap| {
                let reads = r1.clone();
                async move {
                    reads.me.fetch_add(1, Ordering::Relaxed);
                    let token = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or_default();
                    let Some(username) = workload::username_in(token).filter(|u| u.ends_with("-login")) else {
                        return (StatusCode::UNAUTHORIZED, "{}".to_string());
                    };
                    let user = username.trim_end_matches("-login").to_string();
                    let me = json!({"ID": user, "Username": username, "FirstName": "Bench", "LastName": "Shopper",
                        "Email": format!("{user}@example.com"), "Active": true,
                        "Buyer": {"ID": workload::BUYER}, "Locale": null, "xp": {}});
                    (StatusCode::OK, me.to_string())
                }
            }),
        )
        .route(
            "/v1/orders/{direction}/{order_id}/lineitems",
            get(move |Path((_, order_id)): Path<(String, String)>| {
                let reads = r2.clone();
                async move {
                    reads.lines.fetch_add(1, Ordering::Relaxed);
                    let Some(shopper) = workload::shopper_of_order(&order_id) else {
                        return (StatusCode::NOT_FOUND, "{}".to_string());
                    };
                    let items: Vec<Value> = (0..workload::LINES_PER_ORDER)
                        .map(|step| workload::line(shopper, step))
                        .collect();
                    let n = items.len();
                    let page = json!({"Meta": {"Page": 1, "PageSize": 100, "TotalCount": n, "TotalPages": 1,
                        "ItemRange": [1, n]}, "Items": items});
                    (StatusCode::OK, page.to_string())
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    ORDERCLOUD
        .set(format!("http://{addr}"))
        .expect("one OrderCloud stand-in");
    reads
}

// ------------------------------------------------------------------------------------------------
// Ceiling: verification and parsing only
// ------------------------------------------------------------------------------------------------

async fn run_ceiling(port: u16) {
    let keys = Arc::new(vec![Secret::new(KEY)]);
    let app = Router::new().route(
        "/webhooks/ordercloud",
        post(move |headers: HeaderMap, body: Bytes| {
            let keys = keys.clone();
            async move {
                if signature::verify(headers.get("x-oc-hash").map(|v| v.as_bytes()), &body, &keys).is_err() {
                    return (StatusCode::UNAUTHORIZED, "{}");
                }
                match Webhook::parse(&body) {
                    Ok(w) => {
                        std::hint::black_box(routes::classify(&w.verb, &w.route));
                        (StatusCode::OK, r#"{"proceed":true}"#)
                    }
                    Err(_) => (StatusCode::BAD_REQUEST, "{}"),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    axum::serve(listener, app).await.unwrap();
}

// ------------------------------------------------------------------------------------------------
// Processes
// ------------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc {
    child: std::process::Child,
    port: u16,
    /// Highest anonymous RSS seen by the sampler (the kernel keeps no peak of it).
    peak_anon: Arc<Mutex<u64>>,
}

struct Usage {
    /// Peak resident set (VmHWM): heap, stacks, and the file pages SQLite maps.
    hwm_kib: u64,
    /// Peak anonymous resident memory (heap and stacks, without mapped file pages), sampled.
    anon_hwm_kib: u64,
    cpu_secs: f64,
}

impl Proc {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhooks/ordercloud", self.port)
    }

    /// Wraps a started process and samples its anonymous RSS every 50 ms while it lives.
    fn new(child: std::process::Child, port: u16) -> Proc {
        let peak_anon = Arc::new(Mutex::new(0));
        let (pid, peak) = (child.id(), peak_anon.clone());
        std::thread::spawn(move || {
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let anon = status
                    .lines()
                    .find(|l| l.starts_with("RssAnon:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok());
                match anon {
                    Some(kib) => {
                        let mut peak = peak.lock().unwrap();
                        *peak = (*peak).max(kib);
                    }
                    None => return, // a zombie: the process has exited
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Proc { child, port, peak_anon }
    }

    async fn wait_ready(&self, path: &str) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() || r.status() == StatusCode::METHOD_NOT_ALLOWED {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{url} did not answer");
    }

    /// Peak memory and CPU used so far, from /proc.
    fn usage(&self) -> Usage {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |field: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let mut peak = self.peak_anon.lock().unwrap();
        *peak = (*peak).max(kib("RssAnon:"));
        Usage {
            hwm_kib: kib("VmHWM:"),
            anon_hwm_kib: *peak,
            cpu_secs: procfs::cpu_secs(format!("/proc/{pid}/stat")),
        }
    }

    fn terminate(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start_ceiling() -> Proc {
    let port = free_port();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["ceiling", &port.to_string()])
        .spawn()
        .unwrap();
    Proc::new(child, port)
}

struct StoreChoice {
    url: String,
    schema: Option<String>,
}

fn start_service(store: &StoreChoice, cdp: &str, extra: &[(&str, &str)]) -> Proc {
    let port = free_port();
    let bin =
        std::env::var("BENCH_SERVICE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder").into());
    let mut cmd = std::process::Command::new(bin);
    cmd.env("FORWARDER__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY)
        .env("FORWARDER__ORDERCLOUD__API_URLS", ordercloud())
        .env("FORWARDER__STORE__URL", &store.url)
        .env("FORWARDER__CDP__BASE_URL", cdp)
        .env("FORWARDER__CDP__CLIENT_KEY", "bench-client-key")
        .env("FORWARDER__CDP__POS", "bench")
        .env("FORWARDER__LOG__LEVEL", "warn")
        .env("FORWARDER__ADMIN__TOKEN", ADMIN_TOKEN)
        .current_dir(std::env::temp_dir())
        .stderr(std::process::Stdio::null());
    if let Some(schema) = &store.schema {
        cmd.env("FORWARDER__STORE__SCHEMA", schema);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::new(cmd.spawn().unwrap(), port)
}

/// The bench's token for the service's `/admin` API.
const ADMIN_TOKEN: &str = "bench-admin-token-0001";

/// Waits until the service's queue is empty and returns when its last event reached CDP (`None` if
/// none did since `since`). The sink's count, in this process, is watched every 5 ms; the service's
/// `/admin/queue` (a count over the queue in the store: milliseconds of the database's CPU on a deep
/// queue) is asked only once no event has come for 50 ms, and then at most every 100 ms. Asking it
/// every 20 ms, as this bench did until session 14, spent more than half a core of PostgreSQL's
/// CPU during the drain it measured.
async fn wait_drained(port: u16, sink: &Sink, since: Instant) -> Option<Instant> {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/admin/queue");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = sink.events.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    let mut asked = Instant::now() - Duration::from_secs(1);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = sink.events.load(Ordering::Relaxed);
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
            continue;
        }
        if quiet_since.elapsed() < Duration::from_millis(50) || asked.elapsed() < Duration::from_millis(100) {
            continue;
        }
        asked = Instant::now();
        if let Ok(r) = client.get(&url).bearer_auth(ADMIN_TOKEN).send().await {
            let queue: Value = r.json().await.unwrap_or_default();
            if queue["stats"]["pending"].as_i64() == Some(0) {
                return (*sink.last_event.lock().unwrap()).filter(|at| *at >= since);
            }
        }
    }
    panic!("the queue did not drain within 600 s");
}

/// The run with the median throughput.
fn median_run(runs: &[Value]) -> Value {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| {
        a["throughput_per_s"]
            .as_f64()
            .partial_cmp(&b["throughput_per_s"].as_f64())
            .unwrap()
    });
    sorted.get(sorted.len() / 2).cloned().unwrap_or(Value::Null)
}

/// The highest throughput among closed-loop runs.
fn best_throughput(runs: &[Value]) -> f64 {
    runs.iter()
        .filter_map(|r| r["throughput_per_s"].as_f64())
        .fold(0.0, f64::max)
}

/// CPU seconds used so far by this process (the load generator and the CDP sink) and by the whole
/// machine (all cores, from /proc/stat), to tell how the two cores were shared in a run.
fn cpu_now() -> (f64, f64) {
    let machine = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // user nice system idle iowait irq softirq steal: busy is everything but idle and iowait.
    let busy: f64 = machine
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(8)
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4)
                .filter_map(|(_, v)| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    (procfs::cpu_secs("/proc/self/stat"), busy / 100.0)
}

/// CPU seconds per 1,000 requests of a closed-loop run.
fn cpu_per_1000(cpu_secs: f64, summary: &Value) -> Value {
    let requests = summary["requests"].as_f64().unwrap_or(0.0).max(1.0);
    json!((cpu_secs / requests * 1000.0 * 1000.0).round() / 1000.0)
}

/// One closed-loop round (concurrency 64) against `server`, with the CPU each side used per 1,000
/// webhooks (the server's, the load generator's) and how busy the machine's cores were.
async fn measured_round(server: &Proc, run: &str, duration: Duration, postgres: bool) -> Value {
    measured_round_on(&[server], run, duration, postgres).await
}

/// [`measured_round`] against several replicas at once, the 64 connections shared among them; the
/// server CPU is theirs together, and the PostgreSQL server's is reported beside it when it runs here.
async fn measured_round_on(servers: &[&Proc], run: &str, duration: Duration, postgres: bool) -> Value {
    let servers_cpu = || servers.iter().map(|s| s.usage().cpu_secs).sum::<f64>();
    let (server_before, pg_before, (own_before, busy_before)) = (servers_cpu(), procfs::PostgresCpu::now(), cpu_now());
    let started = Instant::now();
    let loops: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| {
            let (url, run) = (
                server.url(),
                if servers.len() == 1 {
                    run.to_string()
                } else {
                    format!("{run}r{i}")
                },
            );
            let concurrency = 64 / servers.len();
            tokio::spawn(async move { closed_loop(&url, &run, concurrency, u64::MAX, duration).await.0 })
        })
        .collect();
    let mut rounds = Vec::new();
    for l in loops {
        rounds.push(l.await.unwrap());
    }
    let mut s = if rounds.len() == 1 {
        rounds.into_iter().next().unwrap()
    } else {
        // Throughputs and requests add up; the latency figures are the first replica's.
        let mut merged = rounds[0].clone();
        merged["throughput_per_s"] = json!(rounds
            .iter()
            .filter_map(|r| r["throughput_per_s"].as_f64())
            .sum::<f64>());
        for key in ["requests", "errors"] {
            merged[key] = json!(rounds.iter().filter_map(|r| r[key].as_u64()).sum::<u64>());
        }
        merged
    };
    let elapsed = started.elapsed().as_secs_f64();
    let (own_after, busy_after) = cpu_now();
    s["cpu_seconds_per_1000_webhooks"] = cpu_per_1000(servers_cpu() - server_before, &s);
    if postgres {
        s["postgres_cpu_seconds_per_1000_webhooks"] = cpu_per_1000(pg_before.since(), &s);
    }
    s["load_generator_cpu_seconds_per_1000"] = cpu_per_1000(own_after - own_before, &s);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    s["machine_busy"] = json!(((busy_after - busy_before) / elapsed / cores * 100.0).round() / 100.0);
    s
}

/// Queues `shoppers`' webhooks through a service while CDP answers 503, then stops it: the backlog a
/// fresh process drains. It first waits (up to a minute, then says so) until the OrderCloud reads
/// they need are made: a backlog is what an outage of CDP leaves, enriched meanwhile
/// (OrderCloud is up), and the phase after it measures delivery, not the enrichment that intake
/// outran (about four fifths of it before session 22; the phase reports what is left).
async fn fill_backlog(store: &StoreChoice, sink: &Sink, cdp: &str, run: &str, shoppers: u64, reads: &OrderCloudReads) {
    let before = reads.now();
    let registered = (0..shoppers).filter(|s| is_registered(*s)).count();
    sink.failing.store(true, Ordering::Relaxed);
    let service = start_service(store, cdp, &[("FORWARDER__DELIVERY__MAX_BACKOFF_MS", "1000")]);
    service.wait_ready("/health/ready").await;
    closed_loop(&service.url(), run, 64, shoppers, Duration::from_secs(3600)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let outstanding = || {
        let (me, lines) = reads.since(before);
        me < registered as u64 || lines < shoppers
    };
    while outstanding() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if Instant::now() >= deadline {
        println!("{run:<14} the fill's OrderCloud reads were not all made within a minute");
    }
    service.terminate();
    sink.failing.store(false, Ordering::Relaxed);
}

async fn wait_for_events(sink: &Sink, expected: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while sink.events.load(Ordering::Relaxed) < expected {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

// ------------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------------

struct Options {
    store: String,
    quick: bool,
    out: PathBuf,
    /// `--only ceiling,alone,intake,e2e,backlog,replicas`: run these phases (the report is then printed, not written).
    only: Option<Vec<String>>,
    /// `--profile DIR`: record a `perf` profile of the service during each measured phase.
    profile: Option<PathBuf>,
    /// `--count DIR`: count the service's system calls and context switches during each measured
    /// phase (`perf stat`, CSV): counts per event do not drift with the machine as times do.
    count: Option<PathBuf>,
}

impl Options {
    fn wants(&self, phase: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|p| p == phase))
    }
}

/// The system calls `--count` counts.
const COUNTED: &str = "task-clock,context-switches,syscalls:sys_enter_pwrite64,syscalls:sys_enter_pread64,\
syscalls:sys_enter_fdatasync,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_sendto,\
syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_read";

/// `perf record` (`--profile`) or `perf stat` (`--count`) attached to a process while it lives
/// (stopped with SIGINT, as perf expects).
struct Profiler(Vec<std::process::Child>);

impl Profiler {
    fn start(opts: &Options, proc_: &Proc, phase: &str) -> Profiler {
        let pid = proc_.child.id().to_string();
        let perf = |dir: &std::path::Path, file: String, args: &[&str], flag: &str| {
            std::fs::create_dir_all(dir).unwrap();
            let out = dir.join(file);
            println!("{flag}: {phase} into {}", out.display());
            std::process::Command::new("perf")
                .args(args)
                .arg("-o")
                .arg(&out)
                .args(["-p", &pid])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{flag} needs perf (Debian's linux-perf): {e}"))
        };
        let mut children = Vec::new();
        if let Some(dir) = &opts.profile {
            let args = ["record", "-F", "499", "--call-graph", "dwarf,16384"];
            children.push(perf(
                dir,
                format!("{}-{phase}.perf.data", opts.store),
                &args,
                "--profile",
            ));
        }
        if let Some(dir) = &opts.count {
            let args = ["stat", "-x", ",", "-e", COUNTED];
            children.push(perf(dir, format!("{}-{phase}.stat.csv", opts.store), &args, "--count"));
        }
        if !children.is_empty() {
            // perf needs a moment to attach before the load starts.
            std::thread::sleep(Duration::from_millis(500));
        }
        Profiler(children)
    }

    fn stop(self) {
        for mut child in self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Options {
        store: value("--store").unwrap_or_else(|| "sqlite".into()),
        quick: args.iter().any(|a| a == "--quick"),
        out: PathBuf::from(value("--out").unwrap_or_else(|| "bench/results".into())),
        only: value("--only").map(|v| v.split(',').map(str::to_string).collect()),
        profile: value("--profile").map(PathBuf::from),
        count: value("--count").map(PathBuf::from),
    }
}

fn store_choice(kind: &str, dir: &std::path::Path, name: &str) -> StoreChoice {
    if kind == "postgres" {
        let url = std::env::var("BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("TEST_DATABASE_URL"))
            .expect("--store postgres needs BENCH_DATABASE_URL or TEST_DATABASE_URL");
        StoreChoice {
            url,
            schema: Some(format!(
                "bench_{}_{}",
                name.replace('-', "_"),
                uuid::Uuid::new_v4().simple()
            )),
        }
    } else {
        StoreChoice {
            url: format!("sqlite://{}", dir.join(format!("{name}.db")).display()),
            schema: None,
        }
    }
}

async fn bench(opts: Options) {
    std::fs::create_dir_all(&opts.out).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secs = if opts.quick { 3 } else { 10 };
    let e2e_webhooks: u64 = if opts.quick { 10_000 } else { 100_000 };
    let shoppers = e2e_webhooks / STEPS as u64;
    let (sink, cdp) = start_sink().await;
    let ordercloud_reads = start_ordercloud().await;
    let mut report =
        json!({"store": opts.store, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)});

    // 1. and 2. Ceiling and intake alone, concurrency 64, in alternating rounds (the median of
    //    each is reported), so that a noisy neighbour slows both rather than one.
    //    Intake alone: CDP refuses the key, so delivery pauses after one probe and the service does
    //    what the ceiling does plus storing (and enrichment).
    let rounds = if opts.quick { 2 } else { 3 };
    let ceiling = opts.wants("ceiling").then(start_ceiling);
    let alone = opts.wants("alone").then(|| {
        sink.refusing.store(true, Ordering::Relaxed);
        start_service(&store_choice(&opts.store, dir.path(), "intake-alone"), &cdp, &[])
    });
    let (mut ceiling_runs, mut alone_runs) = (Vec::new(), Vec::new());
    for (proc_, ready) in [(&ceiling, "/webhooks/ordercloud"), (&alone, "/health/live")] {
        if let Some(p) = proc_ {
            p.wait_ready(ready).await;
            closed_loop(&p.url(), "warm", 16, 200, Duration::from_secs(1)).await;
        }
    }
    for round in 0..rounds {
        if let Some(ceiling) = &ceiling {
            let s = measured_round(ceiling, "ceiling", Duration::from_secs(secs), false).await;
            println!("ceiling        {s}");
            ceiling_runs.push(s);
        }
        if let Some(service) = &alone {
            let profiler = Profiler::start(&opts, service, &format!("alone{round}"));
            let postgres = opts.store == "postgres";
            let s = measured_round(service, &format!("alone{round}"), Duration::from_secs(secs), postgres).await;
            profiler.stop();
            println!("intake alone   {s}");
            alone_runs.push(s);
        }
    }
    let best_ceiling = (!ceiling_runs.is_empty()).then(|| best_throughput(&ceiling_runs));
    if let Some(ceiling) = ceiling {
        ceiling.terminate();
        report["ceiling"] = median_run(&ceiling_runs);
        report["ceiling_rounds"] = json!(ceiling_runs);
    }
    if let Some(service) = alone {
        service.terminate();
        sink.refusing.store(false, Ordering::Relaxed);
        report["intake_alone"] = median_run(&alone_runs);
        report["intake_alone_rounds"] = json!(alone_runs);
    }
    if let (Some(c), Some(a)) = (
        report["ceiling"]["throughput_per_s"].as_f64(),
        report["intake_alone"]["throughput_per_s"].as_f64(),
    ) {
        let ratio = a / c;
        println!("intake/ceiling {ratio:.2} (medians of {rounds} rounds)");
        report["intake_to_ceiling"] = json!((ratio * 100.0).round() / 100.0);
        // The ceiling's rounds sometimes run at two thirds of its best (the load generator and the
        // ceiling then both spend more CPU per request), which flatters the median ratio: against
        // its best round the ratio cannot be flattered that way.
        let best = best_throughput(&ceiling_runs);
        let conservative = a / best;
        println!("intake/best ceiling round {conservative:.2}");
        report["intake_to_best_ceiling"] = json!((conservative * 100.0).round() / 100.0);
    }

    // 2b. Intake while delivering (as in production: the same cores deliver to CDP meanwhile),
    // 3. then latency at fixed offered loads (1,000/s is the target point).
    if opts.wants("intake") {
        let store = store_choice(&opts.store, dir.path(), "intake");
        let service = start_service(&store, &cdp, &[]);
        service.wait_ready("/health/ready").await;
        let url = format!("http://127.0.0.1:{}/webhooks/ordercloud", service.port);
        closed_loop(&url, "warm", 16, 200, Duration::from_secs(1)).await;
        let (mut intake_tp, _) = closed_loop(&url, "intake", 64, u64::MAX, Duration::from_secs(secs)).await;
        // What delivery had not caught up with when intake stopped: the time until its last event
        // reached the sink, the queue then found empty.
        let stopped = Instant::now();
        let last_event = wait_drained(service.port, &sink, stopped).await;
        let drain = last_event.map_or(Duration::ZERO, |at| at - stopped);
        intake_tp["drain_seconds"] = json!(drain.as_secs_f64());
        if let (Some(intake), Some(ceiling)) = (
            intake_tp["throughput_per_s"].as_f64(),
            report["ceiling"]["throughput_per_s"].as_f64(),
        ) {
            intake_tp["to_ceiling"] = json!((intake / ceiling * 100.0).round() / 100.0);
        }
        println!("intake+deliv.  {intake_tp}");
        report["intake_while_delivering"] = intake_tp;

        let mut curve = Vec::new();
        let rates: &[u64] = if opts.quick {
            &[500, 1000, 2000]
        } else {
            &[250, 500, 1000, 1500, 2000, 3000, 4000]
        };
        for rate in rates {
            // Each point starts with an empty queue: the latency is that of the offered load alone.
            wait_drained(service.port, &sink, Instant::now()).await;
            let profiler = Profiler::start(&opts, &service, &format!("open{rate}"));
            let s = open_loop(&url, &format!("open{rate}"), *rate, Duration::from_secs(secs.min(5))).await;
            profiler.stop();
            println!("open {rate:>5}/s   {s}");
            curve.push(s);
        }
        let rss = service.usage();
        service.terminate();
        report["latency_curve"] = json!(curve);
        report["peak_rss_mib"]["intake_and_open_loop"] = json!(rss.hwm_kib / 1024);
        report["peak_anon_rss_mib"]["intake_and_open_loop"] = json!(rss.anon_hwm_kib / 1024);
    }

    // 4. End to end: N webhooks from the first sent to the last CDP event at the sink.
    if opts.wants("e2e") {
        let store = store_choice(&opts.store, dir.path(), "e2e");
        let service = start_service(&store, &cdp, &[]);
        service.wait_ready("/health/ready").await;
        let url = format!("http://127.0.0.1:{}/webhooks/ordercloud", service.port);
        let before = sink.events.load(Ordering::Relaxed);
        let cpu_before = service.usage().cpu_secs;
        let pg_before = procfs::PostgresCpu::now();
        let reads_before = ordercloud_reads.now();
        let profiler = Profiler::start(&opts, &service, "e2e");
        let started = Instant::now();
        let (e2e_intake, _) = closed_loop(&url, "e2e", 64, shoppers, Duration::from_secs(3600)).await;
        let intake_done = started.elapsed();
        let done = wait_for_events(&sink, before + shoppers * EVENTS_PER_SHOPPER, Duration::from_secs(1800)).await;
        let e2e = started.elapsed();
        profiler.stop();
        let usage = service.usage();
        let cpu_per_1000 = (usage.cpu_secs - cpu_before) / (shoppers * STEPS as u64) as f64 * 1000.0;
        let pg_per_1000 = pg_before.since() / (shoppers * STEPS as u64) as f64 * 1000.0;
        println!(
            "e2e            {} webhooks: intake {:.1}s, last CDP event {:.1}s ({}), CPU {cpu_per_1000:.3}s/1000 webhooks, peak RSS {} MiB (anonymous {} MiB)",
            shoppers * STEPS as u64,
            intake_done.as_secs_f64(),
            e2e.as_secs_f64(),
            if done { "all events" } else { "INCOMPLETE" },
            usage.hwm_kib / 1024,
            usage.anon_hwm_kib / 1024,
        );
        service.terminate();
        // Counted once the service has stopped: more than `events` would mean the run ended early.
        let received = sink.events.load(Ordering::Relaxed) - before;
        let e2e_reads = ordercloud_reads.since(reads_before);
        report["end_to_end"] = json!({"webhooks": shoppers * STEPS as u64, "events": shoppers * EVENTS_PER_SHOPPER,
            "events_received": received,
            "intake_seconds": intake_done.as_secs_f64(), "last_event_seconds": e2e.as_secs_f64(), "complete": done,
            "intake": e2e_intake, "cpu_seconds_per_1000_webhooks": cpu_per_1000,
            "ordercloud_reads": {"me": e2e_reads.0, "lineitems": e2e_reads.1}});
        if opts.store == "postgres" {
            println!("e2e            PostgreSQL server CPU {pg_per_1000:.3}s/1000 webhooks");
            report["end_to_end"]["postgres_cpu_seconds_per_1000_webhooks"] = json!(pg_per_1000);
        }
        report["peak_rss_mib"]["end_to_end"] = json!(usage.hwm_kib / 1024);
        report["peak_anon_rss_mib"]["end_to_end"] = json!(usage.anon_hwm_kib / 1024);
    }

    // 5. Delivery rate from a backlog: queue with CDP down, then a fresh process drains it.
    if opts.wants("backlog") {
        let store = store_choice(&opts.store, dir.path(), "backlog");
        let backlog_shoppers = shoppers / 2;
        fill_backlog(&store, &sink, &cdp, "backlog", backlog_shoppers, &ordercloud_reads).await;
        let before = sink.events.load(Ordering::Relaxed);
        // The OrderCloud reads the fill left (see `fill_backlog`), made in this phase beside delivery.
        let reads_before = ordercloud_reads.now();
        let pg_before = procfs::PostgresCpu::now();
        let started = Instant::now();
        let service = start_service(&store, &cdp, &[]);
        let profiler = Profiler::start(&opts, &service, "backlog");
        let counted_from = sink.events.load(Ordering::Relaxed);
        let drained = wait_for_events(
            &sink,
            before + backlog_shoppers * EVENTS_PER_SHOPPER,
            Duration::from_secs(1800),
        )
        .await;
        let drain = started.elapsed();
        let pg_cpu = pg_before.since();
        profiler.stop();
        // The events delivered while `--count` counted (it attaches after the service started).
        let counted_events = sink.events.load(Ordering::Relaxed) - counted_from;
        let rate = (sink.events.load(Ordering::Relaxed) - before) as f64 / drain.as_secs_f64();
        println!(
            "backlog        {} events in {:.1}s = {rate:.0} events/s{}",
            backlog_shoppers * EVENTS_PER_SHOPPER,
            drain.as_secs_f64(),
            if drained { "" } else { " (INCOMPLETE)" }
        );
        let usage = service.usage();
        service.terminate();
        let reads = ordercloud_reads.since(reads_before);
        println!(
            "backlog        OrderCloud reads left over from the fill: {} me, {} line items",
            reads.0, reads.1
        );
        let events = (backlog_shoppers * EVENTS_PER_SHOPPER) as f64;
        report["backlog_delivery"] = json!({"events": backlog_shoppers * EVENTS_PER_SHOPPER, "seconds": drain.as_secs_f64(),
            "events_per_s": rate.round(), "complete": drained,
            "cpu_seconds_per_1000_events": (usage.cpu_secs / events * 1000.0 * 1000.0).round() / 1000.0,
            "ordercloud_reads": {"me": reads.0, "lineitems": reads.1}});
        if opts.store == "postgres" {
            let pg = pg_cpu / events * 1000.0;
            println!("backlog        PostgreSQL server CPU {pg:.3}s/1000 events");
            report["backlog_delivery"]["postgres_cpu_seconds_per_1000_events"] = json!((pg * 1000.0).round() / 1000.0);
        }
        if opts.count.is_some() {
            report["backlog_delivery"]["counted_events"] = json!(counted_events);
        }
        report["peak_rss_mib"]["backlog"] = json!(usage.hwm_kib / 1024);
        report["peak_anon_rss_mib"]["backlog"] = json!(usage.anon_hwm_kib / 1024);
    }

    // 6. PostgreSQL only: two replicas on one database beside one, intake alone and delivery from a
    //    backlog (the same shapes as above, the load and the queue shared by the two).
    if opts.store == "postgres" && opts.wants("replicas") {
        sink.refusing.store(true, Ordering::Relaxed);
        let store = store_choice(&opts.store, dir.path(), "replicas-intake");
        let replicas = [start_service(&store, &cdp, &[]), start_service(&store, &cdp, &[])];
        for r in &replicas {
            r.wait_ready("/health/live").await;
            closed_loop(&r.url(), "warm", 8, 100, Duration::from_secs(1)).await;
        }
        let s = measured_round_on(&[&replicas[0], &replicas[1]], "two", Duration::from_secs(secs), true).await;
        println!("2 replicas     intake alone {s}");
        if let Some(c) = best_ceiling {
            report["two_replicas"]["intake_alone_to_best_ceiling"] =
                json!((s["throughput_per_s"].as_f64().unwrap_or(0.0) / c * 100.0).round() / 100.0);
        }
        report["two_replicas"]["intake_alone"] = s;
        for r in replicas {
            r.terminate();
        }
        sink.refusing.store(false, Ordering::Relaxed);

        let store = store_choice(&opts.store, dir.path(), "replicas-backlog");
        let backlog_shoppers = shoppers / 2;
        fill_backlog(&store, &sink, &cdp, "backlog2", backlog_shoppers, &ordercloud_reads).await;
        let before = sink.events.load(Ordering::Relaxed);
        let pg_before = procfs::PostgresCpu::now();
        let started = Instant::now();
        let replicas = [start_service(&store, &cdp, &[]), start_service(&store, &cdp, &[])];
        let drained = wait_for_events(
            &sink,
            before + backlog_shoppers * EVENTS_PER_SHOPPER,
            Duration::from_secs(1800),
        )
        .await;
        let drain = started.elapsed();
        let events = (sink.events.load(Ordering::Relaxed) - before) as f64;
        let rate = events / drain.as_secs_f64();
        let cpu: f64 = replicas.iter().map(|r| r.usage().cpu_secs).sum();
        let pg = pg_before.since();
        println!(
            "2 replicas     backlog {events} events in {:.1}s = {rate:.0} events/s{}, replicas CPU {:.3}s/1000 events, PostgreSQL {:.3}s/1000 events",
            drain.as_secs_f64(),
            if drained { "" } else { " (INCOMPLETE)" },
            cpu / events * 1000.0,
            pg / events * 1000.0,
        );
        for r in replicas {
            r.terminate();
        }
        report["two_replicas"]["backlog_delivery"] = json!({"events": events, "seconds": drain.as_secs_f64(),
            "events_per_s": rate.round(), "complete": drained,
            "cpu_seconds_per_1000_events": (cpu / events * 1000.0 * 1000.0).round() / 1000.0,
            "postgres_cpu_seconds_per_1000_events": (pg / events * 1000.0 * 1000.0).round() / 1000.0});
    }

    if opts.only.is_some() {
        println!(
            "partial run (--only): report not written\n{}",
            serde_json::to_string_pretty(&report).unwrap()
        );
        return;
    }
    let path = opts.out.join(format!("{}.json", opts.store));
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some("ceiling") {
        let port = args.get(2).and_then(|p| p.parse().ok()).expect("ceiling PORT");
        runtime.block_on(run_ceiling(port));
        return;
    }
    // `cargo test --benches`/`cargo bench` with a filter must not start a long run by accident.
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return;
    }
    runtime.block_on(bench(options()));
}
