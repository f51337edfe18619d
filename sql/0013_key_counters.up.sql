-- The usage writer's counts per key go to a narrow table in the batch's transaction,
-- and a periodic fold moves them into api_keys, so that a key's wide row is updated
-- once per fold instead of once per batch.
--
-- Each usage batch adds to total_requests and last_used_at of every key it holds.
-- With many active keys that is about one api_keys update per request, and it was the
-- largest part of PostgreSQL's work per request (docs/performance.md, round 13): a
-- 208-byte row with three indexes and two trigger conditions, whose page's free half
-- fills within a few updates. The same update on (api_key_id, pending_requests,
-- last_used_at) costs a fifth: psql, 10,000 keys, 2,000 per call, committed, four
-- alternations, 5.1-5.7 ms against 23.1-31.4 ms for migration 12's function.
--
-- Counts stay exactly-once: the writer's upsert commits with its rows, and
-- keygate_fold_key_counters() takes a key's pending count and adds it to api_keys in
-- one transaction. What changes is that api_keys.total_requests and last_used_at lag
-- by up to one fold (keygate folds every few seconds, and once more at shutdown);
-- their sum with this table's columns is exact at any time, and keygate's own reads
-- (`keys list`, the admin API) show that sum.
--
-- Locks: writers (keygate's first attempt through this function, its retries and
-- replays through their own statement) lock counter rows in id order (INSERT ...
-- SELECT ... ORDER BY) and may wait for a fold; a fold takes counter rows with SKIP
-- LOCKED, so it never waits for a writer, and updates api_keys in id order.

CREATE TABLE keygate_key_counters (
    api_key_id       uuid PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
    pending_requests bigint NOT NULL DEFAULT 0 CHECK (pending_requests >= 0),
    last_used_at     timestamptz
) WITH (fillfactor = 50);

CREATE OR REPLACE FUNCTION keygate_bump_key_counters(ids uuid[], counts int8[], last_used timestamptz[])
RETURNS void
LANGUAGE sql
AS $$
INSERT INTO keygate_key_counters AS c (api_key_id, pending_requests, last_used_at)
SELECT id, n, at FROM unnest(ids, counts, last_used) AS u(id, n, at) ORDER BY id
ON CONFLICT (api_key_id) DO UPDATE
    SET pending_requests = c.pending_requests + EXCLUDED.pending_requests,
        last_used_at = greatest(c.last_used_at, EXCLUDED.last_used_at)
$$;

-- Folds up to max_keys keys' pending counts into api_keys; returns how many keys it
-- folded (call again while that equals max_keys). Hash and merge joins are off so the
-- sorted keys drive a nested loop over api_keys' primary key, in id order.
CREATE FUNCTION keygate_fold_key_counters(max_keys integer) RETURNS bigint
LANGUAGE sql
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
WITH due AS (
    SELECT api_key_id, pending_requests, last_used_at FROM keygate_key_counters
    WHERE pending_requests > 0
    LIMIT max_keys
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
