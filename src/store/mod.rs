//! Durable state: the outbox of intents (one queue per shopper), the dedupe of webhooks, and the
//! per-shopper state delivery needs. One contract, split by role ([`roles`]); SQLite (embedded) and
//! PostgreSQL implementations, both held to it by one test battery (`tests/it/store.rs`).
//!
//! The outbox table is the queue: an intent enters in the same transaction as its dedupe record
//! and leaves only when acknowledged (deleted) or dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::StoreSettings;
use crate::domain::intent::{IntentSecrets, RawIntent};
use crate::domain::{now_ms, CartLine, SessionFacts, ShopperState};

pub mod batched;
pub mod postgres;
mod roles;
pub(crate) mod shared;
pub mod sqlite;

pub use roles::{DeliveryReads, DynStore, Intake, Ledger, Operations, Outbox, Shoppers, Store};

/// The queue key of webhooks without a usable shopper (they go straight to the dead letters).
pub const UNIDENTIFIED_SHOPPER: &str = "unidentified";

/// What went wrong in the store. The database's own error stays attached as the
/// [`source`](std::error::Error::source) (shared, so that one failed batch can answer each of its
/// callers with it).
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The database refused or could not be reached (PostgreSQL, or SQLite's readers).
    Database(Arc<sqlx::Error>),
    /// SQLite's writer failed.
    Sqlite(Arc<rusqlite::Error>),
    /// SQLite's WAL could not be flushed to disk: the commit may not survive a crash.
    Sync(Arc<std::io::Error>),
    /// The store is closed, or its writer stopped: there is no database error to show.
    Unavailable(String),
    /// The claim was taken over by another worker (its lease expired, or its replica stopped
    /// heartbeating), or the intent left the queue: do not act on it. Nothing was written.
    StaleClaim(i64),
    /// Stored JSON that cannot be read back (or written: a value JSON cannot hold).
    Json(Arc<serde_json::Error>),
    /// Stored data of a shape the store never writes.
    Corrupt(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Database(e) => write!(f, "store unavailable: {e}"),
            StoreError::Sqlite(e) => write!(f, "store unavailable: {e}"),
            StoreError::Sync(e) => write!(f, "store unavailable: fsync of the SQLite WAL failed: {e}"),
            StoreError::Unavailable(what) => write!(f, "store unavailable: {what}"),
            StoreError::StaleClaim(id) => write!(f, "claim {id} is no longer held"),
            StoreError::Json(e) => write!(f, "stored data is corrupt: {e}"),
            StoreError::Corrupt(what) => write!(f, "stored data is corrupt: {what}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Database(e) => Some(&**e),
            StoreError::Sqlite(e) => Some(&**e),
            StoreError::Sync(e) => Some(&**e),
            StoreError::Json(e) => Some(&**e),
            StoreError::Unavailable(_) | StoreError::StaleClaim(_) | StoreError::Corrupt(_) => None,
        }
    }
}

impl StoreError {
    /// Whether PostgreSQL answered with an SQLSTATE starting with one of `classes`.
    fn sqlstate_in(&self, classes: &[&str]) -> bool {
        matches!(self, StoreError::Database(e) if e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| classes.iter().any(|class| code.starts_with(class))))
    }

    /// The database refused a value it was given (a data exception, a constraint or a value too
    /// large: PostgreSQL's SQLSTATE classes 22, 23 and 54, SQLite's constraint, too-big and
    /// type-mismatch errors), or the value cannot be encoded: writing the same again fails again.
    /// Other errors (a connection, a lock, the disk) may pass.
    pub fn refuses_value(&self) -> bool {
        match self {
            StoreError::Database(_) => self.sqlstate_in(&["22", "23", "54"]),
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::ConstraintViolation
                        | rusqlite::ErrorCode::TooBig
                        | rusqlite::ErrorCode::TypeMismatch
                )
            ),
            StoreError::Json(_) | StoreError::Corrupt(_) => true,
            StoreError::Sync(_) | StoreError::Unavailable(_) | StoreError::StaleClaim(_) => false,
        }
    }

    /// The database could not read a value it holds or was given (a data exception, SQLSTATE class
    /// 22: on reads, a record damaged outside the service, such as a shopper's record that is not
    /// JSON where the server reads into it).
    pub fn data_exception(&self) -> bool {
        self.sqlstate_in(&["22"])
    }

    /// The connection broke, not the statement (the server closed it: a restart, an operator, an
    /// idle timeout; SQLSTATE class 08 or 57P): on another connection the same statement may pass.
    pub fn lost_connection(&self) -> bool {
        matches!(self, StoreError::Database(e) if matches!(**e, sqlx::Error::Io(_))) || self.sqlstate_in(&["08", "57P"])
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(Arc::new(e))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(e))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Json(Arc::new(e))
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
    /// What enrichment would find, when it is known already (an order found by reconciliation,
    /// read with the forwarder's own API client): stored with the intent, which is then enriched.
    pub enrichment: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Queued(i64),
    DeadLettered(i64),
    /// The LogID was seen before: nothing stored.
    Duplicate,
}

