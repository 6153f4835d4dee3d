-- Delivery's two functions, replaced (same arguments, same answers) for two reasons.
--
-- A takeover claims an intent with the progress its stale worker committed while the claim waited
-- for the intent's row: the claim reads the progress by a statement of its own, after its UPDATE.
-- (Migration 0005's forwarder_claim read it in the statement that waited, with the snapshot from
-- before: the event that write recorded was sent again.)
--
-- Delivery's statements that find their rows by a key keep their plans (planned once per
-- connection instead of at every call: planning was about 40 % of the server's time per delivered
-- event, BENCHMARKS.md session 14). Sessions 10 and 13 kept plans and saw a deep queue stall: a plan
-- made on a connection's first call, when the queue is nearly empty, is kept while it grows, and on
-- a table the planner thinks empty a full scan of the partial index `intents_queue` (shopper, id)
-- costs the same as a lookup by id, so it could be the plan kept (seen in the server's log: the
-- apply's check of its claim and the claim's UPDATE, each reading the whole queue). The statements
-- kept here leave the planner one path: they say `state <> 'dead'` where they said
-- `state = 'pending'` (the same rows: a state is one or the other, checked by the table), which no
-- partial index of pending intents matches, so their rows can only be found by the primary key (a
-- shopper's probes name the shopper, which `intents_queue` serves first). The claim's walk of the
-- queue, whose plan does depend on the queue, is still planned at every call.
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
-- The walk is planned at every call (the connections' setting, made sure of here).
SET plan_cache_mode = force_custom_plan
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
    -- From here on, statements that find their rows by key: their plans are kept (see the head of
    -- this file); the function's SET clause plans anew at the next call's walk.
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    WITH claimed AS (
        UPDATE intents i SET claim_id = p_claim, replica_id = p_replica, lease_until = db_now + p_lease,
            attempts = i.attempts + 1, updated_at = p_now
        WHERE i.id = ANY(ids) AND i.state <> 'dead' AND i.next_attempt_at <= p_now
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

CREATE OR REPLACE FUNCTION forwarder_apply(
    p_id BIGINT, p_claim TEXT, p_now BIGINT,
    p_set_plan BOOLEAN, p_plan TEXT, p_sent BIGINT,
    p_cart_ops TEXT[], p_cart_orders TEXT[], p_cart_lines TEXT[], p_cart_shoppers TEXT[],
    p_cart_json TEXT[], p_cart_at BIGINT[],
    p_shopper_keys TEXT[], p_shopper_states TEXT[], p_shopper_identities TEXT[],
    p_session_channels TEXT[], p_session_browsers TEXT[], p_session_shoppers TEXT[],
    p_session_at BIGINT[], p_session_facts TEXT[],
    p_settle TEXT, p_settle_at BIGINT, p_settle_text TEXT
) RETURNS BOOLEAN LANGUAGE plpgsql
-- Statements of a few rows each: compiling them (JIT, on by default in PostgreSQL) would cost more
-- than running them. Each finds its rows by a key: its plan is made once per connection and kept.
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- A takeover's claim waits for this lock, then finds the claim changed or not.
    -- `state <> 'dead'`, not `state = 'pending'`: the same rows (a state is one or the other), but
    -- no partial index of pending intents matches it, so the kept plan can only be a lookup by the
    -- primary key (see the head of this file).
    PERFORM 1 FROM intents WHERE id = p_id AND claim_id = p_claim AND state <> 'dead' FOR SHARE;
    IF NOT FOUND THEN
        RETURN FALSE;
    END IF;
    IF p_set_plan OR p_sent IS NOT NULL THEN
        INSERT INTO intent_progress AS p (intent_id, sent, plan)
        VALUES (p_id, COALESCE(p_sent, 0), p_plan)
        ON CONFLICT (intent_id) DO UPDATE
        SET sent = COALESCE(p_sent, CASE WHEN p_set_plan THEN 0 ELSE p.sent END),
            plan = CASE WHEN p_set_plan THEN p_plan ELSE p.plan END;
        IF p_set_plan THEN
            -- A plan an earlier version stored is replaced too.
            UPDATE intents SET progress = NULL WHERE id = p_id AND progress IS NOT NULL;
        END IF;
    END IF;
    FOR i IN 1 .. COALESCE(array_length(p_cart_ops, 1), 0) LOOP
        CASE p_cart_ops[i]
            WHEN 'put' THEN
                INSERT INTO cart_lines (order_id, line_id, shopper_key, line, updated_at)
                VALUES (p_cart_orders[i], p_cart_lines[i], p_cart_shoppers[i], p_cart_json[i], p_cart_at[i])
                ON CONFLICT (order_id, line_id) DO UPDATE SET shopper_key = excluded.shopper_key,
                    line = excluded.line, updated_at = excluded.updated_at;
            WHEN 'delete_line' THEN
                DELETE FROM cart_lines WHERE order_id = p_cart_orders[i] AND line_id = p_cart_lines[i];
            WHEN 'delete_cart' THEN
                DELETE FROM cart_lines WHERE order_id = p_cart_orders[i];
            WHEN 'move' THEN
                UPDATE cart_lines SET shopper_key = p_cart_shoppers[i] WHERE order_id = p_cart_orders[i];
        END CASE;
    END LOOP;
    FOR i IN 1 .. COALESCE(array_length(p_shopper_keys, 1), 0) LOOP
        INSERT INTO shoppers (shopper_key, state, identity, updated_at)
        VALUES (p_shopper_keys[i], p_shopper_states[i], p_shopper_identities[i], p_now)
        ON CONFLICT (shopper_key) DO UPDATE SET state = excluded.state,
            identity = COALESCE(excluded.identity, shoppers.identity), updated_at = excluded.updated_at;
    END LOOP;
    FOR i IN 1 .. COALESCE(array_length(p_session_channels, 1), 0) LOOP
        INSERT INTO cdp_sessions (channel, browser_id, shopper_key, last_event_at, facts)
        VALUES (p_session_channels[i], p_session_browsers[i], p_session_shoppers[i], p_session_at[i], p_session_facts[i])
        ON CONFLICT (channel, browser_id) DO UPDATE SET shopper_key = excluded.shopper_key,
            last_event_at = excluded.last_event_at, facts = excluded.facts;
    END LOOP;
    CASE p_settle
        WHEN 'ack' THEN
            DELETE FROM intents WHERE id = p_id;
            DELETE FROM intent_progress WHERE intent_id = p_id;
        WHEN 'retry' THEN
            UPDATE intents SET next_attempt_at = p_settle_at, last_error = p_settle_text, claim_id = NULL,
                lease_until = NULL, replica_id = NULL, updated_at = p_now
            WHERE id = p_id;
        WHEN 'dead' THEN
            UPDATE intents SET state = 'dead', last_error = p_settle_text, dead_at = p_now, updated_at = p_now,
                secrets = NULL, claim_id = NULL, lease_until = NULL, replica_id = NULL
            WHERE id = p_id;
        ELSE
            NULL;
    END CASE;
    RETURN TRUE;
END
$$;
