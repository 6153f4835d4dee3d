//! Which queue each shopper's pending intents are in, and the id the next intent gets: kept in
//! memory by the SQLite store's writer instead of read from the database with every webhook.
//!
//! A shopper's pending intents form one queue, numbered by the id of the intent that started it
//! (claims find each queue's head through the `(queue_id, id)` index, whose entries follow time).
//! A new intent joins its shopper's queue while that queue still holds a pending intent, else it
//! starts one. Memory counts each queue's pending intents: intake adds one, an ack or a dead letter
//! takes one away, a replayed dead letter adds one; a queue whose count reaches zero is forgotten.
//!
//! The `intents` table is the truth: memory is loaded from it at start and again whenever it may
//! be stale (the writer's invalidations: a batch that did not commit, a commit by another
//! connection). Memory changes only after the statement it mirrors has succeeded. Counting a
//! queue's intents too high is harmless (the next intent joins a queue that has emptied, and is its
//! head); too low would start a second queue beside a live one, so nothing counts down early.
//! All of this runs on the writer thread, inside the writer's transactions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::store::StoreError;

pub(super) struct Queues {
    memory: Mutex<Memory>,
    /// The writer's count of times memory may have gone stale ([`super::writer::Writer::invalidations`]).
    invalidations: Arc<AtomicU64>,
}

#[derive(Default)]
struct Memory {
    /// Every shopper with a pending intent: its queue and how many pending intents it holds.
    by_shopper: HashMap<String, Queue>,
    /// The id the next intent gets (ids are never reused).
    next_id: i64,
    /// `invalidations` when memory was last loaded; `None`: load it.
    in_sync_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Queue {
    id: i64,
    pending: u64,
}

impl Queues {
    pub fn new(invalidations: Arc<AtomicU64>) -> Queues {
        Queues {
            memory: Mutex::new(Memory::default()),
            invalidations,
        }
    }

    /// The id the next intent gets, and the queue it joins if it is a pending intent of `shopper`:
    /// the shopper's current queue, or a new one numbered by that id. Changes nothing: call
    /// [`Queues::stored`] once the intent is stored.
    pub fn place(&self, conn: &Connection, shopper: &str) -> Result<(i64, i64), StoreError> {
        let memory = self.lock_synced(conn)?;
        let id = memory.next_id;
        let queue = memory.by_shopper.get(shopper).map_or(id, |q| q.id);
        Ok((id, queue))
    }

    /// Intent `id` is stored; when `pending_in` is `Some(queue)` it is a pending intent of
    /// `shopper` in that queue (from [`Queues::place`]).
    pub fn stored(&self, id: i64, shopper: &str, pending_in: Option<i64>) {
        let mut memory = self.memory.lock().expect("queues lock");
        memory.next_id = memory.next_id.max(id + 1);
        if let Some(queue) = pending_in {
            joined(&mut memory, shopper, queue);
        }
    }

    /// The queue a replayed dead letter `id` of `shopper` joins: the shopper's current one, else a
    /// new one numbered by its own id. Counted at once: call it only once the replay is stored
    /// (in the same savepoint, as the replay's last step).
    pub fn rejoin(&self, conn: &Connection, shopper: &str, id: i64) -> Result<i64, StoreError> {
        let mut memory = self.lock_synced(conn)?;
        let queue = memory.by_shopper.get(shopper).map_or(id, |q| q.id);
        joined(&mut memory, shopper, queue);
        Ok(queue)
    }

    /// One pending intent of `shopper` left its queue (acknowledged or dead-lettered).
    pub fn left(&self, shopper: &str) {
        let mut memory = self.memory.lock().expect("queues lock");
        if let Some(queue) = memory.by_shopper.get_mut(shopper) {
            queue.pending = queue.pending.saturating_sub(1);
            if queue.pending == 0 {
                memory.by_shopper.remove(shopper);
            }
        }
    }

    /// Loads memory now rather than at the first webhook.
    pub fn load(&self, conn: &Connection) -> Result<(), StoreError> {
        self.lock_synced(conn).map(drop)
    }

    fn lock_synced(&self, conn: &Connection) -> Result<std::sync::MutexGuard<'_, Memory>, StoreError> {
        let mut memory = self.memory.lock().expect("queues lock");
        let invalidations = self.invalidations.load(Ordering::Acquire);
        if memory.in_sync_at != Some(invalidations) {
            *memory = read(conn)?;
            memory.in_sync_at = Some(invalidations);
        }
        Ok(memory)
    }
}

fn joined(memory: &mut Memory, shopper: &str, queue: i64) {
    match memory.by_shopper.get_mut(shopper) {
        Some(q) => q.pending += 1,
        None => {
            memory
                .by_shopper
                .insert(shopper.to_string(), Queue { id: queue, pending: 1 });
        }
    }
}

