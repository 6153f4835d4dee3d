-- Claims walk the pending intents in id order (the head of each shopper's queue first).
CREATE INDEX intents_pending_id ON intents (id) WHERE state = 'pending';
