//! Webhook intake: signature, size, parsing, classification, dedupe, durability, dead letters.

use ordercloud_cdp_forwarder::ordercloud::signature;
use serde_json::{json, Value};

use crate::helpers::*;

/// Nothing listens here: OrderCloud reads and CDP calls fail and are retried, so intents stay queued
/// where these tests can see them.
const NOWHERE: &str = "http://127.0.0.1:9";
const AUD: &str = NOWHERE;

/// The service with CDP and OrderCloud unreachable.
async fn intake_app(configure: impl FnOnce(&mut ordercloud_cdp_forwarder::config::Settings)) -> TestApp {
    spawn_app_with(|s| {
        s.cdp.dry_run = false;
        s.cdp.base_url = Some(NOWHERE.into());
        s.cdp.client_key = ordercloud_cdp_forwarder::config::Secret::new("ck");
        s.ordercloud.api_urls = vec![NOWHERE.into()];
        configure(s);
    })
    .await
}

fn sample() -> Value {
    line_created(
        "ORDER-1",
        &anon_token("ORDER-1", "web-client", AUD),
        &line_item("L1", "SKU-1", 1, 10.0),
    )
}

async fn stored(app: &TestApp) -> (usize, usize) {
    let pending = app.store.pending(1000).await.unwrap().len();
    let dead = app.store.dead_letters(None, 1000).await.unwrap().len();
    (pending, dead)
}

#[tokio::test]
async fn status_codes_of_intake() {
    let app = intake_app(|s| s.server.max_body_bytes = 4096).await;
    let body = serde_json::to_vec(&sample()).unwrap();
    let url = app.url("/webhooks/ordercloud");

    let unsigned = app.client.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(unsigned.status(), 401);

    let wrong = app.post_signed(&body, "not-a-configured-key").await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(stored(&app).await, (0, 0), "refused webhooks store nothing");

    let second_key = app.post_signed(&body, SECOND_KEY).await;
    assert_eq!(second_key.status(), 200, "any configured key may sign");

    let mut other = sample();
    other["LogID"] = json!("lower-case-header");
    let other = serde_json::to_vec(&other).unwrap();
    let lower = app
        .client
        .post(&url)
        .header("x-oc-hash", signature::sign(KEY.as_bytes(), &other))
        .body(other.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    assert_eq!(lower.json::<Value>().await.unwrap(), json!({"proceed": true}));

    let big = vec![b' '; 5000];
    let too_large = app.post_signed(&big, KEY).await;
    assert_eq!(too_large.status(), 413);

    let not_json = app.post_signed(b"this is not json", KEY).await;
    assert_eq!(not_json.status(), 400);
    let reason = not_json.json::<Value>().await.unwrap();
    assert!(
        reason["error"].as_str().unwrap().contains("not an OrderCloud webhook"),
        "{reason}"
    );

    let no_route = app.post_signed(br#"{"Verb":"PUT"}"#, KEY).await;
    assert_eq!(no_route.status(), 400);

    let unrelated = envelope(
        "PUT",
        "v1/buyers/{buyerID}",
        json!({"buyerID": "b1"}),
        Some("x"),
        json!({}),
        json!({}),
    );
    app.deliver(&unrelated).await;

    assert_eq!(
        stored(&app).await,
        (2, 0),
        "only the two signed line-item webhooks are stored"
    );
}

#[tokio::test]
async fn bad_input_does_not_disturb_shoppers_in_flight() {
    let app = intake_app(|_| {}).await;
    app.deliver(&sample()).await;
    for _ in 0..3 {
        assert_eq!(app.post_signed(b"{", KEY).await.status(), 400);
        assert_eq!(app.post_signed(b"{}", "wrong").await.status(), 401);
    }
    let pending = app.store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].shopper_key, "anon-ORDER-1");
}

