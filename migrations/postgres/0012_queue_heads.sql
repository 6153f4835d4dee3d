-- The heads of the shoppers' queues, marked: the claim's walk reads them alone.
--
-- Until now the walk read every pending, enriched intent in id order and kept those with no older
-- pending intent of their shopper, one probe of the shopper's queue each. On a backlog the intents
-- queued behind the shoppers in flight fill the front of the queue: a quick backlog's claims passed
-- about 1,300 of them (4,000 pages) to claim four intents, 2.3 ms a claim, and the dispatcher claimed
-- almost without pause (BENCHMARKS.md, session 25). Now `head` marks each shopper's oldest pending
-- intent and the walk reads `intents_heads`, those of them ready to go: the shoppers in flight and
-- those waiting for a retry's time, whatever the depth of their queues.
--
-- The rule the triggers below keep: a shopper's oldest pending intent has `head` set. (A row may
-- have it set while it is not the oldest — a replayed dead letter marks itself without unmarking
-- the intent running — so the claim still checks that no older intent of the shopper is pending:
-- `head` narrows the walk, it does not decide the claim.) Triggers, not the service's statements,
-- so that every path that makes, ends or replays an intent keeps it: replicas of the release before
-- (rolling upgrade) and operators' commands included.
--
-- A shopper's intake transactions take turns on the shopper's advisory lock (class 7305, migration
-- 0007). The trigger that moves the mark after a head is acknowledged or dead-lettered takes the
-- same lock before it looks for the next head, so the two cannot miss each other: an intent stored
-- while the head is being removed is marked either by its intake (which ran after the removal's
-- commit and saw no older pending intent) or by the removal (which ran after the intake's commit and
-- found it).

LOCK TABLE intents IN ACCESS EXCLUSIVE MODE;

ALTER TABLE intents ADD COLUMN head BOOLEAN NOT NULL DEFAULT FALSE;

UPDATE intents i SET head = TRUE
WHERE i.state = 'pending'
  AND i.id = (SELECT min(o.id) FROM intents o WHERE o.shopper_key = i.shopper_key AND o.state = 'pending');

CREATE INDEX intents_heads ON intents (id) WHERE state = 'pending' AND enriched AND head;

