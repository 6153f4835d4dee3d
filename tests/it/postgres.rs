//! PostgreSQL across replicas: two service instances on one database, and a database that goes
//! away and comes back. These need a real server (`TEST_DATABASE_URL`) and say so when they skip.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::fakes::cdp::{Answer, CdpFake};
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;
use crate::world::*;

/// The settings of a replica on the shared schema.
fn replica(url: &str, schema: &str, oc: &OrderCloudFake, cdp: &CdpFake) -> ordercloud_cdp_forwarder::config::Settings {
    let dir = std::env::temp_dir();
    let mut s = test_settings(&dir);
    world_settings(&mut s, oc, cdp);
    s.store.url = url.to_string();
    s.store.schema = Some(schema.to_string());
    s
}

#[tokio::test]
async fn two_replicas_on_one_database_deliver_every_intent_once_in_per_shopper_order() {
    let Some(url) = postgres_url("two_replicas_on_one_database") else {
        return;
    };
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    // Some failures so that retries interleave across replicas.
    cdp.script_all(
        (0..20)
            .map(|i| Answer::status(if i % 2 == 0 { 503 } else { 201 }))
            .collect(),
    );
    let schema = fresh_schema();
    let apps = [
        spawn_app_in(tempfile::tempdir().unwrap(), replica(&url, &schema, &oc, &cdp)).await,
        spawn_app_in(tempfile::tempdir().unwrap(), replica(&url, &schema, &oc, &cdp)).await,
    ];
    let apps = Arc::new(apps);
    let shoppers = 16;
    let mut tasks = Vec::new();
    for s in 0..shoppers {
        let (apps, oc_url) = (apps.clone(), oc.base_url());
        let order = format!("R-{s}");
        let token = anon_token(&order, WEB_CLIENT, &oc_url);
        oc.register_anon_token(&token, &order);
        let lines: Vec<Value> = (0..3)
            .map(|i| line_item(&format!("L{i}"), &format!("P{i}"), i + 1, 2.0))
            .collect();
        oc.set_cart(&token, json!({"ID": order, "Currency": "USD"}), lines.clone());
        tasks.push(tokio::spawn(async move {
            // Each shopper's webhooks go to the replicas in turn, one after the other.
            for (i, line) in lines.iter().enumerate() {
                apps[i % 2].deliver(&line_created(&order, &token, line)).await;
            }
            let submit = envelope(
                "POST",
                "v1/orders/{direction}/{orderID}/submit",
                json!({"direction": "Outgoing", "orderID": order}),
                Some(&token),
                Value::Null,
                json!({"ID": order, "Currency": "USD", "Total": 12.0}),
            );
            apps[1].deliver(&submit).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for s in 0..shoppers {
        let reference = format!("R-{s}");
        eventually(&reference, Duration::from_secs(30), || async {
            cdp.orders().into_iter().find(|o| o.reference_id == reference)
        })
        .await;
    }
    let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
    for r in cdp.requests().into_iter().filter(|r| r.answered < 300) {
        let key = match r.event_type.as_str() {
            "ADD" => format!("ADD {}", r.event["product"]["item_id"].as_str().unwrap()),
            other => other.to_string(),
        };
        accepted.entry(r.shopper.clone().unwrap()).or_default().push(key);
    }
    let expected = ["IDENTITY", "ADD P0", "ADD P1", "ADD P2", "CONFIRM", "CHECKOUT"];
    for s in 0..shoppers {
        assert_eq!(
            accepted[&format!("anon-R-{s}")],
            expected,
            "shopper {s}: in order, none twice"
        );
    }
    assert_eq!(cdp.orders().len(), shoppers);
    eventually("both replicas to finish", Duration::from_secs(10), || async {
        apps[0].store.pending(1).await.unwrap().is_empty().then_some(())
    })
    .await;
}

/// Two replicas on one database, one killed (SIGKILL) while it holds claims on CDP requests that
/// hang: the other takes its shoppers over once it has missed its heartbeats for
/// `delivery.takeover_secs` — long before the minute-long leases run out — and resumes each at its
/// CHECKOUT. One order per shopper, one CHECKOUT accepted each.
#[tokio::test]
async fn a_replica_killed_while_holding_claims_is_taken_over_by_the_other() {
    let Some(url) = postgres_url("a_replica_killed_while_holding_claims") else {
        return;
    };
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    let shoppers = 8;
    for i in 0..shoppers {
        let ok = Answer::status(201);
        cdp.script(
            &format!("anon-TAKE-{i}"),
            vec![ok.clone(), ok.clone(), ok, Answer::hang()],
        );
    }
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let mut env = binary_env(dir.path(), &oc, &cdp);
    env.retain(|(k, _)| !k.starts_with("FORWARDER__STORE__"));
    env.extend([
        ("FORWARDER__STORE__URL", url.clone()),
        ("FORWARDER__STORE__SCHEMA", schema.clone()),
        ("FORWARDER__DELIVERY__TAKEOVER_SECS", "4".to_string()),
    ]);
    let doomed = Binary::start(dir.path(), &env).await;
    post_orders(&doomed, &oc, "TAKE", shoppers).await;
    eventually(
        "every CHECKOUT to hang on the doomed replica",
        Duration::from_secs(20),
        || async {
            let hung = cdp
                .requests()
                .into_iter()
                .filter(|r| r.event_type == "CHECKOUT" && r.answered == 0)
                .count();
            (hung == shoppers).then_some(())
        },
    )
    .await;
    doomed.kill();
    let mut survivor_settings = replica(&url, &schema, &oc, &cdp);
    survivor_settings.delivery.takeover_secs = 4;
    let _survivor = spawn_app_in(tempfile::tempdir().unwrap(), survivor_settings).await;
    eventually(
        "the survivor to finish every order",
        Duration::from_secs(4 + 8),
        || async { (cdp.orders().len() >= shoppers).then_some(()) },
    )
    .await;
    for i in 0..shoppers {
        let shopper = format!("anon-TAKE-{i}");
        let accepted: Vec<String> = cdp
            .requests()
            .into_iter()
            .filter(|r| r.shopper.as_deref() == Some(&shopper) && (200..300).contains(&r.answered))
            .map(|r| r.event_type)
            .collect();
        assert_eq!(accepted, ["IDENTITY", "ADD", "CONFIRM", "CHECKOUT"], "{shopper}");
    }
    assert_eq!(cdp.orders().len(), shoppers, "one order each");
}

/// A TCP proxy in front of PostgreSQL that can be cut (every connection dropped, new ones refused)
/// and restored: the database "unreachable for a while", without touching the real server.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy in front of the server of `url`, and the URL that reaches the server through it.
    async fn in_front_of(url: &str) -> (Proxy, String) {
        let mut parsed = url::Url::parse(url).unwrap();
        let upstream = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap_or(5432));
        let proxy = Proxy::start(upstream).await;
        parsed.set_host(Some("127.0.0.1")).unwrap();
        parsed.set_port(Some(proxy.addr.port())).unwrap();
        (proxy, parsed.to_string())
    }

    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, conns) = (cut.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the database is unreachable
                }
                let upstream = upstream.clone();
                conns.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Proxy {
            addr,
            cut,
            connections,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test]
async fn database_unreachable_then_back_no_200_without_commit_and_delivery_resumes() {
    let Some(url) = postgres_url("database_unreachable_then_back") else {
        return;
    };
    let (proxy, proxied) = Proxy::in_front_of(&url).await;

    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.store.url = proxied.clone();
        s.store.schema = Some(fresh_schema());
        s.store.connect_timeout_ms = 500;
        s.store.statement_timeout_ms = 2_000;
    })
    .await;
    // CDP fails at first, so intents are still queued when the database goes away.
    world.cdp.script_all((0..5).map(|_| Answer::status(503)).collect());
    let mut shopper = world.anonymous("DB-OUTAGE", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;

    proxy.cut();
    let line = line_item("L2", "OTHER", 1, 5.0);
    let during = line_created("DB-OUTAGE", &shopper.token, &line);
    let body = serde_json::to_vec(&during).unwrap();
    for _ in 0..3 {
        let status = world.app.post_signed(&body, KEY).await.status();
        assert_eq!(status, 503, "no 200 without a commit");
    }
    let ready = world.app.get("/health/ready").await;
    assert_eq!(ready.status(), 503);

    proxy.restore();
    // OrderCloud (or the operator) retries the refused webhook; delivery picks up by itself.
    eventually("the store to accept writes again", Duration::from_secs(20), || async {
        (world.app.post_signed(&body, KEY).await.status() == 200).then_some(())
    })
    .await;
    shopper.lines.push(line);
    world.oc.set_lines("DB-OUTAGE", shopper.lines.clone());
    let revenue = shopper.submit().await;
    let order = world.order("DB-OUTAGE").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.lines.len(), 2);
    let ready = world.app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);
}

