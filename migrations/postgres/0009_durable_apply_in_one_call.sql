-- The progress of a CONFIRM or a CHECKOUT (which must wait for the WAL's flush: sent twice, it
-- could make a second order) and an order's landing check, written in one call whose commit waits. Before, such an
-- apply was a transaction of its own: BEGIN, forwarder_apply, SET LOCAL synchronous_commit = on,
-- the landing check's upsert, COMMIT — five round trips where any other progress takes one.
-- forwarder_apply (migration 0008) is called as it is; replicas of the version before keep calling
-- it in their transaction.
CREATE FUNCTION forwarder_apply_durable(
    p_id BIGINT, p_claim TEXT, p_now BIGINT,
    p_set_plan BOOLEAN, p_plan TEXT, p_sent BIGINT,
    p_cart_ops TEXT[], p_cart_orders TEXT[], p_cart_lines TEXT[], p_cart_shoppers TEXT[],
    p_cart_json TEXT[], p_cart_at BIGINT[],
    p_shopper_keys TEXT[], p_shopper_states TEXT[], p_shopper_identities TEXT[],
    p_session_channels TEXT[], p_session_browsers TEXT[], p_session_shoppers TEXT[],
    p_session_at BIGINT[], p_session_facts TEXT[],
    p_settle TEXT, p_settle_at BIGINT, p_settle_text TEXT,
    -- Landing checks to write (one per submit), as the columns of order_checks.
    p_check_orders TEXT[], p_check_shoppers TEXT[], p_check_intents TEXT[], p_check_enrichments TEXT[],
    p_check_due BIGINT[]
) RETURNS BOOLEAN LANGUAGE plpgsql
SET jit = off SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF NOT forwarder_apply(p_id, p_claim, p_now, p_set_plan, p_plan, p_sent,
                           p_cart_ops, p_cart_orders, p_cart_lines, p_cart_shoppers, p_cart_json, p_cart_at,
                           p_shopper_keys, p_shopper_states, p_shopper_identities,
                           p_session_channels, p_session_browsers, p_session_shoppers, p_session_at,
                           p_session_facts, p_settle, p_settle_at, p_settle_text) THEN
        RETURN FALSE;
    END IF;
    -- After forwarder_apply turned it off for its transaction: the last setting holds at commit.
    PERFORM set_config('synchronous_commit', 'on', true);
    FOR i IN 1 .. COALESCE(array_length(p_check_orders, 1), 0) LOOP
        INSERT INTO order_checks (order_id, shopper_key, intent, enrichment, due_at, since)
        VALUES (p_check_orders[i], p_check_shoppers[i], p_check_intents[i], p_check_enrichments[i],
                p_check_due[i], p_check_due[i])
        ON CONFLICT (order_id) DO UPDATE SET shopper_key = excluded.shopper_key, intent = excluded.intent,
            enrichment = excluded.enrichment, due_at = excluded.due_at, since = excluded.since, lease_until = 0,
            attempts = 0;
    END LOOP;
    RETURN TRUE;
END
$$;
