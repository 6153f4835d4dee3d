//! Layered settings: built-in defaults < `config/default.toml` (when present in the working
//! directory) < the file named by `--config` / `FORWARDER_CONFIG` < `FORWARDER__SECTION__KEY`
//! environment variables. Secrets are wrapped in [`Secret`] so they never print.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// A value that must never reach a log line: Debug and Serialize print a mask.
#[derive(Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to read the value: name the reason at the call site.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("********")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub ordercloud: OrderCloudSettings,
    pub cdp: CdpSettings,
    pub store: StoreSettings,
    pub delivery: DeliverySettings,
    pub log: LogSettings,
    pub admin: AdminSettings,
    pub reconcile: ReconcileSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    /// The operations listener (`/metrics`, `/admin`, the detailed readiness report); when unset
    /// they are served on `listen`.
    pub admin_listen: Option<String>,
    pub max_body_bytes: usize,
    /// Longest wait for a request's headers (and for the next request on an idle keep-alive
    /// connection) and for its body.
    pub read_timeout_ms: u64,
    /// Requests in flight past which intake answers 503 at once.
    pub max_inflight: usize,
    pub shutdown_timeout_secs: u64,
}

impl ServerSettings {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
    /// Open connections past which new ones are closed at once: a bound on file descriptors, which
    /// idle or slow connections would otherwise use up.
    pub fn max_connections(&self) -> usize {
        self.max_inflight.saturating_mul(4).max(64)
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: None,
            max_body_bytes: 1024 * 1024,
            read_timeout_ms: 10_000,
            max_inflight: 512,
            shutdown_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct OrderCloudSettings {
    #[serde(deserialize_with = "list_or_commas")]
    pub hash_keys: Vec<Secret>,
    #[serde(deserialize_with = "list_or_commas")]
    pub api_urls: Vec<String>,
    pub request_timeout_ms: u64,
    /// An API client of the marketplace (roles OrderReader and ApiClientReader), for the order
    /// ledger's reconciliation; reconciliation is off while this is unset.
    pub client_id: Option<String>,
    pub client_secret: Secret,
}

impl OrderCloudSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Every API host OrderCloud documents: production, sandbox and staging in each region (US West,
/// US East, Australia East, Europe West, Japan East; OrderCloud's supported-regions page). A token
/// names its marketplace's host in `aud`; only these are called unless `ordercloud.api_urls` says
/// otherwise.
pub const ORDERCLOUD_API_HOSTS: [&str; 15] = [
    "https://api.ordercloud.io",
    "https://sandboxapi.ordercloud.io",
    "https://stagingapi.ordercloud.io",
    "https://useast-production.ordercloud.io",
    "https://useast-sandbox.ordercloud.io",
    "https://useast-staging.ordercloud.io",
    "https://australiaeast-production.ordercloud.io",
    "https://australiaeast-sandbox.ordercloud.io",
    "https://australiaeast-staging.ordercloud.io",
    "https://westeurope-production.ordercloud.io",
    "https://westeurope-sandbox.ordercloud.io",
    "https://westeurope-staging.ordercloud.io",
    "https://japaneast-production.ordercloud.io",
    "https://japaneast-sandbox.ordercloud.io",
    "https://japaneast-staging.ordercloud.io",
];

impl Default for OrderCloudSettings {
    fn default() -> Self {
        Self {
            hash_keys: Vec::new(),
            api_urls: ORDERCLOUD_API_HOSTS.iter().map(|h| h.to_string()).collect(),
            request_timeout_ms: 10_000,
            client_id: None,
            client_secret: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    Eu,
    Us,
    Ap,
    Jp,
}

impl Region {
    pub fn host(self) -> &'static str {
        match self {
            Region::Eu => "https://api-engage-eu.sitecorecloud.io",
            Region::Us => "https://api-engage-us.sitecorecloud.io",
            Region::Ap => "https://api-engage-ap.sitecorecloud.io",
            Region::Jp => "https://api-engage-jpe.sitecorecloud.io",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Post,
    Get,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ItemIdSource {
    VariantOrProduct,
    Product,
    LineItem,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OrderEvents {
    ConfirmCheckout,
    OrderCheckout,
}

/// Channel and point of sale for one OrderCloud API client (the token's `cid`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientChannel {
    pub client_id: String,
    pub channel: String,
    pub pos: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct CdpSettings {
    pub region: Region,
    pub base_url: Option<String>,
    pub client_key: Secret,
    pub pos: String,
    pub channel: String,
    pub language: String,
    pub currency: String,
    pub page: String,
    pub session_timeout_secs: u64,
    /// Seconds before the session timeout at which a session is already treated as closed.
    pub session_safety_margin_secs: u64,
    pub dry_run: bool,
    pub transport: Transport,
    pub clients: Vec<ClientChannel>,
    pub identity_provider: String,
    pub product_type: String,
    /// A field of `Product.xp` whose value is the product type, e.g. `category`.
    pub product_type_field: Option<String>,
    pub item_id: ItemIdSource,
    /// JSON pointers, tried in order on the request then the response body, to a storefront's CDP browser id.
    #[serde(deserialize_with = "list_or_commas")]
    pub browser_id_pointers: Vec<String>,
    pub order_events: OrderEvents,
    pub payment_type: String,
    pub card_type: Option<String>,
    /// The REST API's token (HTTP Basic `client_key:api_token`), for the order ledger's landing
    /// check; the check is off while it is unset. A secret.
    pub api_token: Option<Secret>,
}

impl Default for CdpSettings {
    fn default() -> Self {
        Self {
            region: Region::Eu,
            base_url: None,
            client_key: Secret::default(),
            pos: String::new(),
            channel: "WEB".into(),
            language: "EN".into(),
            currency: "USD".into(),
            page: "ordercloud".into(),
            session_timeout_secs: 1200,
            session_safety_margin_secs: 120,
            dry_run: false,
            transport: Transport::Post,
            clients: Vec::new(),
            identity_provider: "ordercloud".into(),
            product_type: "PRODUCT".into(),
            product_type_field: None,
            item_id: ItemIdSource::VariantOrProduct,
            browser_id_pointers: vec!["/xp/cdpBrowserId".into(), "/Order/xp/cdpBrowserId".into()],
            order_events: OrderEvents::ConfirmCheckout,
            payment_type: "other".into(),
            card_type: None,
            api_token: None,
        }
    }
}

impl CdpSettings {
    /// The Stream API host: `base_url` when set, else the region's host.
    pub fn host(&self) -> String {
        match &self.base_url {
            Some(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
            _ => self.region.host().to_string(),
        }
    }

    /// How long a session may be idle before the forwarder treats it as closed: the point of
    /// sale's timeout less the safety margin.
    pub fn session_idle(&self) -> Duration {
        Duration::from_secs(
            self.session_timeout_secs
                .saturating_sub(self.session_safety_margin_secs),
        )
    }

    /// Channel and point of sale for the OrderCloud API client `client_id`.
    pub fn channel_for(&self, client_id: Option<&str>) -> (&str, &str) {
        client_id
            .and_then(|cid| self.clients.iter().find(|c| c.client_id == cid))
            .map(|c| (c.channel.as_str(), c.pos.as_str()))
            .unwrap_or((self.channel.as_str(), self.pos.as_str()))
    }
}

#[derive(Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// A secret: it may hold the database's password. Printed only through [`redacted_url`].
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// PostgreSQL schema for the tables (created when missing); the server's default when unset.
    pub schema: Option<String>,
    pub max_connections: u32,
    pub statement_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// How long a LogID is remembered for deduplication.
    pub dedupe_retention_secs: u64,
    /// How long what a shopper left (cart records, CDP session facts, the shopper's record) is kept
    /// after it was last touched; 0 keeps it for ever.
    pub shopper_retention_secs: u64,
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &redacted_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("dedupe_retention_secs", &self.dedupe_retention_secs)
            .field("shopper_retention_secs", &self.shopper_retention_secs)
            .finish()
    }
}

fn serialize_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted_url(url))
}

/// A database URL as it may be printed: scheme, user, host, port, path; the password and every query
/// value that may be a credential masked. A URL that does not parse as one (a mistyped `postgres:/`,
/// text with no host) is masked whole: where its secret is cannot be told.
pub fn redacted_url(url: &str) -> String {
    const MASK: &str = "********";
    let Ok(mut parsed) = url::Url::parse(url.trim()) else {
        return MASK.to_string();
    };
    if parsed.cannot_be_a_base() || (parsed.host_str().is_none() && parsed.scheme() != "sqlite") {
        return MASK.to_string();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(MASK));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                let secret = ["pass", "pwd", "secret", "key", "token", "auth"]
                    .iter()
                    .any(|word| lower.contains(word));
                (k.into_owned(), if secret { MASK.to_string() } else { v.into_owned() })
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.set_fragment(None);
    parsed.to_string()
}

impl StoreSettings {
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn dedupe_retention(&self) -> Duration {
        Duration::from_secs(self.dedupe_retention_secs)
    }
    /// `None`: kept for ever.
    pub fn shopper_retention(&self) -> Option<Duration> {
        (self.shopper_retention_secs > 0).then(|| Duration::from_secs(self.shopper_retention_secs))
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/forwarder.db".into(),
            schema: None,
            max_connections: 8,
            statement_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            dedupe_retention_secs: 7 * 24 * 3600,
            shopper_retention_secs: 90 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    pub concurrency: usize,
    pub request_timeout_ms: u64,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub max_age_secs: u64,
    /// Lease on a claimed intent; must exceed the CDP request timeout. Renewed while an intent runs.
    pub lease_secs: u64,
    /// How often idle workers look for new work.
    pub poll_interval_ms: u64,
    /// After CDP refuses the client key (401/403): first wait before probing again; doubles up to 10×.
    pub auth_pause_secs: u64,
    /// PostgreSQL: a claim whose replica has missed its heartbeats for this long is taken over.
    pub takeover_secs: u64,
}

impl DeliverySettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn initial_backoff(&self) -> Duration {
        Duration::from_millis(self.initial_backoff_ms)
    }
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
    /// An intent still failing after this long becomes a dead letter.
    pub fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age_secs)
    }
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn auth_pause(&self) -> Duration {
        Duration::from_secs(self.auth_pause_secs.max(1))
    }
    pub fn takeover(&self) -> Duration {
        Duration::from_secs(self.takeover_secs)
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            request_timeout_ms: 10_000,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            max_age_secs: 24 * 3600,
            lease_secs: 60,
            poll_interval_ms: 200,
            auth_pause_secs: 30,
            takeover_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token for `/admin`; the admin API is off while this is unset.
    pub token: Option<Secret>,
}

/// The order ledger's reconciliation with OrderCloud (on while `ordercloud.client_id` is set): the
/// submitted orders whose webhook never came are found and sent.
#[derive(Debug, Clone, Deserialize, Serialize)]
// A key no setting has (a typo) is an error naming it, not ignored.
#[serde(default, deny_unknown_fields)]
pub struct ReconcileSettings {
    /// The marketplace's OrderCloud API host to read orders from (https); required while
    /// `ordercloud.api_urls` lists several, else that one host.
    pub api_url: Option<String>,
    pub interval_secs: u64,
    /// How old a submitted order must be before a missing webhook counts as lost (OrderCloud's order
    /// lists are served from a search cache that lags seconds to minutes).
    pub lag_secs: u64,
    /// How far back the first pass looks.
    pub lookback_secs: u64,
    /// `FromUser.Username`s that mark an order as anonymous, besides the API clients' default
    /// context users.
    #[serde(deserialize_with = "list_or_commas")]
    pub anonymous_usernames: Vec<String>,
    /// How long after CDP acknowledged an order's CHECKOUT the landing check asks CDP for the
    /// order; `cdp.session_timeout_secs + 60` when unset.
    pub verify_after_secs: Option<u64>,
    /// How many times an order CDP does not hold is sent again before it becomes a dead letter.
    pub repairs: u32,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            api_url: None,
            interval_secs: 300,
            lag_secs: 300,
            lookback_secs: 259_200,
            anonymous_usernames: Vec::new(),
            verify_after_secs: None,
            repairs: 1,
        }
    }
}

impl Settings {
    /// Whether the reconciler runs.
    pub fn reconciles(&self) -> bool {
        self.ordercloud.client_id.as_deref().is_some_and(|c| !c.is_empty())
    }

    /// Whether the landing check asks CDP for every order whose CHECKOUT it acknowledged.
    pub fn verifies_orders(&self) -> bool {
        self.cdp.api_token.as_ref().is_some_and(|t| !t.is_empty()) && !self.cdp.dry_run
    }

    /// How long after an order's CHECKOUT was acknowledged CDP is asked for it.
    pub fn verify_after(&self) -> Duration {
        Duration::from_secs(
            self.reconcile
                .verify_after_secs
                .unwrap_or(self.cdp.session_timeout_secs.saturating_add(60)),
        )
    }

    /// The OrderCloud API host the reconciler reads.
    pub fn reconcile_api_url(&self) -> String {
        self.reconcile
            .api_url
            .clone()
            .filter(|u| !u.is_empty())
            .or_else(|| self.ordercloud.api_urls.first().cloned())
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string()
    }
}

/// A configuration that cannot be used, with every problem found, each naming its key and fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Where the service's settings come from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// The file named by `--config` or `FORWARDER_CONFIG`.
    pub file: Option<PathBuf>,
    /// Directory searched for `config/default.toml` (the working directory by default).
    pub base_dir: Option<PathBuf>,
}

impl Settings {
    /// Reads and validates every layer, reading environment variables from the process.
    pub fn load(sources: &ConfigSources) -> Result<Settings, ConfigError> {
        Self::load_with_env(sources, None)
    }

