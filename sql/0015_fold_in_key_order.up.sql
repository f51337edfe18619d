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
-- In id order, each batch of a fold starts where the last one ended (from_key) and
-- walks the primary key from there: one pass over the table for the whole fold. A
-- batch that started from the lowest id each time would walk past every key the
-- earlier batches had just folded (psql, 200,000 counter rows, 100,000 pending, one
-- fold of 20 batches: 6.0 s that way, 3.9 s this way and 3.6 s for migration 13's).
-- The start is inclusive, so a key bumped again since its batch is folded again, as
-- it should be. The one-argument form stays for replicas not yet upgraded.
CREATE FUNCTION keygate_fold_key_counters(max_keys integer, from_key uuid,
    OUT folded bigint, OUT last_key uuid)
LANGUAGE sql
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
WITH due AS (
    SELECT api_key_id, pending_requests, last_used_at FROM keygate_key_counters
    WHERE pending_requests > 0 AND api_key_id >= from_key
    ORDER BY api_key_id
    LIMIT max_keys
    FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE keygate_key_counters c SET pending_requests = 0
    FROM due WHERE c.api_key_id = due.api_key_id
    RETURNING due.api_key_id, due.pending_requests AS n, due.last_used_at
), done AS (
    UPDATE api_keys k
    SET total_requests = k.total_requests + t.n,
        last_used_at = greatest(k.last_used_at, t.last_used_at),
        updated_at = now()
    FROM (SELECT * FROM taken ORDER BY api_key_id) t
    WHERE k.id = t.api_key_id
    RETURNING k.id
)
SELECT count(*), (SELECT id FROM done ORDER BY id DESC LIMIT 1) FROM done
$$;

CREATE OR REPLACE FUNCTION keygate_fold_key_counters(max_keys integer) RETURNS bigint
LANGUAGE sql
AS $$
SELECT folded FROM keygate_fold_key_counters(max_keys, '00000000-0000-0000-0000-000000000000')
$$;
