//! The planner: pure functions from an intent's facts and what CDP's sessions already hold to the
//! CDP events to send, in order. No I/O here, so every rule is testable with plain values.
//!
//! Rules (see README "How orders reach CDP"):
//! - IDENTITY goes before the first event a browser sends in each session.
//! - A line change is an ADD (upsert by item_id); a line removal is CLEAR_CART then an ADD per remaining line.
//! - A submit is CONFIRM + CHECKOUT when the session holds every line as it is; otherwise IDENTITY and
//!   an ADD for every line first (the session expired, or the cart was filled on another device).
//! - After an order, other open sessions of the shopper that hold its items get CLEAR_CART.

pub mod lines;
pub mod session;

use crate::cdp::events::ItemRef;
use crate::cdp::{Event, EventKind, Identifier, OrderPayload, Product, SessionRef};
use crate::config::{CdpSettings, OrderEvents};
pub use lines::{parse_lines, products, Line};
pub use session::SessionState;

/// Personal details sent with IDENTITY when known.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub email: Option<String>,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    pub phone: Option<String>,
}

impl Profile {
    /// Fills what `self` lacks from `other`.
    pub fn merged_with(&self, other: &Profile) -> Profile {
        Profile {
            email: self.email.clone().or_else(|| other.email.clone()),
            firstname: self.firstname.clone().or_else(|| other.firstname.clone()),
            lastname: self.lastname.clone().or_else(|| other.lastname.clone()),
            phone: self.phone.clone().or_else(|| other.phone.clone()),
        }
    }
}

/// What every plan needs: who, with which settings, in which currency, and when the shopper acted.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub cdp: &'a CdpSettings,
    pub identity: String,
    pub profile: Profile,
    /// Upper-case ISO 4217.
    pub currency: String,
    /// ISO 8601 UTC with milliseconds.
    pub ordered_at: String,
}

/// A submitted order.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderFacts {
    pub id: String,
    /// Order.Total, when known.
    pub total: Option<f64>,
}

/// Another session of the shopper (or of an anonymous shopper being linked to them).
#[derive(Debug, Clone, PartialEq)]
pub struct OtherSession {
    pub state: SessionState,
    /// Send IDENTITY there even if it holds nothing of the order (links an anonymous guest).
    pub must_link: bool,
}

/// Everything one intent's plan depends on, gathered before planning (`delivery::gather`): the
/// planner is called once with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Situation {
    /// Lines created or changed: the order's lines and those the intent touched.
    LinesUpserted {
        session: SessionState,
        lines: Vec<Line>,
        touched: Vec<Line>,
    },
    /// A line removed: the lines that remain.
    LineDeleted {
        session: SessionState,
        remaining: Vec<Line>,
    },
    CartDeleted {
        session: SessionState,
    },
    GuestDetails {
        session: SessionState,
    },
    Submitted {
        session: SessionState,
        order: OrderFacts,
        lines: Vec<Line>,
        others: Vec<OtherSession>,
    },
    /// An anonymous shopper became a registered one; `target` is the registered shopper's own
    /// session, when they have one apart from the anonymous one.
    Linked {
        anonymous: SessionState,
        target: Option<SessionState>,
        lines: Vec<Line>,
    },
}

/// The CDP events for a situation, in the order they must reach CDP.
pub fn plan(ctx: &Context, situation: &Situation) -> Vec<Event> {
    match situation {
        Situation::LinesUpserted {
            session,
            lines,
            touched,
        } => plan_lines_upserted(ctx, session, lines, touched),
        Situation::LineDeleted { session, remaining } => plan_line_deleted(ctx, session, remaining),
        Situation::CartDeleted { session } => plan_cart_deleted(ctx, session),
        Situation::GuestDetails { session } => plan_identify(ctx, session),
        Situation::Submitted {
            session,
            order,
            lines,
            others,
        } => plan_submit(ctx, session, order, lines, others),
        Situation::Linked {
            anonymous,
            target,
            lines,
        } => plan_link(ctx, anonymous, target.as_ref(), lines),
    }
}

