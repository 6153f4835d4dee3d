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

/// An intent as intake builds it: the bodies are slices of the webhook's JSON, stored as they came.
pub type RawIntent = Intent<Box<RawValue>>;

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
