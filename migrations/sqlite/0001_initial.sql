-- Outbox of intents: one queue per shopper (ordered by id). Acked intents are deleted;
-- dead letters stay with state = 'dead'.
CREATE TABLE intents (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe_key      TEXT    NOT NULL,
    shopper_key     TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    intent          TEXT    NOT NULL,
    secrets         TEXT,
    enriched        INTEGER NOT NULL DEFAULT 0,
    enrichment      TEXT,
    enrich_after    INTEGER NOT NULL DEFAULT 0,
    enrich_attempts INTEGER NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    progress        TEXT,
    next_attempt_at INTEGER NOT NULL,
    claim_id        TEXT,
    lease_until     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    dead_at         INTEGER
);
CREATE INDEX intents_queue ON intents (shopper_key, id) WHERE state = 'pending';
CREATE INDEX intents_enrich ON intents (enrich_after) WHERE state = 'pending' AND enriched = 0;
CREATE INDEX intents_dead ON intents (dead_at) WHERE state = 'dead';

-- Every LogID accepted, so that OrderCloud's redeliveries and replays are answered without a second intent.
CREATE TABLE seen_webhooks (
    dedupe_key TEXT    PRIMARY KEY,
    seen_at    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX seen_webhooks_age ON seen_webhooks (seen_at);

CREATE TABLE shoppers (
    shopper_key TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    identity    TEXT,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE cdp_sessions (
    channel       TEXT    NOT NULL,
    browser_id    TEXT    NOT NULL,
    shopper_key   TEXT    NOT NULL,
    last_event_at INTEGER NOT NULL,
    facts         TEXT    NOT NULL,
    PRIMARY KEY (channel, browser_id)
) WITHOUT ROWID;
CREATE INDEX cdp_sessions_shopper ON cdp_sessions (shopper_key, last_event_at);

CREATE TABLE cart_lines (
    order_id    TEXT    NOT NULL,
    line_id     TEXT    NOT NULL,
    shopper_key TEXT    NOT NULL,
    line        TEXT    NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (order_id, line_id)
) WITHOUT ROWID;
CREATE INDEX cart_lines_shopper ON cart_lines (shopper_key, updated_at);

CREATE TABLE health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);
