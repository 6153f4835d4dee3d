//! What a CDP session holds, as the forwarder tracks it: the view the planner reads, and how each
//! acknowledged event changes it. CDP closes a session after the point of sale's idle timeout; the
//! forwarder treats it as closed a safety margin earlier.

use std::collections::BTreeMap;

use crate::cdp::{Event, EventKind, SessionRef};
use crate::store::{ItemFingerprint, SessionFacts};

/// A session as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub session: SessionRef,
    /// item_id → what CDP's cart holds for it. Empty when the session is closed.
    pub items: BTreeMap<String, ItemFingerprint>,
    /// The identity sent by IDENTITY in this session, if it is still open.
    pub identified_as: Option<String>,
    pub open: bool,
}

impl SessionState {
    /// A session nothing is known of (a new browser, or one the forwarder never sent to).
    pub fn fresh(session: SessionRef) -> SessionState {
        SessionState {
            session,
            items: BTreeMap::new(),
            identified_as: None,
            open: false,
        }
    }

    /// The view of stored facts at `now_ms`, given the effective idle timeout.
    pub fn from_facts(session: SessionRef, facts: Option<&SessionFacts>, now_ms: i64, idle_ms: i64) -> SessionState {
        match facts {
            Some(f) if now_ms - f.last_event_at_ms < idle_ms => SessionState {
                session,
                items: f.items.clone(),
                identified_as: f.identified_as.clone(),
                open: true,
            },
            _ => SessionState::fresh(session),
        }
    }
}

/// Updates stored facts after CDP acknowledged `event` at `now_ms`.
pub fn apply(facts: &mut SessionFacts, event: &Event, now_ms: i64, idle_ms: i64) {
    if now_ms - facts.last_event_at_ms >= idle_ms {
        // The previous session closed: this event opened a new, empty one.
        facts.items.clear();
        facts.identified_as = None;
    }
    facts.last_event_at_ms = now_ms;
    match &event.kind {
        EventKind::Identity { identifiers, .. } => {
            facts.identified_as = identifiers.first().map(|i| i.id.clone());
        }
        EventKind::Add { product } => {
            facts.items.insert(
                product.item_id.clone(),
                ItemFingerprint {
                    quantity: product.quantity,
                    price: product.price,
                },
            );
        }
        // CHECKOUT converts the session's cart into an order; CLEAR_CART empties it.
        EventKind::ClearCart | EventKind::Checkout { .. } => facts.items.clear(),
        EventKind::Confirm { .. } | EventKind::OrderCheckout { .. } => {}
    }
}

/// Facts for a session the forwarder has not sent to yet.
pub fn new_facts(session: &SessionRef, shopper_key: &str) -> SessionFacts {
    SessionFacts {
        channel: session.channel.clone(),
        browser_id: session.browser_id.clone(),
        shopper_key: shopper_key.to_string(),
        last_event_at_ms: i64::MIN / 2,
        items: BTreeMap::new(),
        identified_as: None,
    }
}