#[tokio::test]
async fn the_same_log_id_twice_or_concurrently_yields_one_intent() {
    let app = intake_app(|_| {}).await;
    let webhook = sample();
    app.deliver(&webhook).await;
    app.deliver(&webhook).await;

    let mut burst = sample();
    burst["LogID"] = json!("concurrent-log-id");
    let body = serde_json::to_vec(&burst).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url, body) = (app.client.clone(), app.url("/webhooks/ordercloud"), body.clone());
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("X-oc-hash", signature::sign(KEY.as_bytes(), &body))
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "duplicates are answered 200");
    }
    assert_eq!(stored(&app).await, (2, 0), "one intent per LogID");
}

#[tokio::test]
async fn shopper_keys_for_anonymous_and_registered_tokens() {
    let app = intake_app(|_| {}).await;
    app.deliver(&sample()).await;
    let registered = line_created(
        "ORDER-2",
        &user_token("jane", "web-client", AUD),
        &line_item("L2", "SKU-2", 1, 5.0),
    );
    app.deliver(&registered).await;
    let keys: Vec<String> = app
        .store
        .pending(10)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.shopper_key)
        .collect();
    assert_eq!(
        keys,
        vec!["anon-ORDER-1".to_string(), "user:127.0.0.1:9:jane".to_string()]
    );
}

#[tokio::test]
async fn missing_or_undecodable_token_becomes_a_dead_letter_with_the_reason() {
    let app = intake_app(|_| {}).await;
    let mut missing = sample();
    missing["UserToken"] = json!(null);
    app.deliver(&missing).await;
    let mut garbage = sample();
    garbage["UserToken"] = json!("not-a-jwt");
    garbage["LogID"] = json!("garbage-token");
    app.deliver(&garbage).await;

    let dead = app.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0].last_error.as_deref().unwrap().contains("UserToken is missing"),
        "{:?}",
        dead[0]
    );
    assert!(
        dead[1].last_error.as_deref().unwrap().contains("not a decodable JWT"),
        "{:?}",
        dead[1]
    );
    assert_eq!(app.store.pending(10).await.unwrap().len(), 0);
}

#[tokio::test]
async fn webhook_without_log_id_is_deduplicated_by_its_body() {
    let app = intake_app(|_| {}).await;
    let mut webhook = sample();
    webhook.as_object_mut().unwrap().remove("LogID");
    app.deliver(&webhook).await;
    app.deliver(&webhook).await;
    let pending = app.store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].dedupe_key.starts_with("sha256:"));
}

#[tokio::test]
async fn store_that_cannot_commit_answers_503_and_not_ready() {
    let app = intake_app(|_| {}).await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);

    app.store.close().await;
    let body = serde_json::to_vec(&sample()).unwrap();
    assert_eq!(app.post_signed(&body, KEY).await.status(), 503);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 503);
    let ready = ready.json::<Value>().await.unwrap();
    assert_eq!(
        ready,
        serde_json::json!({"status": "not ready", "failing": ["store"]}),
        "no error text for anyone"
    );
}

/// The tokens a webhook carries (its UserToken, `QueryParams.anonUserToken`, a register answer's
/// `access_token` and `refresh_token`) and the password of its body are not in the stored intent.
/// The token's audience is not an allowed host, so the intent becomes a dead letter without any
/// call, and the dead letter shows what was stored.
#[tokio::test]
async fn tokens_are_not_kept_in_the_intent() {
    let app = intake_app(|_| {}).await;
    let token = user_token("jo", "web-client", "https://elsewhere.example");
    let access = user_token("jo-registered", "web-client", "https://elsewhere.example");
    let mut webhook = envelope(
        "PUT",
        "v1/me/register",
        json!({}),
        Some(&token),
        json!({"Username": "jo", "Password": "pw-secret-9", "Email": "jo@example.com"}),
        json!({"access_token": access, "refresh_token": "refresh-secret-9", "expires_in": 600}),
    );
    webhook["QueryParams"] = json!({"anonUserToken": "secret-anon-token"});
    app.deliver(&webhook).await;
    let dead = app.dead_letters().await;
    assert_eq!(dead[0].kind, "register", "the intent itself is stored");
    assert_eq!(dead[0].intent["request_body"]["Email"], "jo@example.com");
    let text = serde_json::to_string(&dead).unwrap();
    for secret in [
        token.as_str(),
        access.as_str(),
        "secret-anon-token",
        "refresh-secret-9",
        "pw-secret-9",
    ] {
        assert!(!text.contains(secret), "{secret} is in the stored intent: {text}");
    }
}

