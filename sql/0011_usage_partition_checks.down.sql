-- Back to migration 10: the partitions lose their own reference checks (the parent's
-- stay), and keygate_usage_partition() is 0005's again.

DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT i.inhrelid::regclass FROM pg_inherits i WHERE i.inhparent = 'api_key_usage'::regclass LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS kg_api_key_usage_part_references_insert ON %s', part);
        EXECUTE format('DROP TRIGGER IF EXISTS kg_api_key_usage_part_references_update ON %s', part);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION keygate_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi   timestamptz := lo + interval '1 month';
    name text := 'api_key_usage_y' || to_char(lo AT TIME ZONE 'UTC', 'YYYY') || 'm' || to_char(lo AT TIME ZONE 'UTC', 'MM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('keygate_usage_partition'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE api_key_usage INCLUDING DEFAULTS)', name);
    -- Rows for this month already in the default partition must move first, or the
    -- attach is refused.
    EXECUTE format(
        'WITH moved AS (DELETE FROM api_key_usage_default WHERE "timestamp" >= %L AND "timestamp" < %L RETURNING *)
         INSERT INTO %I SELECT * FROM moved', lo, hi, name);
    EXECUTE format('ALTER TABLE api_key_usage ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
    RETURN name;
END $$;

DROP FUNCTION keygate_usage_partition_checks(regclass);