impl Context<'_> {
    fn event(&self, session: &SessionRef, kind: EventKind) -> Event {
        Event {
            session: session.clone(),
            language: self.cdp.language.clone(),
            currency: self.currency.clone(),
            page: self.cdp.page.clone(),
            kind,
        }
    }

    fn identity_event(&self, session: &SessionRef) -> Event {
        let email = self.profile.email.as_ref().map(|e| e.trim().to_lowercase());
        self.event(
            session,
            EventKind::Identity {
                identifiers: vec![Identifier {
                    provider: self.cdp.identity_provider.clone(),
                    id: self.identity.clone(),
                }],
                email: email.filter(|e| !e.is_empty()),
                firstname: self.profile.firstname.clone().filter(|s| !s.is_empty()),
                lastname: self.profile.lastname.clone().filter(|s| !s.is_empty()),
                phone: self.profile.phone.clone().filter(|s| !s.is_empty()),
            },
        )
    }

    /// IDENTITY when the session has not been identified as this shopper yet.
    fn identify_if_needed(&self, state: &SessionState, events: &mut Vec<Event>) {
        if !state.open || state.identified_as.as_deref() != Some(self.identity.as_str()) {
            events.push(self.identity_event(&state.session));
        }
    }

    fn products(&self, lines: &[Line]) -> Vec<Product> {
        products(lines, self.cdp, &self.currency, &self.ordered_at)
    }

    fn adds(&self, session: &SessionRef, products: Vec<Product>, events: &mut Vec<Event>) {
        events.extend(
            products
                .into_iter()
                .map(|product| self.event(session, EventKind::Add { product })),
        );
    }
}

/// Lines created or changed: an ADD for each item_id they touch, carrying every line of the order
/// with that item_id (CDP keeps only the latest ADD per item_id).
pub fn plan_lines_upserted(ctx: &Context, state: &SessionState, order_lines: &[Line], touched: &[Line]) -> Vec<Event> {
    let touched_ids: Vec<&str> = touched.iter().map(|l| l.item_id(ctx.cdp.item_id)).collect();
    let mut lines: Vec<Line> = order_lines
        .iter()
        .filter(|l| touched_ids.contains(&l.item_id(ctx.cdp.item_id)))
        .cloned()
        .collect();
    // A touched line missing from the order's record still counts.
    for t in touched {
        if !lines.iter().any(|l| l.id == t.id) {
            lines.push(t.clone());
        }
    }
    let products = ctx.products(&lines);
    if products.is_empty() {
        return Vec::new();
    }
    let mut events = Vec::new();
    ctx.identify_if_needed(state, &mut events);
    ctx.adds(&state.session, products, &mut events);
    events
}

/// A line removed: CDP has no remove-one-line event, so CLEAR_CART then an ADD per remaining line.
pub fn plan_line_deleted(ctx: &Context, state: &SessionState, remaining: &[Line]) -> Vec<Event> {
    let mut events = Vec::new();
    ctx.identify_if_needed(state, &mut events);
    events.push(ctx.event(&state.session, EventKind::ClearCart));
    ctx.adds(&state.session, ctx.products(remaining), &mut events);
    events
}

/// The cart or unsubmitted order deleted: CLEAR_CART, so the session closes as cleared, not abandoned.
pub fn plan_cart_deleted(ctx: &Context, state: &SessionState) -> Vec<Event> {
    let mut events = Vec::new();
    ctx.identify_if_needed(state, &mut events);
    events.push(ctx.event(&state.session, EventKind::ClearCart));
    events
}

/// Guest details given: IDENTITY with them, always (they are news even in an identified session).
pub fn plan_identify(ctx: &Context, state: &SessionState) -> Vec<Event> {
    vec![ctx.identity_event(&state.session)]
}

