//! Readers for the lookups delivery makes for each intent (shopper, sessions, cart lines): plain
//! SQLite connections used on the calling task, a few microseconds a lookup, instead of a round trip
//! to a sqlx worker thread and back — two thread wake-ups a lookup, where a quarter of the service's
//! CPU per delivered event went to threads handing work to each other (BENCHMARKS.md, issue 23's
//! profile). In WAL mode a reader never waits for the writer.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::store::StoreError;

/// Connections kept open between lookups. A lookup never awaits, so no more run at once than the
/// runtime has threads: this many are enough, and a connection is rarely opened twice.
const IDLE: usize = 8;

pub struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    /// `None` once closed: later lookups fail.
    idle: Mutex<Option<Vec<Connection>>>,
}

impl Readers {
    pub fn new(path: &Path, busy_timeout: Duration) -> Readers {
        Readers {
            path: path.to_path_buf(),
            busy_timeout,
            idle: Mutex::new(Some(Vec::new())),
        }
    }

    /// Runs `read` on an idle connection (or a new one).
    pub fn read<T>(&self, read: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let closed = || StoreError::Unavailable("store is closed".into());
        let idle = self
            .idle
            .lock()
            .expect("readers lock")
            .as_mut()
            .ok_or_else(closed)?
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = read(&conn);
        if let Some(idle) = self.idle.lock().expect("readers lock").as_mut() {
            if idle.len() < IDLE {
                idle.push(conn);
            }
        }
        result
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.execute_batch(&format!(
            "PRAGMA mmap_size = {}; PRAGMA cache_size = {}",
            super::MMAP_BYTES,
            super::cache_size()
        ))?;
        Ok(conn)
    }

    /// Closes every connection; later lookups fail.
    pub fn close(&self) {
        self.idle.lock().expect("readers lock").take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each reader's page cache is [`super::super::CACHE_KIB`], not SQLite's 2 MB default: up to
    /// [`IDLE`] of them stay open.
    #[test]
    fn a_reader_caches_a_bounded_number_of_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL")
            .unwrap();
        let readers = Readers::new(&path, Duration::from_secs(1));
        let size: i64 = readers
            .read(|c| Ok(c.query_row("PRAGMA cache_size", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(size, -i64::from(super::super::CACHE_KIB));
    }
}