/// The database drops every connection the pool holds (a restart, a failover, an operator's
/// `pg_terminate_backend`) and is back at once: the next webhooks are answered 200 at the first try
/// (OrderCloud does not send a refused one again), although the pool only tests a connection idle
/// for a second before it hands it out, and the shopper's order lands once.
#[tokio::test]
async fn webhooks_after_the_database_dropped_the_pools_connections_are_taken_at_the_first_try() {
    let Some(url) = postgres_url("webhooks_after_the_database_dropped_the_pools_connections") else {
        return;
    };
    let (proxy, proxied) = Proxy::in_front_of(&url).await;

    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.store.url = proxied.clone();
        s.store.schema = Some(fresh_schema());
        s.store.max_connections = 4;
    })
    .await;
    let mut shopper = world.anonymous("DB-RESTART", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;
    world.drained().await;

    for round in 0..3 {
        proxy.cut();
        proxy.restore();
        let line = line_item(&format!("L{}", round + 2), &format!("SKU{round}"), 1, 5.0);
        let webhook = line_created("DB-RESTART", &shopper.token, &line);
        let status = world
            .app
            .post_signed(&serde_json::to_vec(&webhook).unwrap(), KEY)
            .await
            .status();
        assert_eq!(
            status, 200,
            "round {round}: a webhook refused for a connection the database had dropped"
        );
        shopper.lines.push(line);
    }
    world.oc.set_lines("DB-RESTART", shopper.lines.clone());
    let revenue = shopper.submit().await;
    let order = world.order("DB-RESTART").await;
    assert_eq!(order.revenue, revenue);
    assert_eq!(order.lines.len(), 4);
    assert_eq!(world.cdp.orders().len(), 1, "one order");
}

