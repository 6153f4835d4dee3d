//! OrderCloud reads made with a shopper's own token: `GET v1/me`, the cart, an order's lines.
//! Only hosts listed in `ordercloud.api_urls` are ever called (the token's `aud` is not trusted),
//! and no redirect is followed (it would carry the shopper's token to wherever it points).

use std::time::Instant;

use serde_json::Value;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::OrderCloudSettings;
use crate::health::Health;

/// OrderCloud's page size limit.
const PAGE_SIZE: u32 = 100;
/// A guard against a server that never stops paging.
const MAX_PAGES: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderCloudError {
    #[error("token audience {0:?} is not in ordercloud.api_urls: not called")]
    HostNotAllowed(String),
    #[error("OrderCloud refused the token (HTTP {0}): expired or revoked")]
    Unauthorized(u16),
    #[error("OrderCloud has no such resource (HTTP 404)")]
    NotFound,
    #[error("OrderCloud is unavailable: {0}")]
    Transient(String),
    #[error("OrderCloud answered HTTP {0}")]
    Permanent(u16),
    /// A configuration error: retried (it may be fixed), and shown by readiness.
    #[error("OrderCloud at {from} answered HTTP {status} redirecting to {to}: the forwarder follows no redirect; list the host that serves the API in ordercloud.api_urls")]
    Redirected { from: String, status: u16, to: String },
}

impl OrderCloudError {
    pub fn is_transient(&self) -> bool {
        matches!(self, OrderCloudError::Transient(_) | OrderCloudError::Redirected { .. })
    }
}

pub struct OrderCloudClient {
    http: reqwest::Client,
    api_urls: Vec<String>,
    /// Told of redirects (a configuration error, shown by readiness until a call succeeds).
    health: Health,
    redirected: AtomicBool,
}

impl OrderCloudClient {
    pub fn new(settings: &OrderCloudSettings, health: Health) -> anyhow::Result<OrderCloudClient> {
        let timeout = settings.request_timeout();
        let http = crate::outbound::client_builder(timeout).build()?;
        Ok(OrderCloudClient {
            http,
            api_urls: settings.api_urls.iter().map(|u| normalize(u)).collect(),
            health,
            redirected: AtomicBool::new(false),
        })
    }

    /// The configured base URL equal to the token's `aud`, or an error: an unlisted host is never called.
    pub fn base_for(&self, aud: Option<&str>) -> Result<String, OrderCloudError> {
        let aud = aud.unwrap_or("");
        let wanted = normalize(aud);
        self.api_urls
            .iter()
            .find(|u| **u == wanted)
            .cloned()
            .ok_or_else(|| OrderCloudError::HostNotAllowed(aud.to_string()))
    }

    /// `GET v1/me`: the shopper's MeUser.
    pub async fn me(&self, base: &str, token: &str) -> Result<Value, OrderCloudError> {
        self.get(base, "v1/me", &[], token, "me").await
    }

    /// `GET v1/cart`: the shopper's current cart (an Order).
    pub async fn cart(&self, base: &str, token: &str) -> Result<Value, OrderCloudError> {
        self.get(base, "v1/cart", &[], token, "cart").await
    }

    /// Every line of an order (classic route) or of the cart (`order = None`), paging through all.
    pub async fn lines(
        &self,
        base: &str,
        token: &str,
        order: Option<(&str, &str)>,
    ) -> Result<Vec<Value>, OrderCloudError> {
        let path = match order {
            Some((direction, order_id)) => format!(
                "v1/orders/{}/{}/lineitems",
                encode(if direction.is_empty() { "Outgoing" } else { direction }),
                encode(order_id)
            ),
            None => "v1/cart/lineitems".to_string(),
        };
        let mut items = Vec::new();
        let mut page = 1;
        loop {
            let page_text = page.to_string();
            let size_text = PAGE_SIZE.to_string();
            let mut list = self
                .get(
                    base,
                    &path,
                    &[("page", &page_text), ("pageSize", &size_text)],
                    token,
                    "lineitems",
                )
                .await?;
            let total_pages = list.pointer("/Meta/TotalPages").and_then(Value::as_u64).unwrap_or(1) as u32;
            if let Some(Value::Array(page_items)) = list.get_mut("Items").map(Value::take) {
                items.extend(page_items);
            }
            if page >= total_pages || page >= MAX_PAGES {
                return Ok(items);
            }
            page += 1;
        }
    }

