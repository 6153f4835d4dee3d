//! Send: the intent's events to CDP, one at a time, in order, recording progress after each one
//! CDP acknowledges — so a crash or a lost lease resumes with the next unsent event, not the
//! intent's first.
//!
//! Before every request the lease keeper is asked how long the claim may still be acted on: below
//! [`MIN_WINDOW`] nothing more is sent, and each request's timeout ends inside the window. When CDP
//! does not know the shopper's browser, a new one is minted, stored, and the intent planned again
//! on it.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tracing::warn;

use super::gather::Gathered;
use super::lease::Lease;
use super::settle::Failure;
use super::Deps;
use crate::cdp::{Event, EventKind, Outcome, SessionRef};
use crate::domain::intent::IntentKind;
use crate::domain::{now_ms, SessionFacts};
use crate::planner;
use crate::store::{ClaimedIntent, OrderCheck, StoreError, Write};

/// Below this much lease left, no request is started.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
/// A request's timeout ends this long before the lease window does.
const WINDOW_MARGIN: Duration = Duration::from_millis(500);
/// Browsers minted in a row for one intent before it is retried later instead.
const MAX_REMINTS: usize = 3;

/// The intent's planned events and how many of them CDP acknowledged.
struct Progress {
    events: Vec<Event>,
    sent: usize,
    /// The plan is not stored as it is: write it with the next progress.
    unstored: bool,
}