/// A database that requires TLS (managed PostgreSQL does, by default) is reached over TLS with
/// `sslmode=require` in `store.url`: the service's connections are encrypted. Skipped where the
/// server has TLS off.
#[tokio::test]
async fn a_database_that_requires_tls_is_reached_over_tls() {
    let Some(url) = postgres_url("a_database_that_requires_tls") else {
        return;
    };
    use sqlx::Connection as _;
    let mut plain = sqlx::PgConnection::connect(&url).await.unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&mut plain).await.unwrap();
    if ssl != "on" {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED a_database_that_requires_tls: the server has ssl = off"
        );
        return;
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    let tls_url = format!("{url}{sep}sslmode=require&application_name=forwarder-tls-test");
    let settings = ordercloud_cdp_forwarder::config::StoreSettings {
        url: tls_url.clone(),
        schema: Some(fresh_schema()),
        ..Default::default()
    };
    let store = ordercloud_cdp_forwarder::store::open(&settings, ordercloud_cdp_forwarder::store::Role::Tool)
        .await
        .expect("the store opens over TLS");
    store.ping().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&tls_url).await.unwrap();
    let encrypted: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(encrypted);
    store.close().await;
}

/// CDP's answer to an event it refuses carries a text PostgreSQL cannot store (U+0000 in
/// `error_msg`): the intent still becomes a dead letter that says why, instead of being sent again
/// and again because its settling is refused.
#[tokio::test]
async fn a_refusal_whose_text_postgresql_cannot_store_still_ends_in_a_dead_letter() {
    let Some(url) = postgres_url("a_refusal_whose_text_postgresql_cannot_store") else {
        return;
    };
    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.store.url = url.clone();
        s.store.schema = Some(fresh_schema());
    })
    .await;
    world.cdp.script_all(vec![
        Answer::status(400).with_body(json!({"error_msg": "bad\u{0}value"}))
    ]);
    let mut shopper = world.anonymous("NUL-ERROR", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 10.0).await;
    let dead = world.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(reason.contains("bad") && reason.contains("value"), "{reason}");
    assert_eq!(world.cdp.requests().len(), 1, "the refused event was sent once");
}

/// A signed submit whose order ID cannot key its dedupe (U+0000 in the route's `orderID`:
/// PostgreSQL cannot store it) is refused with 400, and the shoppers' webhooks that arrived with it
/// are taken.
#[tokio::test]
async fn a_webhook_whose_ids_cannot_be_keys_is_refused_and_those_beside_it_are_taken() {
    let Some(url) = postgres_url("a_webhook_whose_ids_cannot_be_keys") else {
        return;
    };
    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.store.url = url.clone();
        s.store.schema = Some(fresh_schema());
    })
    .await;
    let oc_url = world.oc.base_url();
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let order = format!("KEY-{i}");
        let token = anon_token(&order, WEB_CLIENT, &oc_url);
        let webhook = if i == 20 {
            let params = json!({"direction": "Outgoing", "orderID": "BAD\u{0}ORDER"});
            let submitted = json!({"ID": "BAD\u{0}ORDER", "Total": 1.0});
            envelope(
                "POST",
                "v1/orders/{direction}/{orderID}/submit",
                params,
                Some(&token),
                Value::Null,
                submitted,
            )
        } else {
            line_created(&order, &token, &line_item("L1", "SKU", 1, 1.0))
        };
        let body = serde_json::to_vec(&webhook).unwrap();
        let (client, url) = (world.app.client.clone(), world.app.url("/webhooks/ordercloud"));
        posts.spawn(async move {
            let status = client
                .post(url)
                .header("content-type", "application/json")
                .header(
                    "X-oc-hash",
                    ordercloud_cdp_forwarder::ordercloud::signature::sign(KEY.as_bytes(), &body),
                )
                .body(body)
                .send()
                .await
                .unwrap()
                .status();
            (i, status.as_u16())
        });
    }
    while let Some(joined) = posts.join_next().await {
        let (i, status) = joined.unwrap();
        assert_eq!(status, if i == 20 { 400 } else { 200 }, "webhook {i}");
    }
}

