//! Durable state: the outbox of intents (one queue per shopper), the dedupe of webhooks, and the
//! per-shopper state delivery needs. One trait; SQLite (embedded) and PostgreSQL implementations.
//!
//! The outbox table is the queue: an intent enters in the same transaction as its dedupe record
//! and leaves only when acknowledged (deleted) or dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::StoreSettings;
use crate::intent::{Intent, IntentSecrets, RawIntent};

pub mod group_commit;
pub mod postgres;
pub mod sqlite;

/// Current time in epoch milliseconds, the unit of every stored time.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The queue key of webhooks without a usable shopper (they go straight to the dead letters).
pub const UNIDENTIFIED_SHOPPER: &str = "unidentified";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The claim was taken over by another worker (its lease expired): do not act on it.
    #[error("claim {0} is no longer held")]
    StaleClaim(i64),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// What intake hands to the store.
#[derive(Debug, Clone)]
pub struct NewIntent {
    /// The webhook's LogID (or a hash of the body when OrderCloud sent none).
    pub dedupe_key: String,
    pub shopper_key: String,
    /// Its bodies as the webhook's JSON text: stored as they came.
    pub intent: RawIntent,
    pub secrets: IntentSecrets,
    /// `Some(reason)`: store it as a dead letter right away (e.g. no usable UserToken).
    pub dead_reason: Option<String>,
    /// False when nothing has to be read from OrderCloud before delivery.
    pub needs_enrichment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Queued(i64),
    DeadLettered(i64),
    /// The LogID was seen before: nothing stored.
    Duplicate,
}

/// Proof that a worker holds an intent. Stale claims are refused by every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub intent_id: i64,
    pub claim_id: String,
}

/// An intent handed to a delivery worker.
#[derive(Debug, Clone)]
pub struct ClaimedIntent {
    pub claim: Claim,
    pub shopper_key: String,
    pub intent: Intent,
    /// What enrichment stored (its shape belongs to the delivery module).
    pub enrichment: Option<Value>,
    /// Events of this intent already acknowledged by CDP (shape owned by delivery).
    pub progress: Option<Value>,
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// An intent waiting for its OrderCloud reads.
#[derive(Debug, Clone)]
pub struct EnrichmentJob {
    pub intent_id: i64,
    pub shopper_key: String,
    pub intent: Intent,
    pub secrets: IntentSecrets,
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// A dead letter, for operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: i64,
    pub dedupe_key: String,
    pub shopper_key: String,
    pub kind: String,
    pub intent: Value,
    pub last_error: Option<String>,
    pub attempts: i64,
    pub created_at_ms: i64,
    pub dead_at_ms: Option<i64>,
}

/// A pending intent as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedIntent {
    pub id: i64,
    pub dedupe_key: String,
    pub shopper_key: String,
    pub kind: String,
    pub attempts: i64,
    pub enriched: bool,
    pub next_attempt_at_ms: i64,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
}

/// What the delivery worker remembers per shopper.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShopperState {
    /// `<BuyerID>-<UserID>` or `anon-<orderid>`, once resolved.
    pub identity: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub firstname: Option<String>,
    #[serde(default)]
    pub lastname: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    /// The CDP browser id used per channel.
    #[serde(default)]
    pub browsers: std::collections::BTreeMap<String, String>,
    /// Identities this shopper was linked from (anonymous → registered).
    #[serde(default)]
    pub linked_from: Vec<String>,
}

/// What the forwarder knows of one CDP session (channel + browser id).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionFacts {
    pub channel: String,
    pub browser_id: String,
    pub shopper_key: String,
    /// When CDP last acknowledged an event of this session (epoch ms).
    pub last_event_at_ms: i64,
    /// item_ids ADDed in this session and not cleared since, with the quantity and price last sent.
    #[serde(default)]
    pub items: std::collections::BTreeMap<String, ItemFingerprint>,
    /// The identity sent in an IDENTITY event of this session, if any.
    pub identified_as: Option<String>,
}

/// The quantity and unit price CDP holds for one item_id of a session's cart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemFingerprint {
    pub quantity: i64,
    pub price: f64,
}

/// A cart line as last seen, so that later events can be built without OrderCloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartLine {
    pub order_id: String,
    pub line_id: String,
    pub shopper_key: String,
    /// The LineItem JSON as OrderCloud returned it.
    pub line: Value,
    pub updated_at_ms: i64,
}

