-- Delivery's first reads of an intent (the shopper's record, the session's facts, the order's cart
-- lines, the shopper's open sessions), in a function so that their plan is kept: each finds its rows
-- by a key, and planning them at every call (the connections' `plan_cache_mode = force_custom_plan`)
-- took twice as long as running them (181 µs against 87 µs per call, BENCHMARKS.md session 19). The
-- tables read have no partial index a kept plan could wrongly prefer to the key's (migration 0008's
-- head): each lookup has one index that serves it, and with sequential and bitmap scans off, only
-- that one.
--
-- The claim's walk of the queue stays planned at every call. Kept, it was planned on the empty queue
-- a replica's first claims poll, and there its probes of each shopper's older and claimed intents
-- read `intents_pending_id` whole instead of `intents_queue` by the shopper: half a second a claim
-- on a queue of 77,000 intents (session 19; the test of kept plans now plans on an empty queue).
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
-- of the queue reads the primary key in id order instead.
CREATE INDEX intents_ready_id ON intents (id) WHERE state = 'pending' AND enriched;
DROP INDEX intents_pending_id;
