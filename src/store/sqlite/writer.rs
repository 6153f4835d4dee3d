//! The one SQLite writer: an OS thread that owns the write connection and commits every write
//! that arrived while it was busy in one transaction (group commit).
//!
//! Callers hand it a closure and await the answer, which comes only after the commit. The thread
//! runs statements synchronously (no hop to another thread per statement) from a cache of prepared
//! statements, so a burst of webhooks and the delivery bookkeeping beside it cost one transaction,
//! one WAL write and, when a webhook is in the batch, one fsync — not one of each per statement.
//!
//! Three threads: the writer (statements and commits), the syncer (fsyncs the WAL for webhooks
//! before they are answered, overlapping the writer's next batch) and the checkpointer (copies the
//! WAL into the database file, off the commit path).
//!
//! The WAL is kept small. SQLite starts writing the WAL from its beginning again only once every
//! frame in it has been copied to the database, which never happens by itself while commits keep
//! coming (each checkpoint ends a few commits behind): under sustained load the WAL would grow
//! without bound, and every write and read with it. So once the WAL passes [`WAL_RESTART_BYTES`],
//! the checkpointer copies until little is left and asks the writer to copy that rest between two
//! batches; the writer's next transaction then starts the WAL over.
//!
//! Each closure runs inside a savepoint: one that fails is rolled back alone and answered with its
//! error; the others in the batch still commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::store::StoreError;

/// Most closures committed in one transaction (bounds the wait of the first one in a batch).
const MAX_BATCH: usize = 256;

/// Runs on the writer thread after each batch, outside any transaction and before any of the
/// batch's callers is answered, told how it ended; and once before a batch runs when another
/// connection has committed since the last one.
pub type AfterBatch = Box<dyn Fn(&Connection, BatchEnd) + Send>;

/// How a batch ended, as [`AfterBatch`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEnd {
    /// Memory kept beside the database may be stale as a whole: the batch did not commit, or
    /// another connection committed since the last batch.
    pub stale: bool,
    /// The batch's writes are committed (`false` when told before the batch ran).
    pub committed: bool,
}

/// Answers the caller once the batch's commit outcome is known.
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Runs against the connection inside the batch's transaction and returns how to answer;
/// given `None` (the transaction could not start) it only returns the answer.
type Job = Box<dyn FnOnce(Option<&Connection>) -> Reply + Send>;

