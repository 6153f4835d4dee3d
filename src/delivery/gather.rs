//! Gather: everything one claimed intent's plan needs, read from the store once — the shopper's
//! record, the forwarder's record of the cart, what CDP's sessions hold — and the writes that
//! follow from the intent itself (the record of the cart, the shopper's details and browser).
//! Nothing here talks to CDP; the planner is then called with [`Gathered::situation`].

use std::collections::HashMap;

use serde::Deserialize as _;
use serde_json::value::RawValue;
use serde_json::Value;

use super::enrich::{profile_of, without_network, Enrichment};
use super::settle::Failure;
use super::Deps;
use crate::cdp::{Event, SessionRef};
use crate::config::CdpSettings;
use crate::domain::intent::{may_resolve, IntentKind, UnreadableIntent};
use crate::domain::{now_ms, BrowserId, CartLine, SessionFacts, ShopperState};
use crate::planner::{self, parse_lines, Context, Line, OrderFacts, OtherSession, Profile, SessionState, Situation};
use crate::store::{ClaimedIntent, StoreError, Write};

/// One intent's facts, gathered.
pub struct Gathered {
    /// The intent's shopper (queue key).
    pub key: String,
    pub kind: IntentKind,
    pub enrichment: Enrichment,
    pub channel: String,
    pub pos: String,
    /// A session idle this long counts as closed (milliseconds).
    pub idle_ms: i64,
    /// The shopper's record as it is to be stored: identity, details, and the browser on `channel`
    /// once known.
    pub shopper: ShopperState,
    /// The browser on `channel` is not the stored one: it must be stored before its first use.
    pub browser_is_new: bool,
    /// `shopper` differs from the stored record.
    pub shopper_changed: bool,
    /// The record of the anonymous shopper this intent links, or whose cart a submit carries.
    pub anon_state: Option<ShopperState>,
    /// The record of the registered shopper an anonymous one becomes, when it is another shopper.
    pub registered_state: Option<ShopperState>,
    pub identity: String,
    pub profile: Profile,
    pub currency: String,
    pub ordered_at: String,
    pub order_id: String,
    /// Lines the intent touched (upserts).
    pub touched: Vec<Line>,
    /// The order's lines as planning should see them.
    pub lines: Vec<Line>,
    /// Queue key of an anonymous shopper whose records this intent links.
    pub anon_key: Option<String>,
    /// Order.Total of a submitted order.
    pub order_total: Option<f64>,
    /// What is known of each session the plan may touch; updated as CDP acknowledges events.
    pub sessions: HashMap<SessionRef, SessionFacts>,
    /// The shopper's other sessions, open when gathered (a submit clears them).
    others: Vec<SessionRef>,
    /// Sessions of the anonymous shopper a submit links at the latest.
    anon_links: Vec<SessionRef>,
    /// Writes that follow from the intent itself, made with the first progress or the ack.
    pub writes: Vec<Write>,
    /// The recorded lines a submit was planned from, when OrderCloud's could not be read.
    pub planned_from_record: Option<Vec<Value>>,
    /// A submit's intent as its order's landing check keeps it (when orders are verified; submits
    /// are the only intents whose events build orders), parsed here, before any event is sent:
    /// bodies no tree can hold make a dead letter, not an order sent without its check.
    pub checked_intent: Option<Value>,
}

