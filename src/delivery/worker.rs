//! One intent at a time: gather what the planner needs, plan, send each event, record progress.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn, Instrument as _};

use super::enrich::{enrich, profile_of, EnrichError, Enrichment};
use super::{age_ms, backoff, Deps};
use crate::cdp::{Event, Outcome, SessionRef};
use crate::intent::IntentKind;
use crate::planner::session::{apply, new_facts};
use crate::planner::{self, parse_lines, Context, Line, OrderFacts, OtherSession, Profile, SessionState};
use crate::store::{now_ms, CartLine, ClaimedIntent, EnrichmentJob, SessionFacts, ShopperState, StoreError};

/// Why an intent did not complete this time.
#[derive(Debug)]
enum Failure {
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    Dead(String),
    /// CDP refused the client key: try again at the next probe, burning nothing.
    Paused {
        wait: Duration,
        reason: String,
    },
    /// Shutdown: release the claim at an event boundary.
    Stopping,
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// The planned events of an intent and how many CDP acknowledged, stored as the intent's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    events: Vec<Event>,
    sent: usize,
}

pub(super) async fn enrich_one(deps: &Deps, job: EnrichmentJob) {
    let span = tracing::info_span!("enrich", intent_id = job.intent_id, shopper = %job.shopper_key, kind = job.intent.kind.label());
    async {
        let store = &deps.store;
        let result = match enrich(deps, &job).await {
            Ok(enrichment) => {
                // Kept for a registered shopper's later intents, which may carry nothing naming them;
                // an anonymous shopper's identity is in every one of its tokens (`anon-<orderid>`).
                let mut r = if job.intent.anonymous {
                    Ok(())
                } else {
                    store.put_identity(&job.shopper_key, &enrichment.identity).await
                };
                if let (Ok(()), Some(link)) = (&r, &enrichment.link) {
                    r = store
                        .put_identity(&link.registered_shopper_key, &link.registered_identity)
                        .await;
                }
                match serde_json::to_value(&enrichment) {
                    Ok(value) if r.is_ok() => store.save_enrichment(job.intent_id, &value).await,
                    Ok(_) => r,
                    Err(e) => Err(StoreError::Corrupt(e.to_string())),
                }
            }
            Err(EnrichError::Retry(reason)) if age_ms(job.created_at_ms) > max_age_ms(deps) => {
                warn!(reason, "enrichment gave up: dead letter");
                store
                    .dead_letter_unclaimed(
                        job.intent_id,
                        &format!("{reason} (gave up after delivery.max_age_secs)"),
                    )
                    .await
            }
            Err(EnrichError::Retry(reason)) => {
                let at = now_ms() + backoff::delay(&deps.settings.delivery, job.attempts).as_millis() as i64;
                info!(reason, "enrichment will be retried");
                store.retry_enrichment(job.intent_id, at, &reason).await
            }
            Err(EnrichError::Dead(reason)) => {
                warn!(reason, "enrichment failed for good: dead letter");
                metrics::counter!("forwarder_dead_letters_total", "stage" => "enrichment").increment(1);
                store.dead_letter_unclaimed(job.intent_id, &reason).await
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "cannot record the enrichment outcome; it will run again");
        }
    }
    .instrument(span)
    .await
}

fn max_age_ms(deps: &Deps) -> i64 {
    (deps.settings.delivery.max_age_secs as i64).saturating_mul(1000)
}

/// Delivers one claimed intent and settles it: ack, reschedule, dead letter, or release.
pub(super) async fn process(deps: &Deps, claimed: ClaimedIntent, stop: watch::Receiver<bool>) {
    let span = tracing::info_span!(
        "delivery",
        intent_id = claimed.claim.intent_id,
        shopper = %claimed.shopper_key,
        kind = claimed.intent.kind.label(),
        attempt = claimed.attempts,
    );
    async {
        let lease = deps.lease();
        let renewer = {
            let (store, claim) = (deps.store.clone(), claimed.claim.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if store.extend(&claim, lease).await.is_err() {
                        return;
                    }
                }
            })
        };
        let result = deliver(deps, &claimed, &stop).await;
        renewer.abort();
        settle(deps, &claimed, result).await;
    }
    .instrument(span)
    .await
}

