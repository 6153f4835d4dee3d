//! The multi-replica store: PostgreSQL. The same guarantees as SQLite, across replicas:
//! - claims take the head of each shopper's queue with `FOR UPDATE SKIP LOCKED` and a lease whose
//!   claim id fences out a stale worker;
//! - intake batches (group commit) insert with one statement per table, and take a transaction-level
//!   advisory lock per shopper so that a shopper's intents get ids in commit order on every replica;
//! - the dedupe key is a primary key: the losing insert of two replicas is a duplicate;
//! - migrations run at start under sqlx's advisory lock, so replicas starting together do not race;
//! - replicas register and heartbeat ([`Heartbeat`]); a claim records its replica, and the claim of
//!   a replica silent for `delivery.takeover_secs` is taken over without waiting for its lease.
//!   Leases and heartbeats are judged by the database's clock (`forwarder_now_ms()`).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Row};

use super::batched::Batched;
use super::shared::{self, *};
use super::*;

pub struct PostgresStore {
    pool: PgPool,
    /// Intake's group commit: the webhooks that arrive while a batch commits go in the next.
    writer: Batched<NewIntent, EnqueueOutcome>,
    /// Delivery's first reads, asked while a batch of them runs, go together in the next: one
    /// call for the intents in flight together (`None`: read this intent's alone).
    reads: Batched<ReadsAsk, Option<Result<DeliveryReads, StoreError>>>,
    /// The service's registration (`None` for operators' commands, which take no claims).
    heartbeat: Option<Heartbeat>,
    /// A replica silent this long loses its claims.
    takeover: Duration,
}

/// A pooled connection idle this long is tested before it is used (see [`PostgresStore::open`]).
const TEST_WHEN_IDLE: Duration = Duration::from_secs(1);

/// How often a replica tells the database it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// A replica's registration: a row in `replicas` whose `heartbeat_at` a task keeps fresh.
struct Heartbeat {
    replica_id: String,
    beats: Arc<Mutex<Beats>>,
    task: tokio::task::JoinHandle<()>,
}

struct Beats {
    /// The last heartbeat that reached the database, as a local instant taken before it was sent
    /// (so never later than the database's own time of it).
    last: Instant,
    /// See [`Liveness::epoch`].
    epoch: u64,
}

impl Beats {
    /// A heartbeat sent at `sent` reached the database. Returns true when the one before had
    /// reached it more than `takeover` earlier: the claims made before could have been taken over
    /// meanwhile, so they count as lost (the epoch grows).
    fn reached(&mut self, sent: Instant, takeover: Duration) -> bool {
        let gap = sent > self.last + takeover;
        if gap {
            self.epoch += 1;
        }
        self.last = self.last.max(sent);
        gap
    }

    fn liveness(&self, takeover: Duration, now: Instant) -> Liveness {
        let safe_until = self.last + takeover;
        Liveness {
            safe_until,
            // A gap still open counts too.
            epoch: self.epoch + u64::from(now > safe_until),
        }
    }
}

impl Heartbeat {
    async fn start(pool: &PgPool, takeover: Duration) -> Result<Heartbeat, StoreError> {
        let replica_id = uuid::Uuid::new_v4().to_string();
        // Rows of replicas gone for a day are of no use to anyone.
        sqlx::query("DELETE FROM replicas WHERE heartbeat_at < forwarder_now_ms() - 86400000")
            .execute(pool)
            .await?;
        let sent = Instant::now();
        beat(pool, &replica_id).await?;
        let beats = Arc::new(Mutex::new(Beats { last: sent, epoch: 0 }));
        let (pool, id, beaten) = (pool.clone(), replica_id.clone(), beats.clone());
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let sent = Instant::now();
                match beat(&pool, &id).await {
                    Ok(()) => {
                        if beaten.lock().expect("heartbeat lock").reached(sent, takeover) {
                            tracing::warn!(
                                "replica heartbeats reach the database again after a gap: earlier claims are given up"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replica heartbeat failed: claims stop before they could be taken over")
                    }
                }
            }
        });
        Ok(Heartbeat {
            replica_id,
            beats,
            task,
        })
    }
}

