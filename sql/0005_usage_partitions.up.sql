-- api_key_usage becomes range-partitioned by calendar month (UTC), so retention is a
-- partition drop instead of a slow DELETE, and gains prompt/completion token and model
-- columns. Existing rows (including an adopted database's) move into the new table.
-- A partitioned table's unique keys must include the partition key, so the primary key
-- is (id, "timestamp"); a usage record's id and timestamp never change, so replays
-- stay idempotent with ON CONFLICT (id, "timestamp") DO NOTHING.

ALTER TABLE api_key_usage RENAME TO api_key_usage_unpartitioned;
ALTER INDEX IF EXISTS kg_api_key_usage_org_time_idx RENAME TO kg_api_key_usage_unpartitioned_org_time_idx;
ALTER INDEX IF EXISTS kg_api_key_usage_key_time_idx RENAME TO kg_api_key_usage_unpartitioned_key_time_idx;

CREATE TABLE api_key_usage (
    id                uuid         NOT NULL DEFAULT gen_random_uuid(),
    api_key_id        uuid         NOT NULL,
    organization_id   uuid         NOT NULL,
    "timestamp"       timestamptz  NOT NULL DEFAULT now(),
    endpoint          varchar(255) NOT NULL,
    method            varchar(10)  NOT NULL,
    status_code       integer      NOT NULL,
    response_time_ms  integer,
    tokens_used       integer,
    cost_usd          numeric(12, 6),
    ip_address        varchar(45),
    user_agent        varchar(500),
    error_message     text,
    error_code        varchar(50),
    prompt_tokens     integer,
    completion_tokens integer,
    model             varchar(255),
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");

-- Rows outside every month partition (clock skew, a partition not made yet) land here
-- rather than failing; keygate_usage_partition() moves them out when it makes one.
CREATE TABLE api_key_usage_default PARTITION OF api_key_usage DEFAULT;

-- Creates the partition for the month containing `at`, if missing. Safe to call from
-- several replicas at once (the advisory lock serialises them).
CREATE FUNCTION keygate_usage_partition(at timestamptz) RETURNS text
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

DO $$
DECLARE
    m timestamptz;
    first timestamptz;
BEGIN
    SELECT least(min("timestamp"), now()) INTO first FROM api_key_usage_unpartitioned;
    m := date_trunc('month', coalesce(first, now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    WHILE m <= now() + interval '2 months' LOOP
        PERFORM keygate_usage_partition(m);
        m := m + interval '1 month';
    END LOOP;
END $$;

INSERT INTO api_key_usage (id, api_key_id, organization_id, "timestamp", endpoint, method, status_code,
                           response_time_ms, tokens_used, cost_usd, ip_address, user_agent, error_message, error_code)
SELECT id, api_key_id, organization_id, coalesce("timestamp", now()), coalesce(endpoint, ''), coalesce(method, ''),
       coalesce(status_code, 0), response_time_ms, tokens_used, cost_usd, ip_address, user_agent, error_message, error_code
FROM api_key_usage_unpartitioned;

DROP TABLE api_key_usage_unpartitioned;

ALTER TABLE api_key_usage
    ADD CONSTRAINT kg_api_key_usage_key_fk FOREIGN KEY (api_key_id)
        REFERENCES api_keys (id) ON DELETE RESTRICT,
    ADD CONSTRAINT kg_api_key_usage_org_fk FOREIGN KEY (organization_id)
        REFERENCES organizations (id) ON DELETE RESTRICT;
CREATE INDEX kg_api_key_usage_org_time_idx ON api_key_usage (organization_id, "timestamp");
CREATE INDEX kg_api_key_usage_key_time_idx ON api_key_usage (api_key_id, "timestamp");
