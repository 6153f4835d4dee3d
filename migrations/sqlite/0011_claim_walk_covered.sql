-- The claim's walk of the queue (src/store/sqlite/mod.rs, CLAIM_WALK) reads this index alone: every
-- column the walk needs is in it. Through `intents_pending_id` (id alone) it read each passed
-- intent's row for `enriched`, `next_attempt_at`, `attempts` and `queue_id`, which sit behind the
-- row's webhook and enrichment: the row's overflow pages, one read each, for every intent the walk
-- passed. It replaces `intents_pending_id` (the same entries, in the same order), so that intake
-- and acks keep one index of pending intents to write, not two (an enrichment's save, a retry and a
-- replay now rewrite its entry too); the operators' list of the queue reads it as it read the one it
-- replaces.
DROP INDEX intents_pending_id;
-- It holds `created_at` too: the queue's gauges (every 5 s, src/telemetry.rs) read the oldest pending
-- intent's age from it, which through the rows read every pending intent's overflow pages.
CREATE INDEX intents_pending_walk ON intents (id, queue_id, next_attempt_at, attempts, enriched, state, created_at)
    WHERE state = 'pending';