/// Credential-like keys are stripped in any letter case and at any depth (`xp` nests freely),
/// also when the key is spelled with JSON escapes; other keys that merely resemble them stay.
#[tokio::test]
async fn credentials_nested_anywhere_are_not_kept() {
    let app = intake_app(|_| {}).await;
    let token = user_token("jo", "web-client", "https://elsewhere.example");
    let body = json!({
        "Username": "jo",
        "xp": {
            "profile": {"PASSWORD": "nested-secret-1", "Passwd": "nested-secret-2"},
            "devices": [{"apiToken": "nested-secret-3", "label": "phone"}],
            "ClientSecret": "nested-secret-4",
            "pwdHint": "nested-secret-5",
            "Colour": "blue"
        }
    });
    let mut webhook = envelope("PUT", "v1/me/register", json!({}), Some(&token), body, json!({}));
    // A key spelled with an escape is a credential too.
    let text = serde_json::to_string(&webhook).unwrap().replace(
        "\"Colour\":\"blue\"",
        "\"Colour\":\"blue\",\"Pass\\u0077ord\":\"nested-secret-6\"",
    );
    webhook = serde_json::from_str(&text).unwrap();
    app.deliver(&webhook).await;
    let dead = app.dead_letters().await;
    let stored = &dead[0].intent["request_body"];
    assert_eq!(stored["xp"]["Colour"], "blue", "other keys are kept: {stored}");
    assert_eq!(stored["xp"]["devices"][0]["label"], "phone", "{stored}");
    let text = serde_json::to_string(&dead).unwrap();
    for n in 1..=6 {
        let secret = format!("nested-secret-{n}");
        assert!(!text.contains(&secret), "{secret} is in the stored intent: {text}");
    }
}

/// A 200 means committed: the real binary is killed with SIGKILL right after answering, and a
/// new process on the same file finds the intent.
#[tokio::test]
async fn a_200_survives_an_abrupt_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = store_env(dir.path());
    env.extend([
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY.to_string()),
        // CDP is unreachable, so the intent stays queued for us to find.
        ("FORWARDER__CDP__BASE_URL", "http://127.0.0.1:9".to_string()),
        ("FORWARDER__CDP__CLIENT_KEY", "ck".to_string()),
        ("FORWARDER__CDP__POS", "pos".to_string()),
    ]);
    let binary = Binary::start(dir.path(), &env).await;
    assert_eq!(binary.post(&sample()).await, 200);
    binary.kill();

    let mut settings = test_settings(dir.path());
    let from_env = |key: &str| env.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
    settings.store.url = from_env("FORWARDER__STORE__URL").unwrap();
    settings.store.schema = from_env("FORWARDER__STORE__SCHEMA");
    let store = ordercloud_cdp_forwarder::store::open(&settings.store, ordercloud_cdp_forwarder::store::Role::Tool)
        .await
        .unwrap();
    let pending = store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1, "the acknowledged webhook is in the store");
    assert_eq!(pending[0].shopper_key, "anon-ORDER-1");
    store.close().await;
}

#[tokio::test]
async fn graceful_stop_and_restart_keep_the_queue() {
    let app = intake_app(|_| {}).await;
    let webhook = sample();
    app.deliver(&webhook).await;
    let settings = app.settings.clone();
    if settings.store.url.starts_with("sqlite") {
        assert!(
            app.dir().join("forwarder.db").exists(),
            "the store file is created on first start"
        );
    }
    let dir = app.stop().await;
    let again = spawn_app_in(dir, settings).await;
    let pending = again.store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    again.deliver(&webhook).await;
    assert_eq!(
        again.store.pending(10).await.unwrap().len(),
        1,
        "dedupe survives a restart"
    );
}
