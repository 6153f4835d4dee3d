//! Delivery's lookups of recent shoppers, sessions and carts, answered from memory.
//!
//! Each delivered intent reads its shopper's record, the session its events go to and the record
//! of its cart, and the intent before it (of the same shopper, a moment earlier) has just written
//! all three. Read from SQLite, each lookup is a read transaction that finds the file changed since
//! its connection's last one (the writer commits every few milliseconds), drops that connection's
//! page cache and reads its pages again: a fifth of the service's CPU per delivered event in issue
//! 23's profile.
//!
//! One process writes the file, through the one writer thread, so the writer can keep this in step
//! with what it commits:
//! - a write to one of these records *stages* its key ([`Recent::stage`]) in the batch that runs it;
//! - after the batch, before any of its callers is answered, the writer reads each staged key back
//!   on its own connection (its pages are in its cache) and publishes what it read
//!   ([`Recent::after_batch`]). What it publishes is what a read from the file returns, failed or
//!   rolled-back writes included (they read back as they were);
//! - a batch that did not commit, or another connection's commit (an operator's command on the same
//!   file), empties the memory instead.
//!
//! What is kept is the rows as read, decoded by each lookup on its own task: the writer thread only
//! fetches them (its pages are cached), and raw JSON takes less memory than decoded records.
//!
//! A lookup that misses reads the file and keeps what it read only if nothing was published
//! meanwhile (a read from before a commit must not outlive its publication). So a lookup made after
//! a write was answered always sees that write. Each kind keeps at most [`CAPACITY`] entries and is
//! emptied when full. Only the service keeps this memory; operators' commands read the file.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension as _};

use crate::store::shared::{self, CartLineRow, FactsRow, ShopperRow};
use crate::store::StoreError;

/// Entries kept of each kind (shoppers, sessions, carts): enough for the shoppers active at once
/// in a busy shop. A count, not bytes: a few MiB with carts of a few lines (the benchmarks' peak RSS
/// grew by 2-3 MiB), more with very large carts.
pub const CAPACITY: usize = 2048;

/// A record a write touched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Touched {
    Shopper(String),
    /// (channel, browser id)
    Session(String, String),
    /// The record of an order's lines.
    Cart(String),
}

pub struct Recent {
    /// Off for operators' commands, and once the store is closed (lookups then go to the closed
    /// readers, and fail).
    enabled: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Grows with every publication: a miss keeps what it read only if this has not changed.
    version: u64,
    shoppers: HashMap<String, Option<ShopperRow>>,
    sessions: HashMap<(String, String), Option<FactsRow>>,
    carts: HashMap<String, Vec<CartLineRow>>,
    /// Touched by the batch under way.
    staged: Vec<Touched>,
}

/// The version a miss started at, to keep what it read with [`Recent::keep_shopper`] and the like.
#[derive(Debug, Clone, Copy)]
pub struct Miss(u64);

impl Recent {
    /// `enabled` only for the process that serves the file (its writer sees every write).
    pub fn new(enabled: bool) -> Recent {
        Recent {
            enabled: AtomicBool::new(enabled),
            inner: Mutex::default(),
        }
    }

    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Forgets everything and keeps nothing more (the store is closed).
    pub fn close(&self) {
        self.enabled.store(false, Ordering::Release);
        self.forget();
    }

    /// Forgets everything kept: lookups read the file (after records were deleted, say).
    pub fn forget(&self) {
        self.inner().forget();
    }

