//! A store with faults switched on per shopper: the real store underneath, with some calls failing
//! or held up for the intents of the shoppers a test names — a lease that cannot be renewed, a
//! write the database refuses, a commit that takes seconds. Everything else passes through.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ordercloud_cdp_forwarder::domain::{CartLine, SessionFacts, ShopperState};
use ordercloud_cdp_forwarder::store::{
    Claim, ClaimedIntent, DeadLetter, DynStore, EnqueueOutcome, EnrichmentJob, Intake, Ledger, Liveness, NewIntent,
    Operations, Outbox, QueueStats, QueuedIntent, Settle, Shoppers, StoreError, Write,
};
use serde_json::value::RawValue;
use serde_json::Value;

/// Faults for one shopper's intents.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `extend` fails (the database is unreachable for renewals).
    pub extend_fails: bool,
    /// `apply` fails when its writes include a session or a shopper record (a value the database
    /// refuses); settling alone goes through.
    pub records_fail: bool,
    /// `apply` fails whenever it acknowledges the intent (the store cannot be written then; the
    /// retry's writes go through).
    pub ack_fails: bool,
    /// Reading the shopper's record panics (a bug in delivery, as the dispatcher sees it).
    pub read_panics: bool,
    /// The first write of an order's progress made before the intent's last event (a CONFIRM's,
    /// before its CHECKOUT) fails once, as on a connection the database dropped; later writes go
    /// through. [`FaultyStore::progress_faults`] counts the failures.
    pub progress_fails_once: bool,
    /// The first `apply` that acknowledges an intent fails once, as on a connection the database
    /// dropped at that moment; later ones go through. [`FaultyStore::ack_faults`] counts them.
    pub ack_fails_once: bool,
    /// A claimed intent's stored plan comes back in a shape this version cannot read (as one an
    /// older or newer version wrote, or a damaged row).
    pub plan_unreadable: bool,
    /// A claimed intent's stored bodies hold JSON text no tree can (a number beyond any float's
    /// range), as a row another writer stored could: the claim reads them as text.
    pub bodies_unreadable: bool,
    /// Saving an enrichment panics once (a bug in the enricher's task, outside a job's reads).
    pub save_panics_once: bool,
}

/// One kind of claim (delivery's or enrichment's) as a test steers and counts it.
#[derive(Default)]
pub struct ClaimGate {
    /// While set, claims wait (a queue building up, as behind an outage).
    held: tokio::sync::watch::Sender<bool>,
    /// Every claim once let through: (the most intents it asked for, how many it got).
    calls: Mutex<Vec<(usize, usize)>>,
}

impl ClaimGate {
    /// While `held`, claims wait; let go, the claim waiting goes on at once (no poll interval in
    /// between).
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Every claim, in order, once let through: (the most intents it asked for, how many it got).
    pub fn calls(&self) -> Vec<(usize, usize)> {
        self.calls.lock().unwrap().clone()
    }

    async fn pass(&self) {
        let _ = self.held.subscribe().wait_for(|held| !held).await;
    }

    fn record(&self, limit: usize, got: usize) {
        self.calls.lock().unwrap().push((limit, got));
    }
}

pub struct FaultyStore {
    inner: DynStore,
    faults: Mutex<HashMap<String, Faults>>,
    /// Shopper of each intent claimed, for faults by shopper.
    shoppers: Mutex<HashMap<i64, String>>,
    /// Every delivery claim, in order: (intent, claim id, when).
    claims: Mutex<Vec<(i64, String, Instant)>>,
    /// Faults of every shopper not named in `faults`.
    everyone: Mutex<Faults>,
    /// Every apply that asked for a commit on disk (`Write::Durable`): the `Sent` count it recorded.
    durable: Mutex<Vec<Option<usize>>>,
    /// Calls of `stats` (the queue's counts).
    stats_calls: std::sync::atomic::AtomicUsize,
    /// Intents whose enrichment was saved (the enrichment round ran for them).
    enrichments_saved: Mutex<Vec<Value>>,
    /// Writes failed by `progress_fails_once`.
    progress_faults: std::sync::atomic::AtomicUsize,
    /// Acks failed by `ack_fails_once`.
    ack_faults: std::sync::atomic::AtomicUsize,
    /// Every apply that carried a settlement: its writes.
    settled_writes: Mutex<Vec<Vec<Write>>>,
    /// Claims (delivery's and enrichment's) still to panic (a bug in the loop that claims).
    claims_to_panic: std::sync::atomic::AtomicUsize,
    /// Delivery's claims, held back and counted.
    pub delivery_claims: ClaimGate,
    /// Enrichment's claims, held back and counted.
    pub enrichment_claims: ClaimGate,
}