pub async fn gather(deps: &Deps, claimed: &ClaimedIntent) -> Result<Gathered, Failure> {
    let cdp = &deps.settings.cdp;
    let store: &dyn crate::store::Shoppers = &*deps.store;
    let intent = &claimed.intent;
    let key = claimed.shopper_key.as_str();
    let checked_intent = (intent.kind == IntentKind::OrderSubmitted && deps.settings.verifies_orders())
        .then(|| intent.parsed())
        .transpose()?;
    let enrichment: Enrichment = match &claimed.enrichment {
        Some(v) => {
            // Read in place: a submit's enrichment holds the order's lines, not cloned to be read.
            Enrichment::deserialize(v).map_err(|e| Failure::Dead(format!("unreadable enrichment: {e}")))?
        }
        // Intake found nothing to read from OrderCloud for it.
        None => without_network(intent)?.ok_or_else(|| Failure::Dead("the intent was never enriched".into()))?,
    };
    let (channel, pos) = cdp.channel_for(intent.client_id.as_deref());
    let (channel, pos) = (channel.to_string(), pos.to_string());

    // The order (Cart API routes name none: the shopper's cart).
    let link = enrichment.link.clone();
    let order_id = enrichment
        .order_id
        .clone()
        .or_else(|| intent.order_id.clone())
        .or_else(|| link.as_ref().and_then(|l| l.anon_order_id.clone()))
        .unwrap_or_else(|| format!("cart:{key}"));
    // The shopper's record, the record of the cart, and the session of the stored browser, in one
    // read where the store can.
    // A submit clears the shopper's other open sessions.
    let idle_ms = cdp.session_idle().as_millis() as i64;
    let open_since = (intent.kind == IntentKind::OrderSubmitted).then(|| now_ms() - idle_ms);
    let crate::store::DeliveryReads {
        shopper: stored_shopper,
        cart: recorded,
        session: stored_session,
        open_sessions,
        session_unreadable,
    } = store.delivery_reads(key, &order_id, &channel, open_since).await?;

    // The shopper: identity, details, browser.
    let mut shopper = stored_shopper.clone().unwrap_or_default();
    shopper.identity = Some(enrichment.identity.clone());
    let mut given = enrichment.profile.clone();
    if intent.kind == IntentKind::GuestDetails {
        given = profile_of(&intent.request()?).merged_with(&given);
    }
    let known = Profile {
        email: shopper.email.clone(),
        firstname: shopper.firstname.clone(),
        lastname: shopper.lastname.clone(),
        phone: shopper.phone.clone(),
    };
    let profile = given.merged_with(&known);
    shopper.email = profile.email.clone();
    shopper.firstname = profile.firstname.clone();
    shopper.lastname = profile.lastname.clone();
    shopper.phone = profile.phone.clone();

    let mut anon_state = match link.as_ref().and_then(|l| l.anon_shopper_key.as_deref()) {
        Some(anon) if anon != key => store.shopper(anon).await?,
        _ => None,
    };
    let pointer_browser = browser_from_bodies(&cdp.browser_id_pointers, [&intent.request_body, &intent.response_body])?;
    if let Some(b) = pointer_browser {
        shopper.browsers.insert(channel.clone(), b);
    } else if intent.kind == IntentKind::AnonOrderTransferred && !shopper.browsers.contains_key(&channel) {
        // A logged-in shopper without a browser of their own adopts the anonymous one.
        if let Some(b) = anon_state.as_ref().and_then(|a| a.browsers.get(&channel)) {
            shopper.browsers.insert(channel.clone(), b.clone());
        }
    }
    let stored_browser = stored_shopper.as_ref().and_then(|s| s.browsers.get(&channel));
    let browser_is_new = shopper.browsers.get(&channel) != stored_browser;
    let shopper_changed = stored_shopper.as_ref() != Some(&shopper);

    // A submit planned from the record of its cart (OrderCloud's lines could not be read): the
    // record is deleted with the ack, so its lines go with the order's landing check, whose repair
    // plans from them.
    let planned_from_record = (intent.kind == IntentKind::OrderSubmitted
        // As `record_cart` decides: OrderCloud's lines are used when any of them is a line.
        && enrichment
            .lines
            .as_ref()
            .is_none_or(|lines| !lines.iter().any(|l| planner::lines::Line::from_json(l, cdp).is_some()))
        && !recorded.is_empty())
    .then(|| recorded.iter().map(|l| l.line.clone()).collect());
    let cart = record_cart(cdp, claimed, &enrichment, &order_id, recorded)?;
    let anon_key = cart.anon_key;

    let (identity, profile) = match (&intent.kind, &link) {
        (IntentKind::Registered, Some(link)) => (
            link.registered_identity.clone(),
            link.registered_profile.merged_with(&profile),
        ),
        _ => (enrichment.identity.clone(), profile),
    };
    let registered_key = link.as_ref().map(|l| l.registered_shopper_key.clone());

    // What CDP's sessions hold: the shopper's own, and those of the shoppers the intent links.
    let mut sessions = HashMap::new();
    let session_on = |channel: &str, browser: &str| SessionRef {
        channel: channel.to_string(),
        browser_id: browser.to_string(),
        pos: cdp.pos_for_channel(channel).to_string(),
    };
    if let Some(browser) = shopper.browsers.get(&channel) {
        // Read again when unreadable: it fails as it did.
        if browser_is_new || session_unreadable {
            read_session(store, &mut sessions, session_on(&channel, browser)).await?;
        } else if let Some(facts) = stored_session {
            // The stored browser's session, read with the shopper.
            sessions.insert(session_on(&channel, browser), facts);
        }
    }
    let mut others = Vec::new();
    let mut anon_links = Vec::new();
    let mut registered_state = None;
    match intent.kind {
        IntentKind::OrderSubmitted => {
            for facts in open_sessions {
                let session = session_on(&facts.channel, &facts.browser_id);
                others.push(session.clone());
                sessions.entry(session).or_insert(facts);
            }
            // Lines recorded under an anonymous shopper: link that guest now, at the latest.
            if let Some(anon) = anon_key.as_deref().filter(|a| *a != key) {
                let anon_shopper = store.shopper(anon).await?.unwrap_or_default();
                for (anon_channel, browser) in &anon_shopper.browsers {
                    let session = session_on(anon_channel, browser);
                    read_session(store, &mut sessions, session.clone()).await?;
                    anon_links.push(session);
                }
                anon_state = Some(anon_shopper);
            }
        }
        IntentKind::Registered => {
            let registered_key = registered_key.clone().unwrap_or_default();
            let registered = if registered_key == key {
                shopper.clone()
            } else {
                store.shopper(&registered_key).await?.unwrap_or_default()
            };
            if let Some(browser) = registered.browsers.get(&channel) {
                read_session(store, &mut sessions, session_on(&channel, browser)).await?;
            }
            registered_state = Some(registered);
        }
        IntentKind::AnonOrderTransferred => {
            if let Some(browser) = anon_state.as_ref().and_then(|a| a.browsers.get(&channel)) {
                read_session(store, &mut sessions, session_on(&channel, browser)).await?;
            }
            if let Some(registered) = registered_key.as_deref().filter(|r| *r != key) {
                registered_state = Some(store.shopper(registered).await?.unwrap_or_default());
            }
        }
        _ => {}
    }
    // The anonymous shopper's sessions become the registered shopper's once the intent is done.
    let adopting = match intent.kind {
        IntentKind::OrderSubmitted => anon_key.as_deref().filter(|a| *a != key),
        IntentKind::Registered | IntentKind::AnonOrderTransferred => {
            link.as_ref().and_then(|l| l.anon_shopper_key.as_deref())
        }
        _ => None,
    };
    if let Some(anon) = adopting {
        for facts in store.sessions_of(anon, i64::MIN).await? {
            let session = session_on(&facts.channel, &facts.browser_id);
            sessions.entry(session).or_insert(facts);
        }
    }

    Ok(Gathered {
        key: key.to_string(),
        kind: intent.kind,
        currency: pick_currency(
            &[
                enrichment.order_currency.as_deref(),
                enrichment.locale_currency.as_deref(),
            ],
            &cdp.currency,
        ),
        ordered_at: chrono::DateTime::from_timestamp_millis(intent.occurred_at_ms)
            .unwrap_or_else(chrono::Utc::now)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        order_total: enrichment.order_total,
        enrichment,
        channel,
        pos,
        idle_ms,
        shopper,
        browser_is_new,
        shopper_changed,
        anon_state,
        registered_state,
        identity,
        profile,
        order_id,
        touched: cart.touched,
        lines: cart.lines,
        anon_key,
        sessions,
        others,
        anon_links,
        writes: cart.writes,
        planned_from_record,
        checked_intent,
    })
}

