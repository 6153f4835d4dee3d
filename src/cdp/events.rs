//! CDP events (data model 2.1, direct-HTTP wire names; see reference/cdp.md §7).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The CDP session an event belongs to: channel + browser id (and the point of sale).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct SessionRef {
    pub channel: String,
    pub browser_id: String,
    pub pos: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identifier {
    pub provider: String,
    pub id: String,
}

/// ADD's `product` (§7.3). Numbers are JSON numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    #[serde(rename = "type")]
    pub product_type: String,
    pub item_id: String,
    pub name: String,
    #[serde(rename = "orderedAt")]
    pub ordered_at: String,
    pub quantity: i64,
    pub price: f64,
    #[serde(rename = "productId")]
    pub product_id: String,
    pub currency: String,
    #[serde(rename = "referenceId")]
    pub reference_id: String,
}

/// ORDER_CHECKOUT's `order.orderItems[]` (§7.6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderItem {
    #[serde(rename = "type")]
    pub item_type: String,
    #[serde(rename = "referenceId")]
    pub reference_id: String,
    #[serde(rename = "orderedAt")]
    pub ordered_at: String,
    pub status: String,
    #[serde(rename = "currencyCode")]
    pub currency_code: String,
    pub price: f64,
    pub name: String,
    #[serde(rename = "productId")]
    pub product_id: String,
    pub quantity: i64,
}

/// ORDER_CHECKOUT's `order` (§7.6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPayload {
    #[serde(rename = "referenceId")]
    pub reference_id: String,
    #[serde(rename = "orderedAt")]
    pub ordered_at: String,
    pub status: String,
    #[serde(rename = "currencyCode")]
    pub currency_code: String,
    pub price: f64,
    #[serde(rename = "paymentType")]
    pub payment_type: String,
    #[serde(rename = "cardType", skip_serializing_if = "Option::is_none")]
    pub card_type: Option<String>,
    #[serde(rename = "orderItems")]
    pub order_items: Vec<OrderItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventKind {
    #[serde(rename = "IDENTITY")]
    Identity {
        identifiers: Vec<Identifier>,
        #[serde(skip_serializing_if = "Option::is_none")]
        email: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        firstname: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        lastname: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        phone: Option<String>,
    },
    #[serde(rename = "ADD")]
    Add { product: Product },
    #[serde(rename = "CLEAR_CART")]
    ClearCart,
    /// `product` is always an array of `{item_id}`: an object is accepted but fails CHECKOUT (§8).
    #[serde(rename = "CONFIRM")]
    Confirm { product: Vec<ItemRef> },
    #[serde(rename = "CHECKOUT")]
    Checkout { reference_id: String, status: String },
    #[serde(rename = "ORDER_CHECKOUT")]
    OrderCheckout { order: OrderPayload },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRef {
    pub item_id: String,
}

impl EventKind {
    /// A CHECKOUT or an ORDER_CHECKOUT: the event CDP builds an order from (sent twice, it could
    /// build two).
    pub fn builds_order(&self) -> bool {
        matches!(self, EventKind::Checkout { .. } | EventKind::OrderCheckout { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Identity { .. } => "IDENTITY",
            EventKind::Add { .. } => "ADD",
            EventKind::ClearCart => "CLEAR_CART",
            EventKind::Confirm { .. } => "CONFIRM",
            EventKind::Checkout { .. } => "CHECKOUT",
            EventKind::OrderCheckout { .. } => "ORDER_CHECKOUT",
        }
    }
}

/// One event to send: the session it belongs to, the base fields and what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub session: SessionRef,
    pub language: String,
    pub currency: String,
    pub page: String,
    pub kind: EventKind,
}

impl Event {
    /// The event as CDP expects it: base fields (§7.1) plus the event's own.
    pub fn to_wire(&self) -> Value {
        let mut body = match serde_json::to_value(&self.kind) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let base = json!({
            "channel": self.session.channel,
            "language": self.language,
            "currency": self.currency,
            "page": self.page,
            "pos": self.session.pos,
            "browser_id": self.session.browser_id,
        });
        if let Value::Object(base) = base {
            body.extend(base);
        }
        Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionRef {
        SessionRef {
            channel: "WEB".into(),
            browser_id: "b1".into(),
            pos: "shop".into(),
        }
    }

    #[test]
    fn wire_format_follows_the_reference() {
        let confirm = Event {
            session: session(),
            language: "EN".into(),
            currency: "EUR".into(),
            page: "checkout".into(),
            kind: EventKind::Confirm {
                product: vec![ItemRef {
                    item_id: "SHOES".into(),
                }],
            },
        };
        assert_eq!(
            confirm.to_wire(),
            json!({"channel":"WEB","type":"CONFIRM","language":"EN","currency":"EUR","page":"checkout",
                   "pos":"shop","browser_id":"b1","product":[{"item_id":"SHOES"}]})
        );
        let add = Event {
            kind: EventKind::Add {
                product: Product {
                    product_type: "PRODUCT".into(),
                    item_id: "X".into(),
                    name: "X".into(),
                    ordered_at: "2026-01-01T00:00:00.000Z".into(),
                    quantity: 2,
                    price: 9.5,
                    product_id: "X".into(),
                    currency: "EUR".into(),
                    reference_id: "L1".into(),
                },
            },
            ..confirm.clone()
        };
        let wire = add.to_wire();
        assert_eq!(wire["product"]["quantity"], json!(2));
        assert_eq!(wire["product"]["price"], json!(9.5));
        assert_eq!(wire["product"]["orderedAt"], json!("2026-01-01T00:00:00.000Z"));
        let clear = Event {
            kind: EventKind::ClearCart,
            ..confirm
        };
        assert_eq!(clear.to_wire()["type"], json!("CLEAR_CART"));
    }
}
