//! The LogID dedupe of the SQLite store, written so that a webhook's key costs no random page.
//!
//! LogIDs are random GUIDs: inserted one by one into a keyed index, each lands on a leaf of its
//! own, and every commit writes each such leaf whole to the WAL (then the checkpoint copies it
//! again). So a new key is only appended to `seen_recent` (no index: the keys of a batch share its
//! last page) and remembered in memory. Once [`MERGE_AT`] keys are remembered, they are merged
//! into `seen_webhooks` (the keyed index, pruned by age) in key order, [`MERGE_PER_WEBHOOK`] with
//! each following webhook: neighbouring keys share leaves, so a merged key costs a fraction of a
//! page. A key is looked up in memory, then in a Bloom filter of `seen_webhooks` ([`KeyFilter`],
//! built from the table at start and again, larger, when full), then, when the filter says "maybe",
//! in `seen_webhooks` itself.
//!
//! That fraction is the index's leaves over [`MERGE_AT`]: a 2 KiB leaf holds about 65 keys, so once
//! `seen_webhooks` holds more than about 65 × [`MERGE_AT`] keys (a million: a week's retention at
//! under two webhooks a second), each merged key lands on a leaf of its own, as a direct insert
//! would — later, in key order, and never more than one page a key (BENCHMARKS.md).
//!
//! Memory mirrors `seen_recent`, which is the truth: it is loaded at start, and loaded again after
//! any batch that did not commit (its keys may have been remembered but not stored) or after another
//! connection committed (the writer's invalidations). All of this runs on the writer thread, inside
//! the writer's transactions.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection};

use super::filter::KeyFilter;
use crate::store::StoreError;

/// Remembered keys that start a merge.
const MERGE_AT: usize = 16_384;
/// Keys merged with each webhook while a merge runs: a merge ends long before the next one is due.
const MERGE_PER_WEBHOOK: usize = 8;

/// A dedupe key as stored: a LogID in OrderCloud's GUID form as its 16 bytes, anything else as
/// its text. The order is SQLite's (text before blobs, each by its bytes), so merges walk
/// `seen_webhooks` in index order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SeenKey {
    Text(String),
    Guid([u8; 16]),
}

impl SeenKey {
    pub fn new(dedupe_key: &str) -> SeenKey {
        match uuid::Uuid::try_parse(dedupe_key) {
            Ok(guid) if dedupe_key.len() == 36 => SeenKey::Guid(guid.into_bytes()),
            _ => SeenKey::Text(dedupe_key.to_string()),
        }
    }

    fn from_sql(value: ValueRef<'_>) -> Result<SeenKey, StoreError> {
        match value {
            ValueRef::Text(t) => Ok(SeenKey::Text(String::from_utf8_lossy(t).into_owned())),
            ValueRef::Blob(b) => b
                .try_into()
                .map(SeenKey::Guid)
                .map_err(|_| StoreError::Corrupt(format!("a {}-byte dedupe key", b.len()))),
            other => Err(StoreError::Corrupt(format!(
                "a dedupe key of type {:?}",
                other.data_type()
            ))),
        }
    }
}