/// Reads a session's facts into `sessions`, unless they are there already.
async fn read_session(
    store: &dyn crate::store::Shoppers,
    sessions: &mut HashMap<SessionRef, SessionFacts>,
    session: SessionRef,
) -> Result<(), StoreError> {
    if let std::collections::hash_map::Entry::Vacant(entry) = sessions.entry(session) {
        let session = entry.key();
        if let Some(facts) = store.session(&session.channel, &session.browser_id).await? {
            entry.insert(facts);
        }
    }
    Ok(())
}

/// What the intent does to the forwarder's record of its cart, and the lines planning sees.
struct CartView {
    lines: Vec<Line>,
    touched: Vec<Line>,
    anon_key: Option<String>,
    writes: Vec<Write>,
}

fn record_cart(
    cdp: &CdpSettings,
    claimed: &ClaimedIntent,
    enrichment: &Enrichment,
    order_id: &str,
    recorded: Vec<CartLine>,
) -> Result<CartView, Failure> {
    let intent = &claimed.intent;
    let key = claimed.shopper_key.as_str();
    let snapshot = enrichment.lines.as_ref().map(|l| parse_lines(l, cdp));
    let anon_key = enrichment
        .link
        .as_ref()
        .and_then(|l| l.anon_shopper_key.clone())
        .or_else(|| {
            recorded
                .iter()
                .find(|l| l.shopper_key.starts_with("anon-") && l.shopper_key != key)
                .map(|l| l.shopper_key.clone())
        });
    // Parsed where they are, not copied first.
    let recorded_lines = |record: &[CartLine]| parse_lines(record.iter().map(|l| &l.line), cdp);
    let mut writes = Vec::new();
    let mut touched = Vec::new();
    let now = now_ms();
    let lines = match intent.kind {
        IntentKind::LinesUpserted => {
            let bodies = touched_lines(claimed, &recorded)?;
            let mut record = recorded;
            for line in bodies {
                if let Some(id) = line.get("ID").and_then(Value::as_str) {
                    let updated = CartLine {
                        order_id: order_id.to_string(),
                        line_id: id.to_string(),
                        shopper_key: key.to_string(),
                        line: planner::lines::Line::kept(&line),
                        updated_at_ms: now,
                    };
                    writes.push(Write::CartLine(updated.clone()));
                    match record.iter_mut().find(|l| l.line_id == id) {
                        Some(existing) => *existing = updated,
                        None => record.push(updated),
                    }
                }
                touched.extend(planner::lines::Line::from_json(&line, cdp));
            }
            recorded_lines(&record)
        }
        IntentKind::LineDeleted => {
            let mut record = recorded;
            if let Some(id) = &intent.line_item_id {
                writes.push(Write::DeleteCartLine {
                    order_id: order_id.to_string(),
                    line_id: id.clone(),
                });
                record.retain(|l| l.line_id != *id);
            }
            match &enrichment.lines {
                // The record becomes the snapshot read from OrderCloud.
                Some(lines) => {
                    for line in lines {
                        if let Some(id) = line.get("ID").and_then(Value::as_str) {
                            writes.push(Write::CartLine(CartLine {
                                order_id: order_id.to_string(),
                                line_id: id.to_string(),
                                shopper_key: key.to_string(),
                                line: planner::lines::Line::kept(line),
                                updated_at_ms: now,
                            }));
                        }
                    }
                    for old in &record {
                        if !lines
                            .iter()
                            .any(|l| l.get("ID").and_then(Value::as_str) == Some(old.line_id.as_str()))
                        {
                            writes.push(Write::DeleteCartLine {
                                order_id: order_id.to_string(),
                                line_id: old.line_id.clone(),
                            });
                        }
                    }
                    snapshot.unwrap_or_default()
                }
                None => recorded_lines(&record),
            }
        }
        IntentKind::CartDeleted => {
            writes.push(Write::DeleteCart {
                order_id: order_id.to_string(),
            });
            Vec::new()
        }
        IntentKind::OrderSubmitted | IntentKind::AnonOrderTransferred | IntentKind::Registered => match snapshot {
            Some(lines) if !lines.is_empty() => lines,
            _ => recorded_lines(&recorded),
        },
        IntentKind::GuestDetails => Vec::new(),
    };
    if intent.kind == IntentKind::OrderSubmitted && lines.is_empty() {
        return Err(Failure::Dead(format!(
            "no line items known for order {order_id}: OrderCloud could not be read ({}) and none were recorded",
            enrichment.lines_error.as_deref().unwrap_or("no lines")
        )));
    }
    Ok(CartView {
        lines,
        touched,
        anon_key,
        writes,
    })
}

