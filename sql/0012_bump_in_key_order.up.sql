-- The usage writer's per-batch counter update (total_requests, last_used_at) as one
-- function whose plan locks the keys in id order by construction.
--
-- Until now the writer sent a statement that first locked the batch's keys in id order
-- (a CTE with ORDER BY ... FOR NO KEY UPDATE), so two batches touching the same keys, on
-- two connections or two replicas, queue instead of deadlocking, and then updated them
-- through a second join. For a batch of many distinct keys the planner chose hash joins
-- that read the whole of api_keys twice per batch (once per join), and every key was
-- visited twice and logged twice (the lock, then the update). With 10,000 keys in
-- rotation this statement was the largest part of PostgreSQL's work per request:
-- pg_stat_statements under benches/load.sh's kg-Nkeys, 15 s at c=50, 201 batches of
-- 2,000 distinct keys at 33.6 ms each, 16.8 us per request.
--
-- Here the batch is sorted by id and drives a nested loop over the primary key (hash
-- and merge joins, and the sequential scan they would need, are switched off for this
-- function only). A nested loop hands rows to the update in its outer side's order, so
-- the keys are locked, and updated, one visit each, in id order, as before. Measured
-- on PostgreSQL 15 with 10,000 keys, 2,000 distinct keys per call, committed, six
-- alternations: 29.7-39.1 ms for the old statement, 21.6-24.3 ms for this function.
--
-- updated_at is set here so the touch trigger's PL/pgSQL call is skipped (migration 10).

CREATE FUNCTION keygate_bump_key_counters(ids uuid[], counts int8[], last_used timestamptz[])
RETURNS void
LANGUAGE sql
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
AS $$
UPDATE api_keys k
SET total_requests = k.total_requests + v.n,
    last_used_at = greatest(k.last_used_at, v.last_used),
    updated_at = now()
FROM (SELECT * FROM unnest(ids, counts, last_used) AS u(id, n, last_used) ORDER BY id) v
WHERE k.id = v.id
$$;
