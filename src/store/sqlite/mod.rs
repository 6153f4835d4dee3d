//! The embedded store: one SQLite file in WAL mode.
//!
//! - Every write goes through one connection owned by one thread ([`writer`]), which commits
//!   whatever arrived while it was busy in one transaction; reads use a pool of their own (WAL
//!   readers do not block the writer).
//! - A webhook is answered only after the WAL holding its commit is fsynced: one fsync for all the
//!   webhooks committed meanwhile, on a thread of its own while the writer goes on.
//! - Delivery bookkeeping (progress, session facts) is answered at commit (`synchronous =
//!   NORMAL`): durable across a process crash, and made durable by the next webhook's fsync; at
//!   worst a power loss repeats a few CDP events (delivery is at least once).
//! - One serving process per file ([`lock`]): so delivery's and enrichment's claims are kept in
//!   the process's memory ([`claims`]), not written into the file; a process that starts holds none.
//!   (Earlier versions wrote delivery's claims into the intents' rows: migration 0010 voids those.)

mod claims;
mod filter;
mod lock;
mod queues;
mod readers;
mod recent;
mod seen;
mod writer;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::shared::{self, *};
use super::*;
use crate::config::redacted_url;
use claims::Claims;
use queues::Queues;
use recent::{Recent, Touched};
use seen::{SeenKey, SeenKeys};
use writer::{BatchEnd, Writer};

/// No connection maps the file: pages are read with pread(2) into SQLite's page cache. A map
/// (16 MiB until issue 23) made every reader remap, an munmap and a TLB shootdown across the
/// cores, each time the file had grown since its last read, which a store taking webhooks always
/// has; and the pages it touched counted in the process's resident memory (peak RSS 38-41 MiB with
/// it, 23-24 without, in the quick end-to-end and backlog runs; CPU per event no higher: BENCHMARKS.md).
const MMAP_BYTES: u64 = 0;

/// Each connection's page cache, in KiB (SQLite's default is 2,000): 128 pages of 2 KiB. The
/// writer, up to eight delivery readers and the pool each kept their own 2 MB of pages, which the
/// OS page cache holds anyway; at 256 KiB peak RSS fell from 41-42 to 32 MiB end to end (37 to 28 in
/// the backlog run) with no more CPU per event (issue 23, BENCHMARKS.md). Smaller also keeps short
/// the scan of the whole cache SQLite makes at a commit after a b-tree page split.
const CACHE_KIB: u32 = 256;

/// `PRAGMA cache_size` for [`CACHE_KIB`] (a negative size counts KiB).
fn cache_size() -> String {
    format!("-{CACHE_KIB}")
}

pub struct SqliteStore {
    /// Readers for operators' and the ledger's reads.
    pool: SqlitePool,
    /// Readers for delivery's per-intent lookups, used on the calling task.
    readers: readers::Readers,
    /// Recent shoppers', sessions' and carts' records, kept in step by the writer.
    recent: Arc<Recent>,
    /// The one writer.
    writer: Writer,
    /// The LogID dedupe (used on the writer thread).
    seen: Arc<SeenKeys>,
    /// Shoppers' queues and the next intent id (used on the writer thread).
    queues: Arc<Queues>,
    /// Delivery's claims ([`claims`]): kept in memory, not in the intents' rows.
    claims: Arc<Claims>,
    /// Intents whose enrichment is under way: their claim id and until when (epoch ms). One
    /// process serves the file, so a lease needs no row written: only the writer thread reads or
    /// changes this, in the same order as the rows it guards.
    enrichment_leases: Arc<Mutex<HashMap<i64, (String, i64)>>>,
    /// Held while the service runs (`None` for operators' commands).
    lock: Mutex<Option<lock::FileLock>>,
}

