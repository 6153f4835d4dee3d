//! The enricher: runs the OrderCloud reads each stored intent needs ([`super::enrich`]) as soon as
//! it is stored, independently of CDP, and stores the results under the job's claim (a stale
//! enricher's writes are refused). Failures are retried with backoff and age out under
//! `delivery.max_age_secs` like delivery's.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt as _;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument as _};

use super::enrich::{enrich, EnrichError};
use super::{backoff, idle, Deps};
use crate::domain::now_ms;
use crate::store::{EnrichmentJob, StoreError};

/// Runs enrichment jobs until stopped.
pub async fn run_enricher(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let poll = deps.settings.delivery.poll_interval();
    let batch = deps.settings.delivery.concurrency.clamp(4, 64);
    loop {
        if *stop.borrow() {
            return;
        }
        let jobs = match deps.store.claim_enrichment(batch, deps.settings.delivery.lease()).await {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!(error = %e, "cannot claim enrichment jobs");
                if !idle(&deps, &mut stop, poll * 5).await {
                    return;
                }
                continue;
            }
        };
        if jobs.is_empty() {
            if !idle(&deps, &mut stop, poll).await {
                return;
            }
            continue;
        }
        // One task per shopper, their jobs in order: the first resolves the identity, the rest find
        // it cached instead of each calling OrderCloud.
        let mut by_shopper: Vec<(String, Vec<EnrichmentJob>)> = Vec::new();
        for job in jobs {
            match by_shopper.iter_mut().find(|(key, _)| *key == job.shopper_key) {
                Some((_, list)) => list.push(job),
                None => by_shopper.push((job.shopper_key.clone(), vec![job])),
            }
        }
        let mut set = JoinSet::new();
        for (_, list) in by_shopper {
            let deps = deps.clone();
            set.spawn(async move {
                for job in list {
                    enrich_one(&deps, job).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        deps.wake.notify_waiters();
    }
}

async fn enrich_one(deps: &Deps, job: EnrichmentJob) {
    let span = tracing::info_span!("enrich", intent_id = job.claim.intent_id, shopper = %job.shopper_key, kind = job.intent.kind.label());
    async {
        let store = &deps.store;
        let claim = &job.claim;
        // A panic (a bug, as the enricher sees it) is a failure like any other: retried, then aged
        // out to a dead letter that says so. Unsettled, the job would run again at each lease's
        // end, its shopper's queue waiting behind it for good.
        let enriched = match AssertUnwindSafe(enrich(deps, &job)).catch_unwind().await {
            Ok(enriched) => enriched,
            Err(payload) => {
                let message = super::dispatcher::panic_message(payload);
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
