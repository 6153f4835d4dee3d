-- Each shopper's current queue is kept in the writer's memory, loaded from the pending intents
-- (src/store/sqlite/queues.rs): intake no longer reads or writes a row of this table per webhook.
DROP TABLE shopper_queues;
