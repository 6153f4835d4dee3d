-- Replicas register and heartbeat; a claim records its replica, so a claim whose replica stopped
-- heartbeating for delivery.takeover_secs is taken over without waiting for its lease. Leases and
-- heartbeats are judged by the database's clock, so replicas whose clocks disagree cannot take
-- each other's claims early.
CREATE TABLE replicas (
    id           TEXT   PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
CREATE FUNCTION forwarder_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE AS $$ SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT $$;
ALTER TABLE intents ADD COLUMN replica_id TEXT;
-- Enrichment claims: a stale enricher's writes are refused.
ALTER TABLE intents ADD COLUMN enrich_claim TEXT;
-- Delivery records its progress after each event CDP acknowledges: the plan (the JSON array of
-- the intent's events) once in `progress`, and `sent`, the events acknowledged. Plans stored in the
-- earlier shape ({"events": [...], "sent": n}) are read as they are (src/delivery/send.rs,
-- stored_plan): replicas of both versions may share the database during a rolling upgrade.
ALTER TABLE intents ADD COLUMN sent BIGINT NOT NULL DEFAULT 0;
-- Intents held by a worker, by shopper: a replayed dead letter (older than the intent in flight)
-- waits until its shopper has none in flight.
CREATE INDEX intents_claimed ON intents (shopper_key) WHERE claim_id IS NOT NULL;
-- Everything a delivery writes under its claim, in one call (one round trip): the claim is checked
-- (and its row locked until commit) first; nothing is written if another worker holds the intent
-- (returns false). Writes run in the order given: the plan and the count of events acknowledged,
-- the record of the cart (ops 'put', 'delete_line', 'delete_cart', 'move'), shoppers' records, CDP
-- sessions' facts; then the settlement ('ack', 'retry', 'dead', or NULL for none).
CREATE FUNCTION forwarder_apply(
    p_id BIGINT, p_claim TEXT, p_now BIGINT,
    p_set_plan BOOLEAN, p_plan TEXT, p_sent BIGINT,
    p_cart_ops TEXT[], p_cart_orders TEXT[], p_cart_lines TEXT[], p_cart_shoppers TEXT[],
    p_cart_json TEXT[], p_cart_at BIGINT[],
    p_shopper_keys TEXT[], p_shopper_states TEXT[], p_shopper_identities TEXT[],
    p_session_channels TEXT[], p_session_browsers TEXT[], p_session_shoppers TEXT[],
    p_session_at BIGINT[], p_session_facts TEXT[],
    p_settle TEXT, p_settle_at BIGINT, p_settle_text TEXT
) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    UPDATE intents
    SET updated_at = p_now,
        progress = CASE WHEN p_set_plan THEN p_plan ELSE progress END,
        sent = COALESCE(p_sent, CASE WHEN p_set_plan THEN 0 ELSE sent END)
    WHERE id = p_id AND claim_id = p_claim AND state = 'pending';
    IF NOT FOUND THEN
        RETURN FALSE;
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

-- Claims the head of up to p_limit shoppers' queues, in one call. Candidates are heads whose claim
-- (if any) is not live (a claim is live while its lease runs and its replica, when it has one,
-- heartbeats), of shoppers with no other intent in flight (a replayed dead letter, older
-- than the intent running, waits); a transaction-level advisory lock per shopper makes concurrent
-- claimers of one shopper take turns (the losers skip it). The second statement, which starts once
-- those locks are held, checks again with a snapshot that sees every claim committed before.
CREATE FUNCTION forwarder_claim(
    p_claim TEXT, p_replica TEXT, p_lease BIGINT, p_now BIGINT, p_limit INTEGER, p_takeover BIGINT
) RETURNS TABLE (id BIGINT, shopper_key TEXT, intent TEXT, enrichment TEXT, progress TEXT, sent BIGINT,
                 attempts BIGINT, created_at BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    db_now BIGINT := forwarder_now_ms();
    ids BIGINT[];
BEGIN
    SELECT array_agg(c.id) INTO ids FROM (
        SELECT i.id, i.shopper_key FROM intents i
        WHERE i.state = 'pending' AND i.enriched AND i.next_attempt_at <= p_now
          AND NOT (i.claim_id IS NOT NULL AND i.lease_until >= db_now
               AND (i.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover)))
          AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
                          AND o.state = 'pending' AND o.id < i.id)
          AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
                          AND o.claim_id IS NOT NULL AND o.state = 'pending' AND o.id <> i.id
                          AND (o.claim_id IS NOT NULL AND o.lease_until >= db_now
               AND (o.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = o.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover))))
        ORDER BY i.id LIMIT p_limit OFFSET 0) c
    -- Advisory locks are the database's, not the schema's: the schema is part of the key.
    WHERE pg_try_advisory_xact_lock(hashtextextended(current_schema() || '/' || c.shopper_key, 7306));
    IF ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE intents i SET claim_id = p_claim, replica_id = p_replica, lease_until = db_now + p_lease,
        attempts = i.attempts + 1, updated_at = p_now
    WHERE i.id = ANY(ids) AND i.state = 'pending' AND i.next_attempt_at <= p_now
      AND NOT (i.claim_id IS NOT NULL AND i.lease_until >= db_now
               AND (i.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover)))
      AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
                      AND o.state = 'pending' AND o.id < i.id)
      AND NOT EXISTS (SELECT 1 FROM intents o WHERE o.shopper_key = i.shopper_key
                      AND o.claim_id IS NOT NULL AND o.state = 'pending' AND o.id <> i.id
                      AND (o.claim_id IS NOT NULL AND o.lease_until >= db_now
               AND (o.replica_id IS NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.id = o.replica_id
                                                   AND r.heartbeat_at >= db_now - p_takeover))))
    RETURNING i.id, i.shopper_key, i.intent, i.enrichment, i.progress, i.sent, i.attempts, i.created_at;
END
$$;