/// Plans are kept where a statement can only find its rows by key: intake's batch (migration 0007:
/// its statements insert the rows they are given), delivery's apply (migration 0008), the apply of a
/// CONFIRM's or a CHECKOUT's progress with its landing check (migration 0009), delivery's first reads,
/// an enrichment's save and the claim, its walk of the queue included (migration 0010: planned at
/// every call, they spent as long planning as running, BENCHMARKS.md session 19; the walk can be kept
/// since the index its probes misused is gone). Whether the kept plans hold on a deep queue is the
/// next test's.
/// And the intent's text is compressed with lz4 where the server has it.
#[tokio::test]
async fn plans_are_kept_where_they_find_rows_by_key_and_intents_are_compressed_with_lz4() {
    let Some(url) = postgres_url("plans_are_kept_where_they_find_rows_by_key") else {
        return;
    };
    let schema = migrated_schema(&url).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let settings: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT p.proname::text, COALESCE(p.proconfig, '{}') FROM pg_proc p \
         JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname LIKE 'forwarder\\_%' ORDER BY p.proname",
    )
    .bind(&schema)
    .fetch_all(&pool)
    .await
    .unwrap();
    let kept: Vec<&str> = settings
        .iter()
        .filter(|(_, config)| config.iter().any(|c| c == "plan_cache_mode=force_generic_plan"))
        .map(|(function, _)| function.as_str())
        .collect();
    assert_eq!(
        kept,
        [
            "forwarder_apply",
            "forwarder_apply_durable",
            "forwarder_claim",
            "forwarder_delivery_reads",
            "forwarder_delivery_reads_batch",
            "forwarder_enqueue",
            "forwarder_save_enrichment"
        ],
        "{settings:?}"
    );
    let lz4: bool =
        sqlx::query_scalar("SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")
            .fetch_one(&pool)
            .await
            .unwrap();
    if lz4 {
        let compression: String = sqlx::query_scalar(
            "SELECT a.attcompression::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = 'intents' AND a.attname = 'intent'",
        )
        .bind(&schema)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(compression, "l", "intents.intent is compressed with lz4");
    }
}

