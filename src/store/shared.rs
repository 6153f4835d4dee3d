//! What both backends say the same way: the SQL text they share (written with `$1`-style
//! parameters, which SQLite takes too, numbered in order of first use) and the decoding of the rows
//! they read into the store's types. A backend file holds only what differs: SQLite's single
//! writer and in-memory queues, PostgreSQL's `SKIP LOCKED` claims, advisory locks and functions.

use serde_json::Value;

use super::{Claim, ClaimedIntent, EnrichmentJob, OrderCheck, Outbox, QueueStats, StoreError};
use crate::domain::intent::{RawIntent, UnreadableIntent};
use crate::domain::{now_ms, CartLine, SessionFacts, ShopperState};

pub(crate) const SHOPPER: &str = "SELECT state, identity FROM shoppers WHERE shopper_key = $1";
pub(crate) const SESSION: &str = "SELECT facts FROM cdp_sessions WHERE channel = $1 AND browser_id = $2";
pub(crate) const SESSIONS_OF: &str = "SELECT facts FROM cdp_sessions WHERE shopper_key = $1 AND last_event_at >= $2 \
     ORDER BY last_event_at, channel, browser_id";
pub(crate) const CART_LINES: &str = "SELECT order_id, line_id, shopper_key, line, updated_at FROM cart_lines \
     WHERE order_id = $1 ORDER BY updated_at, line_id";
/// The oldest pending intents (`$1` of them): the ids of each kind read in id order from an index of
/// its own (PostgreSQL's `intents_ready_id` and `intents_unenriched`, migration 0010), since no index
/// holds every pending intent in id order and the primary key's would walk the dead letters too.
pub(crate) const PENDING: &str =
    "SELECT id, dedupe_key, shopper_key, kind, attempts, enriched, next_attempt_at, last_error, created_at \
     FROM intents WHERE id IN ( \
       SELECT id FROM (SELECT id FROM intents WHERE state = 'pending' AND enriched ORDER BY id LIMIT $1) AS ready \
       UNION ALL \
       SELECT id FROM (SELECT id FROM intents WHERE state = 'pending' AND NOT enriched ORDER BY id LIMIT $1) AS unenriched) \
     ORDER BY id LIMIT $1";
/// What [`super::Operations::prune_shoppers`] deletes, one statement per table (`$1`: before), each
/// at most [`PRUNE_BATCH`] records at a time (run again until fewer go): whole carts whose lines
/// all are older, sessions, and shoppers without an intent queued.
pub(crate) const PRUNE_SHOPPERS: [&str; 3] = [
    "DELETE FROM cart_lines WHERE order_id IN (SELECT order_id FROM cart_lines GROUP BY order_id \
     HAVING MAX(updated_at) < $1 LIMIT 500)",
    "DELETE FROM cdp_sessions WHERE (channel, browser_id) IN (SELECT channel, browser_id FROM cdp_sessions \
     WHERE last_event_at < $1 LIMIT 500)",
    "DELETE FROM shoppers WHERE shopper_key IN (SELECT s.shopper_key FROM shoppers s WHERE s.updated_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM intents i WHERE i.shopper_key = s.shopper_key AND i.state = 'pending') \
     LIMIT 500)",
];
/// The `LIMIT` of [`PRUNE_SHOPPERS`]'s statements (carts, sessions, shoppers per statement): a
/// statement short enough not to hold SQLite's writer, or PostgreSQL's statement timeout, for long.
pub(crate) const PRUNE_BATCH: u64 = 500;
pub(crate) const COUNT_DEAD_BEFORE: &str = "SELECT COUNT(*) FROM intents WHERE state = 'dead' AND dead_at < $1";
pub(crate) const STATS: &str = "SELECT (SELECT COUNT(*) FROM intents WHERE state = 'pending') AS pending, \
            (SELECT COUNT(*) FROM intents WHERE state = 'dead') AS dead, \
            (SELECT MIN(created_at) FROM intents WHERE state = 'pending') AS oldest";