-- An intent stored pending is its shopper's head when no other of the shopper's is pending. Its
-- intake holds the shopper's lock (migration 0007), and the query sees what committed before it.
-- Rows of the same statement inserted before it are seen too (a batch with two intents of one
-- shopper marks the first only). The queries of both functions below order the shopper's intents
-- by `id + 0`, which no index serves, so that their kept plans read the shopper's queue index
-- (`intents_queue`) by the shopper and sort those few rows, whatever the statistics said when they
-- were made: ordered by `id`, a plan made while the queue held one shopper's intents walked the
-- primary key instead (1,681 pages for a claim, an ack and a save on the kept-plans test's queue of
-- 60,000; the shopper's key equal to one value, the planner took the key's order for the id's).
CREATE FUNCTION forwarder_mark_new_head() RETURNS TRIGGER LANGUAGE plpgsql
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
BEGIN
    PERFORM o.id FROM intents o WHERE o.shopper_key = NEW.shopper_key AND o.state = 'pending'
    ORDER BY o.id + 0 LIMIT 1;
    NEW.head := NOT FOUND;
    RETURN NEW;
END
$$;

CREATE TRIGGER intents_new_head BEFORE INSERT ON intents
FOR EACH ROW WHEN (NEW.state = 'pending') EXECUTE FUNCTION forwarder_mark_new_head();

-- A dead letter replayed marks itself: it is older than any intent its shopper has pending.
CREATE FUNCTION forwarder_mark_replayed_head() RETURNS TRIGGER LANGUAGE plpgsql
AS $$
BEGIN
    NEW.head := TRUE;
    RETURN NEW;
END
$$;

CREATE TRIGGER intents_replayed_head BEFORE UPDATE OF state ON intents
FOR EACH ROW WHEN (NEW.state = 'pending' AND OLD.state <> 'pending') EXECUTE FUNCTION forwarder_mark_replayed_head();

-- A head acknowledged (deleted) or dead-lettered: under its shopper's lock, the shopper's oldest
-- pending intent is marked. Should that intent be changing in another transaction meanwhile (an
-- enrichment's dead letter, say), the mark waits for it and, if it left the queue, the next oldest
-- is marked instead.
CREATE FUNCTION forwarder_mark_next_head() RETURNS TRIGGER LANGUAGE plpgsql
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    next_id BIGINT;
    marked BOOLEAN;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(current_schema() || '/' || OLD.shopper_key, 7305));
    LOOP
        SELECT o.id, o.head INTO next_id, marked FROM intents o
        WHERE o.shopper_key = OLD.shopper_key AND o.state = 'pending' ORDER BY o.id + 0 LIMIT 1;
        EXIT WHEN next_id IS NULL OR marked;
        UPDATE intents SET head = TRUE WHERE id = next_id AND state = 'pending';
        EXIT WHEN FOUND;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER intents_acked_head AFTER DELETE ON intents
FOR EACH ROW WHEN (OLD.state = 'pending' AND OLD.head) EXECUTE FUNCTION forwarder_mark_next_head();

CREATE TRIGGER intents_ended_head AFTER UPDATE OF state ON intents
FOR EACH ROW WHEN (OLD.state = 'pending' AND NEW.state <> 'pending' AND OLD.head)
EXECUTE FUNCTION forwarder_mark_next_head();

-- The claim walks the heads (`AND i.head`); everything else as migration 0010 made it.
CREATE OR REPLACE FUNCTION forwarder_claim(
    p_claim TEXT, p_replica TEXT, p_lease BIGINT, p_now BIGINT, p_limit INTEGER, p_takeover BIGINT
) RETURNS TABLE (id BIGINT, shopper_key TEXT, intent TEXT, enrichment TEXT, progress TEXT, sent BIGINT,
                 attempts BIGINT, created_at BIGINT)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    db_now BIGINT := forwarder_now_ms();
    ids BIGINT[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT array_agg(c.id) INTO ids FROM (SELECT h.id FROM (
        SELECT i.id, i.shopper_key FROM intents i
        WHERE i.state = 'pending' AND i.enriched AND i.head AND i.next_attempt_at <= p_now
          AND NOT (i.claim_id IS NOT NULL AND i.lease_until >= db_now
               AND (i.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover)))
          AND (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
               AND o.state = 'pending' AND o.id + 0 < i.id LIMIT 1) IS NULL
          AND (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
               AND o.state = 'pending' AND o.id <> i.id
               AND o.claim_id IS NOT NULL AND o.lease_until >= db_now
               AND (o.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = o.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover))
               LIMIT 1) IS NULL
        ORDER BY i.id LIMIT 64 OFFSET 0) h
    WHERE pg_try_advisory_xact_lock(hashtextextended(current_schema() || '/' || h.shopper_key, 7306))
    LIMIT p_limit) c;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    WITH claimed AS (
        UPDATE intents i SET claim_id = p_claim, replica_id = p_replica, lease_until = db_now + p_lease,
            attempts = i.attempts + 1, updated_at = p_now
        WHERE i.id = ANY(ids) AND i.state <> 'dead' AND i.next_attempt_at <= p_now
          AND NOT (i.claim_id IS NOT NULL AND i.lease_until >= db_now
                   AND (i.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica_id
                                                       AND r.heartbeat_at >= db_now - p_takeover)))
          AND (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
               AND o.state = 'pending' AND o.id + 0 < i.id LIMIT 1) IS NULL
          AND (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
               AND o.state = 'pending' AND o.id <> i.id
               AND o.claim_id IS NOT NULL AND o.lease_until >= db_now
               AND (o.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = o.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover))
               LIMIT 1) IS NULL
        RETURNING i.id)
    SELECT array_agg(c.id) INTO ids FROM claimed c;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT i.id, i.shopper_key, i.intent, i.enrichment, COALESCE(p.plan, i.progress), COALESCE(p.sent, 0),
           i.attempts, i.created_at
    FROM intents i LEFT JOIN intent_progress p ON p.intent_id = i.id
    WHERE i.id = ANY(ids);
END
$$;