/// Proof that a worker holds an intent (for delivery, or for its enrichment). Every write made
/// under a claim is refused once another worker holds the intent.
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
    /// Its bodies as stored: parsed only by the readings that need them.
    pub intent: RawIntent,
    /// What enrichment stored (its shape belongs to the delivery module).
    pub enrichment: Option<Value>,
    /// The planned events of this intent, when a plan was stored (shape owned by delivery)...
    pub plan: Option<Value>,
    /// ...and how many of them CDP acknowledged.
    pub sent: usize,
    /// This claim included.
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// An intent waiting for its OrderCloud reads, claimed for them.
#[derive(Debug, Clone)]
pub struct EnrichmentJob {
    pub claim: Claim,
    pub shopper_key: String,
    pub intent: RawIntent,
    pub secrets: IntentSecrets,
    /// This attempt included.
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// One write a delivery makes while it holds its claim. [`Store::apply`] makes a list of them
/// atomically, and only while the claim is held.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// The intent's planned events (a JSON array's text), or `None` to forget a plan that no longer
    /// holds.
    Plan(Option<String>),
    /// How many planned events CDP acknowledged.
    Sent(usize),
    /// What a CDP session holds now.
    Session(SessionFacts),
    /// A shopper's record (identity, details, CDP browsers).
    Shopper {
        key: String,
        state: ShopperState,
    },
    /// A cart line as last seen.
    CartLine(CartLine),
    DeleteCartLine {
        order_id: String,
        line_id: String,
    },
    DeleteCart {
        order_id: String,
    },
    /// Moves the record of an order's lines to another shopper (anonymous order transfer).
    MoveCart {
        order_id: String,
        to_shopper: String,
    },
    /// The commit waits until it is on disk, whatever the store does for delivery's other writes:
    /// the progress of a CONFIRM or a CHECKOUT, which would be sent again (a second order) if a
    /// crash of the machine or the database server lost it.
    Durable,
    /// CDP acknowledged the order's CHECKOUT: ask CDP for the order at `due_at_ms` (the landing
    /// check), with what is needed to send it again. An earlier check of the order keeps its count
    /// of repairs.
    CheckOrder(OrderCheck),
}

impl Write {
    /// Whether this write still has something to record when the same [`Store::apply`] settles
    /// the intent with `settle`. An ack deletes the intent, and its plan and count of acknowledged
    /// events with it: written first, they would be written only to be deleted (on SQLite, the
    /// intent's whole row, webhook and plan, rewritten for nothing). `Durable` is read apart.
    pub fn outlives(&self, settle: Option<&Settle>) -> bool {
        !(matches!(settle, Some(Settle::Ack)) && matches!(self, Write::Plan(_) | Write::Sent(_)))
    }
}

/// An order the landing check will look up in CDP.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderCheck {
    pub order_id: String,
    pub shopper_key: String,
    /// The submit's intent and enrichment (JSON), to send the order again.
    pub intent: Value,
    pub enrichment: Option<Value>,
    pub due_at_ms: i64,
    /// Claimed checks only: the due time the CHECKOUT's write set (names this round of checks),
    /// how many times it was sent again, and checks that failed.
    pub since_ms: i64,
    pub repairs: i64,
    pub attempts: i64,
}

/// How a landing check ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckOutcome {
    /// CDP holds the order, or it was dead-lettered: the check is done.
    Done,
    /// Sent again: check again at `due_at_ms`.
    Repaired { due_at_ms: i64 },
    /// CDP's REST API failed: ask again at `due_at_ms`.
    Retry { due_at_ms: i64, error: String },
}

/// Whether a replica's claims can be taken over by the others (PostgreSQL): read before claiming,
/// and before every CDP request made under a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Until when, at least, no other replica takes this one's claims over: the last heartbeat that
    /// reached the database plus `delivery.takeover_secs`.
    pub safe_until: std::time::Instant,
    /// Grows each time the heartbeats stopped for long enough that the claims could have been taken
    /// over, even if they reach the database again since: a claim made before that is lost.
    pub epoch: u64,
}

/// How a claimed intent leaves the worker's hands.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Done: the intent leaves the queue.
    Ack,
    /// Try again at `at_ms` (epoch ms); the claim is released.
    Retry { at_ms: i64, error: String },
    /// Gives up: the intent becomes a dead letter with `reason`, and the shopper's next intent may go.
    Dead { reason: String },
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
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct QueuedIntent {
    pub id: i64,
    pub dedupe_key: String,
    pub shopper_key: String,
    pub kind: String,
    pub attempts: i64,
    pub enriched: bool,
    #[sqlx(rename = "next_attempt_at")]
    pub next_attempt_at_ms: i64,
    pub last_error: Option<String>,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
}

/// Queue figures for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub pending: i64,
    pub dead: i64,
    /// Age of the oldest pending intent in milliseconds (0 when none).
    pub oldest_pending_age_ms: i64,
}

/// Who opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The service: takes delivery claims. SQLite: holds the file's lock (one serving process per
    /// file) and keeps its claims in its memory (they die with the process). PostgreSQL: registers the
    /// replica and heartbeats, so its claims are taken over `takeover` after its heartbeats stop
    /// (`delivery.takeover_secs`), and it takes over those of replicas silent for as long.
    Service { takeover: Duration },
    /// An operator's command (`dead-letters …`) beside a running service: no lock, no claims.
    Tool,
}

/// Opens the store named by `store.url`, creating and migrating it as needed.
pub async fn open(settings: &StoreSettings, role: Role) -> anyhow::Result<DynStore> {
    if settings.url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(settings, role).await?))
    } else {
        Ok(Arc::new(postgres::PostgresStore::open(settings, role).await?))
    }
}