impl Drop for Heartbeat {
    /// A store dropped without `close` (a replica killed, as far as the database can tell) stops
    /// heartbeating: its claims are taken over once `delivery.takeover_secs` have passed.
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn beat(pool: &PgPool, replica_id: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO replicas (id, started_at, heartbeat_at) VALUES ($1, forwarder_now_ms(), forwarder_now_ms()) \
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
    )
    .bind(replica_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// A schema name safe to quote into DDL and `search_path`.
fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit())
}

impl PostgresStore {
    pub async fn open(settings: &StoreSettings, role: Role) -> anyhow::Result<PostgresStore> {
        let mut options = PgConnectOptions::from_str(&settings.url)
            .with_context(|| {
                format!(
                    "store.url = {:?} is not a PostgreSQL URL",
                    crate::config::redacted_url(&settings.url)
                )
            })?
            // What `pg_stat_activity` shows the service's connections as.
            .application_name("ordercloud-cdp-forwarder")
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
            let mut conn = tokio::time::timeout(settings.connect_timeout(), options.connect())
                .await
                .context("timed out connecting to PostgreSQL")?
                .context("cannot connect to PostgreSQL (store.url)")?;
            // Replicas started together would race to create it (`IF NOT EXISTS` is no guard against
            // a concurrent CREATE): they take turns under a transaction-level advisory lock.
            let mut tx = conn.begin().await.context("cannot connect to PostgreSQL (store.url)")?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('forwarder schema/' || $1, 7307))")
                .bind(schema)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("cannot create schema {schema}"))?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("cannot create schema {schema}"))?;
            tx.commit()
                .await
                .with_context(|| format!("cannot create schema {schema}"))?;
            conn.close().await.ok();
            options = options.options([("search_path", schema.to_string())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.connect_timeout())
            // sqlx tests every connection as it goes back to the pool; testing it again on its
            // way out, one more round trip per statement, is left to connections idle long enough
            // for the server to have gone away meanwhile (a restart, an idle timeout). A broken
            // connection that slips through fails its statement: intake tries its batch again on
            // another connection (`enqueue_batch`), delivery retries.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move { Ok(meta.idle_for < TEST_WHEN_IDLE || conn.ping().await.is_ok()) })
            })
            .connect_with(options)
            .await
            .context("cannot connect to PostgreSQL (store.url)")?;
        // A replica of the release before restarting during a rolling upgrade finds this release's
        // migrations applied: they are additive (docs/OPERATIONS.md, "Upgrading"), so it starts.
        let mut migrator = sqlx::migrate!("migrations/postgres");
        migrator.set_ignore_missing(true);
        migrator
            .run(&pool)
            .await
            .context("cannot migrate the PostgreSQL store")?;
        let (heartbeat, takeover) = match role {
            Role::Service { takeover } => (
                Some(
                    Heartbeat::start(&pool, takeover)
                        .await
                        .context("cannot register the replica in PostgreSQL")?,
                ),
                takeover,
            ),
            Role::Tool => (None, Duration::from_secs(10)),
        };
        let writer_pool = pool.clone();
        let tries = settings.max_connections + 1;
        let writer = Batched::start(MAX_INTAKE_BATCH, move |items| {
            let pool = writer_pool.clone();
            async move { enqueue_batch(&pool, &items, tries).await }
        });
        let reads_pool = pool.clone();
        let reads = Batched::start(MAX_READS_BATCH, move |asks| {
            let pool = reads_pool.clone();
            async move { delivery_reads_batch(&pool, &asks, tries).await }
        });
        Ok(PostgresStore {
            pool,
            writer,
            reads,
            heartbeat,
            takeover,
        })
    }
}

/// Most webhooks committed in one transaction.
const MAX_INTAKE_BATCH: usize = 512;
/// Most intents whose first reads are one call.
const MAX_READS_BATCH: usize = 64;

/// What delivery reads first for one intent ([`Shoppers::delivery_reads`]' arguments).
#[derive(Clone)]
struct ReadsAsk {
    shopper_key: String,
    order_id: String,
    channel: String,
    open_since: Option<i64>,
}

