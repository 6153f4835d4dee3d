-- The order ledger's reconciliation with OrderCloud (src/reconcile/): how far it has looked
-- (`watermark`, epoch ms of DateSubmitted) and who is looking now (a lease, so that one process at
-- a time reconciles a window). One row per reconciler.
CREATE TABLE reconciler (
    name        TEXT    PRIMARY KEY,
    watermark   INTEGER,
    holder      TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0
);
