//! What a webhook asks the forwarder to do, as stored in a shopper's queue.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The shopper action behind a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum IntentKind {
    /// A line item created, saved or patched; also a bundle added (several lines).
    LinesUpserted,
    /// A line item (or a bundle's item) removed from the cart.
    LineDeleted,
    /// The whole cart or unsubmitted order deleted.
    CartDeleted,
    /// The order submitted.
    OrderSubmitted,
    /// Guest details given at checkout (`PATCH …/fromuser`).
    GuestDetails,
    /// An anonymous shopper registered (`PUT v1/me/register`).
    Registered,
    /// An anonymous order transferred to a logged-in shopper (`PUT v1/me/orders`).
    AnonOrderTransferred,
}

impl IntentKind {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            IntentKind::LinesUpserted => "line_upsert",
            IntentKind::LineDeleted => "line_delete",
            IntentKind::CartDeleted => "cart_delete",
            IntentKind::OrderSubmitted => "submit",
            IntentKind::GuestDetails => "fromuser",
            IntentKind::Registered => "register",
            IntentKind::AnonOrderTransferred => "transfer",
        }
    }
}

/// The dedupe key of an order's submit, whichever path brings it (the webhook, or reconciliation
/// with OrderCloud): one submit per order is ever stored, so CDP gets one order per OrderCloud order.
pub fn submit_dedupe_key(order_id: &str) -> String {
    format!("order-submit:{order_id}")
}

/// Which OrderCloud API the shopper's call went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteFamily {
    /// `v1/orders/{direction}/{orderID}/…`: carries the order ID.
    Orders,
    /// `v1/cart/…`: carries no order ID.
    Cart,
    /// `v1/me/…`.
    Me,
}

/// One stored intent: everything delivery needs, without the tokens (kept apart, see [`IntentSecrets`]).
///
/// `B` is how the webhook's request and response bodies are held: parsed ([`Value`], what delivery
/// reads) or as the webhook's own JSON text ([`RawIntent`], what intake stores without building a
/// tree of them). Both serialize to the same stored JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent<B = Value> {
    pub kind: IntentKind,
    pub family: RouteFamily,
    pub verb: String,
    pub route: String,
    pub direction: Option<String>,
    pub order_id: Option<String>,
    pub line_item_id: Option<String>,
    /// When the shopper acted: the webhook's Date, else the time of receipt (epoch ms).
    pub occurred_at_ms: i64,
    pub request_body: B,
    pub response_body: B,
    /// Query parameters with any token removed.
    pub query_params: Map<String, Value>,
    /// Facts from the UserToken's claims.
    pub client_id: Option<String>,
    pub api_url: Option<String>,
    pub anonymous: bool,
    pub anon_order_id: Option<String>,
    pub token_expires_at: Option<i64>,
}

/// An intent with its bodies as the webhook's own JSON text: what intake builds and stores, and what
/// a claim reads back. Most intents are delivered without a tree of their bodies ever being built
/// (a line item's ~2 KB, a submitted order's more): the few readings that need one parse them then.
pub type RawIntent = Intent<Box<RawValue>>;

impl RawIntent {
    /// The request body as a tree.
    pub fn request(&self) -> Result<Value, UnreadableIntent> {
        Ok(serde_json::from_str(self.request_body.get())?)
    }

    /// The response body as a tree.
    pub fn response(&self) -> Result<Value, UnreadableIntent> {
        Ok(serde_json::from_str(self.response_body.get())?)
    }

    /// The whole intent as a tree (what an order's landing check keeps).
    pub fn parsed(&self) -> Result<Value, UnreadableIntent> {
        Ok(serde_json::to_value(self)?)
    }
}

/// A stored intent, or one of its bodies, that cannot be read back: a damaged row, or text no JSON
/// tree can hold (a number out of range, nesting past 128), which intake refuses, so a row written
/// by something else. The intent is dead-lettered alone with this reason.
#[derive(Debug, thiserror::Error)]
#[error("the stored intent cannot be read back: {0}")]
pub struct UnreadableIntent(#[from] serde_json::Error);

/// Whether the JSON pointer `pointer` could resolve in the JSON text `body`, told without parsing
/// it: each of its segments that is not an array index is an object key, which the text must then
/// hold as written — unless the text has escapes, which could spell a key otherwise.
pub fn may_resolve(body: &str, pointer: &str) -> bool {
    body.contains('\\')
        || pointer
            .split('/')
            .skip(1)
            .filter(|segment| segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()))
            .all(|segment| body.contains(&*segment.replace("~1", "/").replace("~0", "~")))
}

/// Live credentials an intent needs for its OrderCloud reads; stored apart and erased once the
/// intent has been enriched or has left the queue.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IntentSecrets {
    pub user_token: Option<String>,
    /// `QueryParams.anonUserToken` of register and transfer calls.
    pub anon_user_token: Option<String>,
    /// The new user's `access_token` from a register response.
    #[serde(default)]
    pub registered_token: Option<String>,
}

impl std::fmt::Debug for IntentSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentSecrets")
            .field("user_token", &self.user_token.as_ref().map(|_| "********"))
            .field("anon_user_token", &self.anon_user_token.as_ref().map(|_| "********"))
            .field("registered_token", &self.registered_token.as_ref().map(|_| "********"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pointer_may_resolve_only_where_the_text_holds_its_keys() {
        let body = r#"{"xp":{"cdpBrowserId":"b-1"},"Items":[{"a/b":1,"t~":2}]}"#;
        for pointer in ["/xp/cdpBrowserId", "/Items/0/a~1b", "/Items/0/t~0", "/Items/17"] {
            assert!(may_resolve(body, pointer), "{pointer}");
        }
        for pointer in ["/xp/cdpbrowserid", "/Order/xp/cdpBrowserId", "/Items/0/a~0b"] {
            assert!(!may_resolve(body, pointer), "{pointer}");
        }
        // Wherever the text escapes, a key could be spelt otherwise: it is read.
        let escaped = r#"{"xp":{"cdpBrowser\u0049d":"b-1"}}"#;
        assert!(may_resolve(escaped, "/xp/cdpBrowserId"));
        let parsed: Value = serde_json::from_str(escaped).unwrap();
        assert_eq!(parsed.pointer("/xp/cdpBrowserId").and_then(Value::as_str), Some("b-1"));
    }
}
