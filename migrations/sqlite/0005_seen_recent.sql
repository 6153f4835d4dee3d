-- LogIDs not yet merged into seen_webhooks, in arrival order (src/store/sqlite/seen.rs): no index,
-- so that storing a webhook's key writes no random page. Keys are GUID bytes or text, as in
-- seen_webhooks.
CREATE TABLE seen_recent (
    dedupe_key BLOB    NOT NULL,
    seen_at    INTEGER NOT NULL
);