    /// A panic elsewhere while the lock was held must not stop the writer thread, which takes it
    /// for every batch: what was kept is forgotten instead.
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut inner = poisoned.into_inner();
            inner.forget();
            self.inner.clear_poison();
            inner
        })
    }

    /// The shopper's record if known; else the [`Miss`] to keep the file's answer with.
    pub fn shopper(&self, key: &str) -> Result<Option<ShopperRow>, Miss> {
        self.look(|i| i.shoppers.get(key).cloned())
    }

    pub fn session(&self, channel: &str, browser_id: &str) -> Result<Option<FactsRow>, Miss> {
        self.look(|i| i.sessions.get(&(channel.to_string(), browser_id.to_string())).cloned())
    }

    pub fn cart(&self, order_id: &str) -> Result<Vec<CartLineRow>, Miss> {
        self.look(|i| i.carts.get(order_id).cloned())
    }

    fn look<T>(&self, hit: impl FnOnce(&Inner) -> Option<T>) -> Result<T, Miss> {
        if !self.enabled() {
            return Err(Miss(u64::MAX));
        }
        let inner = self.inner();
        hit(&inner).ok_or(Miss(inner.version))
    }

    pub fn keep_shopper(&self, miss: Miss, key: &str, value: &Option<ShopperRow>) {
        self.keep(miss, |i| {
            bounded_insert(&mut i.shoppers, key.to_string(), value.clone())
        });
    }

    pub fn keep_session(&self, miss: Miss, channel: &str, browser_id: &str, value: &Option<FactsRow>) {
        self.keep(miss, |i| {
            bounded_insert(
                &mut i.sessions,
                (channel.to_string(), browser_id.to_string()),
                value.clone(),
            )
        });
    }

    pub fn keep_cart(&self, miss: Miss, order_id: &str, value: &[CartLineRow]) {
        self.keep(miss, |i| {
            bounded_insert(&mut i.carts, order_id.to_string(), value.to_vec())
        });
    }

    fn keep(&self, miss: Miss, insert: impl FnOnce(&mut Inner)) {
        let mut inner = self.inner();
        if self.enabled() && inner.version == miss.0 {
            insert(&mut inner);
        }
    }

    /// On the writer thread, in the batch that writes `touched` (before the write: a write that
    /// fails is read back as it stayed).
    pub fn stage(&self, touched: impl IntoIterator<Item = Touched>) {
        if self.enabled() {
            self.inner().staged.extend(touched);
        }
    }

    /// On the writer thread after each batch, before its callers are answered, outside any
    /// transaction: reads back what the batch touched and publishes it; or, when the batch did not
    /// commit or another connection committed (`stale`), forgets everything.
    pub fn after_batch(&self, conn: &Connection, stale: bool) {
        let mut staged = std::mem::take(&mut self.inner().staged);
        if !self.enabled() {
            return;
        }
        if stale {
            self.forget();
            return;
        }
        if staged.is_empty() {
            return;
        }
        staged.sort_unstable();
        staged.dedup();
        // Read without the lock; published together. A read that fails (the file busy past
        // `busy_timeout`, a row the driver cannot read) forgets everything: lookups read the file.
        let mut read = Vec::with_capacity(staged.len());
        for touched in staged {
            match read_back(conn, &touched) {
                Ok(entry) => read.push((touched, entry)),
                Err(e) => {
                    tracing::warn!(error = %e, "SQLite: a record written could not be read back; lookups read the file");
                    self.forget();
                    return;
                }
            }
        }
        let mut inner = self.inner();
        inner.version += 1;
        for (touched, entry) in read {
            match (touched, entry) {
                (Touched::Shopper(k), Entry::Shopper(v)) => bounded_insert(&mut inner.shoppers, k, v),
                (Touched::Session(c, b), Entry::Session(v)) => bounded_insert(&mut inner.sessions, (c, b), v),
                (Touched::Cart(o), Entry::Cart(v)) => bounded_insert(&mut inner.carts, o, v),
                _ => unreachable!("read_back answers each kind with its own entry"),
            }
        }
    }
}

impl Inner {
    /// Forgets everything; reads begun before keep nothing.
    fn forget(&mut self) {
        self.version += 1;
        self.shoppers.clear();
        self.sessions.clear();
        self.carts.clear();
    }
}

enum Entry {
    Shopper(Option<ShopperRow>),
    Session(Option<FactsRow>),
    Cart(Vec<CartLineRow>),
}

/// Reads a record's rows as a lookup does: the same SQL.
fn read_back(conn: &Connection, touched: &Touched) -> Result<Entry, StoreError> {
    Ok(match touched {
        Touched::Shopper(key) => Entry::Shopper(read_shopper(conn, key)?),
        Touched::Session(channel, browser_id) => Entry::Session(read_session(conn, channel, browser_id)?),
        Touched::Cart(order_id) => Entry::Cart(read_cart(conn, order_id)?),
    })
}

