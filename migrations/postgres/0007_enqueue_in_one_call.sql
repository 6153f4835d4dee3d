-- Intake's batch in one call (one round trip, one statement to plan once), instead of a
-- transaction of five (BEGIN, the shoppers' locks, the dedupe keys, the intents, COMMIT); measured
-- in BENCHMARKS.md (session 13). Called outside any transaction: it commits before the service reads
-- its answer, and the commit waits for the WAL's flush (synchronous_commit as the server sets it)
-- — a 200 still stands for a commit on disk.
--
-- Items are the batch's first occurrence of each dedupe key, in arrival order; p_lock_shoppers their
-- shoppers, in any order and with repeats. A shopper's intents must get ids in commit order across
-- replicas (the queue is ordered by id): intake transactions touching the same shopper take turns,
-- in sorted order, so they cannot deadlock. Keys already seen insert nothing. Returns the id of each
-- intent inserted, with its dedupe key.
CREATE FUNCTION forwarder_enqueue(
    p_now BIGINT, p_lock_shoppers TEXT[],
    p_keys TEXT[], p_shoppers TEXT[], p_kinds TEXT[], p_intents TEXT[], p_secrets TEXT[],
    p_enriched BOOLEAN[], p_states TEXT[], p_errors TEXT[], p_enrichments TEXT[]
) RETURNS TABLE (o_key TEXT, o_id BIGINT) LANGUAGE plpgsql
-- Its statements insert the rows they are given and read no table to choose them, so the plan made
-- once holds however large the queue grows: kept, rather than planned at every call as the service's
-- connections otherwise do (plan_cache_mode = force_custom_plan, src/store/postgres.rs: a plan made
-- on an empty queue and kept turns claims into scans). A few rows each: no JIT.
SET plan_cache_mode = force_generic_plan SET jit = off
AS $$
BEGIN
    -- Sorted here, by the database's collation, as earlier versions' intake sorted them: replicas of
    -- both versions take a batch's locks in the same order during a rolling upgrade.
    PERFORM pg_advisory_xact_lock(hashtextextended(current_schema() || '/' || k, 7305))
    FROM (SELECT DISTINCT k FROM unnest(p_lock_shoppers) AS k ORDER BY k) s;
    RETURN QUERY
    WITH fresh AS (
        INSERT INTO seen_webhooks AS w (dedupe_key, seen_at) SELECT k, p_now FROM unnest(p_keys) AS k
        ON CONFLICT (dedupe_key) DO NOTHING RETURNING w.dedupe_key)
    INSERT INTO intents AS i (dedupe_key, shopper_key, kind, intent, secrets, enriched, state, next_attempt_at,
                              last_error, created_at, updated_at, dead_at, enrichment)
    SELECT t.d, t.s, t.k, t.i, t.sec, t.e, t.st, p_now, t.le, p_now, p_now,
           CASE WHEN t.st = 'dead' THEN p_now END, t.en
    FROM unnest(p_keys, p_shoppers, p_kinds, p_intents, p_secrets, p_enriched, p_states, p_errors, p_enrichments)
         WITH ORDINALITY AS t(d, s, k, i, sec, e, st, le, en, ord)
    WHERE t.d IN (SELECT f.dedupe_key FROM fresh f)
    ORDER BY t.ord
    RETURNING i.dedupe_key, i.id;
END
$$;

-- The intent's text (2 KB and more with its line items) is compressed when a row grows past
-- PostgreSQL's threshold: with lz4 where the server has it (cheaper than pglz to write and to read back), pglz otherwise.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        -- Run as text: a server older than PostgreSQL 14 has no SET COMPRESSION to parse.
        EXECUTE 'ALTER TABLE intents ALTER COLUMN intent SET COMPRESSION lz4, '
             || 'ALTER COLUMN enrichment SET COMPRESSION lz4, ALTER COLUMN secrets SET COMPRESSION lz4';
        EXECUTE 'ALTER TABLE intent_progress ALTER COLUMN plan SET COMPRESSION lz4';
    END IF;
END
$$;
