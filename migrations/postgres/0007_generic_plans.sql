-- Delivery's two functions run the same few statements at every call, with different values. Left
-- to itself, PostgreSQL plans a statement anew at each run (a "custom plan") whenever the plan made
-- once for any values (the "generic plan") is estimated costlier, which the settings that pin the
-- claim's walk make it seem. Planning was then a quarter of the server's CPU while a backlog drains
-- (BENCHMARKS.md, session 13). The plans these statements need do not depend on the values: the
-- generic plan is kept.
ALTER FUNCTION forwarder_claim(TEXT, TEXT, BIGINT, BIGINT, INTEGER, BIGINT)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION forwarder_apply(BIGINT, TEXT, BIGINT, BOOLEAN, TEXT, BIGINT, TEXT[], TEXT[], TEXT[], TEXT[],
    TEXT[], BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[], TEXT, BIGINT, TEXT)
    SET plan_cache_mode = force_generic_plan;
