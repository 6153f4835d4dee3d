//! The order ledger's reconciliation with OrderCloud: every `reconcile.interval_secs`, one replica
//! lists the orders submitted since the last pass (less `reconcile.lag_secs`, which OrderCloud's
//! search cache may take to show them) and sends the submit of each order the service holds none
//! for — webhooks that never came (OrderCloud documents no retry; the portal fires none). A submit
//! is stored under its order's dedupe key whichever path brings it, so an order becomes one CDP
//! order: a webhook that arrives after its order was reconciled is a duplicate.
//!
//! On while `ordercloud.client_id` is set. Failures (bad credentials, OrderCloud down) are shown by
//! readiness as a warning and tried again at the next interval; they never hold up webhooks.

mod pass;
pub mod submit;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, OnceCell};
use tracing::{info, warn};

use crate::config::Settings;
use crate::health::Health;
use crate::ordercloud::admin::{AdminClient, AdminError};
use crate::store::DynStore;

pub use pass::{PassError, Report};

/// What the reconciler works with.
pub struct Reconciler {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub health: Health,
    /// Wakes delivery when a submit is stored.
    pub wake: Arc<Notify>,
    pub ordercloud: AdminClient,
    /// This process's name in the reconciler's lease.
    pub holder: String,
    /// The API clients' default context users, read once.
    anonymous_users: OnceCell<Vec<String>>,
    /// How far the passes have looked (epoch ms), as last read or written by this process.
    watermark: std::sync::Mutex<Option<i64>>,
}

impl Reconciler {
    pub fn new(settings: Arc<Settings>, store: DynStore, health: Health, wake: Arc<Notify>) -> anyhow::Result<Self> {
        Ok(Reconciler {
            ordercloud: AdminClient::new(&settings)?,
            settings,
            store,
            health,
            wake,
            holder: format!("reconciler-{}", uuid::Uuid::new_v4()),
            anonymous_users: OnceCell::new(),
            watermark: std::sync::Mutex::new(None),
        })
    }

    /// `FromUser.Username`s of anonymous shoppers' orders.
    async fn anonymous_usernames(&self) -> Result<Vec<String>, AdminError> {
        let mut names = self
            .anonymous_users
            .get_or_try_init(|| self.ordercloud.default_context_usernames())
            .await?
            .clone();
        names.extend(self.settings.reconcile.anonymous_usernames.iter().cloned());
        Ok(names)
    }

    fn saw_watermark(&self, watermark: Option<i64>) {
        if let Some(w) = watermark {
            *self.watermark.lock().expect("watermark lock") = Some(w);
        }
    }

    /// How long a pass may hold the window before another replica may take it.
    fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.reconcile.interval_secs.max(60) * 2)
    }
}

/// One pass now (what the loop runs each interval).
pub async fn run_pass(reconciler: &Reconciler) -> Result<Report, PassError> {
    pass::run(reconciler).await
}

/// Runs a pass every `reconcile.interval_secs` until stopped.
pub async fn run_reconciler(reconciler: Arc<Reconciler>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_secs(reconciler.settings.reconcile.interval_secs);
    info!(
        api = reconciler.ordercloud.base(),
        ?interval,
        "reconciling submitted orders with OrderCloud"
    );
    loop {
        match pass::run(&reconciler).await {
            Ok(report) => {
                match &report.unread {
                    Some((order, _, error)) => reconciler.health.warn(
                        "reconciler",
                        format!(
                            "the lines of lost order {order} could not be read ({error}); tried again at each pass, \
                             the other orders go on"
                        ),
                    ),
                    None => reconciler.health.clear("reconciler"),
                }
                if report.sent > 0 {
                    reconciler.wake.notify_waiters();
                    info!(
                        listed = report.listed,
                        sent = report.sent,
                        "orders whose submit never came are sent"
                    );
                }
            }
            Err(e) => {
                warn!(error = %e, "reconciliation pass failed; tried again at the next interval");
                reconciler.health.warn("reconciler", e.to_string());
            }
        }
        // Grows while passes fail: what to alert on.
        if let Some(w) = *reconciler.watermark.lock().expect("watermark lock") {
            metrics::gauge!("reconcile_watermark_age_seconds").set((crate::domain::now_ms() - w) as f64 / 1000.0);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
