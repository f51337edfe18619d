-- Migration 7's reference check also guards rows written straight into a month
-- partition (or the default one), as the foreign keys it replaced did.
--
-- The foreign keys of 0005 were declared on the partitioned api_key_usage, and
-- PostgreSQL copies such a key onto every partition, so a row inserted into
-- api_key_usage_y2026m12 directly was checked too. Migration 7's statement-level
-- triggers are not copied: a statement names one table, and only that table's
-- statement triggers fire. Since 7, `INSERT INTO api_key_usage_y2026m12 ...` with a key
-- or organisation that does not exist was accepted, a billing row pointing at nothing.
--
-- Each partition now carries the same two triggers, calling the same function. A
-- statement on api_key_usage itself still fires the parent's triggers only (the rows
-- are checked once), so keygate's writes cost what they did: measured on PostgreSQL 15,
-- 200 COPY batches of 1,000 rows into api_key_usage, 4.2-5.1 us of backend CPU per row
-- with the partition's trigger and 4.5-5.4 without, alternated (noise).
--
-- keygate_usage_partition() adds them to each partition it makes. A partition attached
-- by hand gets them from `SELECT keygate_usage_partition_checks('its_name')`.

CREATE FUNCTION keygate_usage_partition_checks(part regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = part AND tgname = 'kg_api_key_usage_part_references_insert') THEN
        EXECUTE format('CREATE TRIGGER kg_api_key_usage_part_references_insert AFTER INSERT ON %s
            REFERENCING NEW TABLE AS keygate_new_usage
            FOR EACH STATEMENT EXECUTE FUNCTION keygate_usage_check_references()', part);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = part AND tgname = 'kg_api_key_usage_part_references_update') THEN
        EXECUTE format('CREATE TRIGGER kg_api_key_usage_part_references_update AFTER UPDATE ON %s
            REFERENCING NEW TABLE AS keygate_new_usage
            FOR EACH STATEMENT EXECUTE FUNCTION keygate_usage_check_references()', part);
    END IF;
END $$;

-- 0005's function, with the checks added once the partition is attached (the rows it
-- moves in from the default partition were checked when they were written).
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
    PERFORM keygate_usage_partition_checks(format('%I', name)::regclass);
    RETURN name;
END $$;

SELECT keygate_usage_partition_checks(i.inhrelid::regclass)
FROM pg_inherits i
WHERE i.inhparent = 'api_key_usage'::regclass;