/// Delivery's first reads of several intents in one call (`forwarder_delivery_reads_batch`,
/// migration 0011), an answer per ask in order; tried again on another connection while the one it
/// was given turns out broken, as intake's batch is (a read is safe to repeat; failed, it would fail
/// the delivery attempt of every intent in the batch). Should the server fail to read a browser from
/// a shopper's record (not JSON: a record damaged outside the service), every ask of the batch is
/// answered `None`: each caller then reads its own alone, and fails or not as its own reads would.
async fn delivery_reads_batch(
    pool: &PgPool,
    asks: &[ReadsAsk],
    tries: u32,
) -> Result<Vec<Option<Result<DeliveryReads, StoreError>>>, StoreError> {
    let rows = on_a_live_connection("delivery's reads", tries, || read_batch(pool, asks)).await;
    match rows {
        Ok(rows) if rows.len() == asks.len() => Ok(rows
            .into_iter()
            .zip(asks)
            .map(|(row, ask)| Some(row.decode(&ask.order_id)))
            .collect()),
        Ok(rows) => Err(StoreError::Corrupt(format!(
            "{} answers to {} asks of delivery's first reads",
            rows.len(),
            asks.len()
        ))),
        Err(e) if e.data_exception() => Ok(asks.iter().map(|_| None).collect()),
        Err(e) => Err(e),
    }
}

async fn read_batch(pool: &PgPool, asks: &[ReadsAsk]) -> Result<Vec<shared::DeliveryReadsRow>, StoreError> {
    let column = |get: fn(&ReadsAsk) -> &str| asks.iter().map(get).collect::<Vec<&str>>();
    Ok(sqlx::query_as(
        // Its plan kept: lookups by key.
        "SELECT * FROM forwarder_delivery_reads_batch($1, $2, $3, $4) ORDER BY n",
    )
    .bind(column(|a| &a.shopper_key))
    .bind(column(|a| &a.order_id))
    .bind(column(|a| &a.channel))
    .bind(asks.iter().map(|a| a.open_since).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?)
}

/// Intake's batch, tried again on another connection while the one it was given turns out broken
/// ([`on_a_live_connection`]): OrderCloud does not send a refused webhook again. Safe to repeat: a
/// batch committed before its answer was lost comes back as duplicates, which intake answers 200.
async fn enqueue_batch(pool: &PgPool, items: &[NewIntent], tries: u32) -> Result<Vec<EnqueueOutcome>, StoreError> {
    on_a_live_connection("intake's batch", tries, || insert_batch(pool, items)).await
}

/// Runs `batch` (one that is safe to repeat) again on another connection while the one it was given
/// turns out broken (the server closed it: a restart, an operator, an idle timeout), at most `tries`
/// times. `tries` exceeds the pool's size, so that every connection the pool held can be found
/// broken (each is dropped from the pool) before a new one is opened.
async fn on_a_live_connection<T, Fut>(what: &str, tries: u32, batch: impl Fn() -> Fut) -> Result<T, StoreError>
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut tries = tries.max(1);
    loop {
        tries -= 1;
        match batch().await {
            Err(e) if tries > 0 && e.lost_connection() => {
                tracing::info!(error = %e, "a pooled PostgreSQL connection was broken: {what} tried again");
            }
            done => return done,
        }
    }
}

