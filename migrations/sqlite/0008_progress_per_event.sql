-- Delivery records its progress after each event CDP acknowledges: the plan (the JSON array of
-- the intent's events) is stored once in `progress`, and `sent` counts the events acknowledged.
-- Plans stored in the earlier shape ({"events": [...], "sent": n}) are converted.
ALTER TABLE intents ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;
UPDATE intents
SET sent = COALESCE(json_extract(progress, '$.sent'), 0),
    progress = json_extract(progress, '$.events')
WHERE progress IS NOT NULL AND json_valid(progress) AND json_type(progress, '$.events') = 'array';
-- Intents held by a worker, by queue: a replayed dead letter (older than the intent in flight)
-- waits until its shopper has none in flight.
CREATE INDEX intents_claimed ON intents (queue_id) WHERE claim_id IS NOT NULL;
