//! Test harness: the real service on port 0 with its own store file, and webhook builders.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ordercloud_cdp_forwarder::config::{Secret, Settings};
use ordercloud_cdp_forwarder::ordercloud::signature;
use ordercloud_cdp_forwarder::store::DynStore;
use ordercloud_cdp_forwarder::Application;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const KEY: &str = "test-hash-key-0001";
pub const SECOND_KEY: &str = "test-hash-key-0002";

pub struct TestApp {
    pub addr: SocketAddr,
    /// The operations listener, when `server.admin_listen` is set.
    pub admin_addr: Option<SocketAddr>,
    pub store: DynStore,
    pub client: reqwest::Client,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: Option<tempfile::TempDir>,
}

/// The store the suite runs on: `TEST_STORE=postgres` (with `TEST_DATABASE_URL`) runs every test on
/// PostgreSQL, each in a schema of its own; otherwise a fresh SQLite file in `dir`.
/// Returns (store.url, store.schema).
pub fn test_store(dir: &std::path::Path) -> (String, Option<String>) {
    if std::env::var("TEST_STORE").as_deref() == Ok("postgres") {
        let url = std::env::var("TEST_DATABASE_URL").expect("TEST_STORE=postgres needs TEST_DATABASE_URL");
        (url, Some(fresh_schema()))
    } else {
        (format!("sqlite://{}", dir.join("forwarder.db").display()), None)
    }
}

/// A new schema name, so that tests sharing one database do not see each other.
pub fn fresh_schema() -> String {
    format!("t_{}", uuid::Uuid::new_v4().simple())
}

/// The same store as environment variables for the binary.
pub fn store_env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    let (url, schema) = test_store(dir);
    let mut env = vec![("FORWARDER__STORE__URL", url)];
    if let Some(schema) = schema {
        env.push(("FORWARDER__STORE__SCHEMA", schema));
    }
    env
}

/// `TEST_DATABASE_URL`, or `None` after saying that the calling test skips.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            // Written past the test harness's output capture, so the skip is seen in every run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED {test}: TEST_DATABASE_URL is not set (PostgreSQL tests need a server)"
            );
            None
        }
    }
}

/// Settings for a test: port 0, a fresh store (see [`test_store`]), two hash keys, CDP dry run.
pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".into();
    s.ordercloud.hash_keys = vec![Secret::new(KEY), Secret::new(SECOND_KEY)];
    (s.store.url, s.store.schema) = test_store(dir);
    s.cdp.dry_run = true;
    s.cdp.pos = "test-pos".into();
    s
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    configure(&mut settings);
    spawn_app_in(dir, settings).await
}

/// Starts the service with `settings`, keeping `dir` alive as long as the app.
pub async fn spawn_app_in(dir: tempfile::TempDir, settings: Settings) -> TestApp {
    settings.validate().expect("test settings are valid");
    let app = Application::build(settings.clone()).await.expect("app builds");
    serve(dir, settings, app)
}

/// Starts the service with `settings` on `store` (opened by the test, e.g. with faults around it).
pub async fn spawn_app_on(dir: tempfile::TempDir, settings: Settings, store: DynStore) -> TestApp {
    settings.validate().expect("test settings are valid");
    let app = Application::build_with_store(settings.clone(), store)
        .await
        .expect("app builds");
    serve(dir, settings, app)
}

fn serve(dir: tempfile::TempDir, settings: Settings, app: Application) -> TestApp {
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let store = app.store();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        admin_addr,
        store,
        client: reqwest::Client::new(),
        settings,
        stop: Some(stop),
        task: Some(task),
        dir: Some(dir),
    }
}