impl SqliteStore {
    pub async fn open(settings: &StoreSettings, role: Role) -> anyhow::Result<SqliteStore> {
        use anyhow::Context as _;
        let busy_timeout = settings.statement_timeout().max(Duration::from_secs(1));
        let options = SqliteConnectOptions::from_str(&settings.url)
            .with_context(|| format!("store.url = {:?} is not a SQLite URL", redacted_url(&settings.url)))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy_timeout)
            .pragma("mmap_size", MMAP_BYTES.to_string())
            .pragma("cache_size", cache_size())
            // For a new file: every page a commit touches is written whole to the WAL, two system
            // calls a page. 2 KiB pages hold a webhook's intent in one overflow page and write a third
            // fewer pages than 1 KiB, and half the bytes of the default 4 KiB (measured: about 10 %
            // less CPU per webhook at intake than either).
            .page_size(2048);
        let path = options.get_filename().to_path_buf();
        // An operator's command reads the store a service made: where there is none (the wrong
        // folder: the default store.url is relative), it says so instead of making an empty one.
        if matches!(role, Role::Tool) && !path.exists() {
            anyhow::bail!(
                "no SQLite store at {} (store.url {:?}, read from the folder {}): run the command where the \
                 service runs, or give its store.url",
                path.display(),
                redacted_url(&settings.url),
                std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            );
        }
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create the folder {} for store.url", parent.display()))?;
            }
        }
        let lock = match role {
            Role::Service { .. } => Some(lock::FileLock::acquire(&path)?),
            Role::Tool => None,
        };
        if matches!(role, Role::Service { .. }) && page_caches_shared() {
            tracing::warn!(
                "SQLite was compiled with SQLITE_ENABLE_MEMORY_MANAGEMENT (a build that did not use the \
                 repository's .cargo/config.toml): every connection's page cache waits on one mutex, and \
                 delivery is slower; build from the repository's folder"
            );
        }
        {
            let migrator = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(settings.connect_timeout())
                .connect_with(options.clone())
                .await
                .with_context(|| format!("cannot open the SQLite store {:?}", redacted_url(&settings.url)))?;
            let migrations = sqlx::migrate!("migrations/sqlite");
            // An operator's command of a later version would migrate the file under the earlier
            // version's service serving it (a migration may change the tables that service uses).
            if lock.is_none() && lock::FileLock::held(&path) {
                use sqlx::migrate::Migrate as _;
                let applied = migrator.acquire().await?.list_applied_migrations().await?;
                if let Some(pending) = migrations
                    .iter()
                    .find(|m| !applied.iter().any(|a| a.version == m.version))
                {
                    anyhow::bail!(
                        "the SQLite store at {} is served by a forwarder of an earlier version (without \
                         migration {}, {}): this command would migrate it under that service. Run the \
                         command of the service's version, or upgrade the service first",
                        path.display(),
                        pending.version,
                        pending.description
                    );
                }
            }
            migrations
                .run(&migrator)
                .await
                .context("cannot migrate the SQLite store")?;
            migrator.close().await;
        }
        // Only the process serving the file sees every write (through its writer).
        let recent = Arc::new(Recent::new(lock.is_some()));
        let publishing = recent.clone();
        let claims = Arc::new(Claims::default());
        let holding = claims.clone();
        let after_batch = Box::new(move |c: &Connection, end: BatchEnd| {
            publishing.after_batch(c, end.stale);
            holding.after_batch(end.committed);
        });
        let writer = Writer::open(&path, busy_timeout, after_batch).with_context(|| {
            format!(
                "cannot open the SQLite store {:?} for writing",
                redacted_url(&settings.url)
            )
        })?;
        // No ping before each use: a SQLite connection is a file handle, and the ping is a round trip
        // to its worker thread for every statement.
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .test_before_acquire(false)
            .acquire_timeout(settings.connect_timeout())
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("cannot open the SQLite store {:?}", redacted_url(&settings.url)))?;
        let seen = Arc::new(SeenKeys::new(writer.invalidations()));
        let queues = Arc::new(Queues::new(writer.invalidations()));
        let (loading_seen, loading_queues) = (seen.clone(), queues.clone());
        writer
            .write(move |c| {
                // Prepared now, on the writer's connection that claims: a file without the index the
                // walk names (dropped or damaged by hand) stops the start, not every claim.
                c.prepare_cached(CLAIM_WALK)?;
                loading_seen.load(c)?;
                loading_queues.load(c)
            })
            .await
            .context("cannot prepare the claim's walk, or load the LogIDs seen and the shoppers' queues")?;
        Ok(SqliteStore {
            pool,
            readers: readers::Readers::new(&path, busy_timeout),
            recent,
            writer,
            seen,
            queues,
            claims,
            enrichment_leases: Arc::default(),
            lock: Mutex::new(lock),
        })
    }
}

/// One webhook as the writer thread stores it: text and flags only, built (and the webhook's
/// parts dropped) on the caller's thread, so that the one writer thread only runs SQL.
struct IntentRow {
    dedupe_key: String,
    /// `dedupe_key` as the dedupe stores it.
    seen_key: SeenKey,
    shopper_key: String,
    kind: &'static str,
    intent: String,
    secrets: Option<String>,
    enriched: bool,
    enrichment: Option<String>,
    dead_reason: Option<String>,
}

impl IntentRow {
    fn new(item: NewIntent) -> Result<IntentRow, StoreError> {
        let secrets = if item.dead_reason.is_some() || !item.needs_enrichment {
            None
        } else {
            Some(serde_json::to_string(&item.secrets)?)
        };
        Ok(IntentRow {
            kind: item.intent.kind.label(),
            intent: to_json_text(&item.intent)?,
            secrets,
            enriched: !item.needs_enrichment || item.enrichment.is_some(),
            enrichment: item.enrichment.as_ref().map(Value::to_string),
            seen_key: SeenKey::new(&item.dedupe_key),
            dedupe_key: item.dedupe_key,
            shopper_key: item.shopper_key,
            dead_reason: item.dead_reason,
        })
    }

    /// Its dedupe record, then its intent (unless the LogID was seen before).
    fn insert(&self, conn: &Connection, seen: &SeenKeys, queues: &Queues) -> Result<EnqueueOutcome, StoreError> {
        let now = now_ms();
        let Some(seen_row) = seen.check_and_store(conn, &self.seen_key, now)? else {
            return Ok(EnqueueOutcome::Duplicate);
        };
        let dead = self.dead_reason.is_some();
        let (id, shoppers_queue) = queues.place(conn, &self.shopper_key)?;
        let queue = if dead { id } else { shoppers_queue };
        conn.prepare_cached(
            "INSERT INTO intents (id, queue_id, dedupe_key, shopper_key, kind, intent, secrets, enriched, state, \
             next_attempt_at, last_error, created_at, updated_at, dead_at, enrichment) \
             VALUES (?11, ?12, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8, ?8, ?10, ?13)",
        )?
        .execute(params![
            self.dedupe_key,
            self.shopper_key,
            self.kind,
            self.intent,
            self.secrets,
            self.enriched,
            if dead { "dead" } else { "pending" },
            now,
            self.dead_reason,
            dead.then_some(now),
            id,
            queue,
            self.enrichment,
        ])?;
        seen.remember(conn, self.seen_key.clone(), seen_row, now)?;
        queues.stored(id, &self.shopper_key, (!dead).then_some(queue));
        Ok(if dead {
            EnqueueOutcome::DeadLettered(id)
        } else {
            EnqueueOutcome::Queued(id)
        })
    }
}

/// JSON text in a buffer sized once (an intent is mostly the webhook's bodies, already text), not
/// grown by doubling.
fn to_json_text(intent: &RawIntent) -> Result<String, StoreError> {
    let bodies = intent.request_body.get().len() + intent.response_body.get().len();
    let mut text = Vec::with_capacity(bodies + 1024);
    serde_json::to_writer(&mut text, intent)?;
    Ok(String::from_utf8(text).expect("serde_json writes UTF-8"))
}