/// Sends what is left of the intent's plan. Returns the writes still to make with the ack: among
/// them the progress of the last event, so that a delivered intent costs one store write per event.
pub async fn send(
    deps: &Deps,
    claimed: &ClaimedIntent,
    gathered: &mut Gathered,
    lease: &Lease,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<Write>, Failure> {
    let mut writes = std::mem::take(&mut gathered.writes);
    if gathered.shopper_changed {
        writes.push(Write::Shopper {
            key: gathered.key.clone(),
            state: gathered.shopper.clone(),
        });
    }
    if gathered.browser().is_none() {
        let minted = mint(deps, lease).await?;
        gathered.use_browser(minted);
        writes.push(Write::Shopper {
            key: gathered.key.clone(),
            state: gathered.shopper.clone(),
        });
    }
    // A browser is stored before its first use: a retry then finds the same one.
    if gathered.browser_is_new {
        deps.store
            .apply(&claimed.claim, std::mem::take(&mut writes), None)
            .await?;
    }

    let mut progress = match resumable(deps, claimed, gathered)? {
        Some(stored) => stored,
        None => plan(deps, gathered),
    };
    // The CHECKOUT a stored plan goes on with may have reached CDP already (see `resumable`).
    let mut doubtful_checkout = (!progress.unstored).then_some(progress.sent);
    let mut remints = 0;
    while progress.sent < progress.events.len() {
        // An order's last event goes before delivery stops: left for the next start, a CHECKOUT or
        // ORDER_CHECKOUT would be an order in doubt (its request may have gone), waiting for the
        // landing check instead of landing now. The lease and the shutdown's deadline still bound it.
        if *stop.borrow() && !progress.events[progress.sent].kind.builds_order() {
            return Err(Failure::Stopping);
        }
        let window = lease
            .window()
            .filter(|w| *w >= MIN_WINDOW)
            .ok_or_else(|| Failure::LeaseLost("the lease ran out before the next event".into()))?;
        // An ORDER_CHECKOUT an earlier attempt may have sent is a whole order whatever the session:
        // sent again, it would be a second order if CDP took the first. It is left to the landing
        // check (on, or the stored plan would not have gone on), which finds the order or sends it
        // again, once.
        if doubtful_checkout == Some(progress.sent)
            && matches!(progress.events[progress.sent].kind, EventKind::OrderCheckout { .. })
            && deps.settings.verifies_orders()
        {
            warn!("an ORDER_CHECKOUT CDP may have taken is not sent again: left to the landing check");
            progress.sent += 1;
            record_ack(deps, claimed, gathered, &progress, None, &mut writes);
            write_progress(deps, claimed, gathered, &progress, &mut writes).await?;
            continue;
        }
        let timeout = deps.settings.delivery.request_timeout().min(window - WINDOW_MARGIN);
        let event = &progress.events[progress.sent];
        let name = event.kind.name();
        let sent_at = std::time::Instant::now();
        let outcome = deps.cdp.send(event, timeout).await;
        metrics::counter!("forwarder_cdp_events_total", "event" => name, "outcome" => outcome_label(&outcome))
            .increment(1);
        match outcome {
            Outcome::Done => {
                deps.pause.accepted(sent_at);
                let facts = gathered.acknowledge(&progress.events[progress.sent], now_ms());
                progress.sent += 1;
                if progress.unstored {
                    writes.push(Write::Plan(Some(
                        serde_json::to_string(&progress.events).map_err(|e| Failure::Dead(e.to_string()))?,
                    )));
                    progress.unstored = false;
                }
                record_ack(deps, claimed, gathered, &progress, Some(facts), &mut writes);
                write_progress(deps, claimed, gathered, &progress, &mut writes).await?;
            }
            // CDP no longer knows the browser of a CHECKOUT that may have reached it before: a new
            // browser would need the order planned again, a second order if CDP built the first.
            // The CHECKOUT is left to the landing check instead (on, or the stored plan would not
            // have gone on), which finds that order or sends the order again, once.
            Outcome::BrowserUnknown
                if doubtful_checkout == Some(progress.sent)
                    && matches!(progress.events[progress.sent].kind, EventKind::Checkout { .. })
                    && deps.settings.verifies_orders() =>
            {
                warn!(browser = %progress.events[progress.sent].session.browser_id, "CDP does not know the browser of a CHECKOUT it may have taken: left to the landing check");
                progress.sent += 1;
                record_ack(deps, claimed, gathered, &progress, None, &mut writes);
                write_progress(deps, claimed, gathered, &progress, &mut writes).await?;
            }
            Outcome::BrowserUnknown if Some(&progress.events[progress.sent].session) == gathered.primary().as_ref() => {
                remints += 1;
                if remints > MAX_REMINTS {
                    return Err(Failure::Retry {
                        after: None,
                        reason: "CDP does not know the browser ids it just minted".into(),
                    });
                }
                warn!(browser = %progress.events[progress.sent].session.browser_id, "CDP does not know the shopper's browser: minting a new one");
                let minted = mint(deps, lease).await?;
                gathered.use_browser(minted);
                writes.push(Write::Shopper {
                    key: gathered.key.clone(),
                    state: gathered.shopper.clone(),
                });
                writes.push(Write::Plan(None));
                deps.store
                    .apply(&claimed.claim, std::mem::take(&mut writes), None)
                    .await?;
                progress = plan(deps, gathered);
                // A new plan's CHECKOUT has not been sent by anyone.
                doubtful_checkout = None;
            }
            Outcome::BrowserUnknown => {
                // Another session's browser is gone: there is nothing left there to clear or link.
                let gone = progress.events[progress.sent].session.clone();
                let sent = progress.sent;
                let mut index = 0;
                progress.events.retain(|e| {
                    index += 1;
                    index <= sent || e.session != gone
                });
                progress.unstored = true;
            }
            Outcome::Permanent(reason) => return Err(Failure::Dead(reason)),
            Outcome::Config(reason) => {
                return Err(match deps.pause.refused_event(claimed.claim.intent_id, &reason) {
                    Some(wait) => Failure::Paused { wait, reason },
                    None => Failure::Dead(format!(
                        "{reason}: refused again while CDP accepted other events, so this event's own refusal"
                    )),
                });
            }
            Outcome::Retry { after, reason } => return Err(Failure::Retry { after, reason }),
        }
    }
    Ok(writes)
}

/// Writes the progress [`record_ack`] put among `writes`, unless the last event was acknowledged:
/// its progress is recorded with the ack, in the same write.
async fn write_progress(
    deps: &Deps,
    claimed: &ClaimedIntent,
    gathered: &Gathered,
    progress: &Progress,
    writes: &mut Vec<Write>,
) -> Result<(), Failure> {
    if progress.sent < progress.events.len() {
        if let Err(error) = deps.store.apply(&claimed.claim, std::mem::take(writes), None).await {
            return Err(unrecorded(deps, claimed, gathered, progress, error));
        }
    }
    Ok(())
}

/// The writes that record the last event CDP acknowledged: the count, its session's facts, and for
/// a CONFIRM or a CHECKOUT (sent twice, it could make a second order) the wait for the disk — lost
/// to a crash of the machine or the database, it would be sent again — and the landing check.
fn record_ack(
    deps: &Deps,
    claimed: &ClaimedIntent,
    gathered: &Gathered,
    progress: &Progress,
    facts: Option<SessionFacts>,
    writes: &mut Vec<Write>,
) {
    writes.push(Write::Sent(progress.sent));
    writes.extend(facts.map(Write::Session));
    let acked = &progress.events[progress.sent - 1];
    if matches!(
        acked.kind,
        EventKind::Confirm { .. } | EventKind::Checkout { .. } | EventKind::OrderCheckout { .. }
    ) {
        writes.push(Write::Durable);
    }
    if let Some(check) = landing_check(deps, claimed, gathered, acked) {
        writes.push(Write::CheckOrder(check));
    }
}

/// The write of progress made before the last event failed (a connection the database dropped,
/// say): the failure carries that progress — the plan and what [`record_ack`] writes, the facts of
/// the acknowledged event's session among them (the next attempt goes on only while that session
/// is open) — so that settling records it with the retry, and the next attempt goes on with the
/// next event instead of sending an acknowledged CONFIRM again. Built again from the plan and the
/// gathered sessions here, so that the writes of every event need no copy.
fn unrecorded(
    deps: &Deps,
    claimed: &ClaimedIntent,
    gathered: &Gathered,
    progress: &Progress,
    error: StoreError,
) -> Failure {
    if matches!(error, StoreError::StaleClaim(_)) {
        return error.into();
    }
    let Ok(plan) = serde_json::to_string(&progress.events) else {
        return error.into();
    };
    let mut writes = vec![Write::Plan(Some(plan))];
    let facts = gathered
        .sessions
        .get(&progress.events[progress.sent - 1].session)
        .cloned();
    record_ack(deps, claimed, gathered, progress, facts, &mut writes);
    Failure::Unrecorded {
        error,
        progress: writes,
    }
}

/// After CDP acknowledged an order's CHECKOUT (or ORDER_CHECKOUT): the landing check that asks CDP
/// for the order later (when `cdp.api_token` is set), recorded with the event's progress.
fn landing_check(deps: &Deps, claimed: &ClaimedIntent, gathered: &Gathered, event: &Event) -> Option<OrderCheck> {
    if !deps.settings.verifies_orders() {
        return None;
    }
    let order_id = match &event.kind {
        EventKind::Checkout { reference_id, .. } => reference_id.clone(),
        EventKind::OrderCheckout { order } => order.reference_id.clone(),
        _ => return None,
    };
    Some(OrderCheck {
        order_id,
        shopper_key: claimed.shopper_key.clone(),
        // Parsed when gathered: only a submit's events build an order.
        intent: gathered.checked_intent.clone()?,
        // A repair reads OrderCloud's lines from here: those of the cart's record the order was
        // planned from, when OrderCloud's could not be read (the record leaves with the ack).
        enrichment: match (&gathered.planned_from_record, &claimed.enrichment) {
            (Some(lines), Some(Value::Object(enrichment))) => {
                let mut enrichment = enrichment.clone();
                enrichment.insert("lines".into(), Value::Array(lines.clone()));
                Some(Value::Object(enrichment))
            }
            _ => claimed.enrichment.clone(),
        },
        due_at_ms: now_ms() + deps.settings.verify_after().as_millis() as i64,
        since_ms: 0,
        repairs: 0,
        attempts: 0,
    })
}

/// The stored plan, when it can go on: some of it was acknowledged and the session of its next
/// event is still open (else the session must be rebuilt, and the intent is planned again) — or
/// the order is already in CDP (a CHECKOUT or ORDER_CHECKOUT acknowledged): then it goes on whatever
/// the sessions, for planning it again would send the order a second time.
///
/// The same holds for an order whose CHECKOUT (or ORDER_CHECKOUT) is next where the landing check is on: an earlier
/// attempt may have sent it and lost CDP's answer (a timeout, a gateway's 5xx, a crash), and
/// planned again in a new session it would be a second order if CDP built the first. Sent as it
/// stood, in a session CDP has closed it has no CONFIRM and builds nothing (`cdp.md` §8, reported by
/// the community), and the landing check then finds the order or sends it again; an ORDER_CHECKOUT,
/// which builds an order in any session, is not sent again at all but left to the landing check
/// (see `send`). Without the
/// landing check the order is planned again (at least once: a CDP order is never lost for want of a
/// session).
///
/// An order's plan that cannot be read (a version that wrote another shape, a damaged row) or that
/// counts more events than it holds is a dead letter, to be replayed by a version that reads it:
/// some of it was acknowledged (a plan is stored with its first acknowledged event), and planned
/// again the order could reach CDP a second time. Other intents are planned again (their events are
/// upserts or idempotent).
fn resumable(deps: &Deps, claimed: &ClaimedIntent, gathered: &Gathered) -> Result<Option<Progress>, Failure> {
    let Some(plan) = claimed.plan.as_ref() else {
        return Ok(None);
    };
    let Some((events, sent)) = plan_and_sent(plan, claimed.sent).filter(|(events, sent)| *sent <= events.len()) else {
        return match claimed.intent.kind {
            IntentKind::OrderSubmitted => Err(Failure::Dead(
                "the order's stored plan cannot be read (or counts more events than it holds): not planned \
                 again, which could send the order twice"
                    .into(),
            )),
            _ => Ok(None),
        };
    };
    if sent == 0 {
        return Ok(None);
    }
    let order_sent = events[..sent].iter().any(|e| e.kind.builds_order());
    let order_in_doubt =
        deps.settings.verifies_orders() && events.get(sent).is_some_and(|next| next.kind.builds_order());
    let next_open = events
        .get(sent)
        .is_none_or(|next| gathered.is_open(&next.session, now_ms()));
    Ok((order_sent || order_in_doubt || next_open).then_some(Progress {
        events,
        sent,
        unstored: false,
    }))
}

/// The stored plan and how much of it was acknowledged: a JSON array of events with the `sent`
/// column, or as earlier versions stored it, `{"events": [...], "sent": n}` (replicas of either
/// version may share a database during a rolling upgrade). An earlier version's plan keeps its own
/// count, and this version records what it acknowledges of that plan in the column (the plan is not
/// written again): the larger of the two is what CDP acknowledged.
fn plan_and_sent(plan: &Value, sent_column: usize) -> Option<(Vec<Event>, usize)> {
    match plan {
        Value::Object(earlier) => {
            let events = serde_json::from_value(earlier.get("events")?.clone()).ok()?;
            let sent = earlier.get("sent")?.as_u64()? as usize;
            Some((events, sent.max(sent_column)))
        }
        plan => Some((serde_json::from_value(plan.clone()).ok()?, sent_column)),
    }
}

/// A new plan from what was gathered.
fn plan(deps: &Deps, gathered: &Gathered) -> Progress {
    let cdp = &deps.settings.cdp;
    let events = planner::plan(&gathered.context(cdp), &gathered.situation(now_ms()));
    if let Some(primary) = gathered.primary() {
        if is_replay(gathered.kind, &events, &primary) {
            metrics::counter!("forwarder_session_replays_total", "kind" => gathered.kind.label()).increment(1);
        }
    }
    Progress {
        events,
        sent: 0,
        unstored: true,
    }
}

/// Mints a browser with `browser/create`, within the lease.
async fn mint(deps: &Deps, lease: &Lease) -> Result<String, Failure> {
    let window = lease
        .window()
        .filter(|w| *w >= MIN_WINDOW)
        .ok_or_else(|| Failure::LeaseLost("the lease ran out before browser/create".into()))?;
    let timeout = deps.settings.delivery.request_timeout().min(window - WINDOW_MARGIN);
    let sent_at = std::time::Instant::now();
    match deps.cdp.create_browser(timeout).await {
        Ok(browser) => {
            metrics::counter!("forwarder_browsers_minted_total").increment(1);
            deps.pause.accepted(sent_at);
            Ok(browser)
        }
        Err(Outcome::Config(reason)) => {
            let wait = deps.pause.start(&reason);
            Err(Failure::Paused { wait, reason })
        }
        Err(Outcome::Retry { after, reason }) => Err(Failure::Retry { after, reason }),
        Err(other) => Err(Failure::Retry {
            after: None,
            reason: format!("browser/create failed: {other:?}"),
        }),
    }
}

/// A submit or a link that re-sends the cart into a session (ADDs the shopper did not just make).
fn is_replay(kind: IntentKind, events: &[Event], primary: &SessionRef) -> bool {
    let adds_on = |session: &SessionRef| {
        events
            .iter()
            .any(|e| e.session == *session && matches!(e.kind, EventKind::Add { .. }))
    };
    match kind {
        IntentKind::OrderSubmitted => adds_on(primary),
        IntentKind::Registered | IntentKind::AnonOrderTransferred => {
            events.iter().any(|e| matches!(e.kind, EventKind::Add { .. }))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_earlier_versions_plan_goes_on_from_what_this_version_recorded() {
        // Acknowledged under the earlier version up to 2, then up to 4 under this one.
        let (_, sent) = plan_and_sent(&json!({"events": [], "sent": 2}), 4).unwrap();
        assert_eq!(sent, 4);
        // Nothing recorded by this version yet.
        let (_, sent) = plan_and_sent(&json!({"events": [], "sent": 2}), 0).unwrap();
        assert_eq!(sent, 2);
        let (_, sent) = plan_and_sent(&json!([]), 3).unwrap();
        assert_eq!(sent, 3);
    }
}
