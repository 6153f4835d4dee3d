//! Delivery: from a stored intent to CDP events acknowledged, in stages, one file each.
//!
//! - [`enricher`] runs the OrderCloud reads an intent needs ([`enrich`]) as soon as it is stored,
//!   independently of CDP, and stores the results.
//! - [`dispatcher`] claims the head of each shopper's queue (only the oldest pending intent of a
//!   shopper can be claimed, so a failing shopper waits while others flow) and runs each claimed
//!   intent through [`deliver`], up to `delivery.concurrency` at once.
//! - [`deliver`] takes one intent through the stages: [`gather`] (store reads, the shopper's
//!   browser) → the pure [`crate::planner`] → [`send`] (each event to CDP, progress recorded after
//!   each acknowledgement) → [`settle`] (ack, reschedule or dead letter). [`lease`] keeps the claim
//!   alive meanwhile and tells [`send`] how long it may still act on it.
//!
//! Every write a delivery makes is fenced by its claim: once another worker holds the intent,
//! nothing of the stale worker's lands, and it sends nothing more.

pub mod backoff;
mod deliver;
mod dispatcher;
pub mod enrich;
mod enricher;
mod gather;
pub mod identities;
mod lease;
mod pause;
mod send;
mod settle;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};

use crate::cdp::CdpClient;
use crate::config::Settings;
use crate::domain::now_ms;
use crate::health::Health;
use crate::ordercloud::client::OrderCloudClient;
use crate::store::DynStore;

pub use dispatcher::run_dispatcher;
pub use enricher::run_enricher;
use pause::Pause;

/// What the loops share.
pub struct Deps {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub cdp: CdpClient,
    pub ordercloud: OrderCloudClient,
    pub health: Health,
    /// Notified when an intent is stored or enriched.
    pub wake: Arc<Notify>,
    /// Set while CDP refuses the client key.
    pause: Pause,
    /// Identities enrichment has stored, told to intake (shared with [`crate::http::AppState`]).
    pub identities: Arc<identities::KnownIdentities>,
}

impl Deps {
    pub fn new(
        settings: Arc<Settings>,
        store: DynStore,
        health: Health,
        wake: Arc<Notify>,
        identities: Arc<identities::KnownIdentities>,
    ) -> anyhow::Result<Deps> {
        let cdp = CdpClient::new(&settings.cdp, settings.delivery.request_timeout())?;
        let ordercloud = OrderCloudClient::new(&settings.ordercloud, health.clone())?;
        let pause = Pause::new(settings.delivery.auth_pause(), health.clone());
        Ok(Deps {
            settings,
            store,
            cdp,
            ordercloud,
            health,
            wake,
            pause,
            identities,
        })
    }

    /// Whether an intent stored at `created_at_ms` has been failing for longer than
    /// `delivery.max_age_secs`: then it becomes a dead letter instead of being tried again.
    fn too_old(&self, created_at_ms: i64) -> bool {
        let max_age_ms = i64::try_from(self.settings.delivery.max_age().as_millis()).unwrap_or(i64::MAX);
        now_ms().saturating_sub(created_at_ms) > max_age_ms
    }
}

/// The free slots worth a claim while jobs are in flight (delivery's and enrichment's): a quarter
/// of them. A claim is a store round trip whose cost is mostly its own, so claiming for each slot as
/// it frees would pay it per intent.
fn claim_batch(slots: usize) -> usize {
    (slots / 4).max(1)
}

/// Waits until `batch` of `slots` are free (jobs in flight ending free theirs), at most `poll` —
/// should the jobs in flight be slow ones — or until stopped. Only the loop that waits takes slots,
/// so they are still free when it claims.
async fn until_free(slots: &Semaphore, batch: usize, poll: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        // The slots are given back at once: the wait is for them to be free, not to hold them.
        _ = tokio::time::timeout(poll, slots.acquire_many(batch as u32)) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Waits for a wake-up, `wait`, or stop. Returns false on stop.
async fn idle(deps: &Deps, stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = deps.wake.notified() => true,
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Spawns both loops; they end when `stop` turns true.
pub fn spawn(deps: Arc<Deps>, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let (enricher, dispatcher) = (deps.clone(), deps);
    vec![
        tokio::spawn(supervised("enricher", stop.clone(), move |stop| {
            run_enricher(enricher.clone(), stop)
        })),
        tokio::spawn(supervised("dispatcher", stop, move |stop| {
            run_dispatcher(dispatcher.clone(), stop)
        })),
    ]
}

/// Runs a worker loop until `stop`, starting it again (a second later) should it panic: a loop
/// that ended silently would leave the service live and ready while nothing is delivered. (A
/// panic inside one intent's delivery or enrichment is settled where it happens.)
pub async fn supervised<F, Fut>(name: &'static str, stop: watch::Receiver<bool>, run: F)
where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Aborting the supervisor (the shutdown's deadline) aborts the loop it runs.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        let task = tokio::spawn(run(stop.clone()));
        let _abort = AbortOnDrop(task.abort_handle());
        match task.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let message = panic_message(e.into_panic());
                tracing::error!(worker = name, message, "a worker loop panicked: started again");
                metrics::counter!("forwarder_worker_restarts_total", "worker" => name).increment(1);
                if *stop.borrow() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(_) => return,
        }
    }
}

/// What a caught panic said.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
