//! One serving process per SQLite file: the service holds an exclusive lock on `<file>.lock` for
//! as long as it runs. The kernel drops the lock when the process dies, however it dies, so a
//! restart after kill -9 finds it free, and knows that no claim in the file can still be in use.
//! Operators' commands (`dead-letters …`) do not take it: they write no claims.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The held lock; released when dropped.
pub struct FileLock {
    _file: File,
}

/// `<database>.lock`, beside the database file, named after the file's real path: two names of one
/// file (a symlink, `./`, `..`) share one lock.
pub fn lock_path(database: &Path) -> PathBuf {
    let real = std::fs::canonicalize(database).unwrap_or_else(|_| {
        let parent = database
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
        parent.join(database.file_name().unwrap_or_default())
    });
    let mut path = real.into_os_string();
    path.push(".lock");
    PathBuf::from(path)
}

impl FileLock {
    /// Takes the lock of `database`, or says who holds it.
    pub fn acquire(database: &Path) -> anyhow::Result<FileLock> {
        let path = lock_path(database);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another forwarder serves {} (it holds {}{}): one serving process per SQLite file; \
                     stop it first, or use PostgreSQL (store.url = postgres://…) for several replicas",
                    database.display(),
                    path.display(),
                    Some(holder.trim())
                        .filter(|h| !h.is_empty())
                        .map(|h| format!(", {h}"))
                        .unwrap_or_default()
                );
            }
            Err(TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {e}", path.display());
            }
        }
        // Who holds it, for the next process's message (best effort: the lock is what counts).
        let _ = file.set_len(0);
        let _ = writeln!(file, "pid {}", std::process::id());
        Ok(FileLock { _file: file })
    }

    /// Whether a service holds the lock of `database` now. Asked by operators' commands, which
    /// create no lock file and hold nothing (a shared lock for the instant of the question).
    pub fn held(database: &Path) -> bool {
        let Ok(file) = File::open(lock_path(database)) else {
            return false;
        };
        matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("f.db");
        assert!(!FileLock::held(&db), "no lock file: nobody serves");
        let first = FileLock::acquire(&db).unwrap();
        assert!(FileLock::held(&db));
        let refused = FileLock::acquire(&db).err().expect("refused while held").to_string();
        assert!(refused.contains("another forwarder serves"), "{refused}");
        assert!(refused.contains(&format!("pid {}", std::process::id())), "{refused}");
        drop(first);
        FileLock::acquire(&db).expect("free once released");
    }

    #[test]
    fn two_names_of_one_file_share_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("f.db");
        std::fs::write(&db, b"").unwrap();
        let link = dir.path().join("alias.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        let _first = FileLock::acquire(&db).unwrap();
        assert!(FileLock::acquire(&link).is_err(), "a symlink is the same file");
        assert!(FileLock::acquire(&dir.path().join(".").join("f.db")).is_err());
    }
}