impl ToSql for SeenKey {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            SeenKey::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            SeenKey::Guid(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

pub(super) struct SeenKeys {
    memory: Mutex<Memory>,
    /// The writer's count of times memory may have gone stale ([`super::writer::Writer::invalidations`]).
    invalidations: Arc<AtomicU64>,
}

#[derive(Default)]
struct Memory {
    /// Keys in `seen_recent` not yet being merged.
    recent: BTreeSet<SeenKey>,
    /// Keys being merged, smallest first; their `seen_recent` rows go once all are merged.
    merging: BTreeSet<SeenKey>,
    /// `seen_recent` rows up to this rowid are `merging`'s.
    merging_upto: i64,
    /// When the merge started: the `seen_at` of every key it merges, so that they land in key
    /// order in the age index too (a key is kept a little longer than its retention, never less).
    merging_seen_at: i64,
    /// `invalidations` when memory last matched `seen_recent`; `None`: load it again.
    in_sync_at: Option<u64>,
    /// Every key in `seen_webhooks` (and some no longer there); `None`: build it.
    filter: Option<KeyFilter>,
}

impl SeenKeys {
    pub fn new(invalidations: Arc<AtomicU64>) -> SeenKeys {
        SeenKeys {
            memory: Mutex::new(Memory::default()),
            invalidations,
        }
    }

    /// Whether `key` was seen before. If not, stores it (in the caller's savepoint): the caller
    /// then stores its intent and calls [`SeenKeys::remember`].
    pub fn check_and_store(&self, conn: &Connection, key: &SeenKey, now: i64) -> Result<Option<i64>, StoreError> {
        let mut memory = self.memory.lock().expect("seen keys lock");
        self.sync(&mut memory, conn)?;
        if memory.recent.contains(key) || memory.merging.contains(key) {
            return Ok(None);
        }
        let known = memory.filter.as_ref().is_none_or(|f| f.may_contain(key))
            && conn
                .prepare_cached("SELECT 1 FROM seen_webhooks WHERE dedupe_key = ?1")?
                .exists(params![key])?;
        if known {
            return Ok(None);
        }
        conn.prepare_cached("INSERT INTO seen_recent (dedupe_key, seen_at) VALUES (?1, ?2)")?
            .execute(params![key, now])?;
        Ok(Some(conn.last_insert_rowid()))
    }

    /// Remembers a key stored by [`SeenKeys::check_and_store`] (at `rowid`) once its webhook is
    /// stored too, and merges a few remembered keys into `seen_webhooks`.
    pub fn remember(&self, conn: &Connection, key: SeenKey, rowid: i64, now: i64) -> Result<(), StoreError> {
        let mut memory = self.memory.lock().expect("seen keys lock");
        memory.recent.insert(key);
        if memory.merging.is_empty() && memory.recent.len() >= MERGE_AT {
            memory.merging = std::mem::take(&mut memory.recent);
            memory.merging_upto = rowid;
            memory.merging_seen_at = now;
        }
        if memory.merging.is_empty() {
            return Ok(());
        }
        let merged = Self::merge_some(&mut memory, conn);
        if merged.is_err() {
            // Keys taken out of `merging` were not stored: load memory again.
            memory.in_sync_at = None;
        }
        merged
    }

    fn merge_some(memory: &mut Memory, conn: &Connection) -> Result<(), StoreError> {
        let mut insert =
            conn.prepare_cached("INSERT OR IGNORE INTO seen_webhooks (dedupe_key, seen_at) VALUES (?1, ?2)")?;
        for _ in 0..MERGE_PER_WEBHOOK {
            let Some(key) = memory.merging.pop_first() else { break };
            insert.execute(params![key, memory.merging_seen_at])?;
            if let Some(filter) = &mut memory.filter {
                filter.insert(&key);
            }
        }
        if memory.merging.is_empty() {
            conn.prepare_cached("DELETE FROM seen_recent WHERE rowid <= ?1")?
                .execute(params![memory.merging_upto])?;
        }
        Ok(())
    }

    /// Loads memory from `seen_recent` at first use and whenever it may be stale, and
    /// builds the filter when there is none or it is full.
    fn sync(&self, memory: &mut Memory, conn: &Connection) -> Result<(), StoreError> {
        if memory.filter.as_ref().is_none_or(KeyFilter::is_full) {
            memory.filter = Some(Self::build_filter(conn)?);
        }
        let invalidations = self.invalidations.load(Ordering::Acquire);
        if memory.in_sync_at == Some(invalidations) {
            return Ok(());
        }
        let mut recent = BTreeSet::new();
        let mut keys = conn.prepare_cached("SELECT dedupe_key FROM seen_recent")?;
        let mut rows = keys.query([])?;
        while let Some(row) = rows.next()? {
            recent.insert(SeenKey::from_sql(row.get_ref(0)?)?);
        }
        // The filter stays: keys a rolled-back merge put in it only make "maybe" likelier.
        *memory = Memory {
            recent,
            in_sync_at: Some(invalidations),
            filter: memory.filter.take(),
            ..Memory::default()
        };
        Ok(())
    }

    /// Loads memory (and builds the filter) now rather than at the first webhook: reading a
    /// week of LogIDs takes a fraction of a second per million.
    pub fn load(&self, conn: &Connection) -> Result<(), StoreError> {
        self.sync(&mut self.memory.lock().expect("seen keys lock"), conn)
    }

    fn build_filter(conn: &Connection) -> Result<KeyFilter, StoreError> {
        let keys: i64 = conn.query_row("SELECT COUNT(*) FROM seen_webhooks", [], |r| r.get(0))?;
        let mut filter = KeyFilter::for_keys(keys.max(0) as u64);
        let mut stmt = conn.prepare("SELECT dedupe_key FROM seen_webhooks")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            filter.insert(&SeenKey::from_sql(row.get_ref(0)?)?);
        }
        Ok(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::database;
    use super::*;

    fn guid(i: u128) -> SeenKey {
        SeenKey::new(&uuid::Uuid::from_u128(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)).to_string())
    }

    /// Stores `key` as a webhook would; `true` when it was new.
    fn store(seen: &SeenKeys, conn: &Connection, key: &SeenKey) -> bool {
        match seen.check_and_store(conn, key, 1_000).unwrap() {
            Some(row) => {
                seen.remember(conn, key.clone(), row, 1_000).unwrap();
                true
            }
            None => false,
        }
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn keys_are_recognised_before_during_and_after_a_merge_and_after_a_restart() {
        let conn = database(6);
        let seen = SeenKeys::new(Arc::default());
        let total = (MERGE_AT + MERGE_AT / MERGE_PER_WEBHOOK + 100) as u128;
        for i in 0..total {
            assert!(store(&seen, &conn, &guid(i)), "key {i} is new");
            if i % 997 == 0 {
                assert!(!store(&seen, &conn, &guid(i)), "key {i} again, right away");
                assert!(!store(&seen, &conn, &guid(i / 2)), "key {} again, later", i / 2);
            }
        }
        assert_eq!(
            count(&conn, "seen_webhooks"),
            MERGE_AT as i64,
            "the first keys were merged"
        );
        assert_eq!(
            count(&conn, "seen_recent"),
            total as i64 - MERGE_AT as i64,
            "and left seen_recent"
        );
        let ages: Vec<i64> = conn
            .prepare("SELECT DISTINCT seen_at FROM seen_webhooks")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ages, [1_000], "merged keys carry the merge's start as their age");
        let restarted = SeenKeys::new(Arc::default());
        for i in 0..total {
            assert!(!store(&restarted, &conn, &guid(i)), "key {i} after a restart");
        }
        assert!(store(&restarted, &conn, &guid(total)));
    }

    /// The filter answers for `seen_webhooks`: a new key does not read the index, so a key written
    /// there behind the filter's back (nothing does so) is found only once the filter is built again,
    /// as at every start.
    #[test]
    fn new_keys_are_answered_by_the_filter_without_reading_the_index() {
        let conn = database(6);
        let behind_the_back = |key: SeenKey| {
            let sql = "INSERT INTO seen_webhooks (dedupe_key, seen_at) VALUES (?1, 1000)";
            conn.execute(sql, params![key]).unwrap()
        };
        let seen = SeenKeys::new(Arc::default());
        seen.load(&conn).unwrap();
        behind_the_back(guid(7));
        assert!(store(&seen, &conn, &guid(7)), "taken for new: the index was not read");
        behind_the_back(guid(9));
        let restarted = SeenKeys::new(Arc::default());
        restarted.load(&conn).unwrap();
        assert!(!store(&restarted, &conn, &guid(9)), "the rebuilt filter knows the key");
        assert!(store(&restarted, &conn, &guid(8)));
    }

    #[test]
    fn keys_of_a_batch_that_did_not_commit_are_forgotten() {
        let conn = database(6);
        let failures = Arc::new(AtomicU64::new(0));
        let seen = SeenKeys::new(failures.clone());
        assert!(store(&seen, &conn, &guid(1)));
        conn.execute_batch("BEGIN").unwrap();
        assert!(store(&seen, &conn, &guid(2)));
        assert!(!store(&seen, &conn, &guid(2)), "seen within its own batch");
        conn.execute_batch("ROLLBACK").unwrap();
        // What the writer does when a batch does not commit.
        failures.fetch_add(1, Ordering::Release);
        assert!(store(&seen, &conn, &guid(2)), "the rolled-back key is new again");
        assert!(!store(&seen, &conn, &guid(1)), "the committed one is still known");
    }

    #[test]
    fn keys_sort_as_sqlite_sorts_them() {
        let conn = Connection::open_in_memory().unwrap();
        let keys = [
            SeenKey::new("71ce120a-17d5-4833-89f6-4f9a33ddd42f"),
            SeenKey::new("sha256:ab"),
            SeenKey::new("0b7f8c3e-5d2a-4e61-9c0f-2a4b6d8e1f37"),
            SeenKey::new("LOG-7"),
            SeenKey::new("log-7"),
        ];
        conn.execute_batch("CREATE TABLE k (key BLOB NOT NULL)").unwrap();
        for key in &keys {
            conn.execute("INSERT INTO k (key) VALUES (?1)", [key]).unwrap();
        }
        let by_sqlite: Vec<SeenKey> = conn
            .prepare("SELECT key FROM k ORDER BY key")
            .unwrap()
            .query_map([], |r| Ok(SeenKey::from_sql(r.get_ref(0)?).unwrap()))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut by_rust = keys.to_vec();
        by_rust.sort();
        assert_eq!(by_sqlite, by_rust);
        assert!(matches!(keys[0], SeenKey::Guid(_)));
        assert_eq!(keys[0], SeenKey::new("71CE120A-17D5-4833-89F6-4F9A33DDD42F"));
        assert_ne!(keys[3], keys[4], "keys that are not GUIDs compare exactly");
    }
}
