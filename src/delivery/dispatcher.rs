//! The dispatcher: claims the head of each shopper's queue and runs each claimed intent, up to
//! `delivery.concurrency` shoppers at once (claiming again once a quarter of them are free, not per
//! slot), until stopped; then waits for deliveries in flight (they release their claims at the next
//! event boundary). A delivery that panics is settled like any failure: it counts as an attempt and
//! ages out.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt as _;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::warn;

use super::lease::Claiming;
use super::settle::{settle, Attempt, Failure};
use super::{claim_batch, deliver, idle, send, until_free, Deps};

pub async fn run_dispatcher(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let poll = deps.settings.delivery.poll_interval();
    let slots = Arc::new(Semaphore::new(deps.settings.delivery.concurrency));
    let claim_batch = claim_batch(deps.settings.delivery.concurrency);
    let mut tasks = JoinSet::new();
    // The last turn waited for slots to free: this one claims whatever is free.
    let mut waited = false;
    loop {
        while tasks.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        if let Some(wait) = deps.pause.waiting() {
            // New intents change nothing while CDP refuses the key, only the probe's time does:
            // not woken by each webhook.
            tokio::select! {
                _ = tokio::time::sleep(wait.min(poll * 10)) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        // While paused, one intent at a time probes CDP.
        let paused = deps.pause.is_paused();
        let free = if paused { 1 } else { slots.available_permits() };
        if free == 0 || slots.available_permits() == 0 {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        // While fewer than a quarter of the slots are free, more deliveries are let end before
        // claiming (below 8 slots a quarter is one: no wait). A claim is a store round trip whose
        // cost is mostly its own (on PostgreSQL, its walk of the queue), so claiming for each slot as
        // it frees would pay it per event. Bounded by the poll interval, should the deliveries in
        // flight be slow ones. Then back to the top, once: a pause that began meanwhile sends its
        // probe at its time, not at once.
        if !waited && !paused && free < claim_batch {
            until_free(&slots, claim_batch, poll, &mut stop).await;
            waited = true;
            continue;
        }
        waited = false;
        let Some(claiming) = Claiming::start(&*deps.store, send::MIN_WINDOW) else {
            // The replica's heartbeats do not reach the database: anything it claimed could be taken
            // over at once. Claim again once they do.
            if !idle(&deps, &mut stop, poll * 5).await {
                break;
            }
            continue;
        };
        let claimed = match deps.store.claim(free, deps.settings.delivery.lease()).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot claim intents");
                if !idle(&deps, &mut stop, poll * 5).await {
                    break;
                }
                continue;
            }
        };
        if claimed.is_empty() {
            // A finished delivery may have made its shopper's next intent the head: look again then,
            // not only when the poll interval is over.
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = deps.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        // While paused, the intent claimed is the probe: no other goes until it is answered.
        let probe = paused;
        if probe {
            deps.pause.probing();
        }
        for intent in claimed {
            let permit = slots.clone().acquire_owned().await.expect("semaphore is never closed");
            let (deps, stop) = (deps.clone(), stop.clone());
            // One task per intent: its delivery, the renewal of its lease, and the catch of a panic
            // run on it (each more task was a spawn and a wake-up of the other worker thread per
            // intent). Aborting it at the shutdown deadline aborts all three.
            tasks.spawn(async move {
                // The probe's end, however the task ends (aborted too): another may probe then.
                let _probe = probe.then(|| ProbeEnd(deps.clone()));
                // Kept to settle the intent should its delivery panic.
                let attempt = Attempt::of(&intent);
                let run = AssertUnwindSafe(deliver::process(deps.clone(), intent, claiming, stop));
                if let Err(payload) = run.catch_unwind().await {
                    let message = super::panic_message(payload);
                    warn!(intent_id = attempt.claim.intent_id, message, "delivery panicked");
                    settle(&deps, &attempt, Err(Failure::Panicked(message))).await;
                }
                drop(permit);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Ends a pause's probe when its task ends, however it ends.
struct ProbeEnd(Arc<Deps>);

impl Drop for ProbeEnd {
    fn drop(&mut self) {
        self.0.pause.probe_ended();
    }
}
