//! Settle: how a claimed intent leaves the worker — acknowledged with the records that follow it,
//! rescheduled with backoff, dead-lettered, or released. Every failure counts as an attempt and
//! ages out under `delivery.max_age_secs`, whatever its kind: a CDP error, a store error, a panic.

use std::time::Duration;

use tracing::{info, warn};

use super::{backoff, Deps};
use crate::domain::intent::UnreadableIntent;
use crate::domain::now_ms;
use crate::store::{Claim, ClaimedIntent, Settle, StoreError, Write};

/// Why an intent did not complete this time.
#[derive(Debug)]
pub enum Failure {
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    Dead(String),
    /// CDP refused the configuration: try again at the next probe, burning nothing.
    Paused {
        wait: Duration,
        reason: String,
    },
    /// Shutdown: release the claim (progress is already recorded).
    Stopping,
    /// The claim can no longer be acted on: another worker holds it, or the lease could not be
    /// renewed in time. Nothing more is sent.
    LeaseLost(String),
    Store(StoreError),
    /// The progress of events CDP acknowledged could not be written: recorded with the retry.
    Unrecorded {
        error: StoreError,
        progress: Vec<Write>,
    },
    /// The delivery task panicked.
    Panicked(String),
}

impl From<UnreadableIntent> for Failure {
    fn from(e: UnreadableIntent) -> Self {
        Failure::Dead(e.to_string())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::StaleClaim(_) => Failure::LeaseLost("another worker holds the intent".into()),
            e => Failure::Store(e),
        }
    }
}

/// What settling needs of a claimed intent.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub claim: Claim,
    pub created_at_ms: i64,
    /// This one included.
    pub attempts: i64,
}

impl Attempt {
    pub fn of(claimed: &ClaimedIntent) -> Attempt {
        Attempt {
            claim: claimed.claim.clone(),
            created_at_ms: claimed.created_at_ms,
            attempts: claimed.attempts,
        }
    }
}

/// Settles an attempt after its delivery ended with `result` (the writes to make with the ack).
pub async fn settle(deps: &Deps, claimed: &Attempt, result: Result<Vec<Write>, Failure>) {
    let claim = &claimed.claim;
    let retry = |reason: String, after: Option<Duration>| {
        if deps.too_old(claimed.created_at_ms) {
            warn!(reason, "giving up after delivery.max_age_secs: dead letter");
            metrics::counter!("forwarder_dead_letters_total", "stage" => "delivery").increment(1);
            (
                "dead_letter",
                Settle::Dead {
                    reason: format!("{reason} (gave up after delivery.max_age_secs)"),
                },
            )
        } else {
            let wait = backoff::retry_delay(&deps.settings.delivery, claimed.attempts, after);
            info!(reason, retry_in_ms = wait.as_millis() as u64, "will retry");
            metrics::counter!("forwarder_delivery_retries_total").increment(1);
            (
                "retry",
                Settle::Retry {
                    at_ms: now_ms() + wait.as_millis() as i64,
                    error: reason,
                },
            )
        }
    };
    let (label, writes, settle) = match result {
        Ok(writes) => {
            info!("delivered");
            ("delivered", writes, Settle::Ack)
        }
        Err(Failure::Retry { after, reason }) => {
            let (label, settle) = retry(reason, after);
            (label, Vec::new(), settle)
        }
        Err(Failure::Dead(reason)) => {
            warn!(reason, "dead letter");
            metrics::counter!("forwarder_dead_letters_total", "stage" => "delivery").increment(1);
            ("dead_letter", Vec::new(), Settle::Dead { reason })
        }
        // Due again after two pauses, not one: the next probe is then another shopper's intent where
        // there is one (an intent CDP refuses for itself would otherwise be the probe every time, the
        // oldest due, and CDP never get to accept another: the pause would grow for ever).
        Err(Failure::Paused { wait, reason }) => (
            "paused",
            Vec::new(),
            Settle::Retry {
                at_ms: now_ms() + 2 * wait.as_millis() as i64,
                error: reason,
            },
        ),
        Err(Failure::Stopping) => (
            "released",
            Vec::new(),
            Settle::Retry {
                at_ms: now_ms(),
                error: "released at shutdown".into(),
            },
        ),
        // Given back if it is still ours (a lease that ran short while the store was slow); the
        // store refuses it otherwise.
        Err(Failure::LeaseLost(reason)) => {
            warn!(reason, "lease lost: stopped before the next event");
            let (label, settle) = retry(format!("lease lost: {reason}"), None);
            let label = if label == "retry" { "lease_lost" } else { label };
            (label, Vec::new(), settle)
        }
        Err(Failure::Store(e)) => {
            let (label, settle) = retry(format!("store error: {e}"), None);
            let label = if label == "retry" { "store_error" } else { label };
            (label, Vec::new(), settle)
        }
        Err(Failure::Unrecorded { error, progress }) => {
            let (label, settle) = retry(format!("store error: {error}"), None);
            let label = if label == "retry" { "store_error" } else { label };
            (label, progress, settle)
        }
        Err(Failure::Panicked(message)) => {
            let (label, settle) = retry(format!("delivery panicked: {message}"), None);
            let label = if label == "retry" { "panicked" } else { label };
            (label, Vec::new(), settle)
        }
    };
    metrics::counter!("forwarder_deliveries_total", "outcome" => label).increment(1);
    let carried = !writes.is_empty() || settle == Settle::Ack;
    // What records the acknowledged events among the writes (the last event's, carried by the ack):
    // their count and plan, the wait for the disk, the landing check of an acknowledged CHECKOUT
    // and the sessions' facts. Kept if the rest cannot be recorded, so that no acknowledged event —
    // a CHECKOUT above all — is sent again, and an order CDP acknowledged is still checked for.
    let acknowledged: Vec<Write> = writes
        .iter()
        .filter(|w| is_progress(w) || matches!(w, Write::CheckOrder(_) | Write::Session(_)))
        .cloned()
        .collect();
    match deps.store.apply(claim, writes, Some(settle)).await {
        Ok(()) => {}
        Err(StoreError::StaleClaim(_)) => {
            info!(outcome = label, "not settled: another worker holds the intent now")
        }
        // The ack, or the records it carries, were refused (a value the store cannot take, or a
        // connection dropped as it was written): that is a failure like any other, retried and aged
        // out, not an ack tried forever.
        Err(e) if carried => {
            warn!(error = %e, outcome = label, "cannot record the delivered intent; it will be retried");
            let (_, settle) = retry(format!("store error: {e}"), None);
            record_progress(deps, claim, acknowledged, settle).await;
        }
        Err(e) => {
            warn!(error = %e, outcome = label, "cannot settle the intent; its lease will run out and it runs again")
        }
    }
}