    async fn get(
        &self,
        base: &str,
        path: &str,
        query: &[(&str, &str)],
        token: &str,
        call: &'static str,
    ) -> Result<Value, OrderCloudError> {
        let started = Instant::now();
        let result = self
            .http
            .get(format!("{base}/{path}"))
            .query(query)
            .bearer_auth(token)
            .send()
            .await;
        let outcome = match result {
            Err(e) => Err(OrderCloudError::Transient(e.without_url().to_string())),
            Ok(response) => {
                let status = response.status().as_u16();
                match status {
                    200..=299 => response
                        .json::<Value>()
                        .await
                        .map_err(|e| OrderCloudError::Transient(format!("unreadable answer: {}", e.without_url()))),
                    300..=399 => Err(OrderCloudError::Redirected {
                        from: base.to_string(),
                        status,
                        to: response
                            .headers()
                            .get("location")
                            .and_then(|v| v.to_str().ok())
                            .map(crate::cdp::client::without_query)
                            .unwrap_or_else(|| "nowhere".into()),
                    }),
                    401 | 403 => Err(OrderCloudError::Unauthorized(status)),
                    404 => Err(OrderCloudError::NotFound),
                    408 | 429 | 500..=599 => Err(OrderCloudError::Transient(format!("HTTP {status}"))),
                    _ => Err(OrderCloudError::Permanent(status)),
                }
            }
        };
        match &outcome {
            Err(e @ OrderCloudError::Redirected { .. }) => {
                self.health.warn("ordercloud", e.to_string());
                self.redirected.store(true, Ordering::Relaxed);
            }
            Ok(_) if self.redirected.swap(false, Ordering::Relaxed) => self.health.clear("ordercloud"),
            _ => {}
        }
        let label = match &outcome {
            Ok(_) => "ok",
            Err(OrderCloudError::Unauthorized(_)) => "unauthorized",
            Err(OrderCloudError::NotFound) => "not_found",
            Err(OrderCloudError::Transient(_)) => "transient",
            Err(OrderCloudError::Redirected { .. }) => "redirect",
            Err(_) => "error",
        };
        metrics::counter!("forwarder_ordercloud_calls_total", "call" => call, "outcome" => label).increment(1);
        metrics::histogram!("forwarder_ordercloud_call_duration_seconds", "call" => call)
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_ascii_lowercase()
}

fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_hosts_are_called() {
        let client = OrderCloudClient::new(&OrderCloudSettings::default(), Health::default()).unwrap();
        assert_eq!(
            client.base_for(Some("https://api.ordercloud.io/")).unwrap(),
            "https://api.ordercloud.io"
        );
        assert_eq!(
            client.base_for(Some("https://evil.example.com")),
            Err(OrderCloudError::HostNotAllowed("https://evil.example.com".into()))
        );
        assert!(client.base_for(None).is_err());
    }

    /// A merchant outside US West is not refused by default: every documented host is allowed, in
    /// every region and environment, and nothing else is.
    #[test]
    fn every_documented_region_is_allowed_by_default() {
        let client = OrderCloudClient::new(&OrderCloudSettings::default(), Health::default()).unwrap();
        for region in ["useast", "australiaeast", "westeurope", "japaneast"] {
            for env in ["production", "sandbox", "staging"] {
                let host = format!("https://{region}-{env}.ordercloud.io");
                assert_eq!(client.base_for(Some(&host)).unwrap(), host);
            }
        }
        for host in ["https://stagingapi.ordercloud.io", "https://sandboxapi.ordercloud.io"] {
            assert_eq!(client.base_for(Some(host)).unwrap(), host);
        }
        for host in [
            "https://westeurope-production.ordercloud.io.evil.example",
            "https://northpole-production.ordercloud.io",
            "http://api.ordercloud.io",
        ] {
            assert!(client.base_for(Some(host)).is_err(), "{host}");
        }
    }
}
