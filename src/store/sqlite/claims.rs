//! Delivery's claims on intents, kept in the writer's memory instead of written into each
//! intent's row.
//!
//! One process serves the file (see [`super::lock`]), so no other process ever needs to see a
//! claim, and a process that starts finds none of the previous one's in force (it died holding
//! them, or released them). Before, a claim rewrote the intent's whole row (its webhook and plan
//! with it) and each write of the delivery read the row back to check the claim; now a claim is an
//! entry here, its check a lookup, its renewal a change of one number.
//!
//! Only the writer thread claims, and it checks claims inside the batch that writes what they
//! fence, in the order of the writes: a claim is held from the job that made it, and let go at the
//! end of the batch that settled its intent, once that batch is committed. A batch that does not
//! commit takes its changes here back with it: its claims are dropped (their callers were answered
//! with the error) and the claims it settled are held again, as the rows they fence are.
//!
//! An attempt is counted when its intent is claimed: the count kept here until the attempt ends
//! (rescheduled or dead-lettered: then it is written into the row). An attempt cut short by the
//! process's end is not counted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::store::{Claim, StoreError};

#[derive(Default)]
pub(super) struct Claims {
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    /// Claimed intents by id, whether their lease still runs or not: an expired claim stays until
    /// another claim takes its intent or its holder settles it.
    held: HashMap<i64, Held>,
    /// This batch's changes, undone if it does not commit: the claims made (with what they
    /// replaced) and the intents settled (let go only once it commits, and not claimed again in
    /// the batch: the claim let go is the one settled).
    made: Vec<(i64, Option<Held>)>,
    settled: Vec<i64>,
}

impl Memory {
    /// `claim`'s entry while it still holds its intent (not taken over, not settled).
    fn held_by(&mut self, claim: &Claim) -> Result<&mut Held, StoreError> {
        let settled = self.settled.contains(&claim.intent_id);
        match self.held.get_mut(&claim.intent_id) {
            Some(h) if !settled && *h.claim_id == *claim.claim_id => Ok(h),
            _ => Err(StoreError::StaleClaim(claim.intent_id)),
        }
    }
}

#[derive(Debug, Clone)]
struct Held {
    claim_id: Arc<str>,
    until_ms: i64,
    queue_id: i64,
    shopper_key: Arc<str>,
    /// This attempt's number, this one included.
    attempt: i64,
}

/// An intent the claim's walk found: the head of its shopper's queue, due.
pub(super) struct Candidate {
    pub id: i64,
    pub queue_id: i64,
    /// Attempts the row counts (those that ended).
    pub attempts: i64,
}

/// Which of the walk's candidates a claim may take. Holds the claims' lock for the walk (only
/// renewals wait on it meanwhile, once a third of a lease). Dropped before [`Taking::done`] (the
/// claim's job failed: its savepoint rolls its reads back), it takes back the claims it made.
pub(super) struct Taking<'a> {
    memory: std::sync::MutexGuard<'a, Memory>,
    now_ms: i64,
    /// Queues with an intent whose claim is in force.
    busy: HashSet<i64>,
    /// `memory.made` when the walk started.
    made_before: usize,
    done: bool,
}