/// Memory as the database has it. A shopper has one queue; were there several (never written so),
/// the newest is the one later intents join.
fn read(conn: &Connection) -> Result<Memory, StoreError> {
    let mut by_shopper = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT shopper_key, MAX(queue_id), COUNT(*) FROM intents WHERE state = 'pending' GROUP BY shopper_key",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let pending: i64 = row.get(2)?;
        by_shopper.insert(
            row.get::<_, String>(0)?,
            Queue {
                id: row.get(1)?,
                pending: pending as u64,
            },
        );
    }
    // AUTOINCREMENT keeps the highest id ever used in sqlite_sequence, deleted rows' included.
    let next_id = conn.query_row(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'intents'), 0), \
                    COALESCE((SELECT MAX(id) FROM intents), 0)) + 1",
        [],
        |r| r.get(0),
    )?;
    Ok(Memory {
        by_shopper,
        next_id,
        in_sync_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::database;
    use super::*;

    fn insert(conn: &Connection, queues: &Queues, shopper: &str) -> (i64, i64) {
        let (id, queue) = queues.place(conn, shopper).unwrap();
        conn.execute(
            "INSERT INTO intents (id, queue_id, dedupe_key, shopper_key, kind, intent, state, next_attempt_at, \
             created_at, updated_at) VALUES (?1, ?2, ?1, ?3, 'k', '{}', 'pending', 0, 0, 0)",
            rusqlite::params![id, queue, shopper],
        )
        .unwrap();
        queues.stored(id, shopper, Some(queue));
        (id, queue)
    }

    fn ack(conn: &Connection, queues: &Queues, id: i64) {
        let shopper: String = conn
            .query_row("DELETE FROM intents WHERE id = ?1 RETURNING shopper_key", [id], |r| {
                r.get(0)
            })
            .unwrap();
        queues.left(&shopper);
    }

    #[test]
    fn a_shoppers_intents_share_a_queue_until_it_empties() {
        let conn = database(7);
        let queues = Queues::new(Arc::new(AtomicU64::new(0)));
        let (first, q1) = insert(&conn, &queues, "s1");
        assert_eq!(q1, first, "a shopper's first intent starts a queue numbered by itself");
        let (other, q2) = insert(&conn, &queues, "s2");
        assert_eq!(q2, other);
        let (second, q) = insert(&conn, &queues, "s1");
        assert_eq!((second, q), (first + 2, q1), "a later intent joins the live queue");
        ack(&conn, &queues, first);
        assert_eq!(insert(&conn, &queues, "s1").1, q1, "the queue still holds an intent");
        ack(&conn, &queues, second);
        ack(&conn, &queues, first + 3);
        let (id, q) = insert(&conn, &queues, "s1");
        assert_eq!(q, id, "the emptied queue is forgotten: a new one starts");
    }

    #[test]
    fn memory_is_loaded_again_from_the_table_once_invalidated() {
        let conn = database(7);
        let invalidations = Arc::new(AtomicU64::new(0));
        let queues = Queues::new(invalidations.clone());
        let (first, q1) = insert(&conn, &queues, "s1");
        // Another connection acks it (or a batch holding the ack did not commit)...
        conn.execute("DELETE FROM intents WHERE id = ?1", [first]).unwrap();
        // ...and inserts a pending intent of s2 with an id memory has not handed out.
        conn.execute(
            "INSERT INTO intents (id, queue_id, dedupe_key, shopper_key, kind, intent, state, next_attempt_at, \
             created_at, updated_at) VALUES (50, 50, 'x', 's2', 'k', '{}', 'pending', 0, 0, 0)",
            [],
        )
        .unwrap();
        assert_eq!(
            queues.place(&conn, "s1").unwrap().1,
            q1,
            "memory alone still says s1's queue is live"
        );
        invalidations.fetch_add(1, Ordering::Release);
        let (id, queue) = queues.place(&conn, "s1").unwrap();
        assert_eq!(
            (id, queue),
            (51, 51),
            "loaded again: s1 has no live queue, ids go on after 50"
        );
        assert_eq!(
            queues.place(&conn, "s2").unwrap().1,
            50,
            "s2's queue was loaded from the table"
        );
    }

    #[test]
    fn ids_are_never_reused_after_the_newest_intent_is_deleted() {
        let conn = database(7);
        let queues = Queues::new(Arc::new(AtomicU64::new(0)));
        let (first, _) = insert(&conn, &queues, "s1");
        ack(&conn, &queues, first);
        let reopened = Queues::new(Arc::new(AtomicU64::new(0)));
        assert_eq!(reopened.place(&conn, "s1").unwrap().0, first + 1);
    }
}
