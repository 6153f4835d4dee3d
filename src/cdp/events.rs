//! CDP events (data model 2.1, direct-HTTP wire names; see reference/cdp.md §7).

use serde::{Deserialize, Serialize};
#[cfg(test)]
use serde_json::Value;

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
    /// The event's JSON as CDP takes it: the base fields (§7.1), the event's own, and `client_key`
    /// when given (the POST transport carries it in the body). Written in one pass, no tree between.
    pub(crate) fn wire_json(&self, client_key: Option<&str>) -> Result<String, serde_json::Error> {
        serde_json::to_string(&self.wire(client_key))
    }

    /// The event's JSON as a tree (what [`Event::wire_json`] writes, without the client key), for
    /// tests to read.
    #[cfg(test)]
    pub fn to_wire(&self) -> Value {
        serde_json::to_value(self.wire(None)).unwrap_or(Value::Null)
    }

    fn wire<'a>(&'a self, client_key: Option<&'a str>) -> Wire<'a> {
        Wire {
            channel: &self.session.channel,
            language: &self.language,
            currency: &self.currency,
            page: &self.page,
            pos: &self.session.pos,
            browser_id: &self.session.browser_id,
            kind: &self.kind,
            client_key,
        }
    }
}

/// An event as it goes on the wire. The event's own fields never share a name with these.
#[derive(Serialize)]
struct Wire<'a> {
    channel: &'a str,
    language: &'a str,
    currency: &'a str,
    page: &'a str,
    pos: &'a str,
    browser_id: &'a str,
    #[serde(flatten)]
    kind: &'a EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: EventKind) -> Event {
        Event {
            session: session(),
            language: "EN".into(),
            currency: "EUR".into(),
            page: "checkout".into(),
            kind,
        }
    }

    fn product() -> Product {
        Product {
            product_type: "PRODUCT".into(),
            item_id: "X".into(),
            name: "X".into(),
            ordered_at: "2026-01-01T00:00:00.000Z".into(),
            quantity: 2,
            price: 9.5,
            product_id: "X".into(),
            currency: "EUR".into(),
            reference_id: "L1".into(),
        }
    }

    fn session() -> SessionRef {
        SessionRef {
            channel: "WEB".into(),
            browser_id: "b1".into(),
            pos: "shop".into(),
        }
    }

    #[test]
    fn wire_format_follows_the_reference() {
        let confirm = event(EventKind::Confirm {
            product: vec![ItemRef {
                item_id: "SHOES".into(),
            }],
        });
        assert_eq!(
            confirm.to_wire(),
            json!({"channel":"WEB","type":"CONFIRM","language":"EN","currency":"EUR","page":"checkout",
                   "pos":"shop","browser_id":"b1","product":[{"item_id":"SHOES"}]})
        );
        let add = event(EventKind::Add { product: product() });
        let wire = add.to_wire();
        assert_eq!(wire["product"]["quantity"], json!(2));
        assert_eq!(wire["product"]["price"], json!(9.5));
        assert_eq!(wire["product"]["orderedAt"], json!("2026-01-01T00:00:00.000Z"));
        assert_eq!(event(EventKind::ClearCart).to_wire()["type"], json!("CLEAR_CART"));
    }

    /// Every kind, written straight to bytes: the base fields and the event's own, each key once
    /// (a tree would hide a key written twice), and the client key only when given.
    #[test]
    fn the_wire_json_holds_each_field_once_and_the_client_key_only_when_given() {
        let kinds = [
            EventKind::Identity {
                identifiers: vec![Identifier {
                    provider: "ordercloud".into(),
                    id: "b-u".into(),
                }],
                email: Some("a@b.c".into()),
                firstname: None,
                lastname: Some("L".into()),
                phone: None,
            },
            EventKind::Add { product: product() },
            EventKind::ClearCart,
            EventKind::Confirm {
                product: vec![ItemRef { item_id: "X".into() }],
            },
            EventKind::Checkout {
                reference_id: "O1".into(),
                status: "PURCHASED".into(),
            },
            EventKind::OrderCheckout {
                order: OrderPayload {
                    reference_id: "O1".into(),
                    ordered_at: "2026-01-01T00:00:00.000Z".into(),
                    status: "PURCHASED".into(),
                    currency_code: "EUR".into(),
                    price: 19.0,
                    payment_type: "Card".into(),
                    card_type: None,
                    order_items: vec![],
                },
            },
        ];
        for kind in kinds {
            // A kind added to EventKind fails to compile here: add it here and to the list above.
            match &kind {
                EventKind::Identity { .. }
                | EventKind::Add { .. }
                | EventKind::ClearCart
                | EventKind::Confirm { .. }
                | EventKind::Checkout { .. }
                | EventKind::OrderCheckout { .. } => {}
            }
            let event = event(kind);
            let mut expected = serde_json::to_value(&event.kind).unwrap();
            for (key, value) in [
                ("channel", "WEB"),
                ("language", "EN"),
                ("currency", "EUR"),
                ("page", "checkout"),
                ("pos", "shop"),
                ("browser_id", "b1"),
            ] {
                expected[key] = json!(value);
            }
            let without = event.wire_json(None).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&without).unwrap(),
                expected,
                "{}",
                event.kind.name()
            );
            assert_eq!(event.to_wire(), expected);
            let text = event.wire_json(Some("the-key")).unwrap();
            let mut keys: Vec<String> = crate::cdp::client::object_entries(text.as_bytes())
                .unwrap()
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            let written = keys.len();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), written, "a key written twice: {text}");
            assert!(keys.contains(&"client_key".to_string()));
            assert!(!without.contains("client_key"));
            expected["client_key"] = json!("the-key");
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        }
    }
}