impl Gathered {
    /// The shopper's browser on the intent's channel, once known.
    pub fn browser(&self) -> Option<&str> {
        self.shopper.browsers.get(&self.channel).map(String::as_str)
    }

    /// A new browser for the shopper on the intent's channel (minted): the session starts empty.
    pub fn use_browser(&mut self, browser: String) {
        self.shopper.browsers.insert(self.channel.clone(), browser);
        self.browser_is_new = true;
        self.shopper_changed = true;
    }

    /// The session the intent's events go to.
    pub fn primary(&self) -> Option<SessionRef> {
        self.browser().map(|browser| SessionRef {
            channel: self.channel.clone(),
            browser_id: browser.to_string(),
            pos: self.pos.clone(),
        })
    }

    pub fn context<'a>(&self, cdp: &'a CdpSettings) -> Context<'a> {
        Context {
            cdp,
            identity: self.identity.clone(),
            profile: self.profile.clone(),
            currency: self.currency.clone(),
            ordered_at: self.ordered_at.clone(),
        }
    }

    fn state(&self, session: &SessionRef, now_ms: i64) -> SessionState {
        SessionState::from_facts(session.clone(), self.sessions.get(session), now_ms, self.idle_ms)
    }

    /// Whether the session is open at `now_ms`, as far as the forwarder knows.
    pub fn is_open(&self, session: &SessionRef, now_ms: i64) -> bool {
        self.state(session, now_ms).open
    }

    /// What the planner is given, at `now_ms`. Needs the browser ([`Gathered::primary`]).
    pub fn situation(&self, now_ms: i64) -> Situation {
        let primary = self.primary().expect("the browser is known before planning");
        let state = self.state(&primary, now_ms);
        let session_on_channel = |browser: &String| SessionRef {
            channel: self.channel.clone(),
            browser_id: browser.clone(),
            pos: self.pos.clone(),
        };
        match self.kind {
            IntentKind::LinesUpserted => Situation::LinesUpserted {
                session: state,
                lines: self.lines.clone(),
                touched: self.touched.clone(),
            },
            IntentKind::LineDeleted => Situation::LineDeleted {
                session: state,
                remaining: self.lines.clone(),
            },
            IntentKind::CartDeleted => Situation::CartDeleted { session: state },
            IntentKind::GuestDetails => Situation::GuestDetails { session: state },
            IntentKind::OrderSubmitted => {
                let others = self
                    .others
                    .iter()
                    .map(|s| OtherSession {
                        state: self.state(s, now_ms),
                        must_link: false,
                    })
                    .chain(self.anon_links.iter().map(|s| OtherSession {
                        state: self.state(s, now_ms),
                        must_link: true,
                    }))
                    .collect();
                Situation::Submitted {
                    session: state,
                    order: OrderFacts {
                        id: self.order_id.clone(),
                        total: self.order_total,
                    },
                    lines: self.lines.clone(),
                    others,
                }
            }
            // The intent's shopper is the anonymous one; link to the registered shopper's own
            // session, if any.
            IntentKind::Registered => {
                let target = self
                    .registered_state
                    .as_ref()
                    .and_then(|r| r.browsers.get(&self.channel))
                    .filter(|b| **b != primary.browser_id)
                    .map(|b| self.state(&session_on_channel(b), now_ms));
                Situation::Linked {
                    anonymous: state,
                    target,
                    lines: self.lines.clone(),
                }
            }
            IntentKind::AnonOrderTransferred => {
                match self.anon_state.as_ref().and_then(|a| a.browsers.get(&self.channel)) {
                    Some(anon_browser) => {
                        let anonymous = self.state(&session_on_channel(anon_browser), now_ms);
                        let target = (anonymous.session != state.session).then_some(state);
                        Situation::Linked {
                            anonymous,
                            target,
                            lines: self.lines.clone(),
                        }
                    }
                    // No anonymous session known: replay the transferred cart into the shopper's session.
                    None => Situation::LinesUpserted {
                        session: state,
                        lines: self.lines.clone(),
                        touched: self.lines.clone(),
                    },
                }
            }
        }
    }

    /// Records that CDP acknowledged `event` at `now_ms`; returns the session's facts as they are now.
    pub fn acknowledge(&mut self, event: &Event, now_ms: i64) -> SessionFacts {
        let owner = if Some(&event.session) == self.primary().as_ref() {
            self.key.as_str()
        } else {
            self.anon_key.as_deref().unwrap_or(self.key.as_str())
        };
        let facts = self
            .sessions
            .entry(event.session.clone())
            .or_insert_with(|| SessionFacts::new(&event.session, owner));
        facts.acknowledge(event, now_ms, self.idle_ms);
        facts.clone()
    }

    /// The records that follow the shopper's action, written with the ack once CDP has acknowledged
    /// every event.
    pub fn finish_writes(&self) -> Vec<Write> {
        let mut writes = Vec::new();
        match self.kind {
            // A submitted order is no longer a cart.
            IntentKind::OrderSubmitted => {
                writes.push(Write::DeleteCart {
                    order_id: self.order_id.clone(),
                });
                if let Some(anon) = self.anon_key.as_deref().filter(|a| *a != self.key) {
                    self.adopt_sessions(anon, &self.key, &mut writes);
                }
            }
            IntentKind::Registered | IntentKind::AnonOrderTransferred => {
                let Some(link) = &self.enrichment.link else {
                    return writes;
                };
                let registered_key = link.registered_shopper_key.as_str();
                let mut registered = if registered_key == self.key {
                    self.shopper.clone()
                } else {
                    self.registered_state.clone().unwrap_or_default()
                };
                registered.identity = Some(link.registered_identity.clone());
                if let Some(anon) = &link.anon_shopper_key {
                    if !registered.linked_from.contains(anon) {
                        registered.linked_from.push(anon.clone());
                    }
                    // The registered shopper without a browser of their own adopts the anonymous one.
                    let anon_browser = if *anon == self.key {
                        self.shopper.browsers.get(&self.channel).cloned()
                    } else {
                        self.anon_state
                            .as_ref()
                            .and_then(|a| a.browsers.get(&self.channel).cloned())
                    };
                    if let Some(b) = anon_browser {
                        registered.browsers.entry(self.channel.clone()).or_insert(b);
                    }
                    self.adopt_sessions(anon, registered_key, &mut writes);
                }
                let profile = link.registered_profile.clone();
                registered.email = registered.email.or(profile.email);
                registered.firstname = registered.firstname.or(profile.firstname);
                registered.lastname = registered.lastname.or(profile.lastname);
                registered.phone = registered.phone.or(profile.phone);
                writes.push(Write::Shopper {
                    key: registered_key.to_string(),
                    state: registered,
                });
                // The order keeps its ID across the transfer: its recorded lines follow it.
                writes.push(Write::MoveCart {
                    order_id: self.order_id.clone(),
                    to_shopper: registered_key.to_string(),
                });
            }
            _ => {}
        }
        writes
    }

    /// Sessions of an anonymous shopper become the registered shopper's.
    fn adopt_sessions(&self, from: &str, to: &str, writes: &mut Vec<Write>) {
        let mut adopted: Vec<&SessionFacts> = self.sessions.values().filter(|f| f.shopper_key == from).collect();
        adopted.sort_by(|a, b| (&a.channel, &a.browser_id).cmp(&(&b.channel, &b.browser_id)));
        for facts in adopted {
            let mut facts = facts.clone();
            facts.shopper_key = to.to_string();
            writes.push(Write::Session(facts));
        }
    }
}