async fn insert_batch(pool: &PgPool, items: &[NewIntent]) -> Result<Vec<EnqueueOutcome>, StoreError> {
    let now = now_ms();
    let first = first_occurrences(items);
    let new: Vec<&NewIntent> = items
        .iter()
        .zip(&first)
        .filter(|(_, first)| **first)
        .map(|(i, _)| i)
        .collect();
    // A shopper's intents get ids in commit order across replicas (the queue is ordered by id): the
    // function locks the batch's shoppers, once each and sorted, so that two batches cannot deadlock.
    let shoppers: Vec<&str> = new.iter().map(|i| i.shopper_key.as_str()).collect();
    let mut cols: [Vec<Option<String>>; 8] = Default::default();
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
        cols[7].push(item.enrichment.as_ref().map(Value::to_string));
        enriched.push(!item.needs_enrichment || item.enrichment.is_some());
    }
    let [dedupe, shopper, kind, intent, secrets, state, error, enrichment] = cols;
    // One call (`forwarder_enqueue`, migration 0007), outside any transaction: the shoppers' locks,
    // the dedupe keys and the intents commit together, and the commit (which waits for the disk)
    // is done before the answer is read.
    let rows = sqlx::query("SELECT o_key, o_id FROM forwarder_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
        .bind(now)
        .bind(&shoppers)
        .bind(dedupe)
        .bind(shopper)
        .bind(kind)
        .bind(intent)
        .bind(secrets)
        .bind(enriched)
        .bind(state)
        .bind(error)
        .bind(enrichment)
        .fetch_all(pool)
        .await?;
    let ids: HashMap<String, i64> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
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

/// Splits a batch into first occurrences of each dedupe key and the rest (duplicates within the batch).
fn first_occurrences(items: &[NewIntent]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    items.iter().map(|i| seen.insert(i.dedupe_key.as_str())).collect()
}

#[async_trait]
impl Intake for PostgresStore {
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError> {
        self.writer.submit(item).await
    }

    async fn known_dedupe_keys(&self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT dedupe_key FROM seen_webhooks WHERE dedupe_key = ANY($1)")
                .bind(keys)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

#[async_trait]
impl Outbox for PostgresStore {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError> {
        let now = now_ms();
        let claim_id = uuid::Uuid::new_v4().to_string();
        let takeover = self.takeover.as_millis() as i64;
        // One call (`forwarder_claim`, migrations 0004, 0008 and 0010): candidates under per-shopper
        // advisory locks, then checked again by a statement that sees every claim committed before
        // the locks; the progress read after that, by a statement that sees what it waited for.
        let rows = sqlx::query("SELECT * FROM forwarder_claim($1, $2, $3, $4, $5, $6)")
            .bind(&claim_id)
            .bind(self.heartbeat.as_ref().map(|h| h.replica_id.as_str()))
            .bind(lease.as_millis() as i64)
            .bind(now)
            .bind(limit.min(i32::MAX as usize) as i32)
            .bind(takeover)
            .fetch_all(&self.pool)
            .await?;
        let rows = rows
            .iter()
            .map(|r| ClaimedRow {
                id: r.get("id"),
                shopper_key: r.get("shopper_key"),
                intent: r.get::<String, _>("intent").into_bytes(),
                enrichment: r.get::<Option<String>, _>("enrichment").map(String::into_bytes),
                plan: r.get::<Option<String>, _>("progress").map(String::into_bytes),
                sent: r.get("sent"),
                attempts: r.get("attempts"),
                created_at_ms: r.get("created_at"),
            })
            .collect();
        let (claimed, unreadable) = decode_claimed(rows, &claim_id);
        dead_letter_unreadable(self, unreadable, ClaimedFor::Delivery).await;
        Ok(claimed)
    }

    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET lease_until = forwarder_now_ms() + $1 \
             WHERE id = $2 AND claim_id = $3 AND state = 'pending'",
        )
        .bind(lease.as_millis() as i64)
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn apply(&self, claim: &Claim, writes: Vec<Write>, settle: Option<Settle>) -> Result<(), StoreError> {
        // One call, one round trip, whatever the writes: `forwarder_apply` (migration 0004) checks the
        // claim and locks its row first, then writes in order and settles.
        let mut args = ApplyArgs::default();
        for write in writes.into_iter().filter(|w| w.outlives(settle.as_ref())) {
            args.push(write)?;
        }
        let (settle, settle_at, settle_text) = match settle {
            None => (None, None, None),
            Some(Settle::Ack) => (Some("ack"), None, None),
            Some(Settle::Retry { at_ms, error }) => (Some("retry"), Some(at_ms), Some(storable_text(error))),
            Some(Settle::Dead { reason }) => (Some("dead"), None, Some(storable_text(reason))),
        };
        // The progress of a CONFIRM or a CHECKOUT, and a landing check (one per submit), in one call
        // too (migration 0009): the commit then waits for the WAL's flush.
        let durable = args.waits_for_disk();
        let checks = std::mem::take(&mut args.checks);
        let call = sqlx::query_scalar(if durable {
            "SELECT forwarder_apply_durable($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)"
        } else {
            "SELECT forwarder_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16, $17, $18, $19, $20, $21, $22, $23)"
        })
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .bind(now_ms())
        .bind(args.set_plan)
        .bind(args.plan)
        .bind(args.sent)
        .bind(args.cart_ops)
        .bind(args.cart_orders)
        .bind(args.cart_lines)
        .bind(args.cart_shoppers)
        .bind(args.cart_json)
        .bind(args.cart_at)
        .bind(args.shopper_keys)
        .bind(args.shopper_states)
        .bind(args.shopper_identities)
        .bind(args.session_channels)
        .bind(args.session_browsers)
        .bind(args.session_shoppers)
        .bind(args.session_at)
        .bind(args.session_facts)
        .bind(settle)
        .bind(settle_at)
        .bind(settle_text);
        let call = if durable {
            call.bind(checks.iter().map(|c| c.order_id.as_str()).collect::<Vec<_>>())
                .bind(checks.iter().map(|c| c.shopper_key.as_str()).collect::<Vec<_>>())
                .bind(checks.iter().map(|c| c.intent.to_string()).collect::<Vec<_>>())
                .bind(
                    checks
                        .iter()
                        .map(|c| c.enrichment.as_ref().map(Value::to_string))
                        .collect::<Vec<_>>(),
                )
                .bind(checks.iter().map(|c| c.due_at_ms).collect::<Vec<_>>())
        } else {
            call
        };
        let held: bool = call.fetch_one(&self.pool).await?;
        if !held {
            return Err(StoreError::StaleClaim(claim.intent_id));
        }
        Ok(())
    }

    fn liveness(&self) -> Option<Liveness> {
        self.heartbeat.as_ref().map(|h| {
            h.beats
                .lock()
                .expect("heartbeat lock")
                .liveness(self.takeover, Instant::now())
        })
    }

    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError> {
        let now = now_ms();
        let claim_id = uuid::Uuid::new_v4().to_string();
        let rows = sqlx::query(
            "UPDATE intents SET enrich_after = $1, enrich_claim = $4 WHERE id IN ( \
               SELECT id FROM intents WHERE state = 'pending' AND NOT enriched AND enrich_after <= $2 \
               ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id, shopper_key, intent, secrets, enrich_attempts, created_at",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .bind(&claim_id)
        .fetch_all(&self.pool)
        .await?;
        let rows = rows
            .iter()
            .map(|r| EnrichmentRow {
                id: r.get("id"),
                shopper_key: r.get("shopper_key"),
                intent: r.get::<String, _>("intent").into_bytes(),
                secrets: r.get::<Option<String>, _>("secrets").map(String::into_bytes),
                enrich_attempts: r.get("enrich_attempts"),
                created_at_ms: r.get("created_at"),
            })
            .collect();
        let (jobs, unreadable) = decode_enrichment_jobs(rows, &claim_id);
        dead_letter_unreadable(self, unreadable, ClaimedFor::Enrichment).await;
        Ok(jobs)
    }

    async fn save_enrichment(
        &self,
        claim: &Claim,
        enrichment: &Value,
        identities: &[(String, String)],
    ) -> Result<(), StoreError> {
        // One round trip: the identities are recorded only if the claim still holds.
        // Each shopper once (the last identity given wins), in key order like every other writer.
        let identities: std::collections::BTreeMap<&str, &str> =
            identities.iter().map(|(k, i)| (k.as_str(), i.as_str())).collect();
        let (keys, values): (Vec<&str>, Vec<&str>) = identities.into_iter().unzip();
        // One call, its plans kept (migration 0010).
        let saved: bool = sqlx::query_scalar("SELECT forwarder_save_enrichment($1, $2, $3, $4, $5, $6)")
            .bind(claim.intent_id)
            .bind(&claim.claim_id)
            .bind(enrichment.to_string())
            .bind(now_ms())
            .bind(keys)
            .bind(values)
            .fetch_one(&self.pool)
            .await?;
        stale_unless_one(u64::from(saved), claim)
    }

    async fn retry_enrichment(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET enrich_after = $1, enrich_attempts = enrich_attempts + 1, last_error = $2, \
             enrich_claim = NULL, updated_at = $3 \
             WHERE id = $4 AND enrich_claim = $5 AND NOT enriched AND state = 'pending'",
        )
        .bind(at_ms)
        .bind(storable_text(error))
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }

    async fn dead_letter_enrichment(&self, claim: &Claim, reason: &str) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE intents SET state = 'dead', last_error = $1, dead_at = $2, updated_at = $2, secrets = NULL, \
             claim_id = NULL, lease_until = NULL, replica_id = NULL, enrich_claim = NULL \
             WHERE id = $3 AND enrich_claim = $4 AND NOT enriched AND state = 'pending'",
        )
        .bind(storable_text(reason))
        .bind(now_ms())
        .bind(claim.intent_id)
        .bind(&claim.claim_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        stale_unless_one(rows, claim)
    }
}

shared::shopper_reads!(PostgresStore, {
    /// One round trip for the intents in flight together instead of one each: asked while a batch
    /// of them runs, these reads go together in the next call. Should the server fail to read the
    /// browser from a shopper's record of the batch (not JSON: a record damaged outside the service),
    /// each of its intents reads alone (`delivery_reads_alone`), and only the
    /// damaged record's fails.
    async fn delivery_reads(
        &self,
        shopper_key: &str,
        order_id: &str,
        channel: &str,
        open_since: Option<i64>,
    ) -> Result<DeliveryReads, StoreError> {
        let ask = ReadsAsk {
            shopper_key: shopper_key.to_string(),
            order_id: order_id.to_string(),
            channel: channel.to_string(),
            open_since,
        };
        match self.reads.submit(ask).await? {
            Some(read) => read,
            None => {
                self.delivery_reads_alone(shopper_key, order_id, channel, open_since)
                    .await
            }
        }
    }
});

impl PostgresStore {
    /// One intent's first reads in one call (`forwarder_delivery_reads`, migration 0010), made apart
    /// when the server fails to read the browser from the shopper's record.
    async fn delivery_reads_alone(
        &self,
        shopper_key: &str,
        order_id: &str,
        channel: &str,
        open_since: Option<i64>,
    ) -> Result<DeliveryReads, StoreError> {
        let row: Result<shared::DeliveryReadsRow, StoreError> =
            sqlx::query_as("SELECT * FROM forwarder_delivery_reads($1, $2, $3, $4)")
                .bind(shopper_key)
                .bind(order_id)
                .bind(channel)
                .bind(open_since)
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::from);
        match row {
            Ok(row) => row.decode(order_id),
            Err(e) if e.data_exception() => {
                DeliveryReads::read_apart(self, shopper_key, order_id, channel, open_since).await
            }
            Err(e) => Err(e),
        }
    }
}