struct Work {
    job: Job,
    /// The caller is answered only once the WAL is fsynced after the commit.
    durable: bool,
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL size past which the WAL is started over (see the module documentation).
const WAL_RESTART_BYTES: i64 = 16 << 20;
/// What the checkpointer leaves for the writer to copy between two batches (a short pause).
const WAL_REST_BYTES: i64 = 256 << 10;

pub struct Writer {
    sender: Mutex<Option<mpsc::Sender<Work>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Dropped at close: the checkpointer's signal to stop.
    checkpointer: Mutex<Option<mpsc::Sender<()>>>,
    checkpointer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Times what is kept in memory beside the database may have gone stale, counted before the
    /// next batch runs: see [`Writer::invalidations`].
    invalidations: Arc<AtomicU64>,
}

/// Set by the checkpointer when the WAL should start over: the writer then copies what is left
/// of it between two batches.
type RestartWanted = Arc<AtomicBool>;

impl Writer {
    /// Opens the write connection on `path` (the database must exist and be migrated).
    pub fn open(path: &Path, busy_timeout: Duration, after_batch: AfterBatch) -> Result<Writer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        // Checkpoints run on their own thread (below), not inside a commit of this one; the WAL
        // file is cut back to 64 MiB when it starts over. What is deleted or overwritten is zeroed
        // (`secure_delete`): an erased token leaves no readable trace in the file's free space.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA mmap_size = {}; \
             PRAGMA cache_size = {}; PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864; \
             PRAGMA secure_delete = ON;",
            super::MMAP_BYTES,
            super::cache_size()
        ))?;
        conn.set_prepared_statement_cache_capacity(64);
        let checkpoints = Connection::open(path)?;
        checkpoints.busy_timeout(busy_timeout)?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let restart_wanted = RestartWanted::default();
        let wanted = restart_wanted.clone();
        let database = path.to_path_buf();
        let checkpointer_thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_until_stopped(checkpoints, &database, stopped, wanted))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite checkpointer: {e}")))?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let (sender, receiver) = mpsc::channel::<Work>();
        let invalidations = Arc::new(AtomicU64::new(0));
        let invalidated = invalidations.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, receiver, wal, restart_wanted, &invalidated, after_batch))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite writer: {e}")))?;
        Ok(Writer {
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            checkpointer: Mutex::new(Some(stop_checkpoints)),
            checkpointer_thread: Mutex::new(Some(checkpointer_thread)),
            invalidations,
        })
    }

    /// A count that grows whenever state kept in memory beside the database by the closures may
    /// have gone stale: a batch did not commit (its closures' changes to memory were not stored),
    /// or another connection committed (another process on the same file, such as the
    /// `dead-letters` command). Such state is loaded again once the count has changed.
    pub fn invalidations(&self) -> Arc<AtomicU64> {
        self.invalidations.clone()
    }

    /// Runs `f` in the next batch; its answer arrives after the commit (not fsynced).
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(f, false).await
    }

    /// Like [`Writer::write`], but answered only once the commit is on disk (webhook intake).
    pub async fn write_durable<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(f, true).await
    }

    async fn submit<T, F>(&self, f: F, durable: bool) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => in_savepoint(conn, f),
                None => Err(StoreError::Unavailable("the SQLite transaction did not start".into())),
            };
            Box::new(move |commit: Result<(), StoreError>| {
                let _ = answer.send(commit.and(result));
            })
        });
        let stopped = || StoreError::Unavailable("store is closed".into());
        self.sender
            .lock()
            .expect("writer lock")
            .as_ref()
            .ok_or_else(stopped)?
            .send(Work { job, durable })
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    pub fn is_open(&self) -> bool {
        self.sender.lock().expect("writer lock").is_some()
    }

    /// Stops taking writes, commits those already queued (waiting up to 10 s) and closes both
    /// connections; the last one to close copies the WAL into the file and removes it (with the old
    /// page images it holds).
    pub async fn close(&self) {
        self.sender.lock().expect("writer lock").take();
        self.checkpointer.lock().expect("checkpointer lock").take();
        let threads = [
            self.thread.lock().expect("writer thread lock").take(),
            self.checkpointer_thread
                .lock()
                .expect("checkpointer thread lock")
                .take(),
        ];
        for thread in threads.into_iter().flatten() {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            let _ = tokio::time::timeout(Duration::from_secs(10), joined).await;
        }
    }
}

/// Copies committed WAL frames into the database file every [`CHECKPOINT_EVERY`], beside the
/// writer (a passive checkpoint waits for no one), until its stop channel closes. When the WAL has
/// grown past [`WAL_RESTART_BYTES`], copies again until less than [`WAL_REST_BYTES`] is left, then
/// asks the writer to copy that rest.
///
/// Before asking, it fsyncs the database file ([`settle_before_restart`]): the checkpoint that
/// copies the last frame fsyncs it too (before the WAL may start over), and that fsync, of
/// everything copied since the last one, would otherwise stall the writer, and every webhook
/// waiting on it, for tens of milliseconds.
fn checkpoint_until_stopped(
    conn: Connection,
    database: &Path,
    stop: mpsc::Receiver<()>,
    restart_wanted: RestartWanted,
) {
    let page_bytes = conn
        .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .unwrap_or(4096)
        + 24;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let mut passes = 0;
        loop {
            let (wal_frames, copied) = match checkpoint(&conn) {
                Ok(frames) => frames,
                Err(e) => {
                    tracing::warn!(error = %e, "SQLite checkpoint failed; the WAL grows until the next one");
                    break;
                }
            };
            if wal_frames * page_bytes < WAL_RESTART_BYTES {
                break;
            }
            passes += 1;
            if (wal_frames - copied) * page_bytes < WAL_REST_BYTES || passes == 4 {
                settle_before_restart(&conn, database, page_bytes, copied);
                restart_wanted.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// Most fsync-and-copy rounds before the WAL restart is handed to the writer.
const SETTLE_ROUNDS: usize = 4;

/// Fsyncs the database file, then copies what was committed during that fsync and fsyncs again,
/// until a copy finds little new (an fsync of a few MiB takes tens of milliseconds, and the writer
/// commits meanwhile). The writer's own copy and fsync before the WAL starts over, while every
/// webhook waits, then cover only what arrived during the last, short fsync.
fn settle_before_restart(conn: &Connection, database: &Path, page_bytes: i64, mut copied: i64) {
    for _ in 0..SETTLE_ROUNDS {
        sync_database(database);
        let Ok((_, now_copied)) = checkpoint(conn) else { return };
        // Negative when the WAL started over meanwhile: nothing is left to settle then.
        let new_frames = now_copied - copied;
        copied = now_copied;
        if new_frames * page_bytes < WAL_REST_BYTES {
            if new_frames > 0 {
                sync_database(database);
            }
            return;
        }
    }
    sync_database(database);
}

fn sync_database(database: &Path) {
    if let Err(e) = std::fs::File::open(database).and_then(|f| f.sync_data()) {
        tracing::warn!(error = %e, "SQLite checkpointer: fsync of the database file failed");
    }
}

/// A passive checkpoint: (frames in the WAL, frames of them copied to the database file).
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?)))
}

