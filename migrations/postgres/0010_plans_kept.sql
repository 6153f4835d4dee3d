-- Delivery's first reads of an intent (the shopper's record, the session's facts, the order's cart
-- lines, the shopper's open sessions), in a function so that their plan is kept: each finds its rows
-- by a key, and planning them at every call (the connections' `plan_cache_mode = force_custom_plan`)
-- took twice as long as running them (181 µs against 87 µs per call, BENCHMARKS.md session 19). The
-- tables read have no partial index a kept plan could wrongly prefer to the key's (migration 0008's
-- head): each lookup has one index that serves it, and with sequential and bitmap scans off, only
-- that one.
--
-- The claim's walk of the queue keeps its plan too, at the end of this file, once the index its probes
-- misused is gone.
CREATE FUNCTION forwarder_delivery_reads(p_shopper TEXT, p_order TEXT, p_channel TEXT, p_open_since BIGINT)
RETURNS TABLE (state TEXT, identity TEXT, facts TEXT, line_ids TEXT[], line_shoppers TEXT[], lines TEXT[],
               line_times BIGINT[], open_sessions TEXT[])
LANGUAGE plpgsql
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH cart AS (SELECT c.line_id, c.shopper_key, c.line, c.updated_at FROM cart_lines c WHERE c.order_id = p_order)
    SELECT s.state, s.identity,
        (SELECT f.facts FROM cdp_sessions f WHERE f.channel = p_channel
           AND f.browser_id = (s.state::jsonb -> 'browsers' ->> p_channel)),
        (SELECT array_agg(k.line_id ORDER BY k.updated_at, k.line_id) FROM cart k),
        (SELECT array_agg(k.shopper_key ORDER BY k.updated_at, k.line_id) FROM cart k),
        (SELECT array_agg(k.line ORDER BY k.updated_at, k.line_id) FROM cart k),
        (SELECT array_agg(k.updated_at ORDER BY k.updated_at, k.line_id) FROM cart k),
        (SELECT array_agg(o.facts ORDER BY o.last_event_at, o.channel, o.browser_id) FROM cdp_sessions o
           WHERE p_open_since IS NOT NULL AND o.shopper_key = p_shopper AND o.last_event_at >= p_open_since)
    FROM (VALUES (1)) AS one (x) LEFT JOIN shoppers s ON s.shopper_key = p_shopper;
END
$$;

-- An enrichment's save, in a function so that its plans are kept (planning the statement at every
-- call took about as long as running it: 144 µs against 134 µs, BENCHMARKS.md session 19). The
-- intent is found by its key alone: `state <> 'dead'` where the statement said `state = 'pending'`
-- (the same rows), so that no partial index of pending or unenriched intents can serve it in a plan
-- made while the queue was empty (migration 0008's head). The identities are recorded only if the
-- claim still holds; each shopper once, in key order like every other writer (the caller's order).
CREATE FUNCTION forwarder_save_enrichment(
    p_id BIGINT, p_claim TEXT, p_enrichment TEXT, p_now BIGINT, p_keys TEXT[], p_identities TEXT[]
) RETURNS BOOLEAN LANGUAGE plpgsql
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
BEGIN
    UPDATE intents SET enrichment = p_enrichment, enriched = TRUE, secrets = NULL, enrich_claim = NULL,
        updated_at = p_now
    WHERE id = p_id AND enrich_claim = p_claim AND NOT enriched AND state <> 'dead';
    IF NOT FOUND THEN
        RETURN FALSE;
    END IF;
    INSERT INTO shoppers (shopper_key, state, identity, updated_at)
    SELECT k, '{}', i, p_now FROM unnest(p_keys, p_identities) WITH ORDINALITY AS t(k, i, n) ORDER BY n
    ON CONFLICT (shopper_key) DO UPDATE SET identity = excluded.identity, updated_at = excluded.updated_at;
    RETURN TRUE;
END
$$;

-- The claim's walk reads the intents it may claim (pending and enriched) in id order from an index
-- of those alone, which replaces `intents_pending_id` (migration 0002, every pending intent). Kept
-- plans (the claim's UPDATE after its walk, migration 0008) were made on the first claims of a
-- connection; where the statistics knew the queue empty (autovacuum analyzes a drained queue), the
-- UPDATE's probes of a shopper's older and claimed intents read `intents_pending_id` whole, whose
-- predicate their `state = 'pending'` matches, instead of `intents_queue` by the shopper: 2.8 ms per
-- intent claimed on a queue of 20,000 until the next ANALYZE (`auto_explain`, BENCHMARKS.md session
-- 19). The probes name no `enriched`, so no plan of theirs can use this index. The operators' list
-- of the queue reads it and `intents_unenriched`, each in id order.
-- The table is locked first, for reading too: building the index under a SHARE lock and then
-- dropping the old one (ACCESS EXCLUSIVE) would deadlock with the claims and applies of replicas
-- still running, which wait for the build between a read and a write of `intents`.
LOCK TABLE intents IN ACCESS EXCLUSIVE MODE;
CREATE INDEX intents_ready_id ON intents (id) WHERE state = 'pending' AND enriched;
DROP INDEX intents_pending_id;

-- The claim keeps the plan of its walk of the queue too, as it keeps its other statements' since
-- migration 0008: planning the walk at every call took 0.28–0.32 ms of the server per claim, a third
-- of its time (BENCHMARKS.md, session 19). Kept while `intents_pending_id` existed, the walk was planned on
-- the empty queue a replica's first claims poll, and its probes then read that index whole: half a
-- second a claim on a queue of 77,000 intents. Now the intents it may claim are read in id order from
-- `intents_ready_id`, and each check of a shopper probes `intents_queue` by the shopper: the check
-- for an older intent compares `o.id + 0`, not `o.id`, so that the primary key cannot serve it as a
-- range (statistics taken while the queue held one shopper's intents made that range look as
-- selective as the shopper, for the walk planned at every call as for the UPDATE kept since 0008).
-- A test plans the claim on an empty queue, with statistics of nothing, of empty tables and of one
-- shopper's queue, and runs it on 60,000 rows.
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
-- Every plan kept, the walk's too (see above).
SET plan_cache_mode = force_generic_plan
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
               AND o.state = 'pending' AND o.id + 0 < i.id LIMIT 1) IS NULL
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