shared::operations!(PostgresStore, "convert_to(intent, 'UTF8')", {
    async fn replay_dead_letters(&self, ids: Option<&[i64]>, since_ms: Option<i64>) -> Result<u64, StoreError> {
        let now = now_ms();
        // Replayed intents keep their id, so they rejoin their shopper's queue in their original place.
        let rows = sqlx::query(
            "UPDATE intents SET state = 'pending', attempts = 0, next_attempt_at = $1, \
             claim_id = NULL, lease_until = NULL, replica_id = NULL, enrich_claim = NULL, dead_at = NULL, updated_at = $1, \
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
        let purged: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM intents WHERE state = 'dead' AND dead_at < $1 RETURNING id), \
             progress AS (DELETE FROM intent_progress WHERE intent_id IN (SELECT id FROM gone)) \
             SELECT COUNT(*) FROM gone",
        )
        .bind(before_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(purged as u64)
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

    async fn prune_shoppers(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for sql in shared::PRUNE_SHOPPERS {
            loop {
                let rows = sqlx::query(sql)
                    .bind(before_ms)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                deleted += rows;
                if rows < shared::PRUNE_BATCH {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    async fn close(&self) {
        tokio::join!(self.writer.close(), self.reads.close());
        // The heartbeats stop; the row stays. A delivery aborted at the shutdown deadline may have had
        // a CDP request in flight: what it held is taken over after `delivery.takeover_secs`, not at
        // once (a graceful shutdown gives back everything else itself).
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.task.abort();
        }
        self.pool.close().await;
    }
});

#[async_trait]
impl Ledger for PostgresStore {
    async fn claim_order_checks(&self, limit: usize, lease: Duration) -> Result<Vec<OrderCheck>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows: Vec<CheckRow> = sqlx::query_as(&format!(
            "UPDATE order_checks SET lease_until = forwarder_now_ms() + $1 WHERE order_id IN ( \
               SELECT order_id FROM order_checks WHERE due_at <= $2 AND lease_until < forwarder_now_ms() \
               ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING {CHECK_COLUMNS}"
        ))
        .bind(lease_ms)
        .bind(now_ms())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(CheckRow::decode).collect()
    }

    async fn settle_order_check(&self, order_id: &str, outcome: CheckOutcome) -> Result<(), StoreError> {
        let query = match outcome {
            CheckOutcome::Done => sqlx::query("DELETE FROM order_checks WHERE order_id = $1").bind(order_id),
            CheckOutcome::Repaired { due_at_ms } => sqlx::query(
                "UPDATE order_checks SET repairs = repairs + 1, due_at = $2, lease_until = 0, last_error = NULL \
                 WHERE order_id = $1",
            )
            .bind(order_id)
            .bind(due_at_ms),
            CheckOutcome::Retry { due_at_ms, error } => sqlx::query(
                "UPDATE order_checks SET attempts = attempts + 1, due_at = $2, lease_until = 0, last_error = $3 \
                 WHERE order_id = $1",
            )
            .bind(order_id)
            .bind(due_at_ms)
            .bind(storable_text(error)),
        };
        query.execute(&self.pool).await?;
        Ok(())
    }

    async fn lease_reconciler(&self, holder: &str, lease: Duration) -> Result<Option<Option<i64>>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "INSERT INTO reconciler AS r (name, holder, lease_until) \
             VALUES ('orders', $1, forwarder_now_ms() + $2) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until \
             WHERE r.holder = excluded.holder OR r.lease_until < forwarder_now_ms() OR r.holder IS NULL \
             RETURNING watermark",
        )
        .bind(holder)
        .bind(lease_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get::<Option<i64>, _>("watermark")))
    }

    async fn ledger_since(&self) -> Result<Option<i64>, StoreError> {
        // Migration 0006 (the reconciler's table), as sqlx recorded it.
        Ok(sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM installed_on) * 1000)::BIGINT FROM _sqlx_migrations \
             WHERE version = 6 AND success",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn advance_reconciler(&self, holder: &str, watermark_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE reconciler SET watermark = $1 \
             WHERE name = 'orders' AND holder = $2 AND lease_until >= forwarder_now_ms()",
        )
        .bind(watermark_ms)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// An error's text as PostgreSQL can store it: a text value cannot hold U+0000, which an answer
