-- Delivery's claims are held in the serving process's memory (src/store/sqlite/claims.rs), no longer
-- written into the intents' rows. Claims an earlier version left in the file are void (the service
-- runs this at start holding the file's lock, so the process that held them is gone; a `dead-letters`
-- command runs it only on a file no service holds), and their index is dropped. The columns stay,
-- unused: dropping them would rewrite the whole table.
UPDATE intents SET claim_id = NULL, lease_until = NULL WHERE claim_id IS NOT NULL;
DROP INDEX intents_claimed;
