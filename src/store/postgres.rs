//! The multi-replica store: PostgreSQL. The same guarantees as SQLite, across replicas:
//! - claims take the head of each shopper's queue with `FOR UPDATE SKIP LOCKED` and a lease whose
//!   claim id fences out a stale worker;
//! - intake batches (group commit) insert with one statement per table, and take a transaction-level
//!   advisory lock per shopper so that a shopper's intents get ids in commit order on every replica;
//! - the dedupe key is a primary key: the losing insert of two replicas is a duplicate;
//! - migrations run at start under sqlx's advisory lock, so replicas starting together do not race.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Row};

use super::group_commit::{first_occurrences, GroupCommit};
use super::*;

pub struct PostgresStore {
    pool: PgPool,
    writer: GroupCommit,
}

/// A schema name safe to quote into DDL and `search_path`.
fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit())
}

impl PostgresStore {
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<PostgresStore> {
        let mut options = PgConnectOptions::from_str(&settings.url)
            .with_context(|| {
                format!(
                    "store.url = {:?} is not a PostgreSQL URL",
                    crate::redact_url(&settings.url)
                )
            })?
            .options([
                ("statement_timeout", settings.statement_timeout_ms.to_string()),
                // The queue's shape changes by the second (empty, then a 100,000-intent backlog): a
                // generic plan cached for prepared statements goes stale and turns claims into scans.
                ("plan_cache_mode", "force_custom_plan".to_string()),
            ]);
        if let Some(schema) = settings.schema.as_deref().filter(|s| !s.is_empty()) {
            anyhow::ensure!(
                valid_schema(schema),
                "store.schema = {schema:?}: use letters, digits and underscores only"
            );
            let mut conn = tokio::time::timeout(Duration::from_millis(settings.connect_timeout_ms), options.connect())
                .await
                .context("timed out connecting to PostgreSQL")?
                .context("cannot connect to PostgreSQL (store.url)")?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut conn)
                .await
                .with_context(|| format!("cannot create schema {schema}"))?;
            conn.close().await.ok();
            options = options.options([("search_path", schema.to_string())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .context("cannot connect to PostgreSQL (store.url)")?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .context("cannot migrate the PostgreSQL store")?;
        let writer_pool = pool.clone();
        let writer = GroupCommit::start(move |items| {
            let pool = writer_pool.clone();
            async move { insert_batch(&pool, &items).await }
        });
        Ok(PostgresStore { pool, writer })
    }
}

async fn insert_batch(pool: &PgPool, items: &[NewIntent]) -> Result<Vec<EnqueueOutcome>, StoreError> {
    let now = now_ms();
    let first = first_occurrences(items);
    let mut tx = pool.begin().await?;

    // A shopper's intents must get ids in commit order across replicas (the queue is ordered by id):
    // intake transactions touching the same shopper take turns. Sorted, so they cannot deadlock.
    let mut shoppers: Vec<&str> = items.iter().map(|i| i.shopper_key.as_str()).collect();
    shoppers.sort_unstable();
    shoppers.dedup();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(k, 7305)) FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) s",
    )
    .bind(&shoppers)
    .execute(&mut *tx)
    .await?;

    let keys: Vec<&str> = items
        .iter()
        .zip(&first)
        .filter(|(_, first)| **first)
        .map(|(i, _)| i.dedupe_key.as_str())
        .collect();
    let fresh: std::collections::HashSet<String> = sqlx::query(
        "INSERT INTO seen_webhooks (dedupe_key, seen_at) SELECT k, $2 FROM unnest($1::text[]) AS k \
         ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key",
    )
    .bind(&keys)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| r.get(0))
    .collect();

    let new: Vec<&NewIntent> = items
        .iter()
        .zip(&first)
        .filter(|(i, first)| **first && fresh.contains(&i.dedupe_key))
        .map(|(i, _)| i)
        .collect();
    let mut ids: HashMap<String, i64> = HashMap::new();
    if !new.is_empty() {
        let mut cols: [Vec<Option<String>>; 7] = Default::default();
        let mut enriched = Vec::with_capacity(new.len());
        for item in &new {
            let dead = item.dead_reason.is_some();
            let secrets = if dead || !item.needs_enrichment {
                None
            } else {
                Some(serde_json::to_string(&item.secrets)?)
            };
            cols[0].push(Some(item.dedupe_key.clone()));
            cols[1].push(Some(item.shopper_key.clone()));
            cols[2].push(Some(item.intent.kind.label().to_string()));
            cols[3].push(Some(serde_json::to_string(&item.intent)?));
            cols[4].push(secrets);
            cols[5].push(Some(if dead { "dead" } else { "pending" }.to_string()));
            cols[6].push(item.dead_reason.clone());
            enriched.push(!item.needs_enrichment);
        }
        let [dedupe, shopper, kind, intent, secrets, state, error] = cols;
        let rows = sqlx::query(
            "INSERT INTO intents (dedupe_key, shopper_key, kind, intent, secrets, enriched, state, next_attempt_at, \
             last_error, created_at, updated_at, dead_at) \
             SELECT d, s, k, i, sec, e, st, $9, le, $9, $9, CASE WHEN st = 'dead' THEN $9 END \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::text[], $8::text[]) \
             WITH ORDINALITY AS t(d, s, k, i, sec, e, st, le, ord) ORDER BY ord \
             RETURNING id, dedupe_key",
        )
        .bind(dedupe)
        .bind(shopper)
        .bind(kind)
        .bind(intent)
        .bind(secrets)
        .bind(enriched)
        .bind(state)
        .bind(error)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        ids = rows.into_iter().map(|r| (r.get("dedupe_key"), r.get("id"))).collect();
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

fn claimed_from(row: &sqlx::postgres::PgRow, claim_id: &str) -> Result<ClaimedIntent, StoreError> {
    Ok(ClaimedIntent {
        claim: Claim {
            intent_id: row.get("id"),
            claim_id: claim_id.to_string(),
        },
        shopper_key: row.get("shopper_key"),
        intent: serde_json::from_str(row.get::<&str, _>("intent"))?,
        enrichment: parse_json(row.get("enrichment"))?,
        progress: parse_json(row.get("progress"))?,
        attempts: row.get("attempts"),
        created_at_ms: row.get("created_at"),
    })
}

#[async_trait]
impl Store for PostgresStore {
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError> {
        self.writer.enqueue(item).await
    }

    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError> {
        let now = now_ms();
        let claim_id = uuid::Uuid::new_v4().to_string();
        // Only the head of each shopper's queue is a candidate (no older pending intent of the same
        // shopper); walking in id order stops after `limit` heads. SKIP LOCKED lets replicas claim side
        // by side, and the lease condition is re-checked on the row's latest version when locking.
        let rows = sqlx::query(
            "UPDATE intents SET claim_id = $1, lease_until = $2, attempts = attempts + 1, updated_at = $3 \
             WHERE id IN ( \
               SELECT i.id FROM intents i \
               WHERE i.state = 'pending' AND i.enriched AND i.next_attempt_at <= $3 \
                 AND (i.lease_until IS NULL OR i.lease_until < $3) \
                 AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key \
                                 AND o.state = 'pending' AND o.id < i.id) \
               ORDER BY i.id LIMIT $4 \
               FOR UPDATE SKIP LOCKED) \
             RETURNING id, shopper_key, intent, enrichment, progress, attempts, created_at",
        )
        .bind(&claim_id)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = rows
            .iter()
            .map(|r| claimed_from(r, &claim_id))
            .collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|c| c.claim.intent_id);
        Ok(claimed)
    }

    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError> {
        let rows =
            sqlx::query("UPDATE intents SET lease_until = $1 WHERE id = $2 AND claim_id = $3 AND state = 'pending'")
                .bind(now_ms() + lease.as_millis() as i64)
                .bind(claim.intent_id)
                .bind(&claim.claim_id)
                .execute(&self.pool)
                .await?
                .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn save_progress(&self, claim: &Claim, progress: &Value) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET progress = $1, updated_at = $2 WHERE id = $3 AND claim_id = $4 AND state = 'pending'",
        )
        .bind(progress.to_string())
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn ack(&self, claim: &Claim) -> Result<(), StoreError> {
        let rows = sqlx::query("DELETE FROM intents WHERE id = $1 AND claim_id = $2 AND state = 'pending'")
            .bind(claim.intent_id)
            .bind(&claim.claim_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn reschedule(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET next_attempt_at = $1, last_error = $2, claim_id = NULL, lease_until = NULL, updated_at = $3 \
             WHERE id = $4 AND claim_id = $5 AND state = 'pending'",
        )
        .bind(at_ms)
        .bind(error)
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn dead_letter(&self, claim: &Claim, reason: &str) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET state = 'dead', last_error = $1, dead_at = $2, updated_at = $2, secrets = NULL, \
             claim_id = NULL, lease_until = NULL WHERE id = $3 AND claim_id = $4 AND state = 'pending'",
        )
        .bind(reason)
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE intents SET enrich_after = $1, enrich_attempts = enrich_attempts + 1 WHERE id IN ( \
               SELECT id FROM intents WHERE state = 'pending' AND NOT enriched AND enrich_after <= $2 \
               ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id, shopper_key, intent, secrets, enrich_attempts, created_at",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
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
        sqlx::query(
            "UPDATE intents SET enrichment = $1, enriched = TRUE, secrets = NULL, updated_at = $2 WHERE id = $3",
        )
        .bind(enrichment.to_string())
        .bind(now_ms())
        .bind(intent_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retry_enrichment(&self, intent_id: i64, at_ms: i64, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE intents SET enrich_after = $1, last_error = $2, updated_at = $3 WHERE id = $4 AND NOT enriched",
        )
        .bind(at_ms)
        .bind(error)
        .bind(now_ms())
        .bind(intent_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn dead_letter_unclaimed(&self, intent_id: i64, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE intents SET state = 'dead', last_error = $1, dead_at = $2, updated_at = $2, secrets = NULL, \
             claim_id = NULL, lease_until = NULL WHERE id = $3 AND state = 'pending'",
        )
        .bind(reason)
        .bind(now_ms())
        .bind(intent_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError> {
        let row = sqlx::query("SELECT state, identity FROM shoppers WHERE shopper_key = $1")
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
            "INSERT INTO shoppers (shopper_key, state, identity, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (shopper_key) DO UPDATE SET state = excluded.state, \
             identity = COALESCE(excluded.identity, shoppers.identity), updated_at = excluded.updated_at",
        )
        .bind(shopper_key)
        .bind(serde_json::to_string(state)?)
        .bind(&state.identity)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn put_identity(&self, shopper_key: &str, identity: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO shoppers (shopper_key, state, identity, updated_at) VALUES ($1, '{}', $2, $3) \
             ON CONFLICT (shopper_key) DO UPDATE SET identity = excluded.identity, updated_at = excluded.updated_at",
        )
        .bind(shopper_key)
        .bind(identity)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError> {
        let row = sqlx::query("SELECT facts FROM cdp_sessions WHERE channel = $1 AND browser_id = $2")
            .bind(channel)
            .bind(browser_id)
            .fetch_optional(&self.pool)
            .await?;
        parse_json(row.map(|r| r.get("facts")))
    }

    async fn put_session(&self, facts: &SessionFacts) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (channel, browser_id) DO UPDATE SET shopper_key = excluded.shopper_key, \
             last_event_at = excluded.last_event_at, facts = excluded.facts",
        )
        .bind(&facts.channel)
        .bind(&facts.browser_id)
        .bind(&facts.shopper_key)
        .bind(facts.last_event_at_ms)
        .bind(serde_json::to_string(facts)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError> {
        let rows = sqlx::query(
            "SELECT facts FROM cdp_sessions WHERE shopper_key = $1 AND last_event_at >= $2 ORDER BY last_event_at",
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
        let rows = sqlx::query(
            "SELECT order_id, line_id, shopper_key, line, updated_at FROM cart_lines WHERE order_id = $1 \
             ORDER BY updated_at, line_id",
        )
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
            "INSERT INTO cart_lines (order_id, line_id, shopper_key, line, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (order_id, line_id) DO UPDATE SET shopper_key = excluded.shopper_key, line = excluded.line, \
             updated_at = excluded.updated_at",
        )
        .bind(&line.order_id)
        .bind(&line.line_id)
        .bind(&line.shopper_key)
        .bind(line.line.to_string())
        .bind(line.updated_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_cart_line(&self, order_id: &str, line_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM cart_lines WHERE order_id = $1 AND line_id = $2")
            .bind(order_id)
            .bind(line_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_cart(&self, order_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM cart_lines WHERE order_id = $1")
            .bind(order_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn move_cart(&self, order_id: &str, to_shopper: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE cart_lines SET shopper_key = $1 WHERE order_id = $2")
            .bind(to_shopper)
            .bind(order_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn pending(&self, limit: usize) -> Result<Vec<QueuedIntent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, dedupe_key, shopper_key, kind, attempts, enriched, next_attempt_at, last_error, created_at \
             FROM intents WHERE state = 'pending' ORDER BY id LIMIT $1",
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
             WHERE state = 'dead' AND dead_at >= $1 ORDER BY id LIMIT $2",
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
        let rows = sqlx::query(
            "UPDATE intents SET state = 'pending', attempts = 0, progress = NULL, next_attempt_at = $1, \
             claim_id = NULL, lease_until = NULL, dead_at = NULL, updated_at = $1, \
             enrich_after = $1, enrich_attempts = 0, created_at = $1 \
             WHERE state = 'dead' AND shopper_key <> $2 AND ($3::bigint[] IS NULL OR id = ANY($3)) AND dead_at >= $4",
        )
        .bind(now)
        .bind(UNIDENTIFIED_SHOPPER)
        .bind(ids.map(|i| i.to_vec()))
        .bind(since_ms.unwrap_or(i64::MIN))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(rows)
    }

    async fn purge_dead_letters(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM intents WHERE state = 'dead' AND dead_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
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
        sqlx::query(
            "INSERT INTO health (id, checked_at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn prune_dedupe(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM seen_webhooks WHERE seen_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}