pub fn read_shopper(c: &Connection, key: &str) -> Result<Option<ShopperRow>, StoreError> {
    let mut stmt = c.prepare_cached(shared::SHOPPER)?;
    Ok(stmt.query_row([key], ShopperRow::from_rusqlite).optional()?)
}

pub fn read_session(c: &Connection, channel: &str, browser_id: &str) -> Result<Option<FactsRow>, StoreError> {
    let mut stmt = c.prepare_cached(shared::SESSION)?;
    Ok(stmt
        .query_row([channel, browser_id], FactsRow::from_rusqlite)
        .optional()?)
}

pub fn read_cart(c: &Connection, order_id: &str) -> Result<Vec<CartLineRow>, StoreError> {
    let mut stmt = c.prepare_cached(shared::CART_LINES)?;
    let rows = stmt.query_map([order_id], CartLineRow::from_rusqlite)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Inserts, emptying the map first when it is full.
fn bounded_insert<K: Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, value: V) {
    if map.len() >= CAPACITY && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ShopperState;

    fn database() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE shoppers (shopper_key TEXT PRIMARY KEY, state TEXT NOT NULL, identity TEXT, \
             updated_at INTEGER NOT NULL) WITHOUT ROWID;",
        )
        .unwrap();
        conn
    }

    fn write(conn: &Connection, email: &str) {
        let state = serde_json::to_string(&ShopperState {
            email: Some(email.into()),
            ..ShopperState::default()
        })
        .unwrap();
        conn.execute(
            "INSERT INTO shoppers VALUES ('s1', ?1, NULL, 0) ON CONFLICT (shopper_key) DO UPDATE SET state = excluded.state",
            [state],
        )
        .unwrap();
    }

    fn email(recent: &Recent) -> Option<String> {
        recent
            .shopper("s1")
            .ok()
            .flatten()
            .and_then(|row| row.decode().unwrap().email)
    }

    /// A lookup that read the file before a write was published keeps nothing: else its older
    /// record would outlive the write.
    #[test]
    fn a_read_from_before_a_publication_is_not_kept() {
        let (conn, recent) = (database(), Recent::new(true));
        write(&conn, "old");
        let Err(miss) = recent.shopper("s1") else {
            panic!("a hit")
        };
        let read = read_shopper(&conn, "s1").unwrap();
        // Meanwhile the writer commits a new record and publishes it.
        recent.stage([Touched::Shopper("s1".into())]);
        write(&conn, "new");
        recent.after_batch(&conn, false);
        recent.keep_shopper(miss, "s1", &read);
        assert_eq!(email(&recent).as_deref(), Some("new"));
        // A batch that did not commit forgets everything; a lookup then reads the file.
        recent.after_batch(&conn, true);
        assert!(recent.shopper("s1").is_err());
        let Err(miss) = recent.shopper("s1") else {
            panic!("a hit")
        };
        recent.keep_shopper(miss, "s1", &read_shopper(&conn, "s1").unwrap());
        assert_eq!(email(&recent).as_deref(), Some("new"));
    }

    /// Operators' commands keep nothing: their writer does not see the service's writes.
    #[test]
    fn a_disabled_memory_keeps_nothing() {
        let (conn, recent) = (database(), Recent::new(false));
        write(&conn, "old");
        let Err(miss) = recent.shopper("s1") else {
            panic!("a hit")
        };
        recent.keep_shopper(miss, "s1", &read_shopper(&conn, "s1").unwrap());
        assert!(recent.shopper("s1").is_err());
    }

    #[test]
    fn each_kind_keeps_at_most_its_capacity() {
        let recent = Recent::new(true);
        for i in 0..CAPACITY + 10 {
            let Err(miss) = recent.shopper(&format!("s{i}")) else {
                panic!("a hit")
            };
            recent.keep_shopper(miss, &format!("s{i}"), &None);
        }
        assert!(recent.inner().shoppers.len() <= CAPACITY);
    }
}