impl TestApp {
    /// Waits for the first dead letters to appear.
    pub async fn dead_letters(&self) -> Vec<ordercloud_cdp_forwarder::store::DeadLetter> {
        eventually("a dead letter", Duration::from_secs(10), || async {
            let dead = self.store.dead_letters(None, 10).await.unwrap();
            (!dead.is_empty()).then_some(dead)
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET path` on the service.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request sent")
    }

    /// A URL on the operations listener (the public port when there is none).
    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr.unwrap_or(self.addr), path)
    }

    /// `GET path` on the operations listener (the public port when there is none).
    pub async fn ops_get(&self, path: &str) -> reqwest::Response {
        let addr = self.admin_addr.unwrap_or(self.addr);
        self.client
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .expect("request sent")
    }

    /// Posts `body` signed with `key`.
    pub async fn post_signed(&self, body: &[u8], key: &str) -> reqwest::Response {
        self.client
            .post(self.url("/webhooks/ordercloud"))
            .header("content-type", "application/json")
            .header("X-oc-hash", signature::sign(key.as_bytes(), body))
            .body(body.to_vec())
            .send()
            .await
            .expect("request sent")
    }

    /// Posts a webhook signed with the first key and asserts the 200 `{"proceed": true}` answer.
    pub async fn deliver(&self, webhook: &Value) {
        let body = serde_json::to_vec(webhook).unwrap();
        let resp = self.post_signed(&body, KEY).await;
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 200, "webhook answered {status}: {text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), json!({"proceed": true}));
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app stops cleanly");
        }
        self.dir.take().expect("dir is kept until stop")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("dir is kept until stop").path()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An OrderCloud-like JWT with the given claims (unsigned: the forwarder reads claims only).
pub fn jwt(claims: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"test"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.dGVzdA")
}

/// An anonymous shopper's token for the API at `aud`.
pub fn anon_token(order_id: &str, client_id: &str, aud: &str) -> String {
    jwt(
        json!({"usr":"anon-template","cid":client_id,"orderid":order_id,"usrtype":"buyer",
        "role":["Shopper","MeAdmin"],"iss":"https://auth.ordercloud.io","aud":aud,
        "exp": chrono::Utc::now().timestamp() + 7 * 24 * 3600}),
    )
}

/// A registered shopper's token for the API at `aud`.
pub fn user_token(username: &str, client_id: &str, aud: &str) -> String {
    jwt(
        json!({"usr":username,"cid":client_id,"usrtype":"buyer","role":"Shopper",
        "iss":"https://auth.ordercloud.io","aud":aud,
        "exp": chrono::Utc::now().timestamp() + 3600}),
    )
}

/// A webhook envelope as OrderCloud sends it.
pub fn envelope(
    verb: &str,
    route: &str,
    route_params: Value,
    token: Option<&str>,
    request: Value,
    response: Value,
) -> Value {
    json!({
        "Route": route,
        "RouteParams": route_params,
        "QueryParams": {},
        "Verb": verb,
        "Date": "2026-11-22T10:15:30.1234567+00:00",
        "LogID": uuid::Uuid::new_v4().to_string(),
        "UserToken": token,
        "Request": {"Body": request, "Headers": null},
        "Response": {"Body": response, "Headers": null},
        "ConfigData": {}
    })
}

/// A LineItem as OrderCloud returns it.
pub fn line_item(id: &str, product: &str, quantity: i64, unit_price: f64) -> Value {
    json!({
        "ID": id, "ProductID": product, "Quantity": quantity, "UnitPrice": unit_price,
        "LineSubtotal": unit_price * quantity as f64, "LineTotal": unit_price * quantity as f64,
        "PromotionDiscount": 0, "DateAdded": "2026-11-22T10:15:30+00:00",
        "Product": {"ID": product, "Name": format!("Product {product}"), "xp": {}},
        "Variant": null, "Specs": [], "xp": {}
    })
}

/// Classic-route line item create for `order_id`.
pub fn line_created(order_id: &str, token: &str, line: &Value) -> Value {
    envelope(
        "POST",
        "v1/orders/{direction}/{orderID}/lineitems",
        json!({"direction": "Outgoing", "orderID": order_id}),
        Some(token),
        json!({"ProductID": line["ProductID"], "Quantity": line["Quantity"]}),
        line.clone(),
    )
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real binary, configured through environment variables only, serving on a free port.
pub struct Binary {
    pub child: std::process::Child,
    pub port: u16,
}

impl Binary {
    pub async fn start(dir: &std::path::Path, env: &[(&str, String)]) -> Binary {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"));
        cmd.current_dir(dir)
            .env("FORWARDER__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "FORWARDER__LOG__LEVEL",
                std::env::var("TEST_BINARY_LOG").unwrap_or("info".into()),
            )
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("forwarder.log"))
                    .expect("log file"),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the binary starts");
        let bin = Binary { child, port };
        let client = reqwest::Client::new();
        let url = bin.url("/health/live");
        eventually("the binary to serve", Duration::from_secs(30), || {
            let (client, url) = (client.clone(), url.clone());
            async move { client.get(&url).send().await.ok().filter(|r| r.status() == 200) }
        })
        .await;
        bin
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Posts a webhook signed with [`KEY`] and returns the status.
    pub async fn post(&self, webhook: &Value) -> u16 {
        let body = serde_json::to_vec(webhook).unwrap();
        reqwest::Client::new()
            .post(self.url("/webhooks/ordercloud"))
            .header("X-oc-hash", signature::sign(KEY.as_bytes(), &body))
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status. Waits off the async runtime: the fakes the binary is still
    /// talking to run on it.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(sent.success());
        tokio::task::spawn_blocking(move || self.child.wait().unwrap())
            .await
            .unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
