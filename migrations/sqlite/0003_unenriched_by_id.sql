-- Enrichment claims walk the unenriched intents in id order; the old index (by enrich_after) left
-- the planner walking every pending intent to find them.
DROP INDEX intents_enrich;
CREATE INDEX intents_unenriched ON intents (id, enrich_after) WHERE state = 'pending' AND enriched = 0;