async fn settle(deps: &Deps, claimed: &ClaimedIntent, result: Result<(), Failure>) {
    let store = &deps.store;
    let claim = &claimed.claim;
    let (label, outcome) = match result {
        Ok(()) => {
            info!("delivered");
            ("delivered", store.ack(claim).await)
        }
        Err(Failure::Retry { reason, .. }) if age_ms(claimed.created_at_ms) > max_age_ms(deps) => {
            warn!(reason, "giving up after delivery.max_age_secs: dead letter");
            let reason = format!("{reason} (gave up after delivery.max_age_secs)");
            ("dead_letter", store.dead_letter(claim, &reason).await)
        }
        Err(Failure::Retry { after, reason }) => {
            let wait = backoff::retry_delay(&deps.settings.delivery, claimed.attempts, after);
            info!(reason, retry_in_ms = wait.as_millis() as u64, "will retry");
            metrics::counter!("forwarder_delivery_retries_total").increment(1);
            (
                "retry",
                store
                    .reschedule(claim, now_ms() + wait.as_millis() as i64, &reason)
                    .await,
            )
        }
        Err(Failure::Dead(reason)) => {
            warn!(reason, "dead letter");
            metrics::counter!("forwarder_dead_letters_total", "stage" => "delivery").increment(1);
            ("dead_letter", store.dead_letter(claim, &reason).await)
        }
        Err(Failure::Paused { wait, reason }) => (
            "paused",
            store
                .reschedule(claim, now_ms() + wait.as_millis() as i64, &reason)
                .await,
        ),
        Err(Failure::Stopping) => (
            "released",
            store.reschedule(claim, now_ms(), "released at shutdown").await,
        ),
        Err(Failure::Store(e)) => {
            warn!(error = %e, "store error during delivery; the lease will expire and the intent run again");
            ("store_error", Ok(()))
        }
    };
    metrics::counter!("forwarder_deliveries_total", "outcome" => label).increment(1);
    if let Err(e) = outcome {
        warn!(error = %e, outcome = label, "cannot settle the intent");
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

/// A storefront-provided browser id in the request or response body.
fn browser_from_bodies(pointers: &[String], bodies: [&Value; 2]) -> Option<String> {
    bodies.iter().find_map(|body| {
        pointers.iter().find_map(|p| {
            body.pointer(p)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
    })
}

/// The line items a create/update/bundle webhook carries, merged over the recorded version
/// (a PATCH request body is partial).
fn touched_lines(claimed: &ClaimedIntent, recorded: &[CartLine]) -> Vec<Value> {
    let intent = &claimed.intent;
    let response = &intent.response_body;
    let mut bodies: Vec<Value> = match response {
        Value::Array(items) => items.clone(),
        Value::Object(map) if map.contains_key("ID") => vec![response.clone()],
        Value::Object(map) if map.get("LineItems").is_some_and(Value::is_array) => {
            map["LineItems"].as_array().cloned().unwrap_or_default()
        }
        _ => match &intent.request_body {
            Value::Object(map) if map.get("LineItems").is_some_and(Value::is_array) => {
                map["LineItems"].as_array().cloned().unwrap_or_default()
            }
            Value::Object(_) => vec![intent.request_body.clone()],
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
    bodies
}

/// Makes the record of an order's lines equal to a snapshot read from OrderCloud.
async fn sync_record(deps: &Deps, order_id: &str, shopper_key: &str, lines: &[Value]) -> Result<(), StoreError> {
    let recorded = deps.store.cart_lines(order_id).await?;
    let now = now_ms();
    for line in lines {
        if let Some(id) = line.get("ID").and_then(Value::as_str) {
            deps.store
                .put_cart_line(&CartLine {
                    order_id: order_id.to_string(),
                    line_id: id.to_string(),
                    shopper_key: shopper_key.to_string(),
                    line: line.clone(),
                    updated_at_ms: now,
                })
                .await?;
        }
    }
    for old in recorded {
        if !lines
            .iter()
            .any(|l| l.get("ID").and_then(Value::as_str) == Some(old.line_id.as_str()))
        {
            deps.store.delete_cart_line(order_id, &old.line_id).await?;
        }
    }
    Ok(())
}

/// Session facts read once per intent and written back after each acknowledged event.
struct Sessions<'a> {
    deps: &'a Deps,
    cache: HashMap<SessionRef, SessionFacts>,
    /// Sessions changed since they were read.
    dirty: std::collections::HashSet<SessionRef>,
    idle_ms: i64,
}

impl<'a> Sessions<'a> {
    async fn facts(&mut self, session: &SessionRef, owner: &str) -> Result<SessionFacts, StoreError> {
        if let Some(f) = self.cache.get(session) {
            return Ok(f.clone());
        }
        let facts = self
            .deps
            .store
            .session(&session.channel, &session.browser_id)
            .await?
            .unwrap_or_else(|| new_facts(session, owner));
        self.cache.insert(session.clone(), facts.clone());
        Ok(facts)
    }

    async fn state(&mut self, session: &SessionRef, owner: &str) -> Result<SessionState, StoreError> {
        let facts = self.facts(session, owner).await?;
        Ok(SessionState::from_facts(
            session.clone(),
            Some(&facts),
            now_ms(),
            self.idle_ms,
        ))
    }

    async fn acknowledged(&mut self, event: &Event, owner: &str) -> Result<(), StoreError> {
        let mut facts = self.facts(&event.session, owner).await?;
        apply(&mut facts, event, now_ms(), self.idle_ms);
        self.cache.insert(event.session.clone(), facts);
        self.dirty.insert(event.session.clone());
        Ok(())
    }

    /// Writes the facts of every session changed since they were read.
    async fn flush(&mut self) -> Result<(), StoreError> {
        for session in std::mem::take(&mut self.dirty) {
            if let Some(facts) = self.cache.get(&session) {
                self.deps.store.put_session(facts).await?;
            }
        }
        Ok(())
    }
}

/// Everything about the intent that planning needs, gathered once.
struct Prepared {
    ctx_identity: String,
    profile: Profile,
    currency: String,
    ordered_at: String,
    channel: String,
    pos: String,
    order_id: String,
    /// Lines the intent touched (upserts).
    touched: Vec<Line>,
    /// The order's lines as planning should see them.
    lines: Vec<Line>,
    /// Shopper key of an anonymous shopper whose records this intent links.
    anon_key: Option<String>,
    /// The registered shopper an anonymous one becomes (registration, transfer).
    registered_key: Option<String>,
    /// Order.Total of a submitted order.
    order_total: Option<f64>,
}

async fn deliver(deps: &Deps, claimed: &ClaimedIntent, stop: &watch::Receiver<bool>) -> Result<(), Failure> {
    let settings = &deps.settings;
    let cdp = &settings.cdp;
    let store = &deps.store;
    let intent = &claimed.intent;
    let key = claimed.shopper_key.as_str();
    let enrichment: Enrichment = match &claimed.enrichment {
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| Failure::Dead(format!("unreadable enrichment: {e}")))?
        }
        // Intake found nothing to read from OrderCloud for it.
        None => match super::enrich::without_network(&claimed.intent) {
            Some(e) => e,
            None => return Err(Failure::Dead("the intent was never enriched".into())),
        },
    };
    let idle_ms = (cdp.session_timeout_secs.saturating_sub(cdp.session_safety_margin_secs) as i64) * 1000;
    let (channel, pos) = cdp.channel_for(intent.client_id.as_deref());
    let (channel, pos) = (channel.to_string(), pos.to_string());

    // The shopper: identity, details, browser.
    let stored_shopper = store.shopper(key).await?;
    let mut shopper = stored_shopper.clone().unwrap_or_default();
    shopper.identity = Some(enrichment.identity.clone());
    let mut given = enrichment.profile.clone();
    if intent.kind == IntentKind::GuestDetails {
        given = profile_of(&intent.request_body).merged_with(&given);
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

    let link = enrichment.link.clone();
    let anon_state = match link.as_ref().and_then(|l| l.anon_shopper_key.as_deref()) {
        Some(anon) if anon != key => store.shopper(anon).await?,
        _ => None,
    };
    let pointer_browser = browser_from_bodies(&cdp.browser_id_pointers, [&intent.request_body, &intent.response_body]);
    if let Some(b) = pointer_browser {
        shopper.browsers.insert(channel.clone(), b);
    } else if intent.kind == IntentKind::AnonOrderTransferred && !shopper.browsers.contains_key(&channel) {
        // A logged-in shopper without a browser of their own adopts the anonymous one.
        if let Some(b) = anon_state.as_ref().and_then(|a| a.browsers.get(&channel)) {
            shopper.browsers.insert(channel.clone(), b.clone());
        }
    }
    if !shopper.browsers.contains_key(&channel) {
        let minted = mint_browser(deps).await?;
        shopper.browsers.insert(channel.clone(), minted);
    }
    // Stored before the browser's first use; skipped when nothing changed.
    if stored_shopper.as_ref() != Some(&shopper) {
        store.put_shopper(key, &shopper).await?;
    }

    let prepared = prepare(deps, claimed, &enrichment, profile, &channel, &pos).await?;

    let mut sessions = Sessions {
        deps,
        cache: HashMap::new(),
        dirty: Default::default(),
        idle_ms,
    };
    let mut progress: Option<Progress> = claimed
        .progress
        .clone()
        .and_then(|p| serde_json::from_value(p).ok())
        .filter(|p: &Progress| p.sent > 0 && p.sent < p.events.len());
    let mut remints = 0;
    // Acknowledged events are recorded in memory and written once, when the intent ends or stops:
    // a crash in between only repeats a few events (delivery is at least once).
    let mut p: Progress;
    let outcome: Result<(), Failure> = 'plan: loop {
        let browser = shopper.browsers[&channel].clone();
        let primary = SessionRef {
            channel: channel.clone(),
            browser_id: browser.clone(),
            pos: pos.clone(),
        };
        // A stored plan is resumed while the session of its next event is still open; otherwise the
        // session must be rebuilt and the intent is planned again.
        p = match progress.take() {
            Some(stored) if sessions.state(&stored.events[stored.sent].session, key).await?.open => stored,
            _ => {
                let events = plan(deps, claimed, &prepared, &primary, &mut sessions, anon_state.as_ref()).await?;
                if is_replay(claimed.intent.kind, &events, &primary) {
                    metrics::counter!("forwarder_session_replays_total", "kind" => claimed.intent.kind.label())
                        .increment(1);
                }
                Progress { events, sent: 0 }
            }
        };
        while p.sent < p.events.len() {
            if *stop.borrow() {
                break 'plan Err(Failure::Stopping);
            }
            let event = p.events[p.sent].clone();
            let outcome = deps.cdp.send(&event.to_wire(), event.kind.name()).await;
            metrics::counter!("forwarder_cdp_events_total", "event" => event.kind.name(), "outcome" => outcome_label(&outcome))
                .increment(1);
            match outcome {
                Outcome::Done => {
                    deps.resume();
                    let owner = if event.session == primary {
                        key
                    } else {
                        prepared.anon_key.as_deref().unwrap_or(key)
                    };
                    sessions.acknowledged(&event, owner).await?;
                    p.sent += 1;
                }
                Outcome::BrowserUnknown if event.session.browser_id == browser => {
                    remints += 1;
                    if remints > 3 {
                        break 'plan Err(Failure::Retry {
                            after: None,
                            reason: "CDP does not know the browser ids it just minted".into(),
                        });
                    }
                    warn!(browser = %browser, "CDP does not know the shopper's browser: minting a new one");
                    let minted = match mint_browser(deps).await {
                        Ok(b) => b,
                        Err(e) => break 'plan Err(e),
                    };
                    shopper.browsers.insert(channel.clone(), minted);
                    store.put_shopper(key, &shopper).await?;
                    continue 'plan;
                }
                Outcome::BrowserUnknown => {
                    // Another session's browser is gone: there is nothing left there to clear or link.
                    let gone = event.session.clone();
                    let sent = p.sent;
                    let mut index = 0;
                    p.events.retain(|e| {
                        index += 1;
                        index <= sent || e.session != gone
                    });
                }
                Outcome::Permanent(reason) => break 'plan Err(Failure::Dead(reason)),
                Outcome::Config(reason) => {
                    let wait = deps.pause_for_config(&reason);
                    break 'plan Err(Failure::Paused { wait, reason });
                }
                Outcome::Retry { after, reason } => break 'plan Err(Failure::Retry { after, reason }),
            }
        }
        break Ok(());
    };
    sessions.flush().await?;
    if let Err(failure) = outcome {
        if p.sent > 0 && p.sent < p.events.len() {
            let saved = serde_json::to_value(&p).map_err(|e| Failure::Dead(e.to_string()))?;
            store.save_progress(&claimed.claim, &saved).await?;
        }
        return Err(failure);
    }
    finish(deps, claimed, &enrichment, &prepared, &shopper, &channel).await?;
    Ok(())
}

/// A submit or a link that re-sends the cart into a session (ADDs the shopper did not just make).
fn is_replay(kind: IntentKind, events: &[Event], primary: &SessionRef) -> bool {
    let adds_on = |session: &SessionRef| {
        events
            .iter()
            .any(|e| e.session == *session && matches!(e.kind, crate::cdp::EventKind::Add { .. }))
    };
    match kind {
        IntentKind::OrderSubmitted => adds_on(primary),
        IntentKind::Registered | IntentKind::AnonOrderTransferred => events
            .iter()
            .any(|e| matches!(e.kind, crate::cdp::EventKind::Add { .. })),
        _ => false,
    }
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Done => "done",
        Outcome::BrowserUnknown => "browser_unknown",
        Outcome::Permanent(_) => "permanent",
        Outcome::Config(_) => "config",
        Outcome::Retry { .. } => "retry",
    }
}

