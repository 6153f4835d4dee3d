//! The landing check: CDP answers 201 to a CHECKOUT and can still build no order (a wrong point of
//! sale, a session already closed, a price type it does not take), and the Stream API cannot mend an
//! order afterwards. So `reconcile.verify_after_secs` after CDP acknowledged an order's CHECKOUT,
//! CDP's REST API is asked for the order; one it does not hold is sent again (a copy of its submit,
//! which opens a new session of the shopper's browser), at most `reconcile.repairs` times, and then
//! becomes a dead letter with the reason. A REST API that fails is asked again with backoff; a check
//! never holds up a shopper's queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::cdp::orders::OrderLookup;
use crate::config::Settings;
use crate::domain::intent::RawIntent;
use crate::domain::now_ms;
use crate::health::Health;
use crate::store::{CheckOutcome, DynStore, EnqueueOutcome, NewIntent, OrderCheck, StoreError};

/// Checks claimed at a time.
const BATCH: usize = 16;

pub struct Verifier {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub health: Health,
    pub wake: Arc<Notify>,
    pub cdp: OrderLookup,
}

impl Verifier {
    pub fn new(settings: Arc<Settings>, store: DynStore, health: Health, wake: Arc<Notify>) -> anyhow::Result<Self> {
        Ok(Verifier {
            cdp: OrderLookup::new(&settings)?,
            settings,
            store,
            health,
            wake,
        })
    }
}

/// The reason a check gives up with.
fn missing_reason(order_id: &str) -> String {
    format!("CDP acknowledged the CHECKOUT of order {order_id} but holds no order")
}

/// Looks due orders up until stopped.
pub async fn run_verifier(v: Arc<Verifier>, mut stop: watch::Receiver<bool>) {
    let tick = v
        .settings
        .verify_after()
        .div_f64(4.0)
        .clamp(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match check_due(&v).await {
            Ok(0) => {}
            Ok(_) => continue,
            Err(e) => warn!(error = %e, "cannot read the orders to check in CDP"),
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Checks the orders that are due; how many it looked at.
async fn check_due(v: &Verifier) -> Result<usize, StoreError> {
    // Long enough for the whole batch, each lookup taking its full timeout: another replica does
    // not take a check over while this one works through it.
    let lease = v.settings.delivery.request_timeout() * (BATCH as u32 + 1) + Duration::from_secs(30);
    let checks = v.store.claim_order_checks(BATCH, lease).await?;
    for check in &checks {
        // One check that fails (a store error, a submit that cannot be read back) waits its turn
        // again; the others go on.
        let outcome = check_one(v, check).await.unwrap_or_else(|e| {
            warn!(order = %check.order_id, error = %e, "landing check failed; tried again later");
            let wait = crate::delivery::backoff::retry_delay(&v.settings.delivery, check.attempts + 1, None);
            CheckOutcome::Retry {
                due_at_ms: now_ms() + wait.as_millis() as i64,
                error: e.to_string(),
            }
        });
        v.store.settle_order_check(&check.order_id, outcome).await?;
    }
    Ok(checks.len())
}

async fn check_one(v: &Verifier, check: &OrderCheck) -> Result<CheckOutcome, StoreError> {
    let order = &check.order_id;
    let held = match v.cdp.holds(order).await {
        Ok(held) => {
            v.health.clear("order_check");
            held
        }
        Err(e) => {
            // Retried without end (an order is never dropped unverified): readiness says why until
            // a lookup succeeds, refused credentials or an API that keeps failing alike.
            v.health
                .warn("order_check", format!("{e}; landing checks are tried again"));
            let wait = crate::delivery::backoff::retry_delay(&v.settings.delivery, check.attempts + 1, None);
            warn!(order = %order, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot ask CDP for the order");
            return Ok(CheckOutcome::Retry {
                due_at_ms: now_ms() + wait.as_millis() as i64,
                error: e.to_string(),
            });
        }
    };
    if held {
        metrics::counter!("orders_verified_total", "outcome" => "present").increment(1);
        return Ok(CheckOutcome::Done);
    }
    let repairs_allowed = i64::from(v.settings.reconcile.repairs);
    if check.repairs < repairs_allowed {
        // Keyed by this round of checks and the repair's number: a check tried again after its
        // repair was stored (its settling failed) stores none twice; a round after a replay of the
        // order is a new one.
        let key = format!("order-repair:{order}:{}:{}", check.since_ms, check.repairs + 1);
        if let EnqueueOutcome::Queued(_) = v.store.enqueue(copy_of_submit(check, key, None)?).await? {
            v.wake.notify_waiters();
            metrics::counter!("orders_verified_total", "outcome" => "repaired").increment(1);
            warn!(order = %order, repair = check.repairs + 1, "CDP acknowledged the order's CHECKOUT but holds no order: sent again");
        }
        // The repair's CHECKOUT sets the next check; this one is only for a repair that never
        // gets that far (it ages out to a dead letter of its own first).
        let later = v.settings.delivery.max_age() + v.settings.verify_after();
        return Ok(CheckOutcome::Repaired {
            due_at_ms: now_ms() + later.as_millis() as i64,
        });
    }
    // This round's repair was stored and its CHECKOUT never acknowledged (that would have begun a
    // new round): it became a dead letter of its own, which stands for the order. A second one
    // would be replayed with it, a second order.
    if check.repairs > 0 {
        let repair = format!("order-repair:{order}:{}:{}", check.since_ms, check.repairs);
        if !v
            .store
            .known_dedupe_keys(std::slice::from_ref(&repair))
            .await?
            .is_empty()
        {
            metrics::counter!("orders_verified_total", "outcome" => "repair_dead_letter").increment(1);
            warn!(order = %order, "CDP holds no order and its repair became a dead letter: replay that one");
            return Ok(CheckOutcome::Done);
        }
    }
    let reason = missing_reason(order);
    let key = format!("order-missing:{order}:{}", check.since_ms);
    let dead = copy_of_submit(check, key, Some(reason.clone()))?;
    v.store.enqueue(dead).await?;
    metrics::counter!("orders_verified_total", "outcome" => "missing").increment(1);
    metrics::counter!("forwarder_dead_letters_total", "stage" => "landing_check").increment(1);
    info!(order = %order, reason, "dead letter");
    Ok(CheckOutcome::Done)
}

/// The order's submit again, as stored when CDP acknowledged its CHECKOUT: queued under `key`, or
/// stored as a dead letter with `dead_reason`.
fn copy_of_submit(check: &OrderCheck, key: String, dead_reason: Option<String>) -> Result<NewIntent, StoreError> {
    let intent: RawIntent = serde_json::from_str(&check.intent.to_string())?;
    Ok(NewIntent {
        dedupe_key: key,
        shopper_key: check.shopper_key.clone(),
        intent,
        secrets: Default::default(),
        dead_reason,
        needs_enrichment: false,
        enrichment: check.enrichment.clone(),
    })
}