impl Claims {
    /// Starts a claim at `now_ms` (on the writer thread): ask [`Taking::free`] of each candidate
    /// in the walk's order, and [`Taking::take`] those that are.
    pub fn taking(&self, now_ms: i64) -> Taking<'_> {
        let memory = self.memory.lock().expect("claims lock");
        let busy = memory
            .held
            .values()
            .filter(|h| h.until_ms >= now_ms)
            .map(|h| h.queue_id)
            .collect();
        let made_before = memory.made.len();
        Taking {
            memory,
            now_ms,
            busy,
            made_before,
            done: false,
        }
    }

    /// The shopper of the intent `claim` holds, and this attempt's number; `StaleClaim` unless
    /// the claim still holds it (another claim took it over, or it was settled).
    pub fn holder(&self, claim: &Claim) -> Result<(Arc<str>, i64), StoreError> {
        let mut memory = self.memory.lock().expect("claims lock");
        let h = memory.held_by(claim)?;
        Ok((h.shopper_key.clone(), h.attempt))
    }

    /// Renews `claim`'s lease until `until_ms`.
    pub fn extend(&self, claim: &Claim, until_ms: i64) -> Result<(), StoreError> {
        let mut memory = self.memory.lock().expect("claims lock");
        let h = memory.held_by(claim)?;
        h.until_ms = h.until_ms.max(until_ms);
        Ok(())
    }

    /// `claim`'s intent is settled in this batch (checked by [`Claims::holder`] in the same job):
    /// let go once the batch commits.
    pub fn settled(&self, claim: &Claim) {
        let mut memory = self.memory.lock().expect("claims lock");
        debug_assert!(
            memory
                .held
                .get(&claim.intent_id)
                .is_some_and(|h| *h.claim_id == *claim.claim_id),
            "settled without holding the claim"
        );
        memory.settled.push(claim.intent_id);
    }

    /// The writer's batch ended: keep its changes if it committed, else undo them. (Also told,
    /// not committed, before a batch when another connection committed: nothing is made or settled
    /// then, as every batch's end empties both lists.)
    pub fn after_batch(&self, committed: bool) {
        let mut memory = self.memory.lock().expect("claims lock");
        let (made, settled) = (std::mem::take(&mut memory.made), std::mem::take(&mut memory.settled));
        if committed {
            for id in settled {
                memory.held.remove(&id);
            }
        } else {
            undo(&mut memory.held, made);
        }
    }

    /// How many claims are held (in force or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.memory.lock().expect("claims lock").held.len()
    }
}

impl Taking<'_> {
    /// Whether `candidate` may be claimed: not while its own claim or one of its queue's is in
    /// force (a replayed dead letter is older than the intent running, and waits for it), nor once
    /// settled in this batch. Asked before its row is read.
    pub fn free(&self, candidate: &Candidate) -> bool {
        !self.busy.contains(&candidate.queue_id) && !self.memory.settled.contains(&candidate.id)
    }

    /// Claims `candidate` (found [`Taking::free`]) for `claim_id` until `until_ms` and returns this
    /// attempt's number.
    pub fn take(&mut self, candidate: &Candidate, shopper_key: &str, claim_id: &Arc<str>, until_ms: i64) -> i64 {
        debug_assert!(self.free(candidate));
        let replaced = self.memory.held.get(&candidate.id).cloned();
        // An attempt whose claim ran out without being settled counts too.
        let attempt = candidate.attempts.max(replaced.as_ref().map_or(0, |h| h.attempt)) + 1;
        debug_assert!(replaced.as_ref().is_none_or(|h| h.until_ms < self.now_ms));
        self.memory.held.insert(
            candidate.id,
            Held {
                claim_id: claim_id.clone(),
                until_ms,
                queue_id: candidate.queue_id,
                shopper_key: shopper_key.into(),
                attempt,
            },
        );
        self.memory.made.push((candidate.id, replaced));
        self.busy.insert(candidate.queue_id);
        attempt
    }

    /// How many queues are held: the walk reads past at most one candidate of each.
    pub fn busy_queues(&self) -> usize {
        self.busy.len()
    }

    /// The claim's job succeeded: keep its claims (until the batch's end says whether it committed).
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        if !self.done {
            let made = self.memory.made.split_off(self.made_before);
            undo(&mut self.memory.held, made);
        }
    }
}

