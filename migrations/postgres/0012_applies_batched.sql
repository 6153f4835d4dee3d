-- Delivery's writes of several intents in one call: the store sends together the writes asked while a
-- call of them runs (progress, session facts, shopper records, cart lines and settles), instead of one
-- call per acknowledged CDP event (about 10,000 calls per 7,000 events drained, each its own round
-- trip and transaction, BENCHMARKS.md session 25). Each intent's writes are `forwarder_apply`'s
-- (migration 0008), called once per intent in the order given: fenced by the intent's claim, its
-- plans kept. The answer holds, per intent, whether its claim held (`forwarder_apply`'s answer).
--
-- The lists of cart lines, shopper records and sessions are every intent's, one after the other; the
-- counts say how many each intent has. The writes of a CONFIRM's or a CHECKOUT's progress and of a
-- landing check are not sent here: `forwarder_apply_durable` (migration 0009) writes them alone,
-- since its commit waits for the disk; this call's commit does not (`forwarder_apply` turns
-- `synchronous_commit` off for the transaction).
--
-- An error fails the whole call and commits nothing (a value one intent holds, a deadlock with
-- another replica's writes, a statement timeout): the store then calls this function again for each
-- intent alone, so that only the intent at fault fails. Replicas of the release before keep calling
-- `forwarder_apply` during a rolling upgrade.
CREATE FUNCTION forwarder_apply_batch(
    p_ids BIGINT[], p_claims TEXT[], p_now BIGINT,
    p_set_plans BOOLEAN[], p_plans TEXT[], p_sents BIGINT[],
    p_cart_counts INT[], p_cart_ops TEXT[], p_cart_orders TEXT[], p_cart_lines TEXT[], p_cart_shoppers TEXT[],
    p_cart_json TEXT[], p_cart_at BIGINT[],
    p_shopper_counts INT[], p_shopper_keys TEXT[], p_shopper_states TEXT[], p_shopper_identities TEXT[],
    p_session_counts INT[], p_session_channels TEXT[], p_session_browsers TEXT[], p_session_shoppers TEXT[],
    p_session_at BIGINT[], p_session_facts TEXT[],
    p_settles TEXT[], p_settle_ats BIGINT[], p_settle_texts TEXT[]
) RETURNS BOOLEAN[] LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    held BOOLEAN[] := '{}';
    -- The first element of the next intent's cart lines, shopper records and sessions.
    c INT := 1;
    s INT := 1;
    f INT := 1;
    c_to INT;
    s_to INT;
    f_to INT;
BEGIN
    FOR i IN 1 .. COALESCE(array_length(p_ids, 1), 0) LOOP
        c_to := c + p_cart_counts[i] - 1;
        s_to := s + p_shopper_counts[i] - 1;
        f_to := f + p_session_counts[i] - 1;
        held := held || forwarder_apply(
            p_ids[i], p_claims[i], p_now, p_set_plans[i], p_plans[i], p_sents[i],
            p_cart_ops[c:c_to], p_cart_orders[c:c_to], p_cart_lines[c:c_to], p_cart_shoppers[c:c_to],
            p_cart_json[c:c_to], p_cart_at[c:c_to],
            p_shopper_keys[s:s_to], p_shopper_states[s:s_to], p_shopper_identities[s:s_to],
            p_session_channels[f:f_to], p_session_browsers[f:f_to], p_session_shoppers[f:f_to],
            p_session_at[f:f_to], p_session_facts[f:f_to],
            p_settles[i], p_settle_ats[i], p_settle_texts[i]);
        c := c_to + 1;
        s := s_to + 1;
        f := f_to + 1;
    END LOOP;
    -- The counts must have covered the lists exactly (else an intent got another's writes): if not,
    -- everything written is rolled back.
    IF c IS DISTINCT FROM COALESCE(array_length(p_cart_ops, 1), 0) + 1
       OR s IS DISTINCT FROM COALESCE(array_length(p_shopper_keys, 1), 0) + 1
       OR f IS DISTINCT FROM COALESCE(array_length(p_session_channels, 1), 0) + 1 THEN
        RAISE EXCEPTION 'forwarder_apply_batch: the counts do not cover the lists' USING ERRCODE = 'internal_error';
    END IF;
    RETURN held;
END
$$;
