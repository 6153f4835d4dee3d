//! Operating the service: metrics, dead-letter tools (CLI and admin API), graceful shutdown of the
//! real binary, and the webhook registration document.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fakes::cdp::{Answer, CdpFake};
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;
use crate::world::*;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

async fn dead_letter_once(world: &World, order: &str) -> i64 {
    world.cdp.script(&format!("anon-{order}"), vec![Answer::status(400)]);
    let mut shopper = world.anonymous(order, WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 2.0).await;
    world.dead_letters().await.pop().unwrap().id
}

#[tokio::test]
async fn metrics_name_every_stage() {
    let world = World::start().await;
    dead_letter_once(&world, "M-DEAD").await;
    let mut shopper = world.anonymous("M-OK", WEB_CLIENT);
    shopper.add("L1", "SKU", 1, 2.0).await;
    shopper.submit().await;
    world.order("M-OK").await;
    assert_eq!(world.app.post_signed(b"{}", "wrong").await.status(), 401);
    let text = world.app.ops_get("/metrics").await.text().await.unwrap();
    for name in [
        "forwarder_webhooks_total{route=\"line_upsert\",outcome=\"accepted\"}",
        "forwarder_webhooks_total{route=\"unknown\",outcome=\"401\"}",
        "forwarder_intake_duration_seconds_bucket",
        "forwarder_queue_pending",
        "forwarder_queue_oldest_pending_age_seconds",
        "forwarder_deliveries_total{outcome=\"delivered\"}",
        "forwarder_deliveries_total{outcome=\"dead_letter\"}",
        "forwarder_cdp_request_duration_seconds_bucket{event=\"CHECKOUT\"",
        "forwarder_cdp_events_total",
        "forwarder_dead_letters_total{stage=\"delivery\"}",
        "forwarder_dead_letters ",
        "forwarder_browsers_minted_total",
        "forwarder_identity_lookups_total",
        "forwarder_ordercloud_calls_total{call=\"lineitems\",outcome=\"ok\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}

#[tokio::test]
async fn dead_letters_through_the_command_line() {
    let world = World::start().await;
    let id = dead_letter_once(&world, "CLI-DEAD").await;
    let mut env = vec![
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY.to_string()),
        ("FORWARDER__CDP__DRY_RUN", "true".to_string()),
        ("FORWARDER__STORE__URL", world.app.settings.store.url.clone()),
    ];
    if let Some(schema) = &world.app.settings.store.schema {
        env.push(("FORWARDER__STORE__SCHEMA", schema.clone()));
    }
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"));
        cmd.current_dir(world.app.dir()).arg("dead-letters").args(args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Value = serde_json::from_str(&cli(&["list", "--json"])).unwrap();
    assert_eq!(listed["dead_letters"][0]["id"], id);
    assert!(listed["dead_letters"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("400"));
    assert!(cli(&["list"]).contains("anon-CLI-DEAD"));
    // A list cut at --limit says that more exist.
    dead_letter_once(&world, "CLI-DEAD-1").await;
    let second = eventually("a second dead letter", Duration::from_secs(10), || async {
        let dead = world.app.store.dead_letters(None, 10).await.unwrap();
        (dead.len() == 2).then(|| dead.iter().map(|d| d.id).find(|d| *d != id).unwrap())
    })
    .await;
    let listed = |limit: &str| -> Value { serde_json::from_str(&cli(&["list", "--json", "--limit", limit])).unwrap() };
    let cut = listed("1");
    assert_eq!(
        (cut["dead_letters"].as_array().unwrap().len(), &cut["more"]),
        (1, &json!(true))
    );
    let whole = listed("2");
    assert_eq!(
        (whole["dead_letters"].as_array().unwrap().len(), &whole["more"]),
        (2, &json!(false))
    );

    assert_eq!(
        cli(&["replay", "--id", &id.to_string(), "--id", &second.to_string()]).trim(),
        "replayed 2 dead letter(s)"
    );
    world.drained().await;
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
    let adds = world
        .cdp
        .requests()
        .iter()
        .filter(|r| r.event_type == "ADD" && r.answered == 201)
        .count();
    assert_eq!(adds, 2, "the replayed intents were delivered");

    dead_letter_once(&world, "CLI-DEAD-2").await;
    // Says what would go; takes the last hour's only with --force, and only with --yes.
    assert!(cli(&["purge", "--before", "0s", "--force"]).contains("1 dead letter(s) would be purged"));
    assert_eq!(world.app.store.dead_letters(None, 10).await.unwrap().len(), 1);
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"))
        .current_dir(world.app.dir())
        .args(["dead-letters", "purge", "--before", "0s", "--yes"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert_eq!(
        cli(&["purge", "--before", "0s", "--force", "--yes"]).trim(),
        "purged 1 dead letter(s)"
    );
}

/// The dead-letter commands open an existing SQLite store only: run from the wrong folder (the
/// default `store.url` is relative) they say there is no store there, instead of creating an empty
/// one and reporting "0 dead letter(s)".
#[test]
fn a_dead_letter_command_finds_no_store_where_there_is_none_and_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"))
        .current_dir(dir.path())
        .args(["dead-letters", "list"])
        .env("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY)
        .env("FORWARDER__CDP__DRY_RUN", "true")
        .env("FORWARDER__STORE__URL", "sqlite://data/forwarder.db")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no SQLite store"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

#[tokio::test]
async fn dead_letters_through_the_admin_api() {
    let off = World::start().await;
    let r = off.app.ops_get("/admin/dead-letters").await;
    assert_eq!(r.status(), 404, "off unless admin.token is set");

    let world = World::start_with(Duration::from_secs(1200), |s| {
        s.admin.token = Some(ordercloud_cdp_forwarder::config::Secret::new(ADMIN_TOKEN))
    })
    .await;
    let id = dead_letter_once(&world, "API-DEAD").await;
    let get = |token: &str| {
        world
            .app
            .client
            .get(world.app.ops_url("/admin/dead-letters"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get("wrong-token").await.unwrap().status(), 401);
    let listed: Value = get(ADMIN_TOKEN).await.unwrap().json().await.unwrap();
    assert_eq!(listed["dead_letters"][0]["id"], id);

    let post = |path: &str, body: Value| {
        world
            .app
            .client
            .post(world.app.ops_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let bad = post("/admin/dead-letters/replay", json!({"all": true, "ids": [1]}))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let replayed: Value = post("/admin/dead-letters/replay", json!({"since": "1h"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["replayed"], 1);
    world.drained().await;
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());

    dead_letter_once(&world, "API-DEAD-2").await;
    // "before": "0s" is now, to the millisecond: once the clock has passed the dead letter's, it is
    // before now (in the same millisecond it is not).
    let dead_at = world.dead_letters().await[0].dead_at_ms.unwrap();
    eventually(
        "a millisecond after the dead letter",
        Duration::from_secs(1),
        || async { (ordercloud_cdp_forwarder::domain::now_ms() > dead_at).then_some(()) },
    )
    .await;
    // A purge says what it would take, and takes it only when confirmed; the last hour only when forced.
    let young = post("/admin/dead-letters/purge", json!({"before": "0s", "confirm": true}))
        .await
        .unwrap();
    assert_eq!(young.status(), 400, "dead letters of the last hour need force");
    let asked: Value = post("/admin/dead-letters/purge", json!({"before": "0s", "force": true}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (asked["would_purge"].clone(), asked["purged"].clone()),
        (json!(1), json!(0))
    );
    assert_eq!(
        world.app.store.dead_letters(None, 10).await.unwrap().len(),
        1,
        "nothing purged"
    );
    let purged: Value = post(
        "/admin/dead-letters/purge",
        json!({"before": "0s", "force": true, "confirm": true}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(purged["purged"], 1);
    assert!(world.app.store.dead_letters(None, 10).await.unwrap().is_empty());
}

/// SIGTERM during a backlog: the binary stops taking webhooks, releases its claims and exits 0;
/// a new process delivers everything without waiting for leases to expire.
#[tokio::test]
async fn sigterm_drains_and_a_restart_loses_nothing() {
    let oc = OrderCloudFake::start().await;
    let cdp = CdpFake::start(CLIENT_KEY, POS, Duration::from_secs(1200)).await;
    cdp.script_all((0..30).map(|_| Answer::status(503)).collect());
    let dir = tempfile::tempdir().unwrap();
    let mut env = binary_env(dir.path(), &oc, &cdp);
    env.extend([
        // Long leases: the restart can only be quick if the first process released its claims.
        ("FORWARDER__DELIVERY__LEASE_SECS", "120".to_string()),
        ("FORWARDER__SERVER__SHUTDOWN_TIMEOUT_SECS", "10".to_string()),
    ]);
    let first = Binary::start(dir.path(), &env).await;
    let shoppers = 8;
    post_orders(&first, &oc, "TERM", shoppers).await;
    eventually("deliveries in flight", Duration::from_secs(10), || async {
        (cdp.requests().len() >= 5).then_some(())
    })
    .await;
    let status = first.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    assert!(cdp.orders().len() < shoppers, "a backlog remained");

    let _second = Binary::start(dir.path(), &env).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cdp.orders().len() < shoppers {
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("forwarder.log")).unwrap_or_default();
            panic!(
                "only {} of {shoppers} orders after the restart; the binary's log:\n{log}",
                cdp.orders().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_webhook_registration_lists_every_handled_route() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ordercloud-webhook.json")).unwrap();
    let webhook: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(webhook["BeforeProcessRequest"], false);
    assert!(
        webhook["HashKey"].as_str().unwrap().contains("REPLACE"),
        "a placeholder, not a key"
    );
    assert!(webhook["ApiClientIDs"].as_array().is_some_and(|a| !a.is_empty()));
    let registered: BTreeSet<(String, String)> = webhook["WebhookRoutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["Verb"].as_str().unwrap().to_string(),
                r["Route"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let handled: BTreeSet<(String, String)> = ordercloud_cdp_forwarder::ordercloud::routes::HANDLED_ROUTES
        .iter()
        .map(|(v, r)| (v.to_string(), r.to_string()))
        .collect();
    assert_eq!(registered, handled);
}