/// Queue figures for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub pending: i64,
    pub dead: i64,
    /// Age of the oldest pending intent in milliseconds (0 when none).
    pub oldest_pending_age_ms: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Dedupes on `dedupe_key` and appends to the shopper's queue in one transaction.
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError>;

    /// Claims the oldest pending intent of up to `limit` shoppers that have none in flight,
    /// skipping shoppers whose head waits for a retry or for enrichment.
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError>;
    /// Extends a held lease while a long intent runs.
    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError>;
    /// Records events acknowledged so far inside the intent's sequence.
    async fn save_progress(&self, claim: &Claim, progress: &Value) -> Result<(), StoreError>;
    /// Done: the intent leaves the queue.
    async fn ack(&self, claim: &Claim) -> Result<(), StoreError>;
    /// Try again at `at_ms` (epoch ms); the claim is released.
    async fn reschedule(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError>;
    /// Gives up: the intent becomes a dead letter with `reason`, and the shopper's next intent may go.
    async fn dead_letter(&self, claim: &Claim, reason: &str) -> Result<(), StoreError>;

    /// Intents whose OrderCloud reads have not run yet, leased for `lease`.
    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError>;
    /// Stores enrichment results (and erases the intent's tokens).
    async fn save_enrichment(&self, intent_id: i64, enrichment: &Value) -> Result<(), StoreError>;
    /// Enrichment failed for now: try again at `at_ms`.
    async fn retry_enrichment(&self, intent_id: i64, at_ms: i64, error: &str) -> Result<(), StoreError>;
    /// Enrichment failed for good: dead-letter the intent (only when still pending).
    async fn dead_letter_unclaimed(&self, intent_id: i64, reason: &str) -> Result<(), StoreError>;

    async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError>;
    async fn put_shopper(&self, shopper_key: &str, state: &ShopperState) -> Result<(), StoreError>;
    /// Sets only the resolved identity (enrichment runs beside delivery and must not clobber it).
    async fn put_identity(&self, shopper_key: &str, identity: &str) -> Result<(), StoreError>;

    async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError>;
    async fn put_session(&self, facts: &SessionFacts) -> Result<(), StoreError>;
    /// Sessions of a shopper whose last event is at or after `since_ms`.
    async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError>;

    async fn cart_lines(&self, order_id: &str) -> Result<Vec<CartLine>, StoreError>;
    async fn put_cart_line(&self, line: &CartLine) -> Result<(), StoreError>;
    async fn delete_cart_line(&self, order_id: &str, line_id: &str) -> Result<(), StoreError>;
    async fn delete_cart(&self, order_id: &str) -> Result<(), StoreError>;
    /// Moves the record of an order's lines to another shopper (anonymous order transfer).
    async fn move_cart(&self, order_id: &str, to_shopper: &str) -> Result<(), StoreError>;

    /// Pending intents, oldest first.
    async fn pending(&self, limit: usize) -> Result<Vec<QueuedIntent>, StoreError>;
    async fn dead_letters(&self, since_ms: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    /// Puts dead letters back in their shoppers' queues, in their original order. Returns how many.
    async fn replay_dead_letters(&self, ids: Option<&[i64]>, since_ms: Option<i64>) -> Result<u64, StoreError>;
    async fn purge_dead_letters(&self, before_ms: i64) -> Result<u64, StoreError>;

    async fn stats(&self) -> Result<QueueStats, StoreError>;
    /// Succeeds when the store accepts writes (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Forgets dedupe records older than `before_ms`.
    async fn prune_dedupe(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// Flushes and closes; later calls fail.
    async fn close(&self);
}

pub type DynStore = Arc<dyn Store>;

/// Opens the store named by `store.url`, creating and migrating it as needed.
pub async fn open(settings: &StoreSettings) -> anyhow::Result<DynStore> {
    if settings.url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(settings).await?))
    } else {
        Ok(Arc::new(postgres::PostgresStore::open(settings).await?))
    }
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: Option<String>) -> Result<Option<T>, StoreError> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(StoreError::from)
}

pub(crate) fn stale_unless_one(rows: u64, claim: &Claim) -> Result<(), StoreError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(StoreError::StaleClaim(claim.intent_id))
    }
}