async fn mint_browser(deps: &Deps) -> Result<String, Failure> {
    match deps.cdp.create_browser().await {
        Ok(browser) => {
            metrics::counter!("forwarder_browsers_minted_total").increment(1);
            deps.resume();
            Ok(browser)
        }
        Err(Outcome::Config(reason)) => {
            let wait = deps.pause_for_config(&reason);
            Err(Failure::Paused { wait, reason })
        }
        Err(Outcome::Retry { after, reason }) => Err(Failure::Retry { after, reason }),
        Err(other) => Err(Failure::Retry {
            after: None,
            reason: format!("browser/create failed: {other:?}"),
        }),
    }
}

/// Updates the forwarder's record of the cart and gathers the lines planning needs.
async fn prepare(
    deps: &Deps,
    claimed: &ClaimedIntent,
    enrichment: &Enrichment,
    profile: Profile,
    channel: &str,
    pos: &str,
) -> Result<Prepared, Failure> {
    let cdp = &deps.settings.cdp;
    let store = &deps.store;
    let intent = &claimed.intent;
    let key = claimed.shopper_key.as_str();
    let order_id = enrichment
        .order_id
        .clone()
        .or_else(|| intent.order_id.clone())
        .or_else(|| enrichment.link.as_ref().and_then(|l| l.anon_order_id.clone()))
        .unwrap_or_else(|| format!("cart:{key}"));
    let snapshot = enrichment.lines.as_ref().map(|l| parse_lines(l, cdp));
    let recorded = store.cart_lines(&order_id).await?;
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
    let mut touched = Vec::new();
    let lines = match intent.kind {
        IntentKind::LinesUpserted => {
            let now = now_ms();
            let mut record = recorded.clone();
            for line in touched_lines(claimed, &recorded) {
                if let Some(id) = line.get("ID").and_then(Value::as_str) {
                    let updated = CartLine {
                        order_id: order_id.clone(),
                        line_id: id.to_string(),
                        shopper_key: key.to_string(),
                        line: line.clone(),
                        updated_at_ms: now,
                    };
                    store.put_cart_line(&updated).await?;
                    match record.iter_mut().find(|l| l.line_id == id) {
                        Some(existing) => *existing = updated,
                        None => record.push(updated),
                    }
                }
                touched.extend(planner::lines::Line::from_json(&line, cdp));
            }
            let values: Vec<Value> = record.into_iter().map(|l| l.line).collect();
            parse_lines(&values, cdp)
        }
        IntentKind::LineDeleted => {
            if let Some(id) = &intent.line_item_id {
                store.delete_cart_line(&order_id, id).await?;
            }
            match &enrichment.lines {
                Some(lines) => {
                    sync_record(deps, &order_id, key, lines).await?;
                    snapshot.unwrap_or_default()
                }
                None => record_lines(deps, &order_id).await?,
            }
        }
        IntentKind::CartDeleted => {
            store.delete_cart(&order_id).await?;
            Vec::new()
        }
        IntentKind::OrderSubmitted | IntentKind::AnonOrderTransferred | IntentKind::Registered => match snapshot {
            Some(lines) if !lines.is_empty() => lines,
            _ => record_lines(deps, &order_id).await?,
        },
        IntentKind::GuestDetails => Vec::new(),
    };
    if intent.kind == IntentKind::OrderSubmitted && lines.is_empty() {
        return Err(Failure::Dead(format!(
            "no line items known for order {order_id}: OrderCloud could not be read ({}) and none were recorded",
            enrichment.lines_error.as_deref().unwrap_or("no lines")
        )));
    }
    let (ctx_identity, profile) = match (&intent.kind, &enrichment.link) {
        (IntentKind::Registered, Some(link)) => (
            link.registered_identity.clone(),
            link.registered_profile.merged_with(&profile),
        ),
        _ => (enrichment.identity.clone(), profile),
    };
    Ok(Prepared {
        ctx_identity,
        profile,
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
        channel: channel.to_string(),
        pos: pos.to_string(),
        order_id,
        touched,
        lines,
        anon_key,
        registered_key: enrichment.link.as_ref().map(|l| l.registered_shopper_key.clone()),
        order_total: enrichment.order_total,
    })
}

