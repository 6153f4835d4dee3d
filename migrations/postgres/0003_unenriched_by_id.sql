-- Enrichment claims walk the unenriched intents in id order (the index by enrich_after alone
-- needed a sort of every due intent).
DROP INDEX intents_enrich;
CREATE INDEX intents_unenriched ON intents (id, enrich_after) WHERE state = 'pending' AND NOT enriched;