/// PostgreSQL: the plans delivery and enrichment keep are made on a connection's first call, when the
/// queue may be empty, and stay lookups by key (or the walk of the one index that serves it) on a
/// deep queue. A claim, an apply and an enrichment's save on a queue of 40,000 intents behind 20,000
/// dead letters, and delivery's first reads among 20,000 shoppers, sessions and carts, by a
/// connection that planned each on an empty queue (the statistics knowing nothing, then knowing
/// the tables empty) and on a queue of one, read a few pages, not an index whole (as the kept plans
/// of sessions 10 and 13 did: a scan of `intents_queue` per call; and, before migration 0010 replaced
/// `intents_pending_id`, the claim's walk kept and its UPDATE planned on statistics of an empty
/// queue: a scan of every pending intent's id per shopper probed, session 19).
#[tokio::test]
async fn plans_kept_on_an_empty_queue_read_a_deep_queue_by_key() {
    let Some(url) = postgres_url("plans_kept_on_an_empty_queue") else {
        return;
    };
    // Each state of the statistics makes other plans: none (a new database, or autovacuum not yet
    // come), tables analyzed empty (autovacuum's work on a drained queue), and a queue analyzed
    // while it held one shopper's intents (the probes' shopper then looks like every row's).
    for analyzed in [Analyzed::Never, Analyzed::Empty, Analyzed::OneShopper] {
        plans_made_on_an_empty_queue_hold_on_a_deep_one(&url, analyzed).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Analyzed {
    Never,
    Empty,
    OneShopper,
}

async fn plans_made_on_an_empty_queue_hold_on_a_deep_one(url: &str, analyzed: Analyzed) {
    // A connection set up as the service's are.
    let (schema, mut conn) = migrated_connection(url, "SET plan_cache_mode = force_custom_plan").await;
    let insert_as = |state: &str, enriched: bool, first: i64, count: i64| {
        format!(
            "INSERT INTO intents (id, dedupe_key, shopper_key, kind, intent, enriched, state, next_attempt_at, \
             created_at, updated_at, dead_at, enrich_claim) SELECT g, 'k' || g, 's' || g, 'x', '{{}}', {enriched}, \
             '{state}', 0, g, g, 0, 'e' || g FROM generate_series({first}, {}) g",
            first + count - 1
        )
    };
    let insert = |first: i64, count: i64| insert_as("pending", true, first, count);
    // An enrichment's save of intent `id` (its claim is `e<id>`).
    let save = |id: i64| format!("SELECT forwarder_save_enrichment({id}, 'e{id}', '{{}}', 0, '{{z{id}}}', '{{i}}')");
    // Delivery's first reads of shopper, order and browser `n`, and their tables' rows for `n` in
    // `first..first + count`.
    let reads = |n: i64| {
        format!(
            "SELECT state FROM forwarder_delivery_reads_batch(ARRAY['s{n}'], ARRAY['o{n}'], ARRAY['web'], \
             ARRAY[0::BIGINT])"
        )
    };
    // The same of one intent alone (replicas of the release before; a batch holding a damaged record).
    let reads_alone = |n: i64| format!("SELECT state FROM forwarder_delivery_reads('s{n}', 'o{n}', 'web', 0)");
    let shoppers_sessions_carts = |first: i64, count: i64| {
        let last = first + count - 1;
        format!(
            "INSERT INTO shoppers (shopper_key, state, updated_at) \
               SELECT 's' || g, '{{\"browsers\": {{\"web\": \"b' || g || '\"}}}}', 0 FROM generate_series({first}, {last}) g; \
             INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts) \
               SELECT 'web', 'b' || g, 's' || g, 1, '{{}}' FROM generate_series({first}, {last}) g; \
             INSERT INTO cart_lines (order_id, line_id, shopper_key, line, updated_at) \
               SELECT 'o' || g, 'l' || g, 's' || g, '{{}}', 0 FROM generate_series({first}, {last}) g"
        )
    };
    let claim =
        |claim: &str| format!("SELECT id FROM forwarder_claim('{claim}', NULL, 600000, forwarder_now_ms(), 1, 10000)");
    let ack = |id: i64, claim: &str| {
        format!(
            "SELECT forwarder_apply({id}, '{claim}', 0, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
             NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'ack', NULL, NULL)"
        )
    };
    if sqlx::query_scalar::<_, i32>("SELECT current_setting('server_version_num')::INT")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        < 150_000
    {
        eprintln!("SKIPPED plans_kept_on_an_empty_queue: pg_stat_force_next_flush needs PostgreSQL 15");
        return;
    }
    // No ANALYZE behind the test's back: it would have the plans made again.
    sqlx::raw_sql(
        "ALTER TABLE intents SET (autovacuum_enabled = off); \
         ALTER TABLE shoppers SET (autovacuum_enabled = off); \
         ALTER TABLE cdp_sessions SET (autovacuum_enabled = off); \
         ALTER TABLE cart_lines SET (autovacuum_enabled = off)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // Planned on an empty queue and empty tables first, as a replica's first calls are (its claims
    // poll an empty queue: a walk planned then and kept scanned a deep queue once per shopper it
    // passed, half a second a claim, BENCHMARKS.md session 19), then on a queue of one intent.
    let analyze = "ANALYZE intents, shoppers, cdp_sessions, cart_lines";
    match analyzed {
        Analyzed::Never => {}
        Analyzed::Empty => sqlx::raw_sql(analyze).execute(&mut conn).await.map(drop).unwrap(),
        Analyzed::OneShopper => sqlx::raw_sql(&format!(
            "INSERT INTO intents (id, dedupe_key, shopper_key, kind, intent, enriched, state, next_attempt_at, \
             created_at, updated_at) SELECT g, 'solo' || g, 'solo', 'x', '{{}}', true, 'pending', 0, g, g \
             FROM generate_series(1000001, 1000200) g; {analyze}; DELETE FROM intents"
        ))
        .execute(&mut conn)
        .await
        .map(drop)
        .unwrap(),
    }
    let none: Vec<i64> = sqlx::query_scalar(&claim("c0")).fetch_all(&mut conn).await.unwrap();
    assert!(none.is_empty());
    let saved: bool = sqlx::query_scalar(&save(1)).fetch_one(&mut conn).await.unwrap();
    assert!(!saved);
    for reads in [reads(1), reads_alone(1)] {
        let state: Option<String> = sqlx::query_scalar(&reads).fetch_one(&mut conn).await.unwrap();
        assert!(state.is_none());
    }
    sqlx::raw_sql(&insert(1, 1)).execute(&mut conn).await.unwrap();
    let first: i64 = sqlx::query_scalar(&claim("c1")).fetch_one(&mut conn).await.unwrap();
    let acked: bool = sqlx::query_scalar(&ack(first, "c1"))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(acked);
    sqlx::raw_sql(&format!(
        "{}; {}",
        insert_as("pending", false, 2, 1),
        shoppers_sessions_carts(1, 1)
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let saved: bool = sqlx::query_scalar(&save(2)).fetch_one(&mut conn).await.unwrap();
    assert!(saved);
    for reads in [reads(1), reads_alone(1)] {
        let state: Option<String> = sqlx::query_scalar(&reads).fetch_one(&mut conn).await.unwrap();
        assert!(state.is_some());
    }
    sqlx::raw_sql("DELETE FROM intents").execute(&mut conn).await.unwrap();
    // Run on a queue of 40,000 (and 20,000 dead letters), before the statistics know it (an ANALYZE would have the plans made
    // again: autovacuum's come a minute apart at best, while a backlog fills in seconds).
    // 20,000 dead letters of other shoppers first: the claimed intent's probe for older intents of
    // its shopper is then a lookup in the shopper's queue, or a read of 20,000 older ids.
    // And 20,000 intents to enrich after them, 20,000 shoppers, sessions and carts.
    sqlx::raw_sql(&format!(
        "{}; {}; {}; {}",
        insert_as("dead", true, 2, 20_000),
        insert(20_002, 20_000),
        insert_as("pending", false, 40_002, 20_000),
        shoppers_sessions_carts(2, 20_000)
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let before = pages_read(&mut conn, &schema, "intents").await;
    let id: i64 = sqlx::query_scalar(&claim("c2")).fetch_one(&mut conn).await.unwrap();
    let acked: bool = sqlx::query_scalar(&ack(id, "c2")).fetch_one(&mut conn).await.unwrap();
    assert!(acked);
    let saved: bool = sqlx::query_scalar(&save(50_000)).fetch_one(&mut conn).await.unwrap();
    assert!(saved);
    let read = pages_read(&mut conn, &schema, "intents").await - before;
    // By key: about 45 pages of the table and its indexes (the walk's few probes, the lookups); the
    // plans sessions 10 and 13 kept read the queue's index, about 280, and a claim planned on the
    // empty queue with `intents_pending_id` there (session 19) about 1,000.
    assert!(
        read < 100,
        "a claim, an ack and a save read {read} pages of a 60,000-intent table (statistics: {analyzed:?})"
    );
    for table in ["shoppers", "cdp_sessions", "cart_lines"] {
        let before = pages_read(&mut conn, &schema, table).await;
        for reads in [reads(10_000), reads_alone(10_001)] {
            let state: Option<String> = sqlx::query_scalar(&reads).fetch_one(&mut conn).await.unwrap();
            assert!(state.is_some());
        }
        let read = pages_read(&mut conn, &schema, table).await - before;
        // Two lookups by key: each two or three pages of an index and one of the table.
        assert!(
            read < 20,
            "delivery's reads read {read} pages of {table} (20,000 rows; statistics: {analyzed:?})"
        );
    }
}

/// PostgreSQL: delivery's first reads asked while a call of them runs go together in the next
/// call — one round trip for the intents in flight together, not one each — and each caller gets
/// its own answer, the one its reads apart give (shopper, cart lines in order, the browser's session,
/// a submit's open sessions; an unknown shopper, an ask made twice). A shopper's record damaged
/// outside the service fails that caller alone: the others of its batch read theirs alone. The first
/// call waits behind a lock the test holds; 31 reads are asked meanwhile. The calls are counted by
/// wrappers of the two functions that record each call's asks.
#[tokio::test]
async fn delivery_reads_asked_while_one_runs_are_one_call() {
    use ordercloud_cdp_forwarder::store::{DeliveryReads, DynStore, StoreError};
    use sqlx::Connection as _;
    let Some(url) = postgres_url("delivery_reads_asked_while_one_runs") else {
        return;
    };
    let columns = "n BIGINT, state TEXT, identity TEXT, facts TEXT, line_ids TEXT[], line_shoppers TEXT[], \
                   lines TEXT[], line_times BIGINT[], open_sessions TEXT[]";
    let single_columns = columns.trim_start_matches("n BIGINT, ");
    let facts = |channel: &str, browser: &str, at: &str| {
        format!(
            "'{{\"channel\": \"{channel}\", \"browser_id\": \"' || {browser} || '\", \"shopper_key\": \"s' || g || \
             '\", \"last_event_at_ms\": ' || {at} || ', \"identified_as\": null}}'"
        )
    };
    // Shopper `s<g>`: browser `b<g>` on WEB (its session's last event at `g`) and an APP session at
    // 0; cart `o<g>`: lines L1 (at 7) and L2 (at 5).
    let (schema, mut conn) = migrated_connection(
        &url,
        &format!(
            "CREATE TABLE read_calls (id SERIAL PRIMARY KEY, asks INT); \
             ALTER FUNCTION forwarder_delivery_reads_batch(TEXT[], TEXT[], TEXT[], BIGINT[]) RENAME TO real_batch; \
             CREATE FUNCTION forwarder_delivery_reads_batch(p_s TEXT[], p_o TEXT[], p_c TEXT[], p_since BIGINT[]) \
               RETURNS TABLE ({columns}) LANGUAGE plpgsql AS $$ BEGIN \
               INSERT INTO read_calls (asks) VALUES (cardinality(p_s)); \
               RETURN QUERY SELECT * FROM real_batch(p_s, p_o, p_c, p_since); END $$; \
             ALTER FUNCTION forwarder_delivery_reads(TEXT, TEXT, TEXT, BIGINT) RENAME TO real_single; \
             CREATE FUNCTION forwarder_delivery_reads(p_s TEXT, p_o TEXT, p_c TEXT, p_since BIGINT) \
               RETURNS TABLE ({single_columns}) LANGUAGE plpgsql AS $$ BEGIN \
               INSERT INTO read_calls (asks) VALUES (1); \
               RETURN QUERY SELECT * FROM real_single(p_s, p_o, p_c, p_since); END $$; \
             INSERT INTO shoppers (shopper_key, state, identity, updated_at) \
               SELECT 's' || g, '{{\"browsers\": {{\"WEB\": \"b' || g || '\"}}}}', 'id-' || g, 0 \
               FROM generate_series(0, 31) g; \
             INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts) \
               SELECT 'WEB', 'b' || g, 's' || g, g, {} FROM generate_series(0, 31) g; \
             INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts) \
               SELECT 'APP', 'a' || g, 's' || g, 0, {} FROM generate_series(0, 31) g; \
             INSERT INTO cart_lines (order_id, line_id, shopper_key, line, updated_at) \
               SELECT 'o' || g, l, 's' || g, '{{\"ID\": \"' || l || '\"}}', t \
               FROM generate_series(0, 31) g, (VALUES ('L1', 7), ('L2', 5)) AS x (l, t)",
            facts("WEB", "'b' || g", "g"),
            facts("APP", "'a' || g", "0"),
        ),
    )
    .await;
    let settings = ordercloud_cdp_forwarder::config::StoreSettings {
        url: url.clone(),
        schema: Some(schema.clone()),
        ..Default::default()
    };
    let store = ordercloud_cdp_forwarder::store::open(
        &settings,
        ordercloud_cdp_forwarder::store::Role::Service {
            takeover: Duration::from_secs(10),
        },
    )
    .await
    .unwrap();
    // Ask i: shopper s<i> (ask 7 an unknown shopper, ask 8 the same as ask 5), a submit's open
    // sessions on the odd ones.
    type Ask = (String, String, Option<i64>);
    let ask = |i: usize| -> Ask {
        let n = match i {
            7 => "nobody".to_string(),
            8 => "5".to_string(),
            i => i.to_string(),
        };
        let since = if i % 2 == 1 || i == 8 { Some(0) } else { None };
        (format!("s{n}"), format!("o{n}"), since)
    };
    let asks: Vec<Ask> = (0..32).map(ask).collect();
    async fn read(store: &DynStore, (shopper, order, since): &Ask) -> Result<DeliveryReads, StoreError> {
        store.delivery_reads(shopper, order, "WEB", *since).await
    }
    // The first ask waits behind the lock; the others are asked meanwhile. Returns every answer.
    async fn behind_lock(
        store: &DynStore,
        url: &str,
        schema: &str,
        conn: &mut sqlx::PgConnection,
        asks: &[Ask],
    ) -> Vec<Result<DeliveryReads, StoreError>> {
        let mut lock = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(&format!(
            "SET search_path TO \"{schema}\"; BEGIN; LOCK TABLE shoppers IN ACCESS EXCLUSIVE MODE"
        ))
        .execute(&mut lock)
        .await
        .unwrap();
        let first = tokio::spawn({
            let (store, ask) = (store.clone(), asks[0].clone());
            async move { read(&store, &ask).await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = 'shoppers'::regclass",
            )
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the first read never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut others = Box::pin(futures_util::future::join_all(asks[1..].iter().map(|a| read(store, a))));
        // One poll asks them all.
        assert!(tokio::time::timeout(Duration::ZERO, &mut others).await.is_err());
        sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();
        lock.close().await.unwrap();
        let mut answers = vec![first.await.unwrap()];
        answers.extend(others.await);
        answers
    }
    async fn calls(conn: &mut sqlx::PgConnection) -> Vec<i32> {
        let calls = sqlx::query_scalar("SELECT asks FROM read_calls ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        sqlx::raw_sql("DELETE FROM read_calls")
            .execute(&mut *conn)
            .await
            .unwrap();
        calls
    }

    let answers = behind_lock(&store, &url, &schema, &mut conn, &asks).await;
    assert_eq!(calls(&mut conn).await, [1, 31], "the asks of each call");
    for (a, answer) in asks.iter().zip(answers) {
        let apart = DeliveryReads::read_apart(&*store, &a.0, &a.1, "WEB", a.2)
            .await
            .unwrap();
        assert_eq!(answer.unwrap(), apart, "{a:?}");
    }
    // What the reads apart answer, for one: each caller got its own.
    let one = read(&store, &asks[9]).await.unwrap();
    assert_eq!(one.shopper.and_then(|s| s.identity), Some("id-9".to_string()));
    let lines: Vec<&str> = one.cart.iter().map(|l| l.line_id.as_str()).collect();
    assert_eq!(lines, ["L2", "L1"]);
    assert_eq!(one.session.map(|s| s.last_event_at_ms), Some(9));
    let open: Vec<&str> = one.open_sessions.iter().map(|s| s.channel.as_str()).collect();
    assert_eq!(open, ["APP", "WEB"]);
    calls(&mut conn).await;

    // s3's record damaged behind the store's back: its caller fails as its reads apart do; the
    // others of its batch read theirs alone and get their answers.
    sqlx::raw_sql("UPDATE shoppers SET state = 'not json' WHERE shopper_key = 's3'")
        .execute(&mut conn)
        .await
        .unwrap();
    let answers = behind_lock(&store, &url, &schema, &mut conn, &asks).await;
    let calls = calls(&mut conn).await;
    // The first ask's call, then the batch's asks each alone; the calls that failed (the batch's,
    // and s3's alone) took their records with them.
    assert_eq!(calls, [1; 31], "{calls:?}");
    for (a, answer) in asks.iter().zip(answers) {
        let apart = DeliveryReads::read_apart(&*store, &a.0, &a.1, "WEB", a.2).await;
        if a.0 == "s3" {
            assert!(answer.is_err() && apart.is_err(), "{answer:?}");
        } else {
            assert_eq!(answer.unwrap(), apart.unwrap(), "{a:?}");
        }
    }
    store.close().await;
    conn.close().await.unwrap();
}

/// Pages of `table` and its indexes read so far in `schema`, from the cache or the disk (this
/// connection's counts flushed first). Pages, not entries: a scan that filters inside the index
/// returns few entries however many it reads.
async fn pages_read(conn: &mut sqlx::PgConnection, schema: &str, table: &str) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar(
        "SELECT (heap_blks_read + heap_blks_hit + COALESCE(idx_blks_read + idx_blks_hit, 0))::BIGINT \
         FROM pg_statio_user_tables WHERE schemaname = $1 AND relname = $2",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// A fresh schema, migrated as an operator's command opens the store: nothing else is needed.
/// A connection to a freshly migrated schema, its search path set, after running `sql` there.
async fn migrated_connection(url: &str, sql: &str) -> (String, sqlx::PgConnection) {
    use sqlx::Connection as _;
    let schema = migrated_schema(url).await;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(&format!("SET search_path TO \"{schema}\"; {sql}"))
        .execute(&mut conn)
        .await
        .unwrap();
    (schema, conn)
}

async fn migrated_schema(url: &str) -> String {
    let schema = fresh_schema();
    let store_settings = ordercloud_cdp_forwarder::config::StoreSettings {
        url: url.to_string(),
        schema: Some(schema.clone()),
        ..Default::default()
    };
    ordercloud_cdp_forwarder::store::open(&store_settings, ordercloud_cdp_forwarder::store::Role::Tool)
        .await
        .unwrap()
        .close()
        .await;
    schema
}

/// The progress of a CONFIRM or a CHECKOUT, with its order's landing check, is one call
/// (`forwarder_apply_durable`, migration 0009) whose commit waits for the WAL's flush, where other
/// progress does not wait (sent twice, a CONFIRM or CHECKOUT could make a second order); a stale
/// claim writes no check.
#[tokio::test]
async fn a_confirms_or_checkouts_progress_and_landing_check_are_one_call_that_waits_for_the_disk() {
    use sqlx::Connection as _;
    let Some(url) = postgres_url("durable_apply_in_one_call") else {
        return;
    };
    let (_, mut conn) = migrated_connection(
        &url,
        "INSERT INTO intents (id, dedupe_key, shopper_key, kind, intent, enriched, state, next_attempt_at, \
           created_at, updated_at, claim_id, lease_until) \
         VALUES (1, 'k1', 's1', 'x', '{}', true, 'pending', 0, 0, 0, 'c1', forwarder_now_ms() + 60000)",
    )
    .await;
    let nulls = "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL";
    let durable = |claim: &str| {
        format!(
            "SELECT forwarder_apply_durable(1, '{claim}', 0, false, NULL, 3, {nulls}, \
             ARRAY['o1'], ARRAY['s1'], ARRAY['{{}}'], ARRAY[NULL::text], ARRAY[5::bigint])"
        )
    };
    // The setting in the call's transaction after the call: what holds at its commit.
    async fn call_then_setting(conn: &mut sqlx::PgConnection, call: &str) -> (bool, String) {
        let mut tx = conn.begin().await.unwrap();
        let held: bool = sqlx::query_scalar(call).fetch_one(&mut *tx).await.unwrap();
        let setting: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (held, setting)
    }
    let (held, setting) = call_then_setting(&mut conn, &durable("c1")).await;
    assert!(held);
    assert_eq!(setting, "on", "the commit waits for the disk");
    let check: (String, i64, i64) =
        sqlx::query_as("SELECT shopper_key, due_at, since FROM order_checks WHERE order_id = 'o1'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(check, ("s1".to_string(), 5, 5));
    let sent: i64 = sqlx::query_scalar("SELECT sent FROM intent_progress WHERE intent_id = 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(sent, 3);
    // Other progress does not wait.
    let plain = format!("SELECT forwarder_apply(1, 'c1', 0, false, NULL, 4, {nulls})");
    let (held, setting) = call_then_setting(&mut conn, &plain).await;
    assert!(held);
    assert_eq!(setting, "off");
    // A stale claim: nothing written, no check.
    sqlx::raw_sql("DELETE FROM order_checks")
        .execute(&mut conn)
        .await
        .unwrap();
    let held: bool = sqlx::query_scalar(&durable("c2")).fetch_one(&mut conn).await.unwrap();
    assert!(!held);
    let checks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM order_checks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(checks, 0);
    conn.close().await.unwrap();
}

/// A replica of the release before, restarting during a rolling upgrade (a crash, an eviction, a
/// scale-out of the old set), starts on a database a later release has migrated: the later
/// migrations are additive. (sqlx refuses an applied migration it does not know, by default.)
#[tokio::test]
async fn a_replica_starts_on_a_database_a_later_release_migrated() {
    let Some(url) = postgres_url("a_replica_starts_on_a_later_database") else {
        return;
    };
    let schema = migrated_schema(&url).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\"._sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'a later release', true, '\\x00', 0)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let settings = ordercloud_cdp_forwarder::config::StoreSettings {
        url: url.clone(),
        schema: Some(schema),
        ..Default::default()
    };
    let store = ordercloud_cdp_forwarder::store::open(
        &settings,
        ordercloud_cdp_forwarder::store::Role::Service {
            takeover: std::time::Duration::from_secs(10),
        },
    )
    .await
    .expect("an older release starts on a later release's database");
    store.ping().await.unwrap();
    store.close().await;
}
