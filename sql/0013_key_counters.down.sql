-- Back to migration 12: what is pending goes into api_keys, and the writer's function
-- updates api_keys again.
UPDATE api_keys k
SET total_requests = k.total_requests + c.pending_requests,
    last_used_at = greatest(k.last_used_at, c.last_used_at),
    updated_at = now()
FROM keygate_key_counters c
WHERE c.api_key_id = k.id AND c.pending_requests > 0;

DROP FUNCTION keygate_fold_key_counters(integer);
DROP TABLE keygate_key_counters;

CREATE OR REPLACE FUNCTION keygate_bump_key_counters(ids uuid[], counts int8[], last_used timestamptz[])
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
