//! CDP's Order REST API, for the order ledger's landing check: does CDP hold an order with this
//! reference? `GET {host}/v2.1/orders?referenceId={ref}` with HTTP Basic `client_key:api_token`;
//! the answer is a collection whose `items` hold orders with a `referenceId` (an empty `items`, or
//! a 404, means none). No redirect is followed: it would carry the API token elsewhere.

use std::time::Instant;

use serde_json::Value;

use crate::config::{Secret, Settings};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("CDP refused the REST API credentials (HTTP {0}): check cdp.client_key and cdp.api_token")]
    Credentials(u16),
    #[error("CDP's order REST API is unavailable: {0}")]
    Unavailable(String),
}

pub struct OrderLookup {
    http: reqwest::Client,
    host: String,
    client_key: Secret,
    api_token: Secret,
}

impl OrderLookup {
    pub fn new(settings: &Settings) -> anyhow::Result<OrderLookup> {
        let timeout = settings.delivery.request_timeout();
        let http = crate::outbound::client_builder(timeout).build()?;
        Ok(OrderLookup {
            http,
            host: settings.cdp.host(),
            client_key: settings.cdp.client_key.clone(),
            api_token: settings.cdp.api_token.clone().unwrap_or_default(),
        })
    }

    /// Whether CDP holds an order whose `referenceId` is `reference`.
    pub async fn holds(&self, reference: &str) -> Result<bool, LookupError> {
        let started = Instant::now();
        let result = self
            .http
            .get(format!("{}/v2.1/orders", self.host))
            .query(&[("referenceId", reference), ("expand", "true")])
            .basic_auth(self.client_key.expose(), Some(self.api_token.expose()))
            .send()
            .await;
        let outcome = match result {
            Err(e) => Err(LookupError::Unavailable(e.without_url().to_string())),
            Ok(response) => match response.status().as_u16() {
                200..=299 => match response.json::<Value>().await {
                    Ok(body) => match body.get("items").and_then(Value::as_array) {
                        Some(items) => Ok(holds_in(items, reference)),
                        // Not the collection documented: asked again, never taken for "none".
                        None => Err(LookupError::Unavailable("an answer without items".into())),
                    },
                    Err(e) => Err(LookupError::Unavailable(format!(
                        "unreadable answer: {}",
                        e.without_url()
                    ))),
                },
                // CDP's "none" (`cdp.md` §15) in CDP's JSON. A 404 page of something else (a proxy,
                // a wrong cdp.base_url path) says nothing of the order: taken for "none", every
                // order CDP built would be sent a second time.
                404 => match response.json::<Value>().await {
                    Ok(Value::Object(_)) => Ok(false),
                    _ => Err(LookupError::Unavailable(
                        "HTTP 404 without CDP's JSON answer (is cdp.base_url CDP's API host?)".into(),
                    )),
                },
                status @ (401 | 403) => Err(LookupError::Credentials(status)),
                status => Err(LookupError::Unavailable(format!("HTTP {status}"))),
            },
        };
        metrics::histogram!("forwarder_cdp_request_duration_seconds", "event" => "ORDER_LOOKUP")
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

/// Whether a page of `GET /v2.1/orders?referenceId=` holds the order. The items' field set is not
/// confirmed (an unexpanded item may carry only `href`): any item that names no other reference
/// counts. Erring this way can only miss a repair, never send an order twice.
fn holds_in(items: &[Value], reference: &str) -> bool {
    items
        .iter()
        .any(|o| match o.get("referenceId").and_then(Value::as_str) {
            Some(r) => r == reference,
            None => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_item_that_names_no_reference_counts_and_another_reference_does_not() {
        assert!(holds_in(&[json!({"ref": "r1", "referenceId": "O1"})], "O1"));
        assert!(holds_in(&[json!({"href": "https://x/v2.1/orders/r1"})], "O1"));
        assert!(!holds_in(&[json!({"ref": "r1", "referenceId": "O2"})], "O1"));
        assert!(!holds_in(&[], "O1"));
    }
}
