-- One fold cadence for the whole cluster, however many replicas run.
--
-- Each keygate folds the writers' pending counts into api_keys on a timer (migration
-- 13). With the timer per replica, N replicas folded N times as often, and a fold's
-- cost is one update of every key used since the last fold, in api_keys and in
-- keygate_key_counters: at 10,000 active keys a fold took 150-230 ms of one backend
-- (docs/performance.md, round 14). So the fold is claimed first: a replica whose
-- timer fires folds only if no replica claimed a fold within the interval.
--
-- The claim is a single row: concurrent claims queue on its lock, and the loser
-- re-reads the winner's time and finds the interval not over. A claim commits on its
-- own, so a fold that fails after it waits for the next interval; nothing is lost,
-- the counts wait in keygate_key_counters. A fold at shutdown does not claim.

CREATE TABLE keygate_fold_clock (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last_fold_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO keygate_fold_clock DEFAULT VALUES;

-- True, and the clock set to now, when no fold was claimed within min_interval.
CREATE FUNCTION keygate_fold_claim(min_interval interval) RETURNS boolean
LANGUAGE sql
AS $$
WITH claimed AS (
    UPDATE keygate_fold_clock SET last_fold_at = now()
    WHERE last_fold_at <= now() - min_interval
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM claimed)
$$;