fn in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    let result = f(conn);
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
    }
    conn.prepare_cached("RELEASE job")?.execute([])?;
    result
}

/// The writer thread: takes whatever is queued (up to [`MAX_BATCH`]), runs it in one transaction,
/// commits, answers; ends when every sender is gone and the queue is empty.
///
/// Commits do not fsync (`synchronous = NORMAL`). Writes that must be on disk before their answer
/// (webhooks) are answered by the syncer thread after it has fsynced the WAL, while this thread
/// goes on with the next batch: the fsync of one batch overlaps the statements of the next.
fn run(
    conn: Connection,
    receiver: mpsc::Receiver<Work>,
    wal: PathBuf,
    restart_wanted: RestartWanted,
    invalidations: &AtomicU64,
    after_batch: AfterBatch,
) {
    let (to_syncer, syncer_queue) = mpsc::channel::<Vec<Reply>>();
    let syncer = std::thread::Builder::new()
        .name("sqlite-sync".into())
        .spawn(move || sync_then_answer(&wal, syncer_queue))
        .expect("cannot start the SQLite syncer thread");
    let mut batch: Vec<Work> = Vec::with_capacity(MAX_BATCH);
    let mut data_version = None;
    while let Ok(first) = receiver.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut foreign = false;
        let outcome = (|| -> Result<(), rusqlite::Error> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            // Changes only when another connection has committed since the last batch.
            let now: i64 = conn
                .prepare_cached("PRAGMA data_version")?
                .query_row([], |r| r.get(0))?;
            if data_version.replace(now).is_some_and(|before| before != now) {
                invalidations.fetch_add(1, Ordering::Release);
                // Told at once, not only after the batch: lookups meanwhile read the file.
                after_batch(
                    &conn,
                    BatchEnd {
                        stale: true,
                        committed: false,
                    },
                );
                foreign = true;
            }
            for work in batch.drain(..) {
                replies.push(((work.job)(Some(&conn)), work.durable));
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        let outcome = outcome.map_err(|e| {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            tracing::warn!(error = %e, "SQLite writer: batch not committed");
            invalidations.fetch_add(1, Ordering::Release);
            StoreError::from(e)
        });
        after_batch(
            &conn,
            BatchEnd {
                stale: outcome.is_err() || foreign,
                committed: outcome.is_ok(),
            },
        );
        // Jobs not run (the transaction did not start) are answered with the batch's error.
        replies.extend(batch.drain(..).map(|work| ((work.job)(None), false)));
        let mut after_sync = Vec::new();
        for (reply, durable) in replies {
            if durable && outcome.is_ok() {
                after_sync.push(reply);
            } else {
                reply(outcome.clone());
            }
        }
        if !after_sync.is_empty() {
            if let Err(mpsc::SendError(replies)) = to_syncer.send(after_sync) {
                for reply in replies {
                    reply(Err(StoreError::Unavailable("the SQLite syncer stopped".into())));
                }
            }
        }
        // No write runs meanwhile, so this copies the WAL to its end, and the next transaction
        // starts the WAL over (unless a reader still reads from it; then the next time).
        if restart_wanted.swap(false, Ordering::Relaxed) {
            if let Err(e) = checkpoint(&conn) {
                tracing::warn!(error = %e, "SQLite checkpoint by the writer failed; the WAL grows until the next one");
            }
        }
    }
    // Closing: everything is copied into the file and the WAL emptied, whichever connection closes
    // last (that one would remove it, but only if no other holds it then): the WAL's frames keep
    // the old versions of pages, erased tokens among them (`secure_delete` clears the file only).
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "SQLite: the WAL could not be emptied at close");
    }
    drop(to_syncer);
    let _ = syncer.join();
}

