-- Outbox of intents: one queue per shopper (ordered by id). Acked intents are deleted;
-- dead letters stay with state = 'dead'. Times are epoch milliseconds.
CREATE TABLE intents (
    id              BIGSERIAL PRIMARY KEY,
    dedupe_key      TEXT    NOT NULL,
    shopper_key     TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    intent          TEXT    NOT NULL,
    secrets         TEXT,
    enriched        BOOLEAN NOT NULL DEFAULT FALSE,
    enrichment      TEXT,
    enrich_after    BIGINT  NOT NULL DEFAULT 0,
    enrich_attempts BIGINT  NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts        BIGINT  NOT NULL DEFAULT 0,
    progress        TEXT,
    next_attempt_at BIGINT  NOT NULL,
    claim_id        TEXT,
    lease_until     BIGINT,
    last_error      TEXT,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    dead_at         BIGINT
);
CREATE INDEX intents_queue ON intents (shopper_key, id) WHERE state = 'pending';
CREATE INDEX intents_enrich ON intents (enrich_after) WHERE state = 'pending' AND NOT enriched;
CREATE INDEX intents_dead ON intents (dead_at) WHERE state = 'dead';

-- Every LogID accepted; the primary key makes the losing insert of two replicas a duplicate.
CREATE TABLE seen_webhooks (
    dedupe_key TEXT   PRIMARY KEY,
    seen_at    BIGINT NOT NULL
);
CREATE INDEX seen_webhooks_age ON seen_webhooks (seen_at);

CREATE TABLE shoppers (
    shopper_key TEXT   PRIMARY KEY,
    state       TEXT   NOT NULL,
    identity    TEXT,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE cdp_sessions (
    channel       TEXT   NOT NULL,
    browser_id    TEXT   NOT NULL,
    shopper_key   TEXT   NOT NULL,
    last_event_at BIGINT NOT NULL,
    facts         TEXT   NOT NULL,
    PRIMARY KEY (channel, browser_id)
);
CREATE INDEX cdp_sessions_shopper ON cdp_sessions (shopper_key, last_event_at);

CREATE TABLE cart_lines (
    order_id    TEXT   NOT NULL,
    line_id     TEXT   NOT NULL,
    shopper_key TEXT   NOT NULL,
    line        TEXT   NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (order_id, line_id)
);
CREATE INDEX cart_lines_shopper ON cart_lines (shopper_key, updated_at);

CREATE TABLE health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at BIGINT  NOT NULL
);
