//! The lease keeper: renews a claim's lease while its intent runs (a future run beside the delivery
//! on the delivery's own task, not a task of its own), and tells the sender how long it may still act
//! on the claim.
//!
//! A renewal that fails is retried until the lease would expire; then the lease counts as lost. A
//! renewal refused because another worker holds the intent loses it at once. The sender asks for
//! the [`Lease::window`] before every CDP request and sends nothing once it is gone, and each
//! request's timeout ends inside the window: so no request of a stale worker can still be in
//! flight when another worker takes the intent over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::store::{Claim, Outbox, StoreError};

pub struct Lease {
    state: Arc<Mutex<State>>,
    store: Arc<dyn Outbox>,
    /// The store's [`crate::store::Liveness::epoch`] before the claim was made.
    epoch: Option<u64>,
}

#[derive(Clone, Copy)]
struct State {
    /// Until when the lease runs for sure: the start of the last renewal that succeeded plus the
    /// lease (the store counted from a later moment).
    until: Instant,
    lost: bool,
}

impl Lease {
    /// The lease of `claim`, taken at `claimed` (what [`Claiming::start`] saw) for `lease`, and the
    /// future that renews it: to be polled beside the delivery for as long as the claim is acted on
    /// (it never completes; once the lease is lost it only waits).
    pub fn keep(
        store: Arc<dyn Outbox>,
        claim: Claim,
        lease: Duration,
        claimed: Claiming,
    ) -> (Lease, impl std::future::Future<Output = ()> + Send + 'static) {
        let state = Arc::new(Mutex::new(State {
            until: claimed.at + lease,
            lost: false,
        }));
        let renewal = {
            let (store, state) = (store.clone(), state.clone());
            async move {
                renew(store, claim, lease, state).await;
                std::future::pending::<()>().await
            }
        };
        let lease = Lease {
            state,
            store,
            epoch: claimed.epoch,
        };
        (lease, renewal)
    }

    /// How long the worker may still act on the claim: the lease's remaining time, or less when the
    /// store says its claims could be taken over sooner. `None` once the lease is lost or over, or
    /// once the store's claims could have been taken over since the claim was made.
    pub fn window(&self) -> Option<Duration> {
        let state = *self.state.lock().expect("lease lock");
        if state.lost {
            return None;
        }
        let until = match self.store.liveness() {
            Some(live) if Some(live.epoch) != self.epoch => return None,
            Some(live) => state.until.min(live.safe_until),
            None => state.until,
        };
        until.checked_duration_since(Instant::now())
    }
}

/// What was true just before a claim was made.
#[derive(Debug, Clone, Copy)]
pub struct Claiming {
    at: Instant,
    epoch: Option<u64>,
}

impl Claiming {
    /// Read before claiming; `None` while the store's claims could be taken over by another replica
    /// within `min_window` (a replica cut off from the database claims nothing).
    pub fn start(store: &dyn Outbox, min_window: Duration) -> Option<Claiming> {
        let at = Instant::now();
        match store.liveness() {
            Some(live) if live.safe_until < at + min_window => None,
            live => Some(Claiming {
                at,
                epoch: live.map(|l| l.epoch),
            }),
        }
    }
}

/// Renews every third of the lease; retries a failed renewal every tenth (at most every second)
/// until the lease would be over.
async fn renew(store: Arc<dyn Outbox>, claim: Claim, lease: Duration, state: Arc<Mutex<State>>) {
    let retry_every = (lease / 10).min(Duration::from_secs(1));
    loop {
        tokio::time::sleep(lease / 3).await;
        loop {
            let started = Instant::now();
            match store.extend(&claim, lease).await {
                Ok(()) => {
                    state.lock().expect("lease lock").until = started + lease;
                    break;
                }
                Err(StoreError::StaleClaim(_)) => {
                    warn!(
                        intent_id = claim.intent_id,
                        "lease lost: another worker holds the intent"
                    );
                    state.lock().expect("lease lock").lost = true;
                    return;
                }
                Err(e) => {
                    let until = state.lock().expect("lease lock").until;
                    if Instant::now() + retry_every >= until {
                        warn!(intent_id = claim.intent_id, error = %e, "lease lost: it could not be renewed before it ran out");
                        state.lock().expect("lease lock").lost = true;
                        return;
                    }
                    warn!(intent_id = claim.intent_id, error = %e, "lease renewal failed; retrying");
                    tokio::time::sleep(retry_every).await;
                }
            }
        }
    }
}