/// Takes back the claims `made`, newest first, restoring those they replaced.
fn undo(held: &mut HashMap<i64, Held>, made: Vec<(i64, Option<Held>)>) {
    for (id, replaced) in made.into_iter().rev() {
        match replaced {
            Some(h) => held.insert(id, h),
            None => held.remove(&id),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: i64, claim_id: &str) -> Claim {
        Claim {
            intent_id: id,
            claim_id: claim_id.into(),
        }
    }

    fn candidate(id: i64, queue: i64) -> Candidate {
        Candidate {
            id,
            queue_id: queue,
            attempts: 0,
        }
    }

    /// One walk of one candidate, as the store's claim makes it: taken if free.
    fn take(claims: &Claims, now: i64, id: i64, queue: i64, claim_id: &str) -> Option<i64> {
        let candidate = candidate(id, queue);
        let mut taking = claims.taking(now);
        let attempt = taking
            .free(&candidate)
            .then(|| taking.take(&candidate, "s", &Arc::from(claim_id), now + 100));
        taking.done();
        attempt
    }

    #[test]
    fn a_queue_is_held_by_one_claim_in_force_and_an_expired_one_is_taken_over_counting_its_attempt() {
        let claims = Claims::default();
        assert_eq!(take(&claims, 0, 1, 1, "a"), Some(1));
        assert_eq!(take(&claims, 50, 2, 1, "b"), None, "its queue is held");
        assert_eq!(take(&claims, 50, 1, 1, "b"), None, "its own claim is in force");
        claims.after_batch(true);
        assert_eq!(take(&claims, 101, 1, 1, "b"), Some(2), "the claim ran out: taken over");
        assert!(matches!(claims.holder(&claim(1, "a")), Err(StoreError::StaleClaim(1))));
        assert!(matches!(
            claims.extend(&claim(1, "a"), 500),
            Err(StoreError::StaleClaim(1))
        ));
        assert_eq!(&*claims.holder(&claim(1, "b")).unwrap().0, "s");
    }

    #[test]
    fn a_settled_claim_is_let_go_only_once_its_batch_commits() {
        let claims = Claims::default();
        take(&claims, 0, 1, 1, "a");
        claims.after_batch(true);
        claims.settled(&claim(1, "a"));
        assert!(claims.holder(&claim(1, "a")).is_err(), "settled: nothing more of it");
        claims.after_batch(false);
        assert_eq!(claims.holder(&claim(1, "a")).unwrap().1, 1, "not committed: still held");
        claims.settled(&claim(1, "a"));
        claims.after_batch(true);
        assert_eq!(claims.len(), 0);
        assert_eq!(take(&claims, 1, 1, 1, "b"), Some(1), "free again");
    }

    #[test]
    fn the_claims_of_a_batch_that_did_not_commit_are_dropped() {
        let claims = Claims::default();
        take(&claims, 0, 1, 1, "a");
        claims.after_batch(true);
        take(&claims, 200, 1, 1, "b");
        take(&claims, 200, 2, 2, "b");
        claims.after_batch(false);
        assert_eq!(claims.len(), 1);
        assert!(claims.holder(&claim(1, "a")).is_ok(), "the claim it replaced is back");
        assert!(claims.holder(&claim(2, "b")).is_err());
    }

    #[test]
    fn an_intent_settled_in_a_batch_is_not_claimed_again_before_it_commits() {
        let claims = Claims::default();
        take(&claims, 0, 1, 1, "a");
        claims.after_batch(true);
        // Its lease ran out, and its holder releases it (due at once) in the batch a claim runs in.
        claims.settled(&claim(1, "a"));
        assert_eq!(take(&claims, 200, 1, 1, "b"), None, "settled in this batch");
        claims.after_batch(true);
        assert_eq!(claims.len(), 0);
        assert_eq!(take(&claims, 200, 1, 1, "b"), Some(1), "claimed after the commit");
        claims.after_batch(true);
        assert!(claims.holder(&claim(1, "b")).is_ok());
    }

    #[test]
    fn the_claims_of_a_walk_that_failed_are_taken_back_at_once() {
        let claims = Claims::default();
        take(&claims, 0, 1, 1, "a");
        {
            let mut taking = claims.taking(0);
            let candidate = candidate(2, 2);
            assert!(taking.free(&candidate));
            assert_eq!(taking.take(&candidate, "s", &Arc::from("b"), 100), 1);
            // The job fails here (a read of the walk): its savepoint rolls back, `done` is never called.
        }
        assert_eq!(
            claims.len(),
            1,
            "the failed walk's claim is gone, the earlier job's kept"
        );
        claims.after_batch(true);
        assert!(claims.holder(&claim(1, "a")).is_ok());
        assert_eq!(take(&claims, 1, 2, 2, "c"), Some(1));
    }
}
