-- Delivery records its progress after each event CDP acknowledges: the plan (the JSON array of
-- the intent's events) is stored once in `progress`, and `sent` counts the events acknowledged.
-- Plans stored in the earlier shape ({"events": [...], "sent": n}) are read as they are
-- (src/delivery/send.rs, stored_plan).
ALTER TABLE intents ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;
-- Intents held by a worker, by queue: a replayed dead letter (older than the intent in flight)
-- waits until its shopper has none in flight.
CREATE INDEX intents_claimed ON intents (queue_id) WHERE claim_id IS NOT NULL;