async fn record_lines(deps: &Deps, order_id: &str) -> Result<Vec<Line>, StoreError> {
    let recorded = deps.store.cart_lines(order_id).await?;
    let values: Vec<Value> = recorded.into_iter().map(|l| l.line).collect();
    Ok(parse_lines(&values, &deps.settings.cdp))
}

/// Gathers session states and calls the planner.
async fn plan(
    deps: &Deps,
    claimed: &ClaimedIntent,
    prepared: &Prepared,
    primary: &SessionRef,
    sessions: &mut Sessions<'_>,
    anon_state: Option<&ShopperState>,
) -> Result<Vec<Event>, Failure> {
    let cdp = &deps.settings.cdp;
    let key = claimed.shopper_key.as_str();
    let ctx = Context {
        cdp,
        identity: prepared.ctx_identity.clone(),
        profile: prepared.profile.clone(),
        currency: prepared.currency.clone(),
        ordered_at: prepared.ordered_at.clone(),
    };
    let state = sessions.state(primary, key).await?;
    let session_of = |browser: &String| SessionRef {
        channel: prepared.channel.clone(),
        browser_id: browser.clone(),
        pos: prepared.pos.clone(),
    };
    Ok(match claimed.intent.kind {
        IntentKind::LinesUpserted => planner::plan_lines_upserted(&ctx, &state, &prepared.lines, &prepared.touched),
        IntentKind::LineDeleted => planner::plan_line_deleted(&ctx, &state, &prepared.lines),
        IntentKind::CartDeleted => planner::plan_cart_deleted(&ctx, &state),
        IntentKind::GuestDetails => planner::plan_identify(&ctx, &state),
        IntentKind::OrderSubmitted => {
            let since = now_ms() - sessions.idle_ms;
            let mut others = Vec::new();
            for facts in deps.store.sessions_of(key, since).await? {
                let session = SessionRef {
                    channel: facts.channel.clone(),
                    browser_id: facts.browser_id.clone(),
                    pos: cdp.pos_for_channel(&facts.channel).to_string(),
                };
                others.push(OtherSession {
                    state: sessions.state(&session, key).await?,
                    must_link: false,
                });
            }
            // Lines recorded under an anonymous shopper: link that guest now, at the latest.
            if let Some(anon) = prepared.anon_key.as_deref().filter(|a| *a != key) {
                let anon_shopper = deps.store.shopper(anon).await?.unwrap_or_default();
                for browser in anon_shopper.browsers.values() {
                    let session = session_of(browser);
                    let state = sessions.state(&session, anon).await?;
                    others.push(OtherSession { state, must_link: true });
                }
            }
            let order = OrderFacts {
                id: prepared.order_id.clone(),
                total: prepared.order_total,
            };
            planner::plan_submit(&ctx, &state, &order, &prepared.lines, &others)
        }
        IntentKind::Registered => {
            // The intent's shopper is the anonymous one; link to the registered shopper's own session if any.
            let registered_key = prepared.registered_key.clone().unwrap_or_default();
            let registered = deps.store.shopper(&registered_key).await?.unwrap_or_default();
            let target = match registered.browsers.get(&prepared.channel) {
                Some(b) if *b != primary.browser_id => Some(sessions.state(&session_of(b), &registered_key).await?),
                _ => None,
            };
            planner::plan_link(&ctx, &state, target.as_ref(), &prepared.lines)
        }
        IntentKind::AnonOrderTransferred => match anon_state.and_then(|a| a.browsers.get(&prepared.channel)) {
            Some(anon_browser) => {
                let anon_key = prepared.anon_key.clone().unwrap_or_default();
                let anon = sessions.state(&session_of(anon_browser), &anon_key).await?;
                let target = (anon.session != state.session).then_some(&state);
                planner::plan_link(&ctx, &anon, target, &prepared.lines)
            }
            // No anonymous session known: replay the transferred cart into the shopper's session.
            None => planner::plan_lines_upserted(&ctx, &state, &prepared.lines, &prepared.lines),
        },
    })
}

