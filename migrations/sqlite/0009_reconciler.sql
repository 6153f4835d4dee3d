-- The order ledger's reconciliation with OrderCloud (src/reconcile/): how far it has looked
-- (`watermark`, epoch ms of DateSubmitted) and who is looking now (a lease, so that one process at
-- a time reconciles a window). One row per reconciler.
CREATE TABLE reconciler (
    name        TEXT    PRIMARY KEY,
    watermark   INTEGER,
    holder      TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0
);
-- The first pass looks no further back than this migration: submits stored before it are keyed by
-- their LogID, not by their order, and would look lost.
INSERT INTO reconciler (name, watermark) VALUES ('orders', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));

-- The landing check (src/reconcile/verify.rs): an order whose CHECKOUT CDP acknowledged, to be
-- looked up in CDP at `due_at`; with the submit's intent and enrichment, to send it again if CDP
-- holds no such order. Written with the delivery's write that records the CHECKOUT.
CREATE TABLE order_checks (
    order_id    TEXT    PRIMARY KEY,
    shopper_key TEXT    NOT NULL,
    intent      TEXT    NOT NULL,
    enrichment  TEXT,
    due_at      INTEGER NOT NULL,
    -- The due time the CHECKOUT's write set: names this round of checks (repairs' dedupe keys).
    since       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    repairs     INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
);
CREATE INDEX order_checks_due ON order_checks (due_at);
