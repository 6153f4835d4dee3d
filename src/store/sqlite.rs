//! The embedded store: one SQLite file in WAL mode.
//!
//! - Every write goes through one connection, so writers queue in the pool instead of meeting
//!   SQLite's lock and its busy handler's sleeps; reads use a pool of their own (WAL readers do not
//!   block the writer).
//! - Webhook intake commits with `synchronous = FULL` (the WAL is fsynced before the 200), through a
//!   group-commit task that puts whatever arrived meanwhile into one transaction: one fsync per batch.
//! - Delivery bookkeeping (claims, progress, session facts) commits with `synchronous = NORMAL`:
//!   durable across a process crash, and made durable by the next intake commit's fsync; at worst a
//!   power loss repeats a few CDP events (delivery is at least once).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use std::collections::{HashMap, HashSet};

use super::group_commit::{first_occurrences, GroupCommit};
use super::*;

pub struct SqliteStore {
    /// Readers.
    pool: SqlitePool,
    /// The one writer connection.
    writes: SqlitePool,
    writer: GroupCommit,
}

impl SqliteStore {
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<SqliteStore> {
        use anyhow::Context as _;
        let options = SqliteConnectOptions::from_str(&settings.url)
            .with_context(|| format!("store.url = {:?} is not a SQLite URL", settings.url))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_millis(settings.statement_timeout_ms.max(1000)))
            // Pages are read through a memory map instead of a pread(2) per page miss.
            .pragma("mmap_size", "33554432");
        if let Some(parent) = options.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create the folder {} for store.url", parent.display()))?;
            }
        }
        // No ping before each use: a SQLite connection is a file handle, and the ping is a round trip
        // to its worker thread for every statement.
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .connect_with(options.clone())
            .await
            .with_context(|| format!("cannot open the SQLite store {:?}", settings.url))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&writes)
            .await
            .context("cannot migrate the SQLite store")?;
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("cannot open the SQLite store {:?}", settings.url))?;
        let writer_pool = writes.clone();
        let writer = GroupCommit::start(move |items| {
            let pool = writer_pool.clone();
            async move { insert_batch(&pool, &items).await }
        });
        Ok(SqliteStore { pool, writes, writer })
    }
}

async fn insert_batch(pool: &SqlitePool, items: &[NewIntent]) -> Result<Vec<EnqueueOutcome>, StoreError> {
    let now = now_ms();
    let mut conn = pool.acquire().await?;
    // A 200 means committed: this commit fsyncs the WAL (and with it any earlier NORMAL commits).
    sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
    let outcomes = insert_batch_on(&mut conn, items, now).await;
    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
    outcomes
}

/// The batch in two statements: one multi-row insert of the dedupe keys (RETURNING only the new
/// ones), one of the intents. Statements, not rows, are what cost here.
async fn insert_batch_on(
    conn: &mut sqlx::SqliteConnection,
    items: &[NewIntent],
    now: i64,
) -> Result<Vec<EnqueueOutcome>, StoreError> {
    use sqlx::Connection as _;
    let first = first_occurrences(items);
    let mut tx = conn.begin().await?;
    let mut seen =
        sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT OR IGNORE INTO seen_webhooks (dedupe_key, seen_at) ");
    seen.push_values(items.iter().zip(&first).filter(|(_, f)| **f), |mut row, (item, _)| {
        row.push_bind(&item.dedupe_key).push_bind(now);
    });
    seen.push(" RETURNING dedupe_key");
    let fresh: HashSet<String> = seen
        .build()
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();

    let mut rows = Vec::new();
    for (item, first) in items.iter().zip(&first) {
        if !*first || !fresh.contains(&item.dedupe_key) {
            continue;
        }
        let dead = item.dead_reason.is_some();
        let secrets = if dead || !item.needs_enrichment {
            None
        } else {
            Some(serde_json::to_string(&item.secrets)?)
        };
        rows.push((item, serde_json::to_string(&item.intent)?, secrets, dead));
    }
    let mut ids: HashMap<String, i64> = HashMap::new();
    if !rows.is_empty() {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO intents (dedupe_key, shopper_key, kind, intent, secrets, enriched, state, \
             next_attempt_at, last_error, created_at, updated_at, dead_at) ",
        );
        insert.push_values(&rows, |mut row, (item, intent, secrets, dead)| {
            row.push_bind(&item.dedupe_key)
                .push_bind(&item.shopper_key)
                .push_bind(item.intent.kind.label())
                .push_bind(intent)
                .push_bind(secrets)
                .push_bind(!item.needs_enrichment)
                .push_bind(if *dead { "dead" } else { "pending" })
                .push_bind(now)
                .push_bind(&item.dead_reason)
                .push_bind(now)
                .push_bind(now)
                .push_bind(dead.then_some(now));
        });
        insert.push(" RETURNING id, dedupe_key");
        ids = insert
            .build()
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|r| (r.get("dedupe_key"), r.get("id")))
            .collect();
    }
    tx.commit().await?;
    Ok(items
        .iter()
        .zip(&first)
        .map(|(item, first)| match ids.get(&item.dedupe_key) {
            Some(id) if *first && item.dead_reason.is_some() => EnqueueOutcome::DeadLettered(*id),
            Some(id) if *first => EnqueueOutcome::Queued(*id),
            _ => EnqueueOutcome::Duplicate,
        })
        .collect())
}

