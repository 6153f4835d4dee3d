-- The order ledger's reconciliation with OrderCloud (src/reconcile/): how far it has looked
-- (`watermark`, epoch ms of DateSubmitted) and which replica is looking now (a lease judged by the
-- database's clock, so that one replica at a time reconciles a window). One row per reconciler.
CREATE TABLE reconciler (
    name        TEXT   PRIMARY KEY,
    watermark   BIGINT,
    holder      TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0
);
-- The first pass looks no further back than this migration: submits stored before it are keyed by
-- their LogID, not by their order, and would look lost.
INSERT INTO reconciler (name, watermark) VALUES ('orders', forwarder_now_ms());

-- The landing check (src/reconcile/verify.rs): an order whose CHECKOUT CDP acknowledged, to be
-- looked up in CDP at `due_at`; with the submit's intent and enrichment, to send it again if CDP
-- holds no such order. Written with the delivery's write that records the CHECKOUT.
CREATE TABLE order_checks (
    order_id    TEXT    PRIMARY KEY,
    shopper_key TEXT    NOT NULL,
    intent      TEXT    NOT NULL,
    enrichment  TEXT,
    due_at      BIGINT NOT NULL,
    -- The due time the CHECKOUT's write set: names this round of checks (repairs' dedupe keys).
    since       BIGINT NOT NULL,
    attempts    BIGINT NOT NULL DEFAULT 0,
    repairs     BIGINT NOT NULL DEFAULT 0,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_error  TEXT
);
CREATE INDEX order_checks_due ON order_checks (due_at);
