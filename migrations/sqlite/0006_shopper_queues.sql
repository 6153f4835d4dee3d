-- A shopper's pending intents form a queue, numbered by the id of the intent that started it
-- (src/store/sqlite/mod.rs, join_queue). Claims find each queue's head through (queue_id, id),
-- whose entries follow time, instead of (shopper_key, id): shopper keys hold OrderCloud's random
-- order IDs, so each webhook's entry dirtied an index page of its own.
ALTER TABLE intents ADD COLUMN queue_id INTEGER;
UPDATE intents SET queue_id = id WHERE state <> 'pending';
UPDATE intents SET queue_id = (SELECT MIN(o.id) FROM intents o
                               WHERE o.shopper_key = intents.shopper_key AND o.state = 'pending')
WHERE state = 'pending';
-- Each shopper's current queue: written when a queue starts, read by the shopper's later webhooks.
-- A row whose queue has emptied is stale (a new one starts); they are pruned with the dedupe records.
CREATE TABLE shopper_queues (
    shopper_key TEXT    PRIMARY KEY,
    queue_id    INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO shopper_queues (shopper_key, queue_id)
SELECT shopper_key, MIN(id) FROM intents WHERE state = 'pending' GROUP BY shopper_key;
CREATE INDEX intents_by_queue ON intents (queue_id, id) WHERE state = 'pending';
DROP INDEX intents_queue;
