//! The store's contract, split by the part of the service that uses it: intake writes webhooks in,
//! delivery claims and settles them (the outbox), delivery and enrichment read what the shoppers'
//! earlier events left (shopper and session state), operators look and repair (operations), and the
//! order ledger reconciles and checks orders. [`Store`] is all of them: what a backend implements.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{
    CheckOutcome, Claim, ClaimedIntent, DeadLetter, EnqueueOutcome, EnrichmentJob, Liveness, NewIntent, OrderCheck,
    QueueStats, QueuedIntent, Settle, StoreError, Write,
};
use crate::domain::{CartLine, SessionFacts, ShopperState};

/// Intake (and the reconciler): webhooks in, deduped.
#[async_trait]
pub trait Intake: Send + Sync + 'static {
    /// Dedupes on `dedupe_key` and appends to the shopper's queue in one transaction.
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError>;
    /// Which of `keys` the dedupe remembers (each at most once).
    async fn known_dedupe_keys(&self, keys: &[String]) -> Result<Vec<String>, StoreError>;
}

/// Delivery and enrichment: claims on the heads of the shoppers' queues, and the writes made
/// under them.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Claims the oldest pending intent of up to `limit` shoppers that have none in flight,
    /// skipping shoppers whose head waits for a retry or for enrichment. A claim whose lease
    /// expired, or whose replica stopped heartbeating (PostgreSQL), is taken over. A row that
    /// cannot be decoded is dead-lettered on its own with the reason and not returned.
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError>;
    /// Extends a held lease while a long intent runs.
    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError>;
    /// Applies `writes` in order and then `settle`, atomically, if `claim` still holds the intent;
    /// [`StoreError::StaleClaim`] and nothing written otherwise.
    async fn apply(&self, claim: &Claim, writes: Vec<Write>, settle: Option<Settle>) -> Result<(), StoreError>;
    /// How safe this process's claims are from takeover by another replica, whatever their leases
    /// say (PostgreSQL: see [`Liveness`]). `None`: no other process takes claims over (SQLite).
    fn liveness(&self) -> Option<Liveness> {
        None
    }

    /// Intents whose OrderCloud reads have not run yet, each claimed for `lease`.
    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError>;
    /// Stores enrichment results, erases the intent's tokens and records resolved identities
    /// (`(shopper_key, identity)`), if `claim` still holds the job.
    async fn save_enrichment(
        &self,
        claim: &Claim,
        enrichment: &Value,
        identities: &[(String, String)],
    ) -> Result<(), StoreError>;
    /// Enrichment failed for now: try again at `at_ms` (the attempt is counted).
    async fn retry_enrichment(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError>;
    /// Enrichment failed for good: dead-letter the intent.
    async fn dead_letter_enrichment(&self, claim: &Claim, reason: &str) -> Result<(), StoreError>;

    /// Done: the intent leaves the queue.
    async fn ack(&self, claim: &Claim) -> Result<(), StoreError> {
        self.apply(claim, Vec::new(), Some(Settle::Ack)).await
    }
    /// Try again at `at_ms` (epoch ms); the claim is released.
    async fn reschedule(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError> {
        let error = error.to_string();
        self.apply(claim, Vec::new(), Some(Settle::Retry { at_ms, error }))
            .await
    }
    /// Gives up: the intent becomes a dead letter with `reason`.
    async fn dead_letter(&self, claim: &Claim, reason: &str) -> Result<(), StoreError> {
        let reason = reason.to_string();
        self.apply(claim, Vec::new(), Some(Settle::Dead { reason })).await
    }
}

/// What earlier events left of each shopper: identity and browsers, CDP sessions, cart lines.
/// Read by delivery and enrichment; written only through [`Outbox::apply`] and
/// [`Outbox::save_enrichment`], under a claim.
#[async_trait]
pub trait Shoppers: Send + Sync + 'static {
    async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError>;
    async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError>;
    /// Sessions of a shopper whose last event is at or after `since_ms`.
    async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError>;
    async fn cart_lines(&self, order_id: &str) -> Result<Vec<CartLine>, StoreError>;

    /// What delivery reads first for each intent: the shopper's record, the record of the cart
    /// `order_id`, the facts of the session of the shopper's stored browser on `channel`, and with
    /// `open_since` the shopper's sessions since then (a submit's). As the reads above would answer;
    /// a backend whose reads are round trips makes it one, shared by the intents asking together
    /// (PostgreSQL).
    async fn delivery_reads(
        &self,
        shopper_key: &str,
        order_id: &str,
        channel: &str,
        open_since: Option<i64>,
    ) -> Result<DeliveryReads, StoreError> {
        DeliveryReads::read_apart(self, shopper_key, order_id, channel, open_since).await
    }
}

