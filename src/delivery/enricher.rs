//! The enricher: runs the OrderCloud reads each stored intent needs ([`super::enrich`]) as soon as
//! it is stored, independently of CDP, and stores the results under the job's claim (a stale
//! enricher's writes are refused). Failures are retried with backoff and age out under
//! `delivery.max_age_secs` like delivery's.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument as _};

use super::enrich::{enrich, EnrichError};
use super::{backoff, claim_batch, idle, until_free, Deps};
use crate::domain::now_ms;
use crate::store::{EnrichmentJob, StoreError};

/// Runs enrichment jobs until stopped: up to `delivery.concurrency` (4 to 64) at once, claiming
/// more once a quarter of them are done — a slow shopper's reads hold only their own slots, not
/// every other shopper's enrichment.
pub async fn run_enricher(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let poll = deps.settings.delivery.poll_interval();
    let concurrency = deps.settings.delivery.concurrency.clamp(4, 64);
    let slots = Arc::new(Semaphore::new(concurrency));
    let claim_batch = claim_batch(concurrency);
    let queues: Arc<Queues> = Arc::default();
    // Told each time a job ends and frees its slot (a shopper's task may run on with more jobs).
    let freed = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    loop {
        while let Some(ended) = tasks.try_join_next() {
            if ended.is_err_and(|e| e.is_panic()) {
                warn!("an enrichment task panicked; its jobs run again after their lease");
            }
        }
        if *stop.borrow() {
            break;
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = freed.notified() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        // While fewer than a quarter of the slots are free, more jobs are let end before claiming
        // (at most the poll interval, should the jobs in flight be slow ones), as delivery does.
        if free < claim_batch {
            until_free(&slots, claim_batch, poll, &mut stop).await;
            if *stop.borrow() {
                break;
            }
        }
        let free = slots.available_permits();
        // Before the claim: the lease it takes starts no later than this.
        let claimed_at = Instant::now();
        let jobs = match deps.store.claim_enrichment(free, deps.settings.delivery.lease()).await {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!(error = %e, "cannot claim enrichment jobs");
                if !idle(&deps, &mut stop, poll * 5).await {
                    break;
                }
                continue;
            }
        };
        if jobs.is_empty() {
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = deps.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        // One task per shopper, its jobs in order — those claimed while it runs join its queue — so
        // that the first resolves the identity and the rest find it cached instead of each calling
        // OrderCloud.
        for job in jobs {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break; // claimed no more than `free`: not reached
            };
            let key = job.shopper_key.clone();
            let queued = Queued {
                job,
                permit,
                claimed_at,
            };
            let start = {
                let mut queues = queues.lock().expect("enrichment queues");
                match queues.get_mut(&key) {
                    Some(queue) => {
                        queue.push_back(queued);
                        false
                    }
                    None => {
                        queues.insert(key.clone(), VecDeque::from([queued]));
                        true
                    }
                }
            };
            if start {
                let (deps, queues, freed) = (deps.clone(), queues.clone(), freed.clone());
                tasks.spawn(async move { run_shopper(&deps, &queues, &freed, &key).await });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// The jobs of each shopper whose task runs, in the order they were claimed.
type Queues = Mutex<HashMap<String, VecDeque<Queued>>>;

/// A claimed job waiting for its shopper's task, with its slot.
struct Queued {
    job: EnrichmentJob,
    permit: OwnedSemaphorePermit,
    claimed_at: Instant,
}

/// A shopper's task: its jobs one after the other until its queue is empty (then the queue goes,
/// under the same lock that adds to it: a job claimed meanwhile starts a new task).
async fn run_shopper(deps: &Deps, queues: &Queues, freed: &Notify, key: &str) {
    let lease = deps.settings.delivery.lease();
    // Should the task panic (a bug outside a job's reads, which are caught), the shopper's queue
    // goes with it: its jobs' slots are freed and the jobs claimed again after their lease. The loop
    // that claims is told: it may be waiting for those very slots.
    struct Leave<'a>(&'a Queues, &'a str, &'a Notify);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(self.1);
                self.2.notify_one();
            }
        }
    }
    let _leave = Leave(queues, key, freed);
    loop {
        let next = {
            let mut queues = queues.lock().expect("enrichment queues");
            let next = queues.get_mut(key).and_then(VecDeque::pop_front);
            if next.is_none() {
                queues.remove(key);
            }
            next
        };
        let Some(Queued {
            job,
            permit,
            claimed_at,
        }) = next
        else {
            break;
        };
        // A job its lease no longer covers for a whole try is left to be claimed again.
        if claimed_at.elapsed() + deadline(lease) > lease {
            debug!(
                intent_id = job.claim.intent_id,
                "no lease left for the job: claimed again later"
            );
        } else {
            enrich_one(deps, job).await;
        }
        drop(permit);
        freed.notify_one();
    }
    deps.wake.notify_waiters();
}

