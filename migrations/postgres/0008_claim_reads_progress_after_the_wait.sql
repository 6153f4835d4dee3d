-- A takeover claims an intent with the progress its stale worker committed while the claim waited
-- for the intent's row (migration 0005's forwarder_claim read the progress in the statement that
-- waited, with the snapshot from before: the event that write recorded was sent again). Only the
-- end of the function changes: the progress is read by a statement of its own.
CREATE OR REPLACE FUNCTION forwarder_claim(
    p_claim TEXT, p_replica TEXT, p_lease BIGINT, p_now BIGINT, p_limit INTEGER, p_takeover BIGINT
) RETURNS TABLE (id BIGINT, shopper_key TEXT, intent TEXT, enrichment TEXT, progress TEXT, sent BIGINT,
                 attempts BIGINT, created_at BIGINT)
LANGUAGE plpgsql
-- The plan that fits a queue of any size: a walk of the pending intents in id order and index probes
-- per shopper, stopped at the first 64 candidates. Left to itself, the planner trusts statistics
-- that lag a fast-filling queue (a table it thinks nearly empty) and reads, filters and sorts the
-- whole queue at every claim (measured: 40 ms a claim with 7,000 events queued); and the costs
-- those settings add would have it compile the plan (JIT) at every call, which takes longer than
-- running it. Both checks of a shopper are subqueries with a LIMIT, so that they stay probes of the
-- shopper's few pending rows (the cheaper first: most rows the walk passes are behind an older
-- intent of their shopper) instead of becoming a scan of every claimed row of the queue.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    db_now BIGINT := forwarder_now_ms();
    ids BIGINT[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT array_agg(c.id) INTO ids FROM (SELECT h.id FROM (
        SELECT i.id, i.shopper_key FROM intents i
        WHERE i.state = 'pending' AND i.enriched AND i.next_attempt_at <= p_now
          AND NOT (i.claim_id IS NOT NULL AND i.lease_until >= db_now
               AND (i.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover)))
          AND (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
               AND o.state = 'pending' AND o.id < i.id LIMIT 1) IS NULL
          AND (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
               AND o.state = 'pending' AND o.id <> i.id
               AND o.claim_id IS NOT NULL AND o.lease_until >= db_now
               AND (o.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = o.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover))
               LIMIT 1) IS NULL
        ORDER BY i.id LIMIT 64 OFFSET 0) h
    -- Advisory locks are the database's, not the schema's: the schema is part of the key.
    WHERE pg_try_advisory_xact_lock(hashtextextended(current_schema() || '/' || h.shopper_key, 7306))
    LIMIT p_limit) c;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    WITH claimed AS (
        UPDATE intents i SET claim_id = p_claim, replica_id = p_replica, lease_until = db_now + p_lease,
            attempts = i.attempts + 1, updated_at = p_now
        WHERE i.id = ANY(ids) AND i.state = 'pending' AND i.next_attempt_at <= p_now
          AND NOT (i.claim_id IS NOT NULL AND i.lease_until >= db_now
                   AND (i.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica_id
                                                       AND r.heartbeat_at >= db_now - p_takeover)))
          AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
                          AND o.state = 'pending' AND o.id < i.id)
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
    -- The progress is read by a statement of its own, whose snapshot is taken after the UPDATE: a
    -- stale worker's last write (its progress, holding the intent's row until it commits) that the
    -- UPDATE waited for is seen. Read in the UPDATE's statement, it was the progress from before.
    RETURN QUERY
    SELECT i.id, i.shopper_key, i.intent, i.enrichment, COALESCE(p.plan, i.progress), COALESCE(p.sent, 0),
           i.attempts, i.created_at
    FROM intents i LEFT JOIN intent_progress p ON p.intent_id = i.id
    WHERE i.id = ANY(ids);
END
$$;