/// Dead letters since `$1`, at most `$2`; `{intent}` is the backend's expression for the intent's
/// stored bytes (they may not be UTF-8: a poison row is shown as it is).
pub(crate) fn dead_letters_sql(intent_bytes: &str) -> String {
    format!(
        "SELECT id, dedupe_key, shopper_key, kind, {intent_bytes} AS intent, last_error, attempts, created_at, dead_at \
         FROM intents WHERE state = 'dead' AND dead_at >= $1 ORDER BY id LIMIT $2"
    )
}

#[derive(sqlx::FromRow, Clone)]
pub(crate) struct ShopperRow {
    state: String,
    identity: Option<String>,
}

impl ShopperRow {
    /// From a row of [`SHOPPER`] read with rusqlite.
    pub fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<ShopperRow> {
        Ok(ShopperRow {
            state: r.get(0)?,
            identity: r.get(1)?,
        })
    }

    pub fn decode(self) -> Result<ShopperState, StoreError> {
        let mut state: ShopperState = serde_json::from_str(&self.state)?;
        if self.identity.is_some() {
            state.identity = self.identity;
        }
        Ok(state)
    }
}

#[derive(sqlx::FromRow, Clone)]
pub(crate) struct FactsRow {
    facts: String,
}

impl FactsRow {
    pub fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<FactsRow> {
        Ok(FactsRow { facts: r.get(0)? })
    }

    pub fn decode(self) -> Result<SessionFacts, StoreError> {
        Ok(serde_json::from_str(&self.facts)?)
    }
}

#[derive(sqlx::FromRow, Clone)]
pub(crate) struct CartLineRow {
    order_id: String,
    line_id: String,
    shopper_key: String,
    line: String,
    updated_at: i64,
}

impl CartLineRow {
    /// From a row of [`CART_LINES`] read with rusqlite.
    pub fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<CartLineRow> {
        Ok(CartLineRow {
            order_id: r.get(0)?,
            line_id: r.get(1)?,
            shopper_key: r.get(2)?,
            line: r.get(3)?,
            updated_at: r.get(4)?,
        })
    }

    pub fn decode(self) -> Result<CartLine, StoreError> {
        Ok(CartLine {
            line: serde_json::from_str(&self.line)?,
            order_id: self.order_id,
            line_id: self.line_id,
            shopper_key: self.shopper_key,
            updated_at_ms: self.updated_at,
        })
    }
}

/// A row of PostgreSQL's `forwarder_delivery_reads` (migration 0010) and of
/// `forwarder_delivery_reads_batch` (0011, a row per ask; its place `n` is not decoded):
/// [`super::Shoppers::delivery_reads`] in one call, the browser read from the shopper's record on the
/// server; the cart's lines as arrays in [`CART_LINES`]' order, the open sessions in [`SESSIONS_OF`]'.
#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryReadsRow {
    state: Option<String>,
    identity: Option<String>,
    facts: Option<String>,
    line_ids: Option<Vec<String>>,
    line_shoppers: Option<Vec<String>>,
    lines: Option<Vec<String>>,
    line_times: Option<Vec<i64>>,
    open_sessions: Option<Vec<String>>,
}

impl DeliveryReadsRow {
    pub fn decode(self, order_id: &str) -> Result<super::DeliveryReads, StoreError> {
        let shopper = self
            .state
            .map(|state| {
                ShopperRow {
                    state,
                    identity: self.identity,
                }
                .decode()
            })
            .transpose()?;
        let (session, session_unreadable) = match self.facts.map(|facts| FactsRow { facts }.decode()).transpose() {
            Ok(session) => (session, false),
            // As the reads apart answer it (`DeliveryReads::read_apart`).
            Err(_) => (None, true),
        };
        let cart = zip4(
            self.line_ids.unwrap_or_default(),
            self.line_shoppers.unwrap_or_default(),
            self.lines.unwrap_or_default(),
            self.line_times.unwrap_or_default(),
        )
        .map(|(line_id, shopper_key, line, updated_at)| {
            CartLineRow {
                order_id: order_id.to_string(),
                line_id,
                shopper_key,
                line,
                updated_at,
            }
            .decode()
        })
        .collect::<Result<_, _>>()?;
        let open_sessions = self
            .open_sessions
            .unwrap_or_default()
            .into_iter()
            .map(|facts| FactsRow { facts }.decode())
            .collect::<Result<_, _>>()?;
        Ok(super::DeliveryReads {
            shopper,
            cart,
            session,
            open_sessions,
            session_unreadable,
        })
    }
}