/// How long one job's OrderCloud reads may take: three quarters of its lease, which is not renewed.
fn deadline(lease: Duration) -> Duration {
    lease - lease / 4
}

async fn enrich_one(deps: &Deps, job: EnrichmentJob) {
    let span = tracing::info_span!("enrich", intent_id = job.claim.intent_id, shopper = %job.shopper_key, kind = job.intent.kind.label());
    async {
        let store = &deps.store;
        let claim = &job.claim;
        // The reads end within three quarters of the lease, which is not renewed, or are tried
        // again later (counted, and aged out) before another enricher could take the job over. A
        // panic (a bug, as the enricher sees it) is a failure like any other: unsettled, the job
        // would run again at each lease's end, its shopper's queue waiting behind it for good.
        let deadline = deadline(deps.settings.delivery.lease());
        let enriching = tokio::time::timeout(deadline, AssertUnwindSafe(enrich(deps, &job)).catch_unwind());
        let enriched = match enriching.await {
            Err(_) => Err(EnrichError::Retry(format!(
                "the OrderCloud reads took longer than {} ms (three quarters of delivery.lease_secs)",
                deadline.as_millis()
            ))),
            Ok(Ok(enriched)) => enriched,
            Ok(Err(payload)) => {
                let message = super::panic_message(payload);
                warn!(message, "enrichment panicked");
                Err(EnrichError::Retry(format!("enrichment panicked: {message}")))
            }
        };
        let result = match enriched {
            Ok(enrichment) => {
                // Kept for a registered shopper's later intents, which may carry nothing naming them;
                // an anonymous shopper's identity is in every one of its tokens (`anon-<orderid>`).
                let mut identities = Vec::new();
                if !job.intent.anonymous {
                    identities.push((job.shopper_key.clone(), enrichment.identity.clone()));
                }
                if let Some(link) = &enrichment.link {
                    identities.push((link.registered_shopper_key.clone(), link.registered_identity.clone()));
                }
                match serde_json::to_value(&enrichment) {
                    Ok(value) => {
                        let saved = store.save_enrichment(claim, &value, &identities).await;
                        if saved.is_ok() {
                            deps.identities.learn(&identities);
                        }
                        saved
                    }
                    Err(e) => Err(StoreError::from(e)),
                }
            }
            Err(EnrichError::Retry(reason)) if deps.too_old(job.created_at_ms) => {
                warn!(reason, "enrichment gave up: dead letter");
                metrics::counter!("forwarder_dead_letters_total", "stage" => "enrichment").increment(1);
                store
                    .dead_letter_enrichment(claim, &format!("{reason} (gave up after delivery.max_age_secs)"))
                    .await
            }
            Err(EnrichError::Retry(reason)) => {
                let at = now_ms() + backoff::delay(&deps.settings.delivery, job.attempts).as_millis() as i64;
                info!(reason, "enrichment will be retried");
                store.retry_enrichment(claim, at, &reason).await
            }
            Err(EnrichError::Dead(reason)) => {
                warn!(reason, "enrichment failed for good: dead letter");
                metrics::counter!("forwarder_dead_letters_total", "stage" => "enrichment").increment(1);
                store.dead_letter_enrichment(claim, &reason).await
            }
        };
        match result {
            Ok(()) => {}
            Err(StoreError::StaleClaim(_)) => {
                debug!("enrichment outcome not recorded: another enricher holds the intent")
            }
            Err(e) => warn!(error = %e, "cannot record the enrichment outcome; it will run again"),
        }
    }
    .instrument(span)
    .await
}