/// After CDP acknowledged everything: records that follow the shopper's action.
async fn finish(
    deps: &Deps,
    claimed: &ClaimedIntent,
    enrichment: &Enrichment,
    prepared: &Prepared,
    shopper: &ShopperState,
    channel: &str,
) -> Result<(), StoreError> {
    let store = &deps.store;
    let key = claimed.shopper_key.as_str();
    match claimed.intent.kind {
        // A submitted order is no longer a cart.
        IntentKind::OrderSubmitted => {
            store.delete_cart(&prepared.order_id).await?;
            if let Some(anon) = prepared.anon_key.as_deref().filter(|a| *a != key) {
                adopt_sessions(deps, anon, key).await?;
            }
        }
        IntentKind::Registered | IntentKind::AnonOrderTransferred => {
            let Some(link) = &enrichment.link else { return Ok(()) };
            let registered_key = link.registered_shopper_key.as_str();
            let mut registered = if registered_key == key {
                shopper.clone()
            } else {
                store.shopper(registered_key).await?.unwrap_or_default()
            };
            registered.identity = Some(link.registered_identity.clone());
            if let Some(anon) = &link.anon_shopper_key {
                if !registered.linked_from.contains(anon) {
                    registered.linked_from.push(anon.clone());
                }
                // The registered shopper without a browser of their own adopts the anonymous one.
                let anon_browser = if anon == key {
                    shopper.browsers.get(channel).cloned()
                } else {
                    store
                        .shopper(anon)
                        .await?
                        .and_then(|a| a.browsers.get(channel).cloned())
                };
                if let Some(b) = anon_browser {
                    registered.browsers.entry(channel.to_string()).or_insert(b);
                }
                adopt_sessions(deps, anon, registered_key).await?;
            }
            let profile = link.registered_profile.clone();
            registered.email = registered.email.or(profile.email);
            registered.firstname = registered.firstname.or(profile.firstname);
            registered.lastname = registered.lastname.or(profile.lastname);
            registered.phone = registered.phone.or(profile.phone);
            store.put_shopper(registered_key, &registered).await?;
            // The order keeps its ID across the transfer: its recorded lines follow it.
            store.move_cart(&prepared.order_id, registered_key).await?;
        }
        _ => {}
    }
    Ok(())
}

/// Sessions of an anonymous shopper become the registered shopper's.
async fn adopt_sessions(deps: &Deps, from: &str, to: &str) -> Result<(), StoreError> {
    for mut facts in deps.store.sessions_of(from, i64::MIN).await? {
        facts.shopper_key = to.to_string();
        deps.store.put_session(&facts).await?;
    }
    Ok(())
}