/// The syncer thread: fsyncs the WAL once for every group of committed durable writes queued
/// meanwhile, then answers them. The fsync starts after their commit returned, so it covers them
/// (an fsync flushes the file, whichever descriptor wrote it).
fn sync_then_answer(wal: &Path, queue: mpsc::Receiver<Vec<Reply>>) {
    let mut file: Option<std::fs::File> = None;
    while let Ok(first) = queue.recv() {
        let mut replies = first;
        while let Ok(more) = queue.try_recv() {
            replies.extend(more);
        }
        let synced = (|| -> std::io::Result<()> {
            if file.is_none() {
                file = Some(std::fs::File::open(wal)?);
            }
            file.as_ref().expect("opened above").sync_data()
        })();
        let outcome = synced.map_err(|e| {
            // Reopened next time: the WAL may have been replaced.
            file = None;
            tracing::warn!(error = %e, wal = %wal.display(), "SQLite syncer: fsync of the WAL failed");
            StoreError::Sync(Arc::new(e))
        });
        for reply in replies {
            reply(outcome.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file in a new folder (kept while the folder lives), set up with `sql`.
    fn database_file(sql: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        (dir, path)
    }

    fn count(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// The WAL's checkpoint sequence number (WAL header bytes 12..16): it grows each time the WAL
    /// starts over from its beginning.
    fn wal_generation(wal: &Path) -> u32 {
        use std::io::Read;
        let mut header = [0u8; 16];
        match std::fs::File::open(wal).and_then(|mut f| f.read_exact(&mut header)) {
            Ok(()) => u32::from_be_bytes(header[12..16].try_into().unwrap()),
            Err(_) => 0,
        }
    }

    /// The writer's page cache is [`super::CACHE_KIB`], not SQLite's 2 MB default.
    #[tokio::test]
    async fn the_writer_caches_a_bounded_number_of_pages() {
        let (_dir, path) = database_file("PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER)");
        let writer = Writer::open(&path, Duration::from_secs(1), Box::new(|_, _| {})).unwrap();
        let size: i64 = writer
            .write(|c| Ok(c.query_row("PRAGMA cache_size", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(size, -i64::from(super::super::CACHE_KIB));
    }

    /// Under sustained writes the WAL starts over once past [`WAL_RESTART_BYTES`] instead of
    /// growing: the checkpointer copies and settles it, the writer finishes between two batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_sustained_writes() {
        let (dir, path) = database_file("PRAGMA journal_mode = WAL; CREATE TABLE t (v BLOB NOT NULL)");
        let wal = dir.path().join("w.db-wal");
        let writer = std::sync::Arc::new(Writer::open(&path, Duration::from_secs(1), Box::new(|_, _| {})).unwrap());
        let first = wal_generation(&wal);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut largest = 0;
        // About 50 MiB/s, the WAL's growth at the bench's peak intake.
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        while wal_generation(&wal) < first + 4 {
            pace.tick().await;
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL did not start over twice in 60 s"
            );
            // 1 MiB in 64 writes of 16 KiB, sharing batches.
            let writes: Vec<_> = (0..64)
                .map(|_| {
                    let writer = writer.clone();
                    tokio::spawn(async move {
                        writer
                            .write_durable(|c| Ok(c.execute("INSERT INTO t (v) VALUES (zeroblob(16384))", [])?))
                            .await
                    })
                })
                .collect();
            for write in writes {
                write.await.unwrap().unwrap();
            }
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        // Past the threshold the WAL grows for at most a checkpoint interval and a restart.
        assert!(
            largest < 3 * WAL_RESTART_BYTES as u64,
            "the WAL reached {largest} bytes before starting over"
        );
        // Neither the checkpoints nor the WAL starting over count as another connection's commit.
        assert_eq!(writer.invalidations().load(Ordering::Acquire), 0);
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_connections_commit_invalidates_memory_before_the_next_batch() {
        let (_dir, path) = database_file("PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER)");
        let writer = Writer::open(&path, Duration::from_secs(1), Box::new(|_, _| {})).unwrap();
        let invalidations = writer.invalidations();
        // The count as a write in the next batch sees it.
        async fn seen_by_a_write(writer: &Writer, invalidations: Arc<AtomicU64>) -> u64 {
            writer
                .write(move |c| {
                    c.execute("INSERT INTO t (v) VALUES (1)", [])?;
                    Ok(invalidations.load(Ordering::Acquire))
                })
                .await
                .unwrap()
        }
        assert_eq!(seen_by_a_write(&writer, invalidations.clone()).await, 0);
        assert_eq!(
            seen_by_a_write(&writer, invalidations.clone()).await,
            0,
            "the writer's own commits do not count"
        );
        // Another process (say, the dead-letters command) commits to the same file.
        Connection::open(&path)
            .unwrap()
            .execute("INSERT INTO t (v) VALUES (2)", [])
            .unwrap();
        assert_eq!(
            seen_by_a_write(&writer, invalidations.clone()).await,
            1,
            "counted before the next batch's writes run"
        );
        assert_eq!(seen_by_a_write(&writer, invalidations).await, 1);
        writer.close().await;
    }

    /// Memory kept beside the file (the claims) keeps a batch's changes only if the hook says it
    /// committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hook_after_each_batch_is_told_whether_it_committed() {
        let (_dir, path) = database_file("PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER)");
        let told = Arc::new(Mutex::new(Vec::new()));
        let telling = told.clone();
        let writer = Writer::open(
            &path,
            Duration::from_secs(1),
            Box::new(move |_, end| telling.lock().unwrap().push(end)),
        )
        .unwrap();
        let ends = || std::mem::take(&mut *told.lock().unwrap());
        let committed = BatchEnd {
            stale: false,
            committed: true,
        };
        // Also what it is told before a batch, once another connection has committed.
        let not_committed = BatchEnd {
            stale: true,
            committed: false,
        };
        writer
            .write(|c| Ok(c.execute("INSERT INTO t (v) VALUES (1)", [])?))
            .await
            .unwrap();
        assert_eq!(ends(), [committed]);
        // A job that ends the transaction itself: the batch's COMMIT then fails.
        let failed = writer.write(|c| Ok(c.execute_batch("ROLLBACK")?)).await;
        assert!(failed.is_err());
        assert_eq!(ends(), [not_committed]);
        Connection::open(&path)
            .unwrap()
            .execute("INSERT INTO t (v) VALUES (2)", [])
            .unwrap();
        writer
            .write(|c| Ok(c.execute("INSERT INTO t (v) VALUES (3)", [])?))
            .await
            .unwrap();
        assert_eq!(
            ends(),
            [
                not_committed,
                BatchEnd {
                    stale: true,
                    committed: true
                }
            ],
            "told before the batch that another connection committed, then that the batch committed"
        );
        assert_eq!(count(&path), 3);
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_is_rolled_back_alone_and_the_batch_commits() {
        let (_dir, path) = database_file("CREATE TABLE t (v INTEGER PRIMARY KEY)");
        let writer = std::sync::Arc::new(Writer::open(&path, Duration::from_secs(1), Box::new(|_, _| {})).unwrap());
        // Many writes at once, so that they share batches; every third fails after writing a row.
        let mut tasks = Vec::new();
        for v in 0..60i64 {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                writer
                    .write_durable(move |c| {
                        c.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
                        if v % 3 == 0 {
                            c.execute("INSERT INTO t (v) VALUES (?1)", [v])?; // duplicate key: fails
                        }
                        Ok(v)
                    })
                    .await
            }));
        }
        let mut failed = 0;
        for (v, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(got) => assert_eq!(got, v as i64),
                Err(_) => {
                    assert_eq!(v % 3, 0, "write {v} should have committed");
                    failed += 1;
                }
            }
        }
        assert_eq!(failed, 20);
        assert_eq!(count(&path), 40, "the failing writes' first rows must be rolled back");
        writer.close().await;
        assert!(!writer.is_open());
        let after = writer
            .write(|c| Ok(c.execute("INSERT INTO t (v) VALUES (1000)", [])?))
            .await;
        assert!(matches!(after, Err(StoreError::Unavailable(_))), "{after:?}");
        assert_eq!(count(&path), 40);
    }
}