/// What [`Shoppers::delivery_reads`] answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryReads {
    pub shopper: Option<ShopperState>,
    /// The record of the cart, oldest line first (as [`Shoppers::cart_lines`]).
    pub cart: Vec<CartLine>,
    /// The facts of the session of `shopper`'s browser on the channel, when both are known.
    pub session: Option<SessionFacts>,
    /// The shopper's sessions since `open_since` (as [`Shoppers::sessions_of`]); none when not asked.
    pub open_sessions: Vec<SessionFacts>,
    /// The stored browser's session could not be read back (`session` is then `None`): an intent
    /// that brings another browser does not need it; one that uses it reads it again, and fails.
    pub session_unreadable: bool,
}

impl DeliveryReads {
    /// The reads one after the other.
    pub async fn read_apart<S: Shoppers + ?Sized>(
        store: &S,
        shopper_key: &str,
        order_id: &str,
        channel: &str,
        open_since: Option<i64>,
    ) -> Result<DeliveryReads, StoreError> {
        let shopper = store.shopper(shopper_key).await?;
        let cart = store.cart_lines(order_id).await?;
        let (session, session_unreadable) = match shopper.as_ref().and_then(|s| s.browsers.get(channel)) {
            Some(browser) => match store.session(channel, browser).await {
                Ok(session) => (session, false),
                Err(StoreError::Json(_) | StoreError::Corrupt(_)) => (None, true),
                Err(e) => return Err(e),
            },
            None => (None, false),
        };
        let open_sessions = match open_since {
            Some(since) => store.sessions_of(shopper_key, since).await?,
            None => Vec::new(),
        };
        Ok(DeliveryReads {
            shopper,
            cart,
            session,
            open_sessions,
            session_unreadable,
        })
    }
}

/// Operators and upkeep: the queue and dead letters as they are, readiness, pruning, closing.
#[async_trait]
pub trait Operations: Send + Sync + 'static {
    /// Pending intents, oldest first.
    async fn pending(&self, limit: usize) -> Result<Vec<QueuedIntent>, StoreError>;
    async fn dead_letters(&self, since_ms: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    /// Puts dead letters back in their shoppers' queues, in their original order. Returns how many.
    async fn replay_dead_letters(&self, ids: Option<&[i64]>, since_ms: Option<i64>) -> Result<u64, StoreError>;
    async fn purge_dead_letters(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// How many dead letters [`Operations::purge_dead_letters`] would delete.
    async fn count_dead_letters_before(&self, before_ms: i64) -> Result<u64, StoreError>;

    async fn stats(&self) -> Result<QueueStats, StoreError>;
    /// Succeeds when the store accepts writes (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Forgets dedupe records older than `before_ms`.
    async fn prune_dedupe(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// Forgets what shoppers left that nothing touched since `before_ms`: records of carts, facts
    /// of CDP sessions, and shoppers' records (identity, details, browsers) — not the record of a
    /// shopper with an intent in its queue. Returns the rows deleted.
    async fn prune_shoppers(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// Flushes and closes; later calls fail.
    async fn close(&self);
}

/// The order ledger: the reconciler's lease and watermark, and the landing checks.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Takes or renews the reconciler's lease for `holder` until `lease` from now: `Some(watermark)`
    /// (how far earlier passes looked, epoch ms, `None` before the first) when it is `holder`'s,
    /// `None` while another holds it.
    async fn lease_reconciler(&self, holder: &str, lease: Duration) -> Result<Option<Option<i64>>, StoreError>;
    /// Records how far a pass looked, if `holder` still holds the lease (false otherwise: nothing
    /// written).
    async fn advance_reconciler(&self, holder: &str, watermark_ms: i64) -> Result<bool, StoreError>;
    /// When this store began keying submits by their order (its migration to the order ledger,
    /// epoch ms): earlier submits were keyed by their LogID, so reconciliation never looks before
    /// it. `None` if the store cannot tell.
    async fn ledger_since(&self) -> Result<Option<i64>, StoreError>;

    /// Up to `limit` landing checks that are due, leased for `lease` (a check whose lease ran out is
    /// due again).
    async fn claim_order_checks(&self, limit: usize, lease: Duration) -> Result<Vec<OrderCheck>, StoreError>;
    async fn settle_order_check(&self, order_id: &str, outcome: CheckOutcome) -> Result<(), StoreError>;
}

/// The whole contract: what a backend implements, and what the service holds.
pub trait Store: Intake + Outbox + Shoppers + Operations + Ledger {}

impl<T: Intake + Outbox + Shoppers + Operations + Ledger> Store for T {}

pub type DynStore = Arc<dyn Store>;
