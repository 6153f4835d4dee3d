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

use crate::cdp::orders::{LookupError, OrderLookup};
use crate::config::Settings;
use crate::domain::intent::RawIntent;
use crate::domain::now_ms;
use crate::health::Health;
use crate::store::{CheckOutcome, DynStore, NewIntent, OrderCheck, StoreError};

/// Checks claimed at a time.
const BATCH: usize = 32;

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
pub fn missing_reason(order_id: &str) -> String {
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
    let lease = v.settings.delivery.request_timeout() * 2 + Duration::from_secs(30);
    let checks = v.store.claim_order_checks(BATCH, lease).await?;
    for check in &checks {
        let outcome = check_one(v, check).await?;
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
            if let LookupError::Credentials(_) = e {
                v.health.warn("order_check", e.to_string());
            }
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
        let repair = copy_of_submit(check, format!("order-repair:{order}:{}", check.repairs + 1), None)?;
        v.store.enqueue(repair).await?;
        v.wake.notify_waiters();
        metrics::counter!("orders_verified_total", "outcome" => "repaired").increment(1);
        warn!(order = %order, repair = check.repairs + 1, "CDP acknowledged the order's CHECKOUT but holds no order: sent again");
        return Ok(CheckOutcome::Repaired {
            due_at_ms: now_ms() + v.settings.verify_after().as_millis() as i64,
        });
    }
    let reason = missing_reason(order);
    let dead = copy_of_submit(check, format!("order-missing:{order}"), Some(reason.clone()))?;
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