/// Runs a statement that reads or returns one intent's `shopper_key`, and returns it if a row matched.
fn intent_shopper(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Option<String>, StoreError> {
    Ok(conn.prepare_cached(sql)?.query_row(params, |r| r.get(0)).optional()?)
}

/// A TEXT or BLOB column's bytes, whether or not they are UTF-8.
fn bytes(value: rusqlite::types::ValueRef<'_>) -> rusqlite::Result<Option<Vec<u8>>> {
    match value {
        rusqlite::types::ValueRef::Null => Ok(None),
        value => Ok(Some(value.as_bytes()?.to_vec())),
    }
}

/// Runs one write statement and returns how many rows it changed.
fn run(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<u64, StoreError> {
    Ok(conn.prepare_cached(sql)?.execute(params)? as u64)
}

#[async_trait]
impl Intake for SqliteStore {
    async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError> {
        let row = IntentRow::new(item)?;
        // The row comes back to be freed here: memory freed on the thread that allocated it costs
        // less than on the writer's (glibc), and the writer is the one thread every webhook waits for.
        let (seen, queues) = (self.seen.clone(), self.queues.clone());
        let (outcome, row) = self
            .writer
            .write_durable(move |c| row.insert(c, &seen, &queues).map(|outcome| (outcome, row)))
            .await?;
        drop(row);
        Ok(outcome)
    }

    async fn known_dedupe_keys(&self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        // Keys not yet merged into seen_webhooks are in seen_recent (committed with their intent).
        let list = serde_json::to_string(keys)?;
        Ok(sqlx::query_scalar(
            "SELECT dedupe_key FROM seen_webhooks WHERE dedupe_key IN (SELECT value FROM json_each(?1)) \
             UNION SELECT dedupe_key FROM seen_recent WHERE dedupe_key IN (SELECT value FROM json_each(?1))",
        )
        .bind(list)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// The claim's walk of the queue: the intents it may claim (pending, enriched, due), oldest first,
/// each the head of its shopper's queue. `?1` now, `?2` the most rows. It reads an index of the
/// pending intents that holds every column it needs (`intents_pending_walk`, migration 0011), never
/// their rows: a row's `queue_id` and `next_attempt_at` sit behind its webhook and enrichment, so
/// that reading them walked the row's overflow pages, one `pread` each, for every intent passed
/// (BENCHMARKS.md, session 24).
const CLAIM_WALK: &str = "SELECT i.id, i.queue_id, i.attempts FROM intents i INDEXED BY intents_pending_walk \
     WHERE i.state = 'pending' AND i.enriched = 1 AND i.next_attempt_at <= ?1 \
       AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.queue_id = i.queue_id \
                       AND o.state = 'pending' AND o.id < i.id) \
     ORDER BY i.id LIMIT ?2";

#[async_trait]
impl Outbox for SqliteStore {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<ClaimedIntent>, StoreError> {
        let now = now_ms();
        let claim_id = uuid::Uuid::new_v4().to_string();
        let until = now + lease.as_millis() as i64;
        let (claims, id) = (self.claims.clone(), Arc::<str>::from(claim_id.as_str()));
        let rows: Vec<ClaimedRow> = self
            .writer
            .write(move |c| {
                // Only the head of each shopper's queue is a candidate, and only while no other
                // intent of its queue is held (a replayed dead letter is older than the intent
                // running), so a shopper's intents go one at a time. The walk in id order reads past
                // at most one head per held queue: it stops after `limit` taken.
                let mut taking = claims.taking(now);
                let mut walk = c.prepare_cached(CLAIM_WALK)?;
                let mut candidates = walk.query(params![now, (limit + taking.busy_queues()) as i64])?;
                let mut read = c.prepare_cached(
                    "SELECT shopper_key, intent, enrichment, progress, sent, created_at FROM intents WHERE id = ?1",
                )?;
                let mut rows = Vec::with_capacity(limit);
                while rows.len() < limit {
                    let Some(candidate) = candidates.next()? else { break };
                    let candidate = claims::Candidate {
                        id: candidate.get(0)?,
                        queue_id: candidate.get(1)?,
                        attempts: candidate.get(2)?,
                    };
                    if !taking.free(&candidate) {
                        continue;
                    }
                    // JSON columns as bytes: a row that is not UTF-8 is dead-lettered on its own when
                    // decoded, instead of failing the whole claim.
                    let row = read.query_row(params![candidate.id], |r| {
                        Ok(ClaimedRow {
                            id: candidate.id,
                            shopper_key: r.get(0)?,
                            intent: bytes(r.get_ref(1)?)?.unwrap_or_default(),
                            enrichment: bytes(r.get_ref(2)?)?,
                            plan: bytes(r.get_ref(3)?)?,
                            sent: r.get(4)?,
                            attempts: 0,
                            created_at_ms: r.get(5)?,
                        })
                    })?;
                    let attempts = taking.take(&candidate, &row.shopper_key, &id, until);
                    rows.push(ClaimedRow { attempts, ..row });
                }
                taking.done();
                Ok(rows)
            })
            .await?;
        let (claimed, unreadable) = decode_claimed(rows, &claim_id);
        dead_letter_unreadable(self, unreadable, ClaimedFor::Delivery).await;
        Ok(claimed)
    }

    async fn extend(&self, claim: &Claim, lease: Duration) -> Result<(), StoreError> {
        self.claims.extend(claim, now_ms() + lease.as_millis() as i64)
    }

    async fn apply(&self, claim: &Claim, writes: Vec<Write>, settle: Option<Settle>) -> Result<(), StoreError> {
        let claim = claim.clone();
        let (queues, claims) = (self.queues.clone(), self.claims.clone());
        let durable = writes.contains(&Write::Durable);
        // Encoded here, not on the one writer thread.
        let writes = writes
            .into_iter()
            .filter(|w| *w != Write::Durable && w.outlives(settle.as_ref()))
            .map(EncodedWrite::new)
            .collect::<Result<Vec<_>, _>>()?;
        let recent = self.recent.clone();
        let job = move |c: &Connection| {
            let (shopper, attempt) = claims.holder(&claim)?;
            recent.stage(writes.iter().filter_map(EncodedWrite::touches));
            for write in &writes {
                write.run(c, claim.intent_id)?;
            }
            match settle {
                None => return Ok(()),
                Some(Settle::Ack) => {
                    run(c, "DELETE FROM intents WHERE id = ?1", params![claim.intent_id])?;
                    queues.left(&shopper);
                }
                Some(Settle::Retry { at_ms, error }) => {
                    run(
                        c,
                        "UPDATE intents SET next_attempt_at = ?1, last_error = ?2, attempts = ?3, updated_at = ?4 \
                         WHERE id = ?5",
                        params![at_ms, error, attempt, now_ms(), claim.intent_id],
                    )?;
                }
                Some(Settle::Dead { reason }) => {
                    run(
                        c,
                        "UPDATE intents SET state = 'dead', last_error = ?1, dead_at = ?2, updated_at = ?2, \
                             secrets = NULL, attempts = ?3 WHERE id = ?4",
                        params![reason, now_ms(), attempt, claim.intent_id],
                    )?;
                    queues.left(&shopper);
                }
            }
            claims.settled(&claim);
            Ok(())
        };
        if durable {
            self.writer.write_durable(job).await
        } else {
            self.writer.write(job).await
        }
    }

    async fn claim_enrichment(&self, limit: usize, lease: Duration) -> Result<Vec<EnrichmentJob>, StoreError> {
        let now = now_ms();
        let until = now + lease.as_millis() as i64;
        let claim_id = uuid::Uuid::new_v4().to_string();
        let leases = self.enrichment_leases.clone();
        let id = claim_id.clone();
        let rows: Vec<EnrichmentRow> = self
            .writer
            .write(move |c| {
                let mut leases = leases.lock().expect("enrichment leases lock");
                leases.retain(|_, (_, until)| *until > now);
                // INDEXED BY: walking every pending intent by id to find the few unenriched ones
                // would grow with the backlog. Leased intents are among the oldest: read past them.
                let mut stmt = c.prepare_cached(
                    "SELECT id, shopper_key, intent, secrets, enrich_attempts, created_at \
                     FROM intents INDEXED BY intents_unenriched \
                     WHERE state = 'pending' AND enriched = 0 AND enrich_after <= ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now, (limit + leases.len()) as i64], |r| {
                    Ok(EnrichmentRow {
                        id: r.get(0)?,
                        shopper_key: r.get(1)?,
                        intent: bytes(r.get_ref(2)?)?.unwrap_or_default(),
                        secrets: bytes(r.get_ref(3)?)?,
                        enrich_attempts: r.get(4)?,
                        created_at_ms: r.get(5)?,
                    })
                })?;
                let mut free = Vec::with_capacity(limit);
                for row in rows {
                    let row = row?;
                    if free.len() < limit && !leases.contains_key(&row.id) {
                        free.push(row);
                    }
                }
                for row in &free {
                    leases.insert(row.id, (id.clone(), until));
                }
                Ok(free)
            })
            .await?;
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
        let (claim, enrichment, identities) = (claim.clone(), enrichment.to_string(), identities.to_vec());
        let leases = self.enrichment_leases.clone();
        let recent = self.recent.clone();
        self.writer
            .write(move |c| {
                recent.stage(identities.iter().map(|(key, _)| Touched::Shopper(key.clone())));
                enrichment_fence(c, &leases, &claim)?;
                run(
                    c,
                    "UPDATE intents SET enrichment = ?1, enriched = 1, secrets = NULL, updated_at = ?2 WHERE id = ?3",
                    params![enrichment, now_ms(), claim.intent_id],
                )?;
                for (key, identity) in &identities {
                    run(
                        c,
                        "INSERT INTO shoppers (shopper_key, state, identity, updated_at) VALUES (?1, '{}', ?2, ?3) \
                         ON CONFLICT (shopper_key) DO UPDATE SET identity = excluded.identity, \
                         updated_at = excluded.updated_at",
                        params![key, identity, now_ms()],
                    )?;
                }
                leases.lock().expect("enrichment leases lock").remove(&claim.intent_id);
                Ok(())
            })
            .await
    }

    async fn retry_enrichment(&self, claim: &Claim, at_ms: i64, error: &str) -> Result<(), StoreError> {
        let (claim, error) = (claim.clone(), error.to_string());
        let leases = self.enrichment_leases.clone();
        self.writer
            .write(move |c| {
                enrichment_fence(c, &leases, &claim)?;
                run(
                    c,
                    "UPDATE intents SET enrich_after = ?1, enrich_attempts = enrich_attempts + 1, last_error = ?2, \
                     updated_at = ?3 WHERE id = ?4",
                    params![at_ms, error, now_ms(), claim.intent_id],
                )?;
                leases.lock().expect("enrichment leases lock").remove(&claim.intent_id);
                Ok(())
            })
            .await
    }

    async fn dead_letter_enrichment(&self, claim: &Claim, reason: &str) -> Result<(), StoreError> {
        let (claim, reason) = (claim.clone(), reason.to_string());
        let (queues, leases) = (self.queues.clone(), self.enrichment_leases.clone());
        self.writer
            .write(move |c| {
                enrichment_fence(c, &leases, &claim)?;
                let shopper = intent_shopper(
                    c,
                    "UPDATE intents SET state = 'dead', last_error = ?1, dead_at = ?2, updated_at = ?2, secrets = NULL \
                     WHERE id = ?3 RETURNING shopper_key",
                    params![reason, now_ms(), claim.intent_id],
                )?;
                if let Some(shopper) = shopper {
                    queues.left(&shopper);
                }
                leases.lock().expect("enrichment leases lock").remove(&claim.intent_id);
                Ok(())
            })
            .await
    }
}

// Each lookup takes a few microseconds on the calling task, against two thread hand-offs through
// sqlx (see `readers`).
#[async_trait]
impl Shoppers for SqliteStore {
    async fn shopper(&self, shopper_key: &str) -> Result<Option<ShopperState>, StoreError> {
        let miss = match self.recent.shopper(shopper_key) {
            Ok(known) => return known.map(shared::ShopperRow::decode).transpose(),
            Err(miss) => miss,
        };
        let read = self.readers.read(|c| recent::read_shopper(c, shopper_key))?;
        self.recent.keep_shopper(miss, shopper_key, &read);
        read.map(shared::ShopperRow::decode).transpose()
    }

    async fn session(&self, channel: &str, browser_id: &str) -> Result<Option<SessionFacts>, StoreError> {
        let miss = match self.recent.session(channel, browser_id) {
            Ok(known) => return known.map(shared::FactsRow::decode).transpose(),
            Err(miss) => miss,
        };
        let read = self.readers.read(|c| recent::read_session(c, channel, browser_id))?;
        self.recent.keep_session(miss, channel, browser_id, &read);
        read.map(shared::FactsRow::decode).transpose()
    }

    async fn sessions_of(&self, shopper_key: &str, since_ms: i64) -> Result<Vec<SessionFacts>, StoreError> {
        self.readers.read(|c| {
            let mut stmt = c.prepare_cached(shared::SESSIONS_OF)?;
            let rows = stmt.query_map(params![shopper_key, since_ms], shared::FactsRow::from_rusqlite)?;
            rows.map(|r| r.map_err(StoreError::from).and_then(shared::FactsRow::decode))
                .collect()
        })
    }

    async fn cart_lines(&self, order_id: &str) -> Result<Vec<CartLine>, StoreError> {
        let miss = match self.recent.cart(order_id) {
            Ok(known) => return known.into_iter().map(shared::CartLineRow::decode).collect(),
            Err(miss) => miss,
        };
        let read = self.readers.read(|c| recent::read_cart(c, order_id))?;
        self.recent.keep_cart(miss, order_id, &read);
        read.into_iter().map(shared::CartLineRow::decode).collect()
    }
}

shared::operations!(SqliteStore, "CAST(intent AS BLOB)", {
    async fn replay_dead_letters(&self, ids: Option<&[i64]>, since_ms: Option<i64>) -> Result<u64, StoreError> {
        let now = now_ms();
        let ids = ids.map(<[i64]>::to_vec);
        let queues = self.queues.clone();
        self.writer
            .write(move |c| {
                // Replayed intents keep their id and join their shopper's current queue, so they
                // rejoin it in their original place (ahead of anything newer).
                let set = "UPDATE intents SET state = 'pending', attempts = 0, next_attempt_at = ?1, \
                           dead_at = NULL, updated_at = ?1, \
                           enrich_after = ?1, enrich_attempts = 0, created_at = ?1 \
                           WHERE state = 'dead' AND shopper_key <> ?2";
                let returning = "RETURNING id, shopper_key";
                let mut replayed: Vec<(i64, String)> = Vec::new();
                let mut collect = |sql: String, params: &[&dyn rusqlite::ToSql]| -> Result<(), StoreError> {
                    let mut stmt = c.prepare_cached(&sql)?;
                    let rows = stmt.query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))?;
                    for row in rows {
                        replayed.push(row?);
                    }
                    Ok(())
                };
                match ids {
                    Some(ids) => {
                        for id in ids {
                            collect(
                                format!("{set} AND id = ?3 {returning}"),
                                params![now, UNIDENTIFIED_SHOPPER, id],
                            )?;
                        }
                    }
                    None => collect(
                        format!("{set} AND dead_at >= ?3 {returning}"),
                        params![now, UNIDENTIFIED_SHOPPER, since_ms.unwrap_or(i64::MIN)],
                    )?,
                }
                replayed.sort();
                for (id, shopper) in &replayed {
                    let queue = queues.rejoin(c, shopper, *id)?;
                    run(c, "UPDATE intents SET queue_id = ?1 WHERE id = ?2", params![queue, id])?;
                }
                Ok(replayed.len() as u64)
            })
            .await
    }

    async fn purge_dead_letters(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.writer
            .write(move |c| {
                run(
                    c,
                    "DELETE FROM intents WHERE state = 'dead' AND dead_at < ?1",
                    params![before_ms],
                )
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if !self.writer.is_open() {
            return Err(StoreError::Unavailable("store is closed".into()));
        }
        self.writer
            .write(|c| {
                run(
                    c,
                    "INSERT INTO health (id, checked_at) VALUES (1, ?1) \
                     ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                    params![now_ms()],
                )
                .map(drop)
            })
            .await
    }

    async fn prune_dedupe(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.writer
            .write(move |c| run(c, "DELETE FROM seen_webhooks WHERE seen_at < ?1", params![before_ms]))
            .await
    }

    async fn prune_shoppers(&self, before_ms: i64) -> Result<u64, StoreError> {
        // A batch at a time, each a write of its own: intake's commits go in between.
        let mut deleted = 0;
        for sql in shared::PRUNE_SHOPPERS {
            loop {
                let rows = self.writer.write(move |c| run(c, sql, params![before_ms])).await?;
                deleted += rows;
                if rows < shared::PRUNE_BATCH {
                    break;
                }
            }
        }
        if deleted > 0 {
            // Lookups read the file again: what memory kept of a deleted record goes with it.
            self.recent.forget();
        }
        Ok(deleted)
    }

    async fn close(&self) {
        // The readers first: the last connection to close removes the WAL, which a read-only one
        // cannot do.
        self.recent.close();
        self.readers.close();
        self.pool.close().await;
        self.writer.close().await;
        self.lock.lock().expect("lock holder").take();
    }
});

#[async_trait]
impl Ledger for SqliteStore {
    async fn lease_reconciler(&self, holder: &str, lease: Duration) -> Result<Option<Option<i64>>, StoreError> {
        let holder = holder.to_string();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.writer
            .write(move |c| {
                let now = now_ms();
                c.prepare_cached(
                    "INSERT INTO reconciler (name, holder, lease_until) VALUES ('orders', ?1, ?2) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until \
                     WHERE reconciler.holder = excluded.holder OR reconciler.lease_until < ?3 \
                        OR reconciler.holder IS NULL",
                )?
                .execute(params![holder, now.saturating_add(lease_ms), now])?;
                let (current, watermark): (Option<String>, Option<i64>) = c
                    .prepare_cached("SELECT holder, watermark FROM reconciler WHERE name = 'orders'")?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok((current.as_deref() == Some(holder.as_str())).then_some(watermark))
            })
            .await
    }

    async fn ledger_since(&self) -> Result<Option<i64>, StoreError> {
        // Migration 0009 (the reconciler's table); sqlx records when it ran, to the second: the end
        // of that second, so that no submit taken before the migration (keyed by its LogID) is
        // counted in the ledger and sent again. A submit whose webhook was lost in the migration's
        // own second is left out instead.
        Ok(sqlx::query_scalar(
            "SELECT CAST((julianday(installed_on) - 2440587.5) * 86400000 AS INTEGER) + 999 \
             FROM _sqlx_migrations WHERE version = 9 AND success",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn advance_reconciler(&self, holder: &str, watermark_ms: i64) -> Result<bool, StoreError> {
        let holder = holder.to_string();
        self.writer
            .write(move |c| {
                run(
                    c,
                    "UPDATE reconciler SET watermark = ?1 WHERE name = 'orders' AND holder = ?2 AND lease_until >= ?3",
                    params![watermark_ms, holder, now_ms()],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn claim_order_checks(&self, limit: usize, lease: Duration) -> Result<Vec<OrderCheck>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .writer
            .write(move |c| {
                let now = now_ms();
                let mut stmt = c.prepare_cached(&format!(
                    "UPDATE order_checks SET lease_until = ?1 WHERE order_id IN ( \
                       SELECT order_id FROM order_checks WHERE due_at <= ?2 AND lease_until < ?2 \
                       ORDER BY due_at LIMIT ?3) \
                     RETURNING {CHECK_COLUMNS}"
                ))?;
                let rows = stmt
                    .query_map(
                        params![now.saturating_add(lease_ms), now, limit as i64],
                        CheckRow::from_rusqlite,
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        rows.into_iter().map(CheckRow::decode).collect()
    }

    async fn settle_order_check(&self, order_id: &str, outcome: CheckOutcome) -> Result<(), StoreError> {
        let order_id = order_id.to_string();
        self.writer
            .write(move |c| {
                match outcome {
                    CheckOutcome::Done => run(c, "DELETE FROM order_checks WHERE order_id = ?1", params![order_id]),
                    CheckOutcome::Repaired { due_at_ms } => run(
                        c,
                        "UPDATE order_checks SET repairs = repairs + 1, due_at = ?2, lease_until = 0, \
                         last_error = NULL WHERE order_id = ?1",
                        params![order_id, due_at_ms],
                    ),
                    CheckOutcome::Retry { due_at_ms, error } => run(
                        c,
                        "UPDATE order_checks SET attempts = attempts + 1, due_at = ?2, lease_until = 0, \
                         last_error = ?3 WHERE order_id = ?1",
                        params![order_id, due_at_ms, error],
                    ),
                }
                .map(drop)
            })
            .await
    }
}

/// A delivery's write, encoded off the writer thread, run on it.
enum EncodedWrite {
    Plan(Option<String>),
    Sent(i64),
    Session {
        facts: SessionFacts,
        json: String,
    },
    Shopper {
        key: String,
        json: String,
        identity: Option<String>,
    },
    CartLine {
        line: CartLine,
        json: String,
    },
    DeleteCartLine {
        order_id: String,
        line_id: String,
    },
    DeleteCart {
        order_id: String,
    },
    MoveCart {
        order_id: String,
        to_shopper: String,
    },
    CheckOrder {
        check: OrderCheck,
        intent: String,
        enrichment: Option<String>,
    },
}

impl EncodedWrite {
    fn new(write: Write) -> Result<EncodedWrite, StoreError> {
        Ok(match write {
            Write::Plan(plan) => EncodedWrite::Plan(plan),
            Write::Sent(sent) => EncodedWrite::Sent(sent as i64),
            Write::Session(facts) => EncodedWrite::Session {
                json: serde_json::to_string(&facts)?,
                facts,
            },
            Write::Shopper { key, state } => EncodedWrite::Shopper {
                json: serde_json::to_string(&state)?,
                identity: state.identity,
                key,
            },
            Write::CartLine(line) => EncodedWrite::CartLine {
                json: line.line.to_string(),
                line,
            },
            Write::DeleteCartLine { order_id, line_id } => EncodedWrite::DeleteCartLine { order_id, line_id },
            Write::DeleteCart { order_id } => EncodedWrite::DeleteCart { order_id },
            Write::MoveCart { order_id, to_shopper } => EncodedWrite::MoveCart { order_id, to_shopper },
            Write::Durable => unreachable!("taken out before encoding"),
            Write::CheckOrder(check) => EncodedWrite::CheckOrder {
                intent: check.intent.to_string(),
                enrichment: check.enrichment.as_ref().map(Value::to_string),
                check,
            },
        })
    }

    /// The record kept in memory ([`recent`]) this write changes, if any.
    fn touches(&self) -> Option<Touched> {
        match self {
            EncodedWrite::Session { facts, .. } => {
                Some(Touched::Session(facts.channel.clone(), facts.browser_id.clone()))
            }
            EncodedWrite::Shopper { key, .. } => Some(Touched::Shopper(key.clone())),
            EncodedWrite::CartLine { line, .. } => Some(Touched::Cart(line.order_id.clone())),
            EncodedWrite::DeleteCartLine { order_id, .. }
            | EncodedWrite::DeleteCart { order_id }
            | EncodedWrite::MoveCart { order_id, .. } => Some(Touched::Cart(order_id.clone())),
            EncodedWrite::Plan(_) | EncodedWrite::Sent(_) | EncodedWrite::CheckOrder { .. } => None,
        }
    }

    fn run(&self, c: &Connection, intent_id: i64) -> Result<(), StoreError> {
        match self {
            EncodedWrite::Plan(plan) => run(
                c,
                "UPDATE intents SET progress = ?1, sent = 0, updated_at = ?2 WHERE id = ?3",
                params![plan, now_ms(), intent_id],
            ),
            EncodedWrite::Sent(sent) => run(
                c,
                "UPDATE intents SET sent = ?1, updated_at = ?2 WHERE id = ?3",
                params![sent, now_ms(), intent_id],
            ),
            EncodedWrite::Session { facts, json } => run(
                c,
                "INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (channel, browser_id) DO UPDATE SET shopper_key = excluded.shopper_key, \
                 last_event_at = excluded.last_event_at, facts = excluded.facts",
                params![facts.channel, facts.browser_id, facts.shopper_key, facts.last_event_at_ms, json],
            ),
            EncodedWrite::Shopper { key, json, identity } => run(
                c,
                "INSERT INTO shoppers (shopper_key, state, identity, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (shopper_key) DO UPDATE SET state = excluded.state, \
                 identity = COALESCE(excluded.identity, shoppers.identity), updated_at = excluded.updated_at",
                params![key, json, identity, now_ms()],
            ),
            EncodedWrite::CartLine { line, json } => run(
                c,
                "INSERT INTO cart_lines (order_id, line_id, shopper_key, line, updated_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (order_id, line_id) DO UPDATE SET shopper_key = excluded.shopper_key, \
                 line = excluded.line, updated_at = excluded.updated_at",
                params![line.order_id, line.line_id, line.shopper_key, json, line.updated_at_ms],
            ),
            EncodedWrite::DeleteCartLine { order_id, line_id } => run(
                c,
                "DELETE FROM cart_lines WHERE order_id = ?1 AND line_id = ?2",
                params![order_id, line_id],
            ),
            EncodedWrite::DeleteCart { order_id } => {
                run(c, "DELETE FROM cart_lines WHERE order_id = ?1", params![order_id])
            }
            EncodedWrite::MoveCart { order_id, to_shopper } => run(
                c,
                "UPDATE cart_lines SET shopper_key = ?1 WHERE order_id = ?2",
                params![to_shopper, order_id],
            ),
            EncodedWrite::CheckOrder {
                check,
                intent,
                enrichment,
            } => run(
                c,
                ORDER_CHECK_UPSERT,
                params![check.order_id, check.shopper_key, intent, enrichment, check.due_at_ms],
            ),
        }
        .map(drop)
    }
}

/// Refuses an enrichment write unless `claim` still holds the job and the intent still waits
/// for its reads.
fn enrichment_fence(
    c: &Connection,
    leases: &Mutex<HashMap<i64, (String, i64)>>,
    claim: &Claim,
) -> Result<(), StoreError> {
    let held = leases
        .lock()
        .expect("enrichment leases lock")
        .get(&claim.intent_id)
        .is_some_and(|(id, _)| *id == claim.claim_id);
    let waiting = c
        .prepare_cached("SELECT 1 FROM intents WHERE id = ?1 AND state = 'pending' AND enriched = 0")?
        .exists(params![claim.intent_id])?;
    if held && waiting {
        Ok(())
    } else {
        Err(StoreError::StaleClaim(claim.intent_id))
    }
}

/// Whether the SQLite linked in was compiled with `SQLITE_ENABLE_MEMORY_MANAGEMENT`, which puts the
/// page caches of all connections behind one mutex. The repository's `.cargo/config.toml` compiles it
/// without; a build made elsewhere (`cargo install`, another folder) may not, and the service says so.
fn page_caches_shared() -> bool {
    Connection::open_in_memory()
        .and_then(|c| {
            c.query_row(
                "SELECT sqlite_compileoption_used('ENABLE_MEMORY_MANAGEMENT')",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    /// The SQLite migrations, in order.
    const MIGRATIONS: [&str; 11] = [
        include_str!("../../../migrations/sqlite/0001_initial.sql"),
        include_str!("../../../migrations/sqlite/0002_pending_by_id.sql"),
        include_str!("../../../migrations/sqlite/0003_unenriched_by_id.sql"),
        include_str!("../../../migrations/sqlite/0004_guid_dedupe_keys.sql"),
        include_str!("../../../migrations/sqlite/0005_seen_recent.sql"),
        include_str!("../../../migrations/sqlite/0006_shopper_queues.sql"),
        include_str!("../../../migrations/sqlite/0007_queues_in_memory.sql"),
        include_str!("../../../migrations/sqlite/0008_progress_per_event.sql"),
        include_str!("../../../migrations/sqlite/0009_reconciler.sql"),
        include_str!("../../../migrations/sqlite/0010_claims_in_memory.sql"),
        include_str!("../../../migrations/sqlite/0011_claim_walk_covered.sql"),
    ];

    /// An in-memory database with the first `migrations` of the store's schema applied.
    pub(super) fn database(migrations: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..migrations] {
            conn.execute_batch(sql).unwrap();
        }
        conn
    }

    /// The rows of a two-column query.
    fn pairs<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql>(conn: &Connection, sql: &str) -> Vec<(A, B)> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The bundled SQLite is compiled without `SQLITE_ENABLE_MEMORY_MANAGEMENT` (`.cargo/config.toml`):
    /// with it, the page caches of every connection are one group behind one global mutex, and the
    /// writer and delivery's readers wait on each other for each page they touch (half as many futex
    /// calls again per delivered event, BENCHMARKS.md session 22).
    #[test]
    fn each_connection_keeps_its_own_page_cache() {
        assert!(
            !super::page_caches_shared(),
            "SQLite was built with SQLITE_ENABLE_MEMORY_MANAGEMENT: is .cargo/config.toml used?"
        );
    }

    /// The steps of `sql`'s plan, as `EXPLAIN QUERY PLAN` details them.
    fn plan_of(conn: &Connection, sql: &str, params: &[i64]) -> Vec<String> {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The claim's walk of the queue reads an index that holds every column it needs, never the
    /// intents' rows (whose webhooks and enrichments span overflow pages it would read for each
    /// intent passed), and in id order with no sort, however the statistics stand.
    #[test]
    fn the_claims_walk_reads_an_index_of_what_it_needs_not_the_rows() {
        let conn = database(MIGRATIONS.len());
        for analyzed in [false, true] {
            if analyzed {
                // Statistics of a queue: a few shoppers' pending intents, some enriched, behind dead
                // letters.
                conn.execute_batch(
                    "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 300) \
                     INSERT INTO intents (id, queue_id, dedupe_key, shopper_key, kind, intent, enriched, state, \
                       next_attempt_at, created_at, updated_at, dead_at) \
                     SELECT n, n % 7, 'd' || n, 's' || (n % 7), 'k', '{}', n % 2, \
                       CASE WHEN n < 200 THEN 'dead' ELSE 'pending' END, 0, n, n, \
                       CASE WHEN n < 200 THEN n END FROM g; \
                     ANALYZE",
                )
                .unwrap();
            }
            let plan = plan_of(&conn, super::CLAIM_WALK, &[0, 10]);
            assert_eq!(
                plan,
                [
                    "SCAN i USING COVERING INDEX intents_pending_walk",
                    "CORRELATED SCALAR SUBQUERY 1",
                    "SEARCH o USING COVERING INDEX intents_by_queue (queue_id=? AND id<?)"
                ],
                "analyzed: {analyzed}"
            );
            // The operators' list of the queue still reads indexes, not the whole table.
            let pending = plan_of(&conn, crate::store::shared::PENDING, &[10]);
            assert!(pending.iter().all(|step| step != "SCAN intents"), "{pending:?}");
            // Nor do the queue's gauges (every 5 s): the pending intents' count and oldest age come
            // from the index, not from every pending row.
            let stats = plan_of(&conn, crate::store::shared::STATS, &[]);
            // The counts and the oldest age read indexes alone.
            let reads: Vec<&String> = stats.iter().filter(|s| s.contains(" intents ")).collect();
            assert_eq!(reads.len(), 3, "{stats:?}");
            assert!(reads.iter().all(|s| s.contains("COVERING INDEX")), "{stats:?}");
        }
    }

    /// Migration 0010 voids the delivery claims earlier versions wrote into the intents' rows.
    #[test]
    fn the_claims_an_earlier_version_wrote_into_the_file_are_voided_with_their_index() {
        let conn = database(9);
        conn.execute(
            "INSERT INTO intents (id, queue_id, dedupe_key, shopper_key, kind, intent, state, next_attempt_at, \
             claim_id, lease_until, created_at, updated_at) VALUES (1, 1, 'd', 's1', 'k', '{}', 'pending', 0, \
             'held', 9999999999999, 0, 0)",
            [],
        )
        .unwrap();
        conn.execute_batch(MIGRATIONS[9]).unwrap();
        let claims: Vec<(Option<String>, Option<i64>)> = pairs(&conn, "SELECT claim_id, lease_until FROM intents");
        assert_eq!(claims, [(None, None)]);
        let index: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'intents_claimed'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 0);
    }

    /// Migration 0006 puts each shopper's pending intents in one queue, numbered by the oldest.
    #[test]
    fn the_queue_migration_numbers_each_shoppers_pending_intents_by_the_oldest() {
        let conn = database(5);
        for (id, shopper, state) in [
            (1, "s1", "dead"),
            (2, "s1", "pending"),
            (3, "s2", "pending"),
            (4, "s1", "pending"),
        ] {
            conn.execute(
                "INSERT INTO intents (id, dedupe_key, shopper_key, kind, intent, state, next_attempt_at, created_at, \
                 updated_at) VALUES (?1, ?1, ?2, 'k', '{}', ?3, 0, 0, 0)",
                rusqlite::params![id, shopper, state],
            )
            .unwrap();
        }
        conn.execute_batch(MIGRATIONS[5]).unwrap();
        let queues: Vec<(i64, i64)> = pairs(&conn, "SELECT id, queue_id FROM intents ORDER BY id");
        assert_eq!(queues, [(1, 1), (2, 2), (3, 3), (4, 2)]);
        let current: Vec<(String, i64)> = pairs(&conn, "SELECT shopper_key, queue_id FROM shopper_queues ORDER BY 1");
        assert_eq!(current, [("s1".to_string(), 2), ("s2".to_string(), 3)]);
    }
}
