-- Back to migration 13's fold, which takes rows in the table's physical order.
DROP FUNCTION keygate_fold_key_counters(uuid[]);
DROP FUNCTION keygate_pending_key_ids();

CREATE OR REPLACE FUNCTION keygate_fold_key_counters(max_keys integer) RETURNS bigint
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