/// Records what an ack could not, with the retry: the acknowledged events' writes; if the store
/// refuses a value among those (one of them is what it cannot take), their count, plan and wait for
/// the disk alone — the landing check and the sessions' facts are then lost, but no acknowledged
/// event is sent again. A passing error (a connection, a lock) is tried once more; when the store
/// still cannot be written, nothing is dropped: the lease runs out and the intent runs again,
/// sending its last event again (at least once), and that event's ack records the rest.
async fn record_progress(deps: &Deps, claim: &Claim, acknowledged: Vec<Write>, settle: Settle) {
    let progress: Vec<Write> = acknowledged.iter().filter(|w| is_progress(w)).cloned().collect();
    let fallback = progress.len() < acknowledged.len();
    let mut result = deps
        .store
        .apply(claim, acknowledged.clone(), Some(settle.clone()))
        .await;
    if result
        .as_ref()
        .is_err_and(|e| !e.refuses_value() && !matches!(e, StoreError::StaleClaim(_)))
    {
        // A passing error (a dropped connection, a deadlock): once more, a moment later.
        tokio::time::sleep(Duration::from_millis(200)).await;
        result = deps.store.apply(claim, acknowledged, Some(settle.clone())).await;
    }
    match result {
        Ok(()) | Err(StoreError::StaleClaim(_)) => return,
        Err(e) if fallback && e.refuses_value() => {
            warn!(error = %e, "the store refuses the acknowledged events' records; recording their progress alone")
        }
        Err(e) => {
            warn!(error = %e, "cannot settle the intent; its lease will run out and it runs again");
            return;
        }
    }
    if let Err(e) = deps.store.apply(claim, progress, Some(settle)).await {
        warn!(error = %e, "cannot settle the intent; its lease will run out and it runs again");
    }
}

/// The plan, the count of events CDP acknowledged and the wait for the disk: what keeps an
/// acknowledged event from being sent again.
fn is_progress(write: &Write) -> bool {
    matches!(write, Write::Plan(_) | Write::Sent(_) | Write::Durable)
}
