-- The order ledger's reconciliation with OrderCloud (src/reconcile/): how far it has looked
-- (`watermark`, epoch ms of DateSubmitted) and which replica is looking now (a lease judged by the
-- database's clock, so that one replica at a time reconciles a window). One row per reconciler.
CREATE TABLE reconciler (
    name        TEXT   PRIMARY KEY,
    watermark   BIGINT,
    holder      TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0
);