impl FaultyStore {
    pub fn wrap(inner: DynStore) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            faults: Mutex::default(),
            shoppers: Mutex::default(),
            claims: Mutex::default(),
            everyone: Mutex::default(),
            durable: Mutex::default(),
            stats_calls: Default::default(),
            enrichments_saved: Default::default(),
            progress_faults: Default::default(),
            ack_faults: Default::default(),
            settled_writes: Mutex::default(),
            claims_to_panic: Default::default(),
            delivery_claims: ClaimGate::default(),
            enrichment_claims: ClaimGate::default(),
        })
    }

    /// The next `n` claims, delivery's or enrichment's, panic in the loop that claims.
    pub fn panic_next_claims(&self, n: usize) {
        self.claims_to_panic.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn maybe_panic_in_claim(&self) {
        use std::sync::atomic::Ordering;
        let left = self
            .claims_to_panic
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        assert!(left.is_err(), "a claim panicked (FaultyStore)");
    }

    pub fn set(&self, shopper: &str, faults: Faults) {
        self.faults.lock().unwrap().insert(shopper.to_string(), faults);
    }

    /// The applies that asked for a commit on disk, by the count of events they recorded as sent.
    pub fn durable_applies(&self) -> Vec<Option<usize>> {
        self.durable.lock().unwrap().clone()
    }

    /// How many times the queue's counts were read.
    pub fn stats_calls(&self) -> usize {
        self.stats_calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many writes `progress_fails_once` failed.
    pub fn progress_faults(&self) -> usize {
        self.progress_faults.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many acks `ack_fails_once` failed.
    pub fn ack_faults(&self) -> usize {
        self.ack_faults.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The writes of every apply that carried a settlement, in order.
    pub fn settled_writes(&self) -> Vec<Vec<Write>> {
        self.settled_writes.lock().unwrap().clone()
    }

    /// How many enrichments were saved: intents that went through the enrichment round.
    pub fn enrichments_saved(&self) -> usize {
        self.enrichments_saved.lock().unwrap().len()
    }

    /// Every enrichment saved, as enrichment gave it to the store.
    pub fn saved_enrichments(&self) -> Vec<Value> {
        self.enrichments_saved.lock().unwrap().clone()
    }

    /// Faults for every shopper not named with [`FaultyStore::set`].
    pub fn set_everyone(&self, faults: Faults) {
        *self.everyone.lock().unwrap() = faults;
    }

    /// Delivery claims made so far of `intent_id`, with when they were made.
    pub fn claims_of(&self, intent_id: i64) -> Vec<(String, Instant)> {
        self.claims
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _, _)| *id == intent_id)
            .map(|(_, claim, at)| (claim.clone(), *at))
            .collect()
    }

    /// The intents claimed so far, in the order they were first claimed.
    pub fn claimed_intents(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = Vec::new();
        for (id, _, _) in self.claims.lock().unwrap().iter() {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
        ids
    }

    /// Turns off a fault that fires once, for the shopper of `intent_id` (or everyone's).
    fn clear_fault(&self, intent_id: i64, clear: impl Fn(&mut Faults)) {
        let shopper = self.shoppers.lock().unwrap().get(&intent_id).cloned();
        match shopper.and_then(|s| self.faults.lock().unwrap().get_mut(&s).map(&clear)) {
            Some(()) => {}
            None => clear(&mut self.everyone.lock().unwrap()),
        }
    }

    fn faults_of(&self, intent_id: i64) -> Faults {
        let shopper = self.shoppers.lock().unwrap().get(&intent_id).cloned();
        shopper
            .and_then(|s| self.faults.lock().unwrap().get(&s).cloned())
            .unwrap_or_else(|| self.everyone.lock().unwrap().clone())
    }
}

#[async_trait]
impl Intake for FaultyStore {
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError> {
        self.inner.enqueue(item).await
    }

    async fn known_dedupe_keys(&self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        self.inner.known_dedupe_keys(keys).await
    }
}

#[async_trait]
impl Outbox for FaultyStore {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError> {
        self.maybe_panic_in_claim();
        self.delivery_claims.pass().await;
        let mut claimed = self.inner.claim(limit, lease).await?;
        self.delivery_claims.record(limit, claimed.len());
        let now = Instant::now();
        for c in &mut claimed {
            let faults = self
                .faults
                .lock()
                .unwrap()
                .get(&c.shopper_key)
                .cloned()
                .unwrap_or_default();
            if faults.plan_unreadable && c.plan.is_some() {
                c.plan = Some(serde_json::json!({"shape": "unknown"}));
            }
            if faults.bodies_unreadable {
                let text = || RawValue::from_string(r#"{"ID": "L9", "Quantity": 1e400}"#.into()).unwrap();
                c.intent.request_body = text();
                c.intent.response_body = text();
            }
            self.shoppers
                .lock()
                .unwrap()
                .insert(c.claim.intent_id, c.shopper_key.clone());
            self.claims
                .lock()
                .unwrap()
                .push((c.claim.intent_id, c.claim.claim_id.clone(), now));
        }
        Ok(claimed)
    }

    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError> {
        if self.faults_of(claim.intent_id).extend_fails {
            return Err(StoreError::Unavailable("injected: the lease cannot be renewed".into()));
        }
        self.inner.extend(claim, lease).await
    }

    async fn apply(&self, claim: &Claim, writes: Vec<Write>, settle: Option<Settle>) -> Result<(), StoreError> {
        let faults = self.faults_of(claim.intent_id);
        let records = writes
            .iter()
            .any(|w| matches!(w, Write::Session(_) | Write::Shopper { .. }));
        if faults.records_fail && records {
            // A value the database refuses, as PostgreSQL's data exceptions are.
            return Err(StoreError::Corrupt("injected: the database refuses this record".into()));
        }
        if faults.progress_fails_once && settle.is_none() && writes.contains(&Write::Durable) {
            self.clear_fault(claim.intent_id, |f| f.progress_fails_once = false);
            self.progress_faults.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected: the connection dropped".into()));
        }
        if writes.contains(&Write::Durable) {
            let sent = writes.iter().find_map(|w| match w {
                Write::Sent(n) => Some(*n),
                _ => None,
            });
            self.durable.lock().unwrap().push(sent);
        }
        if settle.is_some() {
            self.settled_writes.lock().unwrap().push(writes.clone());
        }
        if faults.ack_fails_once && settle == Some(Settle::Ack) {
            self.clear_fault(claim.intent_id, |f| f.ack_fails_once = false);
            self.ack_faults.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected: the connection dropped".into()));
        }
        if faults.ack_fails && settle == Some(Settle::Ack) {
            return Err(StoreError::Unavailable("injected: the database refuses the ack".into()));
        }
        self.inner.apply(claim, writes, settle).await
    }

    fn liveness(&self) -> Option<Liveness> {
        self.inner.liveness()
    }

    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError> {
        self.maybe_panic_in_claim();
        self.enrichment_claims.pass().await;
        let jobs = self.inner.claim_enrichment(limit, lease).await?;
        self.enrichment_claims.record(limit, jobs.len());
        Ok(jobs)
    }

    async fn save_enrichment(
        &self,
        claim: &Claim,
        enrichment: &Value,
        identities: &[(String, String)],
    ) -> Result<(), StoreError> {
        if self.faults_of(claim.intent_id).save_panics_once {
            self.clear_fault(claim.intent_id, |f| f.save_panics_once = false);
            panic!("injected: saving the enrichment panicked (FaultyStore)");
        }
        let saved = self.inner.save_enrichment(claim, enrichment, identities).await;
        if saved.is_ok() {
            self.enrichments_saved.lock().unwrap().push(enrichment.clone());
        }
        saved
    }

    async fn retry_enrichment(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError> {
        self.inner.retry_enrichment(claim, at_ms, error).await
    }

    async fn dead_letter_enrichment(&self, claim: &Claim, reason: &str) -> Result<(), StoreError> {
        self.inner.dead_letter_enrichment(claim, reason).await
    }
}

#[async_trait]
impl Shoppers for FaultyStore {
    async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError> {
        let panics = self
            .faults
            .lock()
            .unwrap()
            .get(shopper_key)
            .is_some_and(|f| f.read_panics);
        assert!(!panics, "a read of {shopper_key} panicked (FaultyStore)");
        self.inner.shopper(shopper_key).await
    }

    async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError> {
        self.inner.session(channel, browser_id).await
    }

    async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError> {
        self.inner.sessions_of(shopper_key, since_ms).await
    }

    async fn cart_lines(&self, order_id: &str) -> Result<Vec<CartLine>, StoreError> {
        self.inner.cart_lines(order_id).await
    }
}

#[async_trait]
impl Operations for FaultyStore {
    async fn pending(&self, limit: usize) -> Result<Vec<QueuedIntent>, StoreError> {
        self.inner.pending(limit).await
    }

    async fn dead_letters(&self, since_ms: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters(since_ms, limit).await
    }

    async fn replay_dead_letters(&self, ids: Option<&[i64]>, since_ms: Option<i64>) -> Result<u64, StoreError> {
        self.inner.replay_dead_letters(ids, since_ms).await
    }

    async fn purge_dead_letters(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.inner.purge_dead_letters(before_ms).await
    }

    async fn count_dead_letters_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.inner.count_dead_letters_before(before_ms).await
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.stats_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn prune_shoppers(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.inner.prune_shoppers(before_ms).await
    }

    async fn prune_dedupe(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.inner.prune_dedupe(before_ms).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[async_trait]
impl Ledger for FaultyStore {
    async fn ledger_since(&self) -> Result<Option<i64>, StoreError> {
        self.inner.ledger_since().await
    }

    async fn claim_order_checks(
        &self,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ordercloud_cdp_forwarder::store::OrderCheck>, StoreError> {
        self.inner.claim_order_checks(limit, lease).await
    }

    async fn settle_order_check(
        &self,
        order_id: &str,
        outcome: ordercloud_cdp_forwarder::store::CheckOutcome,
    ) -> Result<(), StoreError> {
        self.inner.settle_order_check(order_id, outcome).await
    }

    async fn lease_reconciler(&self, holder: &str, lease: Duration) -> Result<Option<Option<i64>>, StoreError> {
        self.inner.lease_reconciler(holder, lease).await
    }

    async fn advance_reconciler(&self, holder: &str, watermark_ms: i64) -> Result<bool, StoreError> {
        self.inner.advance_reconciler(holder, watermark_ms).await
    }
}