/// Four columns of one cart, zipped.
fn zip4<A, B, C, D>(a: Vec<A>, b: Vec<B>, c: Vec<C>, d: Vec<D>) -> impl Iterator<Item = (A, B, C, D)> {
    a.into_iter()
        .zip(b)
        .zip(c.into_iter().zip(d))
        .map(|((a, b), (c, d))| (a, b, c, d))
}

#[derive(sqlx::FromRow)]
pub(crate) struct DeadLetterRow {
    id: i64,
    dedupe_key: String,
    shopper_key: String,
    kind: String,
    intent: Vec<u8>,
    last_error: Option<String>,
    attempts: i64,
    created_at: i64,
    dead_at: Option<i64>,
}

impl DeadLetterRow {
    pub fn decode(self) -> super::DeadLetter {
        super::DeadLetter {
            id: self.id,
            dedupe_key: self.dedupe_key,
            shopper_key: self.shopper_key,
            kind: self.kind,
            intent: intent_for_operators(self.intent),
            last_error: self.last_error,
            attempts: self.attempts,
            created_at_ms: self.created_at,
            dead_at_ms: self.dead_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct StatsRow {
    pending: i64,
    dead: i64,
    oldest: Option<i64>,
}

impl StatsRow {
    pub fn decode(self) -> QueueStats {
        QueueStats {
            pending: self.pending,
            dead: self.dead,
            oldest_pending_age_ms: self.oldest.map(|o| (now_ms() - o).max(0)).unwrap_or(0),
        }
    }
}

/// The reads of the whole [`super::Shoppers`] role through a sqlx pool (`self.pool`), for `$store`
/// (PostgreSQL; SQLite reads the same SQL with its own readers, `sqlite::readers`), then the
/// backend's own methods (`$own`).
macro_rules! shopper_reads {
    ($store:ty, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl Shoppers for $store {
            async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError> {
                let row: Option<shared::ShopperRow> = sqlx::query_as(shared::SHOPPER)
                    .bind(shopper_key)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(shared::ShopperRow::decode).transpose()
            }

            async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError> {
                let row: Option<shared::FactsRow> = sqlx::query_as(shared::SESSION)
                    .bind(channel)
                    .bind(browser_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(shared::FactsRow::decode).transpose()
            }

            async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError> {
                let rows: Vec<shared::FactsRow> = sqlx::query_as(shared::SESSIONS_OF)
                    .bind(shopper_key)
                    .bind(since_ms)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(shared::FactsRow::decode).collect()
            }

            async fn cart_lines(&self, order_id: &str) -> Result<Vec<CartLine>, StoreError> {
                let rows: Vec<shared::CartLineRow> = sqlx::query_as(shared::CART_LINES)
                    .bind(order_id)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(shared::CartLineRow::decode).collect()
            }

            $($own)*
        }
    };
}
pub(crate) use shopper_reads;

/// [`super::Operations`] for `$store`: the queue as operators read it, with the same SQL on both
/// backends (`$intent_bytes`: the backend's expression for an intent's stored bytes), then the
/// backend's own methods (`$own`: replay, purge, ping, pruning, closing).
macro_rules! operations {
    ($store:ty, $intent_bytes:expr, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl Operations for $store {
        async fn pending(&self, limit: usize) -> Result<Vec<QueuedIntent>, StoreError> {
            Ok(sqlx::query_as(shared::PENDING)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn dead_letters(&self, since_ms: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
            let rows: Vec<shared::DeadLetterRow> = sqlx::query_as(&shared::dead_letters_sql($intent_bytes))
                .bind(since_ms.unwrap_or(i64::MIN))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            Ok(rows.into_iter().map(shared::DeadLetterRow::decode).collect())
        }

        async fn count_dead_letters_before(&self, before_ms: i64) -> Result<u64, StoreError> {
            let n: i64 = sqlx::query_scalar(shared::COUNT_DEAD_BEFORE)
                .bind(before_ms)
                .fetch_one(&self.pool)
                .await?;
            Ok(n as u64)
        }

        async fn stats(&self) -> Result<QueueStats, StoreError> {
            let row: shared::StatsRow = sqlx::query_as(shared::STATS).fetch_one(&self.pool).await?;
            Ok(row.decode())
        }

        $($own)*
        }
    };
}
pub(crate) use operations;

/// Records a landing check, or moves an existing one's time (its count of repairs stays):
/// `$1`..`$5` = order id, shopper key, intent, enrichment, due at. Both stores run it as is.
pub(crate) const ORDER_CHECK_UPSERT: &str =
    "INSERT INTO order_checks (order_id, shopper_key, intent, enrichment, due_at, since) \
     VALUES ($1, $2, $3, $4, $5, $5) \
     ON CONFLICT (order_id) DO UPDATE SET shopper_key = excluded.shopper_key, intent = excluded.intent, \
       enrichment = excluded.enrichment, due_at = excluded.due_at, since = excluded.since, lease_until = 0, \
       attempts = 0";

/// The columns of a landing check, in [`CheckRow`]'s order.
pub(crate) const CHECK_COLUMNS: &str = "order_id, shopper_key, intent, enrichment, due_at, since, repairs, attempts";

/// A landing check as both stores read it.
#[derive(sqlx::FromRow)]
pub(crate) struct CheckRow {
    pub order_id: String,
    pub shopper_key: String,
    pub intent: String,
    pub enrichment: Option<String>,
    #[sqlx(rename = "due_at")]
    pub due_at_ms: i64,
    #[sqlx(rename = "since")]
    pub since_ms: i64,
    pub repairs: i64,
    pub attempts: i64,
}

impl CheckRow {
    /// From a row of SQLite's writer, its columns [`CHECK_COLUMNS`].
    pub fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckRow> {
        Ok(CheckRow {
            order_id: r.get(0)?,
            shopper_key: r.get(1)?,
            intent: r.get(2)?,
            enrichment: r.get(3)?,
            due_at_ms: r.get(4)?,
            since_ms: r.get(5)?,
            repairs: r.get(6)?,
            attempts: r.get(7)?,
        })
    }

    pub fn decode(self) -> Result<OrderCheck, StoreError> {
        Ok(OrderCheck {
            intent: serde_json::from_str(&self.intent)?,
            enrichment: self.enrichment.as_deref().map(serde_json::from_str).transpose()?,
            order_id: self.order_id,
            shopper_key: self.shopper_key,
            due_at_ms: self.due_at_ms,
            since_ms: self.since_ms,
            repairs: self.repairs,
            attempts: self.attempts,
        })
    }
}

/// A claimed row as a backend reads it, before its JSON (bytes, not yet known to be UTF-8) is decoded.
pub(crate) struct ClaimedRow {
    pub id: i64,
    pub shopper_key: String,
    pub intent: Vec<u8>,
    pub enrichment: Option<Vec<u8>>,
    pub plan: Option<Vec<u8>>,
    pub sent: i64,
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// Decodes claimed rows, oldest first. A row that cannot be read back (corrupt, not an intent)
/// comes back apart with the reason, to be dead-lettered on its own while the rest of the batch is
/// delivered. The intent's bodies are kept as text: the readings that parse them dead-letter an
/// intent whose bodies no tree can hold (nested deeper than intake accepts, a number out of range).
pub(crate) fn decode_claimed(rows: Vec<ClaimedRow>, claim_id: &str) -> (Vec<ClaimedIntent>, Vec<(Claim, String)>) {
    let mut claimed = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in rows {
        let claim = Claim {
            intent_id: row.id,
            claim_id: claim_id.to_string(),
        };
        let decoded = (|| -> Result<_, serde_json::Error> {
            Ok((
                serde_json::from_slice::<RawIntent>(&row.intent)?,
                row.enrichment.as_deref().map(serde_json::from_slice).transpose()?,
                row.plan.as_deref().map(serde_json::from_slice).transpose()?,
            ))
        })();
        match decoded {
            Ok((intent, enrichment, plan)) => claimed.push(ClaimedIntent {
                claim,
                shopper_key: row.shopper_key,
                intent,
                enrichment,
                plan,
                sent: row.sent.max(0) as usize,
                attempts: row.attempts,
                created_at_ms: row.created_at_ms,
            }),
            Err(e) => unreadable.push((claim, UnreadableIntent::from(e).to_string())),
        }
    }
    claimed.sort_by_key(|c| c.claim.intent_id);
    (claimed, unreadable)
}

/// An intent claimed for enrichment as a backend reads it, before its JSON is decoded.
pub(crate) struct EnrichmentRow {
    pub id: i64,
    pub shopper_key: String,
    pub intent: Vec<u8>,
    pub secrets: Option<Vec<u8>>,
    pub enrich_attempts: i64,
    pub created_at_ms: i64,
}

/// Decodes intents claimed for enrichment, oldest first; unreadable ones apart, as
/// [`decode_claimed`] does.
pub(crate) fn decode_enrichment_jobs(
    rows: Vec<EnrichmentRow>,
    claim_id: &str,
) -> (Vec<EnrichmentJob>, Vec<(Claim, String)>) {
    let mut jobs = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in rows {
        let claim = Claim {
            intent_id: row.id,
            claim_id: claim_id.to_string(),
        };
        let decoded = (|| -> Result<_, serde_json::Error> {
            Ok((
                serde_json::from_slice::<RawIntent>(&row.intent)?,
                row.secrets.as_deref().map(serde_json::from_slice).transpose()?,
            ))
        })();
        match decoded {
            Ok((intent, secrets)) => jobs.push(EnrichmentJob {
                claim,
                shopper_key: row.shopper_key,
                intent,
                secrets: secrets.unwrap_or_default(),
                // This attempt, counted in the row only if it fails (retry_enrichment).
                attempts: row.enrich_attempts + 1,
                created_at_ms: row.created_at_ms,
            }),
            Err(e) => unreadable.push((claim, UnreadableIntent::from(e).to_string())),
        }
    }
    jobs.sort_by_key(|j| j.claim.intent_id);
    (jobs, unreadable)
}

/// Which claim an unreadable row was found under.
#[derive(Clone, Copy)]
pub(crate) enum ClaimedFor {
    Delivery,
    Enrichment,
}

/// Dead-letters the rows [`decode_claimed`] or [`decode_enrichment_jobs`] could not read, each on
/// its own.
pub(crate) async fn dead_letter_unreadable(store: &dyn Outbox, unreadable: Vec<(Claim, String)>, claimed: ClaimedFor) {
    for (claim, reason) in unreadable {
        tracing::warn!(intent_id = claim.intent_id, reason, "unreadable intent: dead letter");
        metrics::counter!("forwarder_dead_letters_total", "stage" => "claim").increment(1);
        let dead = match claimed {
            ClaimedFor::Delivery => store.dead_letter(&claim, &reason).await,
            ClaimedFor::Enrichment => store.dead_letter_enrichment(&claim, &reason).await,
        };
        if let Err(e) = dead {
            tracing::warn!(intent_id = claim.intent_id, error = %e, "cannot dead-letter the unreadable intent");
        }
    }
}

/// An intent's stored JSON as operators see it: parsed when it can be, else its text (bytes that
/// are not UTF-8 replaced).
pub(crate) fn intent_for_operators(stored: Vec<u8>) -> Value {
    serde_json::from_slice(&stored).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&stored).into_owned()))
}

pub(crate) fn stale_unless_one(rows: u64, claim: &Claim) -> Result<(), StoreError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(StoreError::StaleClaim(claim.intent_id))
    }
}