/// The first currency that is three letters: the order's, the user's locale's, the configured one.
fn pick_currency(candidates: &[Option<&str>], fallback: &str) -> String {
    candidates
        .iter()
        .flatten()
        .map(|c| c.trim().to_ascii_uppercase())
        .find(|c| c.len() == 3 && c.chars().all(|ch| ch.is_ascii_uppercase()))
        .unwrap_or_else(|| fallback.to_string())
}

/// A storefront-provided browser id in the request or response body, if it is one CDP could have
/// minted ([`BrowserId`]); anything else is ignored (and said so). A body is parsed only when its
/// text could hold one of the pointers.
fn browser_from_bodies(pointers: &[String], bodies: [&RawValue; 2]) -> Result<Option<String>, UnreadableIntent> {
    let mut given = None;
    for body in bodies {
        given = pointed_text(body, pointers)?;
        if given.is_some() {
            break;
        }
    }
    let Some(given) = given else {
        return Ok(None);
    };
    Ok(match BrowserId::parse(&given) {
        Some(browser) => Some(browser.into_string()),
        None => {
            tracing::warn!(
                length = given.len(),
                "the storefront's CDP browser id is not one CDP mints (1-128 letters, digits, - _ . :): ignored"
            );
            None
        }
    })
}

/// The first non-empty text one of `pointers` finds in `body`, which is parsed only when its text
/// could hold one of them ([`may_resolve`]).
fn pointed_text(body: &RawValue, pointers: &[String]) -> Result<Option<String>, UnreadableIntent> {
    let mut candidates = pointers.iter().filter(|p| may_resolve(body.get(), p)).peekable();
    if candidates.peek().is_none() {
        return Ok(None);
    }
    let parsed: Value = serde_json::from_str(body.get())?;
    Ok(candidates.find_map(|p| {
        let text = parsed.pointer(p).and_then(Value::as_str).map(str::trim);
        text.filter(|s| !s.is_empty()).map(str::to_string)
    }))
}

