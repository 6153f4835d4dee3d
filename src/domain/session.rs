//! What the forwarder knows of one CDP session (channel + browser id), and how each event CDP
//! acknowledges changes it. CDP closes a session after the point of sale's idle timeout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cdp::{Event, EventKind, SessionRef};

/// The facts kept per (channel, browser id).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionFacts {
    pub channel: String,
    pub browser_id: String,
    pub shopper_key: String,
    /// When CDP last acknowledged an event of this session (epoch ms).
    pub last_event_at_ms: i64,
    /// item_ids ADDed in this session and not cleared since, with the quantity and price last sent.
    #[serde(default)]
    pub items: BTreeMap<String, ItemFingerprint>,
    /// The identity sent in an IDENTITY event of this session, if any.
    pub identified_as: Option<String>,
}

/// The quantity and unit price CDP holds for one item_id of a session's cart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemFingerprint {
    pub quantity: i64,
    pub price: f64,
}

impl SessionFacts {
    /// Facts for a session the forwarder has not sent to yet.
    pub fn new(session: &SessionRef, shopper_key: &str) -> SessionFacts {
        SessionFacts {
            channel: session.channel.clone(),
            browser_id: session.browser_id.clone(),
            shopper_key: shopper_key.to_string(),
            last_event_at_ms: i64::MIN / 2,
            items: BTreeMap::new(),
            identified_as: None,
        }
    }

    /// Whether the session is still open at `now_ms`, given the effective idle timeout.
    pub fn is_open(&self, now_ms: i64, idle_ms: i64) -> bool {
        now_ms - self.last_event_at_ms < idle_ms
    }

    /// Updates the facts after CDP acknowledged `event` at `now_ms`.
    pub fn acknowledge(&mut self, event: &Event, now_ms: i64, idle_ms: i64) {
        if !self.is_open(now_ms, idle_ms) {
            // The previous session closed: this event opened a new, empty one.
            self.items.clear();
            self.identified_as = None;
        }
        self.last_event_at_ms = now_ms;
        match &event.kind {
            EventKind::Identity { identifiers, .. } => {
                self.identified_as = identifiers.first().map(|i| i.id.clone());
            }
            EventKind::Add { product } => {
                self.items.insert(
                    product.item_id.clone(),
                    ItemFingerprint {
                        quantity: product.quantity,
                        price: product.price,
                    },
                );
            }
            // CHECKOUT converts the session's cart into an order; CLEAR_CART empties it.
            EventKind::ClearCart | EventKind::Checkout { .. } => self.items.clear(),
            EventKind::Confirm { .. } | EventKind::OrderCheckout { .. } => {}
        }
    }
}