#[async_trait]
impl Store for SqliteStore {
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError> {
        self.writer.enqueue(item).await
    }

    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError> {
        let now = now_ms();
        let claim_id = uuid::Uuid::new_v4().to_string();
        // Only the head of each shopper's queue is claimable, so a shopper's intents go one at a time.
        // Walking the queue in id order and probing for an older pending intent of the same shopper
        // stops after `limit` heads, however long the backlog.
        let rows = sqlx::query(
            "UPDATE intents SET claim_id = ?1, lease_until = ?2, attempts = attempts + 1, updated_at = ?3 \
             WHERE id IN ( \
               SELECT i.id FROM intents i \
               WHERE i.state = 'pending' AND i.enriched = 1 AND i.next_attempt_at <= ?3 \
                 AND (i.lease_until IS NULL OR i.lease_until < ?3) \
                 AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key \
                                 AND o.state = 'pending' AND o.id < i.id) \
               ORDER BY i.id LIMIT ?4) \
             RETURNING id, shopper_key, intent, enrichment, progress, attempts, created_at",
        )
        .bind(&claim_id)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.writes)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let intent_id: i64 = row.get("id");
            claimed.push(ClaimedIntent {
                claim: Claim {
                    intent_id,
                    claim_id: claim_id.clone(),
                },
                shopper_key: row.get("shopper_key"),
                intent: serde_json::from_str(row.get::<&str, _>("intent"))?,
                enrichment: parse_json(row.get("enrichment"))?,
                progress: parse_json(row.get("progress"))?,
                attempts: row.get("attempts"),
                created_at_ms: row.get("created_at"),
            });
        }
        claimed.sort_by_key(|c| c.claim.intent_id);
        Ok(claimed)
    }

    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError> {
        let rows =
            sqlx::query("UPDATE intents SET lease_until = ?1 WHERE id = ?2 AND claim_id = ?3 AND state = 'pending'")
                .bind(now_ms() + lease.as_millis() as i64)
                .bind(claim.intent_id)
                .bind(&claim.claim_id)
                .execute(&self.writes)
                .await?
                .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn save_progress(&self, claim: &Claim, progress: &Value) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET progress = ?1, updated_at = ?2 WHERE id = ?3 AND claim_id = ?4 AND state = 'pending'",
        )
        .bind(progress.to_string())
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.writes)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn ack(&self, claim: &Claim) -> Result<(), StoreError> {
        let rows = sqlx::query("DELETE FROM intents WHERE id = ?1 AND claim_id = ?2 AND state = 'pending'")
            .bind(claim.intent_id)
            .bind(&claim.claim_id)
            .execute(&self.writes)
            .await?
            .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn reschedule(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET next_attempt_at = ?1, last_error = ?2, claim_id = NULL, lease_until = NULL, updated_at = ?3 \
             WHERE id = ?4 AND claim_id = ?5 AND state = 'pending'",
        )
        .bind(at_ms)
        .bind(error)
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.writes)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn dead_letter(&self, claim: &Claim, reason: &str) -> Result<(), StoreError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE intents SET state = 'dead', last_error = ?1, dead_at = ?2, updated_at = ?2, secrets = NULL, \
             claim_id = NULL, lease_until = NULL WHERE id = ?3 AND claim_id = ?4 AND state = 'pending'",
        )
        .bind(reason)
        .bind(now)
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.writes)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE intents SET enrich_after = ?1, enrich_attempts = enrich_attempts + 1 WHERE id IN ( \
               SELECT id FROM intents WHERE state = 'pending' AND enriched = 0 AND enrich_after <= ?2 \
               ORDER BY id LIMIT ?3) \
             RETURNING id, shopper_key, intent, secrets, enrich_attempts, created_at",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.writes)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            jobs.push(EnrichmentJob {
                intent_id: row.get("id"),
                shopper_key: row.get("shopper_key"),
                intent: serde_json::from_str(row.get::<&str, _>("intent"))?,
                secrets: parse_json(row.get("secrets"))?.unwrap_or_default(),
                attempts: row.get("enrich_attempts"),
                created_at_ms: row.get("created_at"),
            });
        }
        jobs.sort_by_key(|j| j.intent_id);
        Ok(jobs)
    }

    async fn save_enrichment(&self, intent_id: i64, enrichment: &Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE intents SET enrichment = ?1, enriched = 1, secrets = NULL, updated_at = ?2 WHERE id = ?3")
            .bind(enrichment.to_string())
            .bind(now_ms())
            .bind(intent_id)
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn retry_enrichment(&self, intent_id: i64, at_ms: i64, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE intents SET enrich_after = ?1, last_error = ?2, updated_at = ?3 WHERE id = ?4 AND enriched = 0",
        )
        .bind(at_ms)
        .bind(error)
        .bind(now_ms())
        .bind(intent_id)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn dead_letter_unclaimed(&self, intent_id: i64, reason: &str) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query(
            "UPDATE intents SET state = 'dead', last_error = ?1, dead_at = ?2, updated_at = ?2, secrets = NULL, \
             claim_id = NULL, lease_until = NULL WHERE id = ?3 AND state = 'pending'",
        )
        .bind(reason)
        .bind(now)
        .bind(intent_id)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError> {
        let row = sqlx::query("SELECT state, identity FROM shoppers WHERE shopper_key = ?1")
            .bind(shopper_key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let mut state: ShopperState = serde_json::from_str(row.get::<&str, _>("state"))?;
            if let Some(identity) = row.get::<Option<String>, _>("identity") {
                state.identity = Some(identity);
            }
            Ok(state)
        })
        .transpose()
    }

    async fn put_shopper(&self, shopper_key: &str, state: &ShopperState) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO shoppers (shopper_key, state, identity, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (shopper_key) DO UPDATE SET state = excluded.state, \
             identity = COALESCE(excluded.identity, shoppers.identity), updated_at = excluded.updated_at",
        )
        .bind(shopper_key)
        .bind(serde_json::to_string(state)?)
        .bind(&state.identity)
        .bind(now_ms())
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn put_identity(&self, shopper_key: &str, identity: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO shoppers (shopper_key, state, identity, updated_at) VALUES (?1, '{}', ?2, ?3) \
             ON CONFLICT (shopper_key) DO UPDATE SET identity = excluded.identity, updated_at = excluded.updated_at",
        )
        .bind(shopper_key)
        .bind(identity)
        .bind(now_ms())
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError> {
        let row = sqlx::query("SELECT facts FROM cdp_sessions WHERE channel = ?1 AND browser_id = ?2")
            .bind(channel)
            .bind(browser_id)
            .fetch_optional(&self.pool)
            .await?;
        parse_json(row.map(|r| r.get("facts")))
    }

    async fn put_session(&self, facts: &SessionFacts) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (channel, browser_id) DO UPDATE SET shopper_key = excluded.shopper_key, \
             last_event_at = excluded.last_event_at, facts = excluded.facts",
        )
        .bind(&facts.channel)
        .bind(&facts.browser_id)
        .bind(&facts.shopper_key)
        .bind(facts.last_event_at_ms)
        .bind(serde_json::to_string(facts)?)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError> {
        let rows = sqlx::query(
            "SELECT facts FROM cdp_sessions WHERE shopper_key = ?1 AND last_event_at >= ?2 ORDER BY last_event_at",
        )
        .bind(shopper_key)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| serde_json::from_str(r.get::<&str, _>("facts")).map_err(StoreError::from))
            .collect()
    }

    async fn cart_lines(&self, order_id: &str) -> Result<Vec<CartLine>, StoreError> {
        let rows = sqlx::query("SELECT order_id, line_id, shopper_key, line, updated_at FROM cart_lines WHERE order_id = ?1 ORDER BY updated_at, line_id")
            .bind(order_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(CartLine {
                    order_id: r.get("order_id"),
                    line_id: r.get("line_id"),
                    shopper_key: r.get("shopper_key"),
                    line: serde_json::from_str(r.get::<&str, _>("line"))?,
                    updated_at_ms: r.get("updated_at"),
                })
            })
            .collect()
    }

    async fn put_cart_line(&self, line: &CartLine) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cart_lines (order_id, line_id, shopper_key, line, updated_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (order_id, line_id) DO UPDATE SET shopper_key = excluded.shopper_key, line = excluded.line, updated_at = excluded.updated_at",
        )
        .bind(&line.order_id)
        .bind(&line.line_id)
        .bind(&line.shopper_key)
        .bind(line.line.to_string())
        .bind(line.updated_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn delete_cart_line(&self, order_id: &str, line_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM cart_lines WHERE order_id = ?1 AND line_id = ?2")
            .bind(order_id)
            .bind(line_id)
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn delete_cart(&self, order_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM cart_lines WHERE order_id = ?1")
            .bind(order_id)
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn move_cart(&self, order_id: &str, to_shopper: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE cart_lines SET shopper_key = ?1 WHERE order_id = ?2")
            .bind(to_shopper)
            .bind(order_id)
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn pending(&self, limit: usize) -> Result<Vec<QueuedIntent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, dedupe_key, shopper_key, kind, attempts, enriched, next_attempt_at, last_error, created_at \
             FROM intents WHERE state = 'pending' ORDER BY id LIMIT ?1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| QueuedIntent {
                id: r.get("id"),
                dedupe_key: r.get("dedupe_key"),
                shopper_key: r.get("shopper_key"),
                kind: r.get("kind"),
                attempts: r.get("attempts"),
                enriched: r.get("enriched"),
                next_attempt_at_ms: r.get("next_attempt_at"),
                last_error: r.get("last_error"),
                created_at_ms: r.get("created_at"),
            })
            .collect())
    }

    async fn dead_letters(&self, since_ms: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, dedupe_key, shopper_key, kind, intent, last_error, attempts, created_at, dead_at FROM intents \
             WHERE state = 'dead' AND dead_at >= ?1 ORDER BY id LIMIT ?2",
        )
        .bind(since_ms.unwrap_or(i64::MIN))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.get("id"),
                    dedupe_key: r.get("dedupe_key"),
                    shopper_key: r.get("shopper_key"),
                    kind: r.get("kind"),
                    intent: serde_json::from_str(r.get::<&str, _>("intent"))?,
                    last_error: r.get("last_error"),
                    attempts: r.get("attempts"),
                    created_at_ms: r.get("created_at"),
                    dead_at_ms: r.get("dead_at"),
                })
            })
            .collect()
    }

    async fn replay_dead_letters(&self, ids: Option<&[i64]>, since_ms: Option<i64>) -> Result<u64, StoreError> {
        let now = now_ms();
        // Replayed intents keep their id, so they rejoin their shopper's queue in their original place.
        let set = "UPDATE intents SET state = 'pending', attempts = 0, progress = NULL, next_attempt_at = ?1, \
                   claim_id = NULL, lease_until = NULL, dead_at = NULL, updated_at = ?1, \
                   enrich_after = ?1, enrich_attempts = 0, created_at = ?1 \
                   WHERE state = 'dead' AND shopper_key <> ?2";
        let mut total = 0;
        match ids {
            Some(ids) => {
                for id in ids {
                    total += sqlx::query(&format!("{set} AND id = ?3"))
                        .bind(now)
                        .bind(UNIDENTIFIED_SHOPPER)
                        .bind(id)
                        .execute(&self.writes)
                        .await?
                        .rows_affected();
                }
            }
            None => {
                total = sqlx::query(&format!("{set} AND dead_at >= ?3"))
                    .bind(now)
                    .bind(UNIDENTIFIED_SHOPPER)
                    .bind(since_ms.unwrap_or(i64::MIN))
                    .execute(&self.writes)
                    .await?
                    .rows_affected();
            }
        }
        Ok(total)
    }

    async fn purge_dead_letters(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM intents WHERE state = 'dead' AND dead_at < ?1")
            .bind(before_ms)
            .execute(&self.writes)
            .await?
            .rows_affected())
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM intents WHERE state = 'pending') AS pending, \
                    (SELECT COUNT(*) FROM intents WHERE state = 'dead') AS dead, \
                    (SELECT MIN(created_at) FROM intents WHERE state = 'pending') AS oldest",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<i64> = row.get("oldest");
        Ok(QueueStats {
            pending: row.get("pending"),
            dead: row.get("dead"),
            oldest_pending_age_ms: oldest.map(|o| (now_ms() - o).max(0)).unwrap_or(0),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if !self.writer.is_open() {
            return Err(StoreError::Unavailable("store is closed".into()));
        }
        sqlx::query("INSERT INTO health (id, checked_at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at")
            .bind(now_ms())
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn prune_dedupe(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM seen_webhooks WHERE seen_at < ?1")
            .bind(before_ms)
            .execute(&self.writes)
            .await?
            .rows_affected())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
        self.writes.close().await;
    }
}
