-- An apply's statements (`forwarder_apply`, migration 0005) are planned once per connection, not at
-- every call: planning them was a tenth of the PostgreSQL server's CPU while a backlog drained
-- (BENCHMARKS.md, session 13). Each reads rows by a key it is given (the intent's id, the cart's
-- order and line), and with sequential and bitmap scans off, the plan made once — even on an empty
-- queue — is an index lookup however large the queue grows. (A plan made on an empty queue and kept
-- had otherwise scanned it: BENCHMARKS.md, session 10. The claim's statements, which choose among
-- the queue's rows, are still planned at every call.)
ALTER FUNCTION forwarder_apply(BIGINT, TEXT, BIGINT, BOOLEAN, TEXT, BIGINT, TEXT[], TEXT[], TEXT[], TEXT[],
    TEXT[], BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[], TEXT, BIGINT, TEXT)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off;