/// from CDP or OrderCloud may carry (`error_msg`), and a refused reason would leave its intent
/// impossible to settle — retried, or dead-lettered, forever.
fn storable_text(text: impl Into<String>) -> String {
    let text = text.into();
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// A delivery's writes as the arguments of `forwarder_apply`: one array per column.
#[derive(Default)]
struct ApplyArgs {
    set_plan: bool,
    plan: Option<String>,
    sent: Option<i64>,
    cart_ops: Vec<&'static str>,
    cart_orders: Vec<String>,
    cart_lines: Vec<Option<String>>,
    cart_shoppers: Vec<Option<String>>,
    cart_json: Vec<Option<String>>,
    cart_at: Vec<Option<i64>>,
    shopper_keys: Vec<String>,
    shopper_states: Vec<String>,
    shopper_identities: Vec<Option<String>>,
    session_channels: Vec<String>,
    session_browsers: Vec<String>,
    session_shoppers: Vec<String>,
    session_at: Vec<i64>,
    session_facts: Vec<String>,
    /// Landing checks: written by `forwarder_apply_durable` after its `forwarder_apply`.
    checks: Vec<OrderCheck>,
    /// The commit waits for the WAL's flush (`forwarder_apply` turns that off for its own;
    /// `forwarder_apply_durable` on again).
    durable: bool,
}

impl ApplyArgs {
    /// Whether the commit waits for the WAL's flush: the progress of a CONFIRM or a CHECKOUT (sent
    /// twice, it could be a second order), and a landing check (it comes with a CHECKOUT's).
    fn waits_for_disk(&self) -> bool {
        self.durable || !self.checks.is_empty()
    }

    fn push(&mut self, write: Write) -> Result<(), StoreError> {
        match write {
            Write::Plan(plan) => {
                self.set_plan = true;
                self.plan = plan;
                self.sent = None;
            }
            Write::Sent(sent) => self.sent = Some(sent as i64),
            Write::Session(facts) => {
                self.session_facts.push(serde_json::to_string(&facts)?);
                self.session_channels.push(facts.channel);
                self.session_browsers.push(facts.browser_id);
                self.session_shoppers.push(facts.shopper_key);
                self.session_at.push(facts.last_event_at_ms);
            }
            Write::Shopper { key, state } => {
                self.shopper_states.push(serde_json::to_string(&state)?);
                self.shopper_identities.push(state.identity);
                self.shopper_keys.push(key);
            }
            Write::CartLine(line) => {
                let json = line.line.to_string();
                self.cart(
                    "put",
                    line.order_id,
                    Some(line.line_id),
                    Some(line.shopper_key),
                    Some(json),
                    Some(line.updated_at_ms),
                );
            }
            Write::DeleteCartLine { order_id, line_id } => {
                self.cart("delete_line", order_id, Some(line_id), None, None, None)
            }
            Write::DeleteCart { order_id } => self.cart("delete_cart", order_id, None, None, None, None),
            Write::MoveCart { order_id, to_shopper } => self.cart("move", order_id, None, Some(to_shopper), None, None),
            Write::CheckOrder(check) => self.checks.push(check),
            Write::Durable => self.durable = true,
        }
        Ok(())
    }

    fn cart(
        &mut self,
        op: &'static str,
        order: String,
        line: Option<String>,
        shopper: Option<String>,
        json: Option<String>,
        at: Option<i64>,
    ) {
        self.cart_ops.push(op);
        self.cart_orders.push(order);
        self.cart_lines.push(line);
        self.cart_shoppers.push(shopper);
        self.cart_json.push(json);
        self.cart_at.push(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CONFIRM's or a CHECKOUT's progress, or a landing check, goes through the call whose commit
    /// waits for the disk (`forwarder_apply_durable`); other progress does not wait.
    #[test]
    fn a_confirms_or_checkouts_progress_and_a_landing_check_wait_for_the_disk() {
        let args = |writes: Vec<Write>| {
            let mut args = ApplyArgs::default();
            for write in writes {
                args.push(write).unwrap();
            }
            args.waits_for_disk()
        };
        assert!(!args(vec![Write::Sent(1)]));
        assert!(args(vec![Write::Sent(2), Write::Durable]));
        let check = OrderCheck {
            order_id: "o1".into(),
            shopper_key: "s1".into(),
            intent: serde_json::json!({}),
            enrichment: None,
            due_at_ms: 0,
            since_ms: 0,
            repairs: 0,
            attempts: 0,
        };
        assert!(args(vec![Write::Sent(3), Write::CheckOrder(check)]));
    }

    /// Claims made before a gap in the heartbeats longer than the takeover are lost even once the
    /// heartbeats reach the database again: another replica may hold them by then.
    #[test]
    fn a_gap_in_the_heartbeats_longer_than_the_takeover_gives_up_earlier_claims() {
        let takeover = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut beats = Beats { last: t0, epoch: 0 };
        let claimed = beats.liveness(takeover, t0).epoch;
        assert!(!beats.reached(t0 + Duration::from_secs(2), takeover));
        assert_eq!(
            beats.liveness(takeover, t0 + Duration::from_secs(3)).epoch,
            claimed,
            "beating: still ours"
        );
        // Silent from 2 s to 14 s: past 12 s the claims could be taken over...
        assert_ne!(beats.liveness(takeover, t0 + Duration::from_secs(13)).epoch, claimed);
        // ...and stay lost once a heartbeat gets through again.
        assert!(beats.reached(t0 + Duration::from_secs(14), takeover));
        let after = beats.liveness(takeover, t0 + Duration::from_secs(15));
        assert_ne!(after.epoch, claimed);
        assert_eq!(after.safe_until, t0 + Duration::from_secs(24));
        // A claim made after the gap is safe again.
        assert_eq!(
            beats.liveness(takeover, t0 + Duration::from_secs(20)).epoch,
            after.epoch
        );
    }
}
