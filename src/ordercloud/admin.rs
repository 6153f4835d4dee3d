//! OrderCloud reads made with the forwarder's own API client (OAuth client credentials), for the
//! order ledger's reconciliation (`src/reconcile/`): the marketplace's submitted orders, the lines
//! of one, and the API clients' default context users (an order placed by one of them is an
//! anonymous shopper's). Only `reconcile.api_url` is called; no redirect is followed (it would
//! carry the token elsewhere).

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Mutex;

use crate::config::{Secret, Settings};

/// OrderCloud's page size limit.
pub const PAGE_SIZE: u32 = 100;
/// A guard against a server that never stops paging (lines of one order, API clients).
const MAX_PAGES: u32 = 100;
/// The roles the reconciler needs.
const SCOPE: &str = "OrderReader ApiClientReader";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// A configuration error, shown by readiness until a pass succeeds.
    #[error(
        "OrderCloud refused the API client's credentials (HTTP {0}): check ordercloud.client_id and \
         ordercloud.client_secret"
    )]
    Credentials(u16),
    #[error("OrderCloud refused {0} to the API client (HTTP {1}): give it the roles OrderReader and ApiClientReader")]
    Forbidden(&'static str, u16),
    #[error("OrderCloud is unavailable for {0}: {1}")]
    Transient(&'static str, String),
    #[error("OrderCloud answered {0} with HTTP {1}")]
    Permanent(&'static str, u16),
}

/// A token and when to get a new one.
struct Token {
    value: Secret,
    renew_at: Instant,
}

pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    client_id: String,
    client_secret: Secret,
    token: Mutex<Option<Token>>,
}

impl AdminClient {
    pub fn new(settings: &Settings) -> anyhow::Result<AdminClient> {
        let timeout = settings.ordercloud.request_timeout();
        let http = crate::outbound::client_builder(timeout).build()?;
        Ok(AdminClient {
            http,
            base: settings.reconcile_api_url(),
            client_id: settings.ordercloud.client_id.clone().unwrap_or_default(),
            client_secret: settings.ordercloud.client_secret.clone(),
            token: Mutex::new(None),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET v1/orders/Incoming?DateSubmitted=>={from}&sortBy=DateSubmitted,ID&pageSize=100&page={page}`
    /// (`>` when not `inclusive`): one list page of the orders submitted at or after `from` (ISO
    /// 8601), oldest first. Orders submitted at one instant are ordered by ID: a search index
    /// returns ties on its sort field in no fixed order, so pages of one listing could otherwise
    /// show some twice and others never. From `from` inclusive: a listing that goes on from the
    /// time of the last order read must read the others submitted at that time.
    pub async fn submitted_orders(&self, from: &str, inclusive: bool, page: u32) -> Result<Value, AdminError> {
        let op = if inclusive { ">=" } else { ">" };
        let (page, size, from) = (page.to_string(), PAGE_SIZE.to_string(), format!("{op}{from}"));
        self.get(
            "v1/orders/Incoming",
            &[
                ("DateSubmitted", from.as_str()),
                ("sortBy", "DateSubmitted,ID"),
                ("pageSize", &size),
                ("page", &page),
            ],
            "orders",
        )
        .await
    }

    /// Every line of an incoming order.
    pub async fn order_lines(&self, order_id: &str) -> Result<Vec<Value>, AdminError> {
        let path = format!(
            "v1/orders/Incoming/{}/lineitems",
            url::form_urlencoded::byte_serialize(order_id.as_bytes()).collect::<String>()
        );
        self.all_pages(&path, "lineitems").await
    }

    /// The `DefaultContextUserName` of every API client of the marketplace.
    pub async fn default_context_usernames(&self) -> Result<Vec<String>, AdminError> {
        Ok(self
            .all_pages("v1/apiclients", "apiclients")
            .await?
            .iter()
            .filter_map(|c| c.get("DefaultContextUserName").and_then(Value::as_str))
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect())
    }

    async fn all_pages(&self, path: &str, call: &'static str) -> Result<Vec<Value>, AdminError> {
        let mut items = Vec::new();
        let size = PAGE_SIZE.to_string();
        for page in 1..=MAX_PAGES {
            let page_text = page.to_string();
            let list = self
                .get(path, &[("pageSize", &size), ("page", &page_text)], call)
                .await?;
            if let Some(Value::Array(page_items)) = list.get("Items") {
                items.extend(page_items.iter().cloned());
            }
            let total_pages = list.pointer("/Meta/TotalPages").and_then(Value::as_u64).unwrap_or(1);
            if u64::from(page) >= total_pages {
                break;
            }
        }
        Ok(items)
    }

    async fn get(&self, path: &str, query: &[(&str, &str)], call: &'static str) -> Result<Value, AdminError> {
        // A token refused mid-life (revoked, or the clock off) is fetched again, once.
        for attempt in 0..2 {
            let token = self.token().await?;
            let started = Instant::now();
            let result = self
                .http
                .get(format!("{}/{path}", self.base))
                .query(query)
                .bearer_auth(token.expose())
                .send()
                .await;
            let outcome = match result {
                Err(e) => Err(AdminError::Transient(call, e.without_url().to_string())),
                Ok(response) => match response.status().as_u16() {
                    200..=299 => response
                        .json::<Value>()
                        .await
                        .map_err(|e| AdminError::Transient(call, format!("unreadable answer: {}", e.without_url()))),
                    401 if attempt == 0 => {
                        *self.token.lock().await = None;
                        continue;
                    }
                    401 => Err(AdminError::Credentials(401)),
                    403 => Err(AdminError::Forbidden(call, 403)),
                    status @ (408 | 429 | 500..=599) => Err(AdminError::Transient(call, format!("HTTP {status}"))),
                    status => Err(AdminError::Permanent(call, status)),
                },
            };
            record(call, &outcome, started);
            return outcome;
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The API client's token, from the cache until shortly before it expires.
    async fn token(&self) -> Result<Secret, AdminError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| t.renew_at > Instant::now()) {
            return Ok(token.value.clone());
        }
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", self.client_secret.expose())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", SCOPE)
            .finish();
        let started = Instant::now();
        let result = self
            .http
            .post(format!("{}/oauth/token", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await;
        let outcome = match result {
            Err(e) => Err(AdminError::Transient("oauth/token", e.without_url().to_string())),
            Ok(response) => match response.status().as_u16() {
                200..=299 => response.json::<Value>().await.map_err(|e| {
                    AdminError::Transient("oauth/token", format!("unreadable answer: {}", e.without_url()))
                }),
                status @ (400 | 401 | 403) => Err(AdminError::Credentials(status)),
                status @ (408 | 429 | 500..=599) => Err(AdminError::Transient("oauth/token", format!("HTTP {status}"))),
                status => Err(AdminError::Permanent("oauth/token", status)),
            },
        };
        record("oauth_token", &outcome, started);
        let answer = outcome?;
        let value = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AdminError::Transient("oauth/token", "an answer without access_token".into()))?;
        let lifetime = answer.get("expires_in").and_then(Value::as_u64).unwrap_or(600);
        // Renewed a minute early (or at half its life, when it is short).
        let renew_in = Duration::from_secs(lifetime.saturating_sub(60).max(lifetime / 2));
        let token = Secret::new(value);
        *cached = Some(Token {
            value: token.clone(),
            renew_at: Instant::now() + renew_in,
        });
        Ok(token)
    }
}

fn record(call: &'static str, outcome: &Result<Value, AdminError>, started: Instant) {
    let label = match outcome {
        Ok(_) => "ok",
        Err(AdminError::Credentials(_) | AdminError::Forbidden(..)) => "unauthorized",
        Err(AdminError::Transient(..)) => "transient",
        Err(AdminError::Permanent(..)) => "error",
    };
    metrics::counter!("forwarder_ordercloud_calls_total", "call" => call, "outcome" => label).increment(1);
    metrics::histogram!("forwarder_ordercloud_call_duration_seconds", "call" => call)
        .record(started.elapsed().as_secs_f64());
}
