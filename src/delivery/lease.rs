//! The lease keeper: renews a claim's lease while its intent runs, and tells the sender how long it
//! may still act on the claim.
//!
//! A renewal that fails is retried until the lease would expire; then the lease counts as lost. A
//! renewal refused because another worker holds the intent loses it at once. The sender asks for
//! the [`Lease::window`] before every CDP request and sends nothing once it is gone, and each
//! request's timeout ends inside the window: so no request of a stale worker can still be in
//! flight when another worker takes the intent over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::store::{Claim, DynStore, StoreError};

pub struct Lease {
    state: Arc<Mutex<State>>,
    store: DynStore,
    renewer: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy)]
struct State {
    /// Until when the lease runs for sure: the start of the last renewal that succeeded plus the
    /// lease (the store counted from a later moment).
    until: Instant,
    lost: bool,
}

impl Lease {
    /// Starts renewing the lease of `claim`, taken at `claimed_at` for `lease`.
    pub fn keep(store: DynStore, claim: Claim, lease: Duration, claimed_at: Instant) -> Lease {
        let state = Arc::new(Mutex::new(State {
            until: claimed_at + lease,
            lost: false,
        }));
        let renewer = tokio::spawn(renew(store.clone(), claim, lease, state.clone()));
        Lease { state, store, renewer }
    }

    /// How long the worker may still act on the claim: the lease's remaining time, or less when the
    /// store says its claims could be taken over sooner. `None` once the lease is lost or over.
    pub fn window(&self) -> Option<Duration> {
        let state = *self.state.lock().expect("lease lock");
        if state.lost {
            return None;
        }
        let until = match self.store.claims_safe_until() {
            Some(safe) => state.until.min(safe),
            None => state.until,
        };
        until.checked_duration_since(Instant::now())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Renews every third of the lease; retries a failed renewal every tenth (at most every second)
/// until the lease would be over.
async fn renew(store: DynStore, claim: Claim, lease: Duration, state: Arc<Mutex<State>>) {
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