/// The line items a create/update/bundle webhook carries, merged over the recorded version
/// (a PATCH request body is partial). The bodies are parsed here, the one reading that needs them
/// whole.
fn touched_lines(claimed: &ClaimedIntent, recorded: &[CartLine]) -> Result<Vec<Value>, UnreadableIntent> {
    let intent = &claimed.intent;
    let line_items = |map: &mut serde_json::Map<String, Value>| match map.remove("LineItems") {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    let mut bodies: Vec<Value> = match intent.response()? {
        Value::Array(items) => items,
        response @ Value::Object(_) if response.get("ID").is_some() => vec![response],
        Value::Object(mut map) if map.get("LineItems").is_some_and(Value::is_array) => line_items(&mut map),
        _ => match intent.request()? {
            Value::Object(mut map) if map.get("LineItems").is_some_and(Value::is_array) => line_items(&mut map),
            request @ Value::Object(_) => vec![request],
            _ => Vec::new(),
        },
    };
    for body in &mut bodies {
        if body.get("ID").and_then(Value::as_str).is_none() {
            if let (Some(id), Value::Object(map)) = (&intent.line_item_id, &mut *body) {
                map.insert("ID".into(), Value::String(id.clone()));
            }
        }
        let id = body.get("ID").and_then(Value::as_str).map(str::to_string);
        if let Some(previous) = id.and_then(|id| recorded.iter().find(|l| l.line_id == id)) {
            let mut merged = previous.line.clone();
            if let (Value::Object(into), Value::Object(from)) = (&mut merged, &*body) {
                for (k, v) in from {
                    into.insert(k.clone(), v.clone());
                }
            }
            *body = merged;
        }
    }
    Ok(bodies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Claim;
    use serde_json::json;

    fn line_change(request: Value, response: Value, line_item_id: Option<&str>) -> ClaimedIntent {
        let text = format!(
            r#"{{"kind":"lines_upserted","family":"orders","verb":"PATCH","route":"r","direction":null,
                "order_id":"O1","line_item_id":{},"occurred_at_ms":0,"request_body":{request},
                "response_body":{response},"query_params":{{}},"client_id":null,"api_url":null,
                "anonymous":true,"anon_order_id":"O1","token_expires_at":null}}"#,
            json!(line_item_id)
        );
        ClaimedIntent {
            claim: Claim {
                intent_id: 1,
                claim_id: "c".into(),
            },
            shopper_key: "anon-O1".into(),
            intent: serde_json::from_str(&text).unwrap(),
            enrichment: None,
            plan: None,
            sent: 0,
            attempts: 1,
            created_at_ms: 0,
        }
    }

    /// Every shape a line webhook's bodies come in, read from the bodies' text.
    #[test]
    fn the_lines_a_change_touches_are_read_from_each_shape_of_its_bodies() {
        let recorded = [CartLine {
            order_id: "O1".into(),
            line_id: "L1".into(),
            shopper_key: "anon-O1".into(),
            line: json!({"ID": "L1", "ProductID": "P", "Quantity": 1}),
            updated_at_ms: 0,
        }];
        let touched = |request: Value, response: Value, id: Option<&str>| {
            touched_lines(&line_change(request, response, id), &recorded).expect("the bodies parse")
        };
        // Several lines answered (bundles).
        assert_eq!(
            touched(Value::Null, json!([{"ID": "A"}, {"ID": "B"}]), None),
            vec![json!({"ID": "A"}), json!({"ID": "B"})]
        );
        // One LineItem answered, merged over the recorded line.
        assert_eq!(
            touched(json!({"Quantity": 9}), json!({"ID": "L1", "Quantity": 2}), Some("L1")),
            vec![json!({"ID": "L1", "ProductID": "P", "Quantity": 2})]
        );
        // A response holding LineItems; else a request holding them.
        assert_eq!(
            touched(Value::Null, json!({"LineItems": [{"ID": "C"}]}), None),
            vec![json!({"ID": "C"})]
        );
        assert_eq!(
            touched(json!({"LineItems": [{"ID": "D"}]}), json!({}), None),
            vec![json!({"ID": "D"})]
        );
        // A partial PATCH body: the route's line ID, merged over the recorded line.
        assert_eq!(
            touched(json!({"Quantity": 3}), Value::Null, Some("L1")),
            vec![json!({"ID": "L1", "ProductID": "P", "Quantity": 3})]
        );
        assert!(touched(json!("text"), Value::Null, Some("L1")).is_empty());
    }

    #[test]
    fn a_storefront_browser_id_is_used_only_when_it_is_one_cdp_could_mint() {
        let pointers = vec!["/xp/cdpBrowserId".to_string()];
        let body =
            |id: &str| serde_json::value::to_raw_value(&serde_json::json!({"xp": {"cdpBrowserId": id}})).unwrap();
        let null = serde_json::value::to_raw_value(&Value::Null).unwrap();
        let found = |body: Box<RawValue>| browser_from_bodies(&pointers, [&body, &null]).expect("the bodies parse");
        assert_eq!(found(body(" 0b7f8c3e-5d2a ")).as_deref(), Some("0b7f8c3e-5d2a"));
        assert_eq!(found(body("a\u{0}b")), None);
        assert_eq!(found(body(&"x".repeat(500))), None);
    }
}
