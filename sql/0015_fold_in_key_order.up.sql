-- The fold takes keys' counter rows in id order, as the writers do.
--
-- Migration 13 relied on SKIP LOCKED to keep a fold from ever waiting for a writer,
-- so the order in which it took rows did not matter. PostgreSQL does not keep that
-- promise in one case: when the row's updater commits between the fold's look at it
-- and its try at the lock, the try succeeds, and the fold then locks the row's newer
-- versions too, waiting for whichever transaction holds the newest one. That wait
-- ignores SKIP LOCKED (heap_lock_updated_tuple, PostgreSQL 15). A fold that had
-- taken rows in the table's physical order could so wait for a writer at key B while
-- holding key A > B that the writer, going up in id order, would need next: a
-- deadlock, reported to one of them as 40P01 (seen in the writers-and-folds test
-- about once in 200 runs).
--
-- Taking rows in id order makes every such wait safe: the writer the fold waits for
-- at key B has passed every key below B and needs only keys above it, and the fold
-- holds only keys below B. SKIP LOCKED stays: the fold still passes over rows that
-- writers hold, so in the common case it waits for none.
--
-- A fold first reads which keys are pending, in id order (one scan of the table and a
-- sort of those keys), then folds them in batches of that list, each batch locking
-- its keys through the primary key. Batches that each walked the primary key from
-- the lowest id to their next pending keys fetched every row in index order (psql,
-- 200,000 counter rows, median of five against migration 13's fold: 1,000 pending
-- keys 223 against 52 ms, 100,000 pending 5.2 against 3.1 s). The list costs about
-- what migration 13 did: 80 against 58 ms, 10,000 pending 430 against 354 ms,
-- 100,000 pending 3.0 against 3.0 s. The one-argument form stays for replicas not yet
-- upgraded: it folds the lowest pending ids, up to max_keys.

-- The keys with a pending count, in id order: what a fold goes through.
CREATE FUNCTION keygate_pending_key_ids() RETURNS uuid[]
LANGUAGE sql
STABLE
AS $$
SELECT coalesce(array_agg(api_key_id ORDER BY api_key_id), '{}')
FROM keygate_key_counters WHERE pending_requests > 0
$$;

CREATE FUNCTION keygate_fold_key_counters(keys uuid[]) RETURNS bigint
LANGUAGE sql
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
WITH due AS (
    SELECT api_key_id, pending_requests, last_used_at FROM keygate_key_counters
    WHERE api_key_id = ANY (keys) AND pending_requests > 0
    ORDER BY api_key_id
    FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE keygate_key_counters c SET pending_requests = 0
    FROM due WHERE c.api_key_id = due.api_key_id
    RETURNING due.api_key_id, due.pending_requests AS n, due.last_used_at
), folded AS (
    UPDATE api_keys k
    SET total_requests = k.total_requests + t.n,
        last_used_at = greatest(k.last_used_at, t.last_used_at),
        updated_at = now()
    FROM (SELECT * FROM taken ORDER BY api_key_id) t
    WHERE k.id = t.api_key_id
    RETURNING k.id
)
SELECT count(*) FROM folded
$$;

CREATE OR REPLACE FUNCTION keygate_fold_key_counters(max_keys integer) RETURNS bigint
LANGUAGE sql
AS $$
SELECT keygate_fold_key_counters(ARRAY(
    SELECT api_key_id FROM keygate_key_counters WHERE pending_requests > 0
    ORDER BY api_key_id LIMIT max_keys))
$$;
