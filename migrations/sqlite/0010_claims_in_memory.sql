-- Delivery's claims are held in the serving process's memory (src/store/sqlite/claims.rs), no longer
-- written into the intents' rows. Claims an earlier version left in the file are void (the process
-- that held them is gone: the file's lock is ours), and their index is dropped. The columns stay,
-- unused: dropping them would rewrite the whole table.
UPDATE intents SET claim_id = NULL, lease_until = NULL WHERE claim_id IS NOT NULL;
DROP INDEX intents_claimed;
