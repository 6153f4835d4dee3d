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
