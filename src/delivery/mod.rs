//! Delivery: the enrichment loop (OrderCloud reads as soon as an intent is stored) and the delivery
//! loop (claims the head of each shopper's queue, plans its CDP events, sends them in order).
//!
//! Per-shopper order comes from the store: only the oldest pending intent of a shopper can be
//! claimed, so a failing shopper waits while other shoppers flow.

pub mod backoff;
pub mod enrich;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::cdp::CdpClient;
use crate::config::Settings;
use crate::health::Health;
use crate::ordercloud::client::OrderCloudClient;
use crate::store::{now_ms, DynStore};

/// What the loops share.
pub struct Deps {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub cdp: CdpClient,
    pub ordercloud: OrderCloudClient,
    pub health: Health,
    /// Notified when an intent is stored or enriched.
    pub wake: Arc<Notify>,
    /// Set while CDP refuses the client key: when to probe again, and the current pause length.
    pause: Mutex<Option<(Instant, Duration)>>,
}

impl Deps {
    pub fn new(settings: Arc<Settings>, store: DynStore, health: Health, wake: Arc<Notify>) -> anyhow::Result<Deps> {
        let cdp = CdpClient::new(
            &settings.cdp,
            Duration::from_millis(settings.delivery.request_timeout_ms),
        )?;
        let ordercloud = OrderCloudClient::new(&settings.ordercloud)?;
        Ok(Deps {
            settings,
            store,
            cdp,
            ordercloud,
            health,
            wake,
            pause: Mutex::new(None),
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.delivery.lease_secs)
    }

    /// CDP refused the client key: pause delivery, report it, probe again later (slowly).
    fn pause_for_config(&self, reason: &str) -> Duration {
        let mut pause = self.pause.lock().expect("pause lock");
        let first = Duration::from_secs(self.settings.delivery.auth_pause_secs.max(1));
        let next = match *pause {
            Some((_, last)) => (last * 2).min(first * 10),
            None => first,
        };
        *pause = Some((Instant::now() + next, next));
        self.health.set("cdp", reason.to_string());
        warn!(
            reason,
            probe_in_secs = next.as_secs(),
            "CDP refuses the client key: delivery paused"
        );
        next
    }

    fn resume(&self) {
        let was_paused = self.pause.lock().expect("pause lock").take().is_some();
        if was_paused {
            self.health.clear("cdp");
            info!("CDP accepts the client key again: delivery resumed");
        }
    }

    /// `Some(wait)` while paused and the next probe is not due yet.
    fn paused_for(&self) -> Option<Duration> {
        let pause = self.pause.lock().expect("pause lock");
        pause.and_then(|(probe_at, _)| probe_at.checked_duration_since(Instant::now()))
    }

    fn is_paused(&self) -> bool {
        self.pause.lock().expect("pause lock").is_some()
    }
}

/// Waits for a wake-up, the poll interval, or stop. Returns false on stop.
async fn idle(deps: &Deps, stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = deps.wake.notified() => true,
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Runs enrichment jobs until stopped.
pub async fn run_enricher(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let poll = Duration::from_millis(deps.settings.delivery.poll_interval_ms);
    let batch = deps.settings.delivery.concurrency.clamp(4, 64);
    loop {
        if *stop.borrow() {
            return;
        }
        let jobs = match deps.store.claim_enrichment(batch, deps.lease()).await {
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
        let mut by_shopper: Vec<(String, Vec<crate::store::EnrichmentJob>)> = Vec::new();
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
                    worker::enrich_one(&deps, job).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        deps.wake.notify_waiters();
    }
}

/// Claims and delivers intents, up to `delivery.concurrency` shoppers at once, until stopped; then
/// waits for deliveries in flight (they release their claims at the next event boundary).
pub async fn run_dispatcher(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let poll = Duration::from_millis(deps.settings.delivery.poll_interval_ms);
    let concurrency = deps.settings.delivery.concurrency;
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        if let Some(wait) = deps.paused_for() {
            // New intents change nothing while CDP refuses the key, only the probe's time does:
            // not woken by each webhook.
            tokio::select! {
                _ = tokio::time::sleep(wait.min(poll * 10)) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        // While paused, one intent at a time probes CDP.
        let free = if deps.is_paused() { 1 } else { slots.available_permits() };
        if free == 0 || slots.available_permits() == 0 {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        let claimed = match deps.store.claim(free, deps.lease()).await {
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
        for intent in claimed {
            let permit = slots.clone().acquire_owned().await.expect("semaphore is never closed");
            let (deps, stop) = (deps.clone(), stop.clone());
            tasks.spawn(async move {
                worker::process(&deps, intent, stop).await;
                drop(permit);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Spawns both loops; they end when `stop` turns true.
pub fn spawn(deps: Arc<Deps>, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(run_enricher(deps.clone(), stop.clone())),
        tokio::spawn(run_dispatcher(deps, stop)),
    ]
}

/// Milliseconds since an intent was stored.
fn age_ms(created_at_ms: i64) -> i64 {
    now_ms() - created_at_ms
}