    /// As [`Settings::load`], with an explicit environment (tests) instead of the process's.
    pub fn load_with_env(
        sources: &ConfigSources,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let base = sources.base_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let default_file = base.join("config").join("default.toml");
        let mut builder = config::Config::builder().add_source(
            config::File::from(default_file.as_path())
                .format(config::FileFormat::Toml)
                .required(false),
        );
        if let Some(file) = &sources.file {
            if !file.exists() {
                return Err(ConfigError::Load(format!(
                    "configuration file {} does not exist: fix --config or FORWARDER_CONFIG",
                    file.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(file.as_path())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let mut environment = config::Environment::with_prefix("FORWARDER")
            .prefix_separator("__")
            .separator("__")
            // No coercion of values that look like numbers: a secret or a point of sale named
            // "0123…" stays as it was written. Numbers and booleans are read from the text by the
            // settings' types; lists are comma-separated text (`list_or_commas`).
            .try_parsing(false);
        if let Some(env) = env {
            environment = environment.source(Some(env));
        }
        let mut settings: Settings = builder
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        // "old, new" or a key file's trailing newline: the spaces are not part of a key or secret.
        for key in &mut settings.ordercloud.hash_keys {
            *key = Secret::new(key.expose().trim());
        }
        let trimmed = |secret: &mut Secret| *secret = Secret::new(secret.expose().trim());
        trimmed(&mut settings.cdp.client_key);
        trimmed(&mut settings.ordercloud.client_secret);
        if let Some(token) = settings.cdp.api_token.as_mut() {
            trimmed(token);
        }
        if let Some(token) = settings.admin.token.as_mut() {
            trimmed(token);
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Every problem at once, each naming the key and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!(
                "server.listen = {:?} is not an address: use host:port, e.g. 0.0.0.0:8080",
                self.server.listen
            ));
        }
        if self.server.max_body_bytes == 0 {
            errors.push("server.max_body_bytes must be above 0, e.g. 1048576".into());
        }
        if let Some(admin) = self.server.admin_listen.as_deref().filter(|a| !a.is_empty()) {
            if admin.parse::<SocketAddr>().is_err() {
                errors.push(format!(
                    "server.admin_listen = {admin:?} is not an address: use host:port, e.g. 127.0.0.1:9090"
                ));
            } else if admin == self.server.listen && !admin.ends_with(":0") {
                errors.push("server.admin_listen must differ from server.listen".into());
            }
        }
        if self.server.read_timeout_ms == 0 {
            errors.push("server.read_timeout_ms must be above 0, e.g. 10000".into());
        }
        if self.server.max_inflight == 0 {
            errors.push("server.max_inflight must be above 0, e.g. 512".into());
        }
        if self.reconciles() {
            if self.ordercloud.client_secret.is_empty() {
                errors.push(
                    "ordercloud.client_id is set but ordercloud.client_secret is not: set \
                     FORWARDER__ORDERCLOUD__CLIENT_SECRET, or unset the client id to turn reconciliation off"
                        .into(),
                );
            }
            let api = self.reconcile_api_url();
            let explicit = self.reconcile.api_url.as_deref().is_some_and(|u| !u.is_empty());
            if !explicit && self.ordercloud.api_urls.len() > 1 {
                // The marketplace lives on one of them; a guess would read another region's.
                errors.push(
                    "reconcile.api_url is not set and ordercloud.api_urls lists several hosts: set it to your \
                     marketplace's API host, e.g. FORWARDER__RECONCILE__API_URL=https://westeurope-production.ordercloud.io"
                        .into(),
                );
            } else if !(api.starts_with("https://") || is_loopback_http(&api)) {
                // The client secret goes there.
                errors.push(format!(
                    "reconcile.api_url = {api:?} is not an https URL: use e.g. https://api.ordercloud.io"
                ));
            }
            let r = &self.reconcile;
            if r.interval_secs == 0 {
                errors.push("reconcile.interval_secs must be above 0, e.g. 300".into());
            }
            // OrderCloud's order lists lag (a search cache): without a lag, a pass would move its
            // watermark past orders the lists do not show yet, and never look at them again.
            if r.lag_secs == 0 {
                errors.push("reconcile.lag_secs must be above 0, e.g. 300".into());
            }
            for (key, value) in [
                ("reconcile.interval_secs", r.interval_secs),
                ("reconcile.lag_secs", r.lag_secs),
                ("reconcile.lookback_secs", r.lookback_secs),
            ] {
                if value > TEN_YEARS_SECS {
                    errors.push(format!(
                        "{key} ({value}) is more than ten years: use a number of seconds"
                    ));
                }
            }
            // An order is told apart from one already sent by its submit's dedupe record: it must be
            // remembered for as long as a pass may look back.
            let window = r
                .lookback_secs
                .saturating_add(r.lag_secs)
                .saturating_add(r.interval_secs);
            if self.store.dedupe_retention_secs < window {
                errors.push(format!(
                    "store.dedupe_retention_secs ({}) must cover reconcile.lookback_secs + lag_secs + \
                     interval_secs ({window}): an order whose submit was forgotten would be sent again",
                    self.store.dedupe_retention_secs
                ));
            }
        }
        // A landing check that comes due again after its order's repair became a dead letter tells
        // it by the repair's dedupe record: it must still be remembered then.
        if self.verifies_orders() && self.verify_after().as_secs() < self.cdp.session_timeout_secs {
            errors.push(format!(
                "reconcile.verify_after_secs ({}) must be at least cdp.session_timeout_secs ({}): an order is \
                 looked for once its CHECKOUT's session has closed, or a repair could join the session CDP may \
                 still be building the first order in",
                self.verify_after().as_secs(),
                self.cdp.session_timeout_secs
            ));
        }
        if self.verifies_orders() {
            let due = self.delivery.max_age_secs.saturating_add(self.verify_after().as_secs());
            if self.store.dedupe_retention_secs < due {
                errors.push(format!(
                    "store.dedupe_retention_secs ({}) must cover delivery.max_age_secs + reconcile.verify_after_secs \
                     ({due}) while the landing check is on (cdp.api_token): a repair that became a dead letter \
                     would be followed by a second one",
                    self.store.dedupe_retention_secs
                ));
            }
        }
        if self.ordercloud.hash_keys.iter().all(|k| k.is_empty()) {
            errors.push(
                "ordercloud.hash_keys is empty: set at least one key, e.g. FORWARDER__ORDERCLOUD__HASH_KEYS=key1,key2"
                    .into(),
            );
        }
        for (n, key) in self.ordercloud.hash_keys.iter().enumerate() {
            let key = key.expose();
            if key.is_empty() {
                continue;
            }
            if key.chars().any(char::is_whitespace) {
                errors.push(format!(
                    "ordercloud.hash_keys: key #{} contains whitespace: a HashKey has none (separate keys with commas)",
                    n + 1
                ));
            }
            if key.len() < MIN_HASH_KEY_BYTES {
                errors.push(format!(
                    "ordercloud.hash_keys: key #{} is {} bytes long, shorter than {MIN_HASH_KEY_BYTES}: use a long random key (OrderCloud allows up to 50 characters)",
                    n + 1,
                    key.len()
                ));
            }
            if key.len() > 256 {
                errors.push(format!(
                    "ordercloud.hash_keys: key #{} is longer than 256 characters (OrderCloud allows 50)",
                    n + 1
                ));
            }
        }
        if self.ordercloud.api_urls.is_empty() {
            errors.push(
                "ordercloud.api_urls is empty: no OrderCloud host could be read (leave it unset for every \
                 documented host, or list yours, e.g. https://api.ordercloud.io)"
                    .into(),
            );
        }
        for url in &self.ordercloud.api_urls {
            // A shopper's token goes to these hosts: https, or plain http on this machine only.
            if !(url.starts_with("https://") || is_loopback_http(url)) {
                errors.push(format!(
                    "ordercloud.api_urls: {url:?} is not an https URL (plain http only to this machine): \
                     use e.g. https://api.ordercloud.io"
                ));
            }
        }
        let cdp = &self.cdp;
        if !cdp.dry_run {
            if cdp.client_key.is_empty() {
                errors.push(
                    "cdp.client_key is empty: set it (FORWARDER__CDP__CLIENT_KEY) or set cdp.dry_run = true".into(),
                );
            }
            if cdp.pos.is_empty() {
                errors.push(
                    "cdp.pos is empty: set the exact name of a CDP point of sale (FORWARDER__CDP__POS) or set cdp.dry_run = true"
                        .into(),
                );
            }
        }
        if let Some(url) = &cdp.base_url {
            if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
                errors.push(format!(
                    "cdp.base_url = {url:?} is not an http(s) URL: remove it to use cdp.region, or give e.g. https://api-engage-eu.sitecorecloud.io"
                ));
            }
        }
        if !is_upper_code(&cdp.channel, 1, 32) {
            errors.push(format!(
                "cdp.channel = {:?} must be upper case, e.g. WEB, MOBILE_WEB or MOBILE_APP",
                cdp.channel
            ));
        }
        for c in &cdp.clients {
            if !is_upper_code(&c.channel, 1, 32) {
                errors.push(format!(
                    "cdp.clients[client_id={}].channel = {:?} must be upper case, e.g. MOBILE_APP",
                    c.client_id, c.channel
                ));
            }
            if c.pos.is_empty() {
                errors.push(format!(
                    "cdp.clients[client_id={}].pos is empty: name a CDP point of sale",
                    c.client_id
                ));
            }
        }
        if !is_upper_code(&cdp.language, 2, 2) {
            errors.push(format!(
                "cdp.language = {:?} must be two upper-case letters (ISO 639-1), e.g. EN",
                cdp.language
            ));
        }
        if !is_upper_code(&cdp.currency, 3, 3) {
            errors.push(format!(
                "cdp.currency = {:?} must be three upper-case letters (ISO 4217), e.g. USD",
                cdp.currency
            ));
        }
        if cdp.session_timeout_secs == 0 {
            errors.push("cdp.session_timeout_secs must match the point of sale's timeout, e.g. 1200".into());
        }
        if cdp.session_safety_margin_secs >= cdp.session_timeout_secs {
            errors.push(format!(
                "cdp.session_safety_margin_secs ({}) must be below cdp.session_timeout_secs ({})",
                cdp.session_safety_margin_secs, cdp.session_timeout_secs
            ));
        }
        if cdp.identity_provider.is_empty() {
            errors.push(
                "cdp.identity_provider is empty: use the provider of your CDP identity rule, e.g. ordercloud".into(),
            );
        }
        for p in &cdp.browser_id_pointers {
            if !p.starts_with('/') {
                errors.push(format!(
                    "cdp.browser_id_pointers: {p:?} is not a JSON pointer: start it with /, e.g. /xp/cdpBrowserId"
                ));
            }
        }
        if !(self.store.url.starts_with("sqlite:")
            || self.store.url.starts_with("postgres://")
            || self.store.url.starts_with("postgresql://"))
        {
            errors.push(format!(
                "store.url = {:?} is not supported: use sqlite://path/to/file.db or postgres://user@host/db",
                redacted_url(&self.store.url)
            ));
        }
        if self.store.max_connections == 0 {
            errors.push("store.max_connections must be above 0, e.g. 8".into());
        }
        let d = &self.delivery;
        if d.concurrency == 0 {
            errors.push("delivery.concurrency must be above 0, e.g. 16".into());
        }
        if d.request_timeout_ms == 0 {
            errors.push("delivery.request_timeout_ms must be above 0, e.g. 10000".into());
        }
        if d.initial_backoff_ms == 0 || d.initial_backoff_ms > d.max_backoff_ms {
            errors.push(format!(
                "delivery.initial_backoff_ms ({}) must be above 0 and at most delivery.max_backoff_ms ({})",
                d.initial_backoff_ms, d.max_backoff_ms
            ));
        }
        if d.max_age_secs == 0 {
            errors.push("delivery.max_age_secs must be above 0, e.g. 86400".into());
        }
        // How often an idle replica asks the store for work: below, an idle service is a loop of
        // claims against the store.
        if d.poll_interval_ms < 10 {
            errors.push(format!(
                "delivery.poll_interval_ms ({}) must be at least 10, e.g. 200",
                d.poll_interval_ms
            ));
        }
        if !(4..=3600).contains(&d.takeover_secs) {
            errors.push(format!(
                "delivery.takeover_secs ({}) must be from 4 (replicas heartbeat every 2 s) to 3600, e.g. 10",
                d.takeover_secs
            ));
        }
        for (key, value) in [
            ("delivery.max_age_secs", d.max_age_secs),
            ("delivery.lease_secs", d.lease_secs),
            ("store.dedupe_retention_secs", self.store.dedupe_retention_secs),
        ] {
            if value > TEN_YEARS_SECS {
                errors.push(format!(
                    "{key} ({value}) is more than ten years: use a number of seconds, e.g. 86400"
                ));
            }
        }
        if d.lease_secs * 1000 <= d.request_timeout_ms {
            errors.push(format!(
                "delivery.lease_secs ({}) must be longer than delivery.request_timeout_ms ({} ms)",
                d.lease_secs, d.request_timeout_ms
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push(format!(
                "log.level = {:?} is not a level or filter: use e.g. info, debug or ordercloud_cdp_forwarder=debug",
                self.log.level
            ));
        }
        if let Some(token) = &self.admin.token {
            if !token.is_empty() && token.expose().len() < 16 {
                errors.push("admin.token is shorter than 16 characters: use a long random value".into());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The effective configuration as JSON with every secret masked (a database password too).
    pub fn masked_json(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }

    /// The SQLite file path when the store is SQLite.
    pub fn sqlite_path(&self) -> Option<&Path> {
        self.store
            .url
            .strip_prefix("sqlite://")
            .or_else(|| self.store.url.strip_prefix("sqlite:"))
            .map(|p| Path::new(p.split('?').next().unwrap_or(p)))
    }
}

/// A list as a file writes it (an array), or as an environment variable does (`a,b`).
fn list_or_commas<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String> + Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        List(Vec<T>),
        Text(String),
    }
    Ok(match Either::<T>::deserialize(d)? {
        Either::List(items) => items,
        Either::Text(text) if text.trim().is_empty() => Vec::new(),
        Either::Text(text) => text.split(',').map(|item| T::from(item.trim().to_string())).collect(),
    })
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

/// The shortest hash key accepted: a guessable key lets anyone sign webhooks.
pub const MIN_HASH_KEY_BYTES: usize = 16;

/// Longer than any setting in seconds needs to be (and short enough for epoch-millisecond sums).
const TEN_YEARS_SECS: u64 = 10 * 365 * 86_400;

/// `http://127.0.0.1…` or `http://localhost…`: plain HTTP that never leaves the machine (tests, a
/// local stand-in).
fn is_loopback_http(url: &str) -> bool {
    url.strip_prefix("http://")
        .is_some_and(|rest| rest.starts_with("127.0.0.1") || rest.starts_with("localhost") || rest.starts_with("[::1]"))
}

fn is_upper_code(value: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        && value.chars().next().is_some_and(|c| c.is_ascii_uppercase())
}

impl CdpSettings {
    /// The point of sale used with a channel: the first client entry with that channel, else the default.
    pub fn pos_for_channel(&self, channel: &str) -> &str {
        self.clients
            .iter()
            .find(|c| c.channel == channel)
            .map(|c| c.pos.as_str())
            .unwrap_or(self.pos.as_str())
    }
}