/// True when the session holds every product exactly as it would be ADDed now.
pub fn session_holds(state: &SessionState, products: &[Product]) -> bool {
    state.open
        && products.iter().all(|p| {
            state.items.get(&p.item_id).is_some_and(|held| {
                held.quantity == p.quantity && (held.price - p.price).abs() * p.quantity as f64 <= 0.005
            })
        })
}

/// The order submitted. CONFIRM + CHECKOUT when the submitting session holds every line as it is;
/// otherwise IDENTITY and an ADD for every line first, back to back (a replay). Or, in
/// `order_checkout` mode, IDENTITY then ORDER_CHECKOUT. Then CLEAR_CART on the shopper's other
/// sessions that still hold items of the order.
pub fn plan_submit(
    ctx: &Context,
    state: &SessionState,
    order: &OrderFacts,
    lines: &[Line],
    others: &[OtherSession],
) -> Vec<Event> {
    let products = ctx.products(lines);
    let mut events = Vec::new();
    match ctx.cdp.order_events {
        OrderEvents::OrderCheckout => {
            events.push(ctx.identity_event(&state.session));
            let items = lines::order_items(&products);
            let price = order
                .total
                .unwrap_or_else(|| lines::round_cents(items.iter().map(|i| i.price).sum()));
            events.push(ctx.event(
                &state.session,
                EventKind::OrderCheckout {
                    order: OrderPayload {
                        reference_id: order.id.clone(),
                        ordered_at: ctx.ordered_at.clone(),
                        status: "PURCHASED".into(),
                        currency_code: ctx.currency.clone(),
                        price,
                        payment_type: ctx.cdp.payment_type.clone(),
                        card_type: ctx.cdp.card_type.clone(),
                        order_items: items,
                    },
                },
            ));
        }
        OrderEvents::ConfirmCheckout => {
            if session_holds(state, &products) {
                ctx.identify_if_needed(state, &mut events);
            } else {
                events.push(ctx.identity_event(&state.session));
                ctx.adds(&state.session, products.clone(), &mut events);
            }
            let confirmed = products
                .iter()
                .map(|p| ItemRef {
                    item_id: p.item_id.clone(),
                })
                .collect();
            events.push(ctx.event(&state.session, EventKind::Confirm { product: confirmed }));
            events.push(ctx.event(
                &state.session,
                EventKind::Checkout {
                    reference_id: order.id.clone(),
                    status: "PURCHASED".into(),
                },
            ));
        }
    }
    for other in others.iter().filter(|o| o.state.session != state.session) {
        let holds_order_items = other.state.open && products.iter().any(|p| other.state.items.contains_key(&p.item_id));
        if holds_order_items {
            ctx.identify_if_needed(&other.state, &mut events);
            events.push(ctx.event(&other.state.session, EventKind::ClearCart));
        } else if other.must_link {
            ctx.identify_if_needed(&other.state, &mut events);
        }
    }
    events
}

/// An anonymous shopper became a registered one (registration or order transfer).
/// IDENTITY with the registered identity on the anonymous browser, so CDP's identity rules merge the
/// guests. When the registered shopper has a session of their own (`target`), the transferred cart is
/// replayed there and the anonymous session is cleared; otherwise the anonymous browser is adopted and
/// its session already holds the cart.
pub fn plan_link(ctx: &Context, anonymous: &SessionState, target: Option<&SessionState>, lines: &[Line]) -> Vec<Event> {
    let mut events = vec![ctx.identity_event(&anonymous.session)];
    if let Some(target) = target.filter(|t| t.session != anonymous.session) {
        let products = ctx.products(lines);
        if !products.is_empty() {
            ctx.identify_if_needed(target, &mut events);
            ctx.adds(&target.session, products, &mut events);
        }
        events.push(ctx.event(&anonymous.session, EventKind::ClearCart));
    }
    events
}

#[cfg(test)]
mod tests;
