-- Delivery's first reads of several intents in one call: the store asks them together for the
-- intents in flight together (those asked while a call runs go in the next), instead of one call
-- per intent (10,000 calls of about 200 µs per 10,000 webhooks, BENCHMARKS.md session 23). Each ask
-- is answered as `forwarder_delivery_reads` (migration 0010) answers it, with its place `n` (from 1).
-- That function stays: replicas of the previous version call it during a rolling upgrade, and
-- this version reads each ask of a batch alone with it when a shopper record of the batch cannot be
-- read (its caller alone then fails).
-- Its plan is kept, as the single call's is, and must find each ask's rows by key whatever the
-- statistics said when it was made: with the tables analyzed empty the planner otherwise joins the
-- asks to a scan of every shopper (4,039 pages of 20,000 shoppers a call, the test of kept plans).
-- Without hash and merge joins, the asks are the outer side of a nested loop of index probes.
CREATE FUNCTION forwarder_delivery_reads_batch(
    p_shoppers TEXT[], p_orders TEXT[], p_channels TEXT[], p_open_since BIGINT[]
) RETURNS TABLE (n BIGINT, state TEXT, identity TEXT, facts TEXT, line_ids TEXT[], line_shoppers TEXT[],
                 lines TEXT[], line_times BIGINT[], open_sessions TEXT[])
LANGUAGE plpgsql
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT a.n, s.state, s.identity,
        (SELECT f.facts FROM cdp_sessions f WHERE f.channel = a.channel
           AND f.browser_id = (s.state::jsonb -> 'browsers' ->> a.channel)),
        c.line_ids, c.line_shoppers, c.lines, c.line_times,
        (SELECT array_agg(o.facts ORDER BY o.last_event_at, o.channel, o.browser_id) FROM cdp_sessions o
           WHERE a.open_since IS NOT NULL AND o.shopper_key = a.shopper AND o.last_event_at >= a.open_since)
    FROM unnest(p_shoppers, p_orders, p_channels, p_open_since)
         WITH ORDINALITY AS a (shopper, order_id, channel, open_since, n)
    LEFT JOIN shoppers s ON s.shopper_key = a.shopper
    LEFT JOIN LATERAL (
        SELECT array_agg(k.line_id ORDER BY k.updated_at, k.line_id) AS line_ids,
               array_agg(k.shopper_key ORDER BY k.updated_at, k.line_id) AS line_shoppers,
               array_agg(k.line ORDER BY k.updated_at, k.line_id) AS lines,
               array_agg(k.updated_at ORDER BY k.updated_at, k.line_id) AS line_times
        FROM cart_lines k WHERE k.order_id = a.order_id
    ) c ON TRUE;
END
$$;
