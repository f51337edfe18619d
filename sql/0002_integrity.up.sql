-- What the product needs on top of the seed's tables: normalised types, uniqueness,
-- checks, foreign keys with deliberate ON DELETE rules, indexes for usage queries and
-- `updated_at` kept by the database. Written to run on a fresh baseline and on an
-- adopted Alembic database alike, so every step checks what is already there.

-- Helpers live in pg_temp: they vanish with the session and leave nothing behind.
CREATE FUNCTION pg_temp.kg_has_unique(tbl regclass, cols text[]) RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_index i
        WHERE i.indrelid = tbl AND i.indisunique AND i.indpred IS NULL
          AND (SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.attnum) = cols)
$$;

CREATE FUNCTION pg_temp.kg_drop_fks(tbl regclass, col text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE c record;
BEGIN
    FOR c IN
        SELECT con.conname FROM pg_constraint con
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = ANY (con.conkey)
        WHERE con.conrelid = tbl AND con.contype = 'f' AND a.attname = col
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', tbl, c.conname);
    END LOOP;
END $$;

-- 1. Types. SQLAlchemy may have made naive timestamps, JSON scopes and 32-bit counters.
DO $$
DECLARE c record;
BEGIN
    FOR c IN
        SELECT table_name, column_name FROM information_schema.columns
        WHERE table_schema = current_schema()
          AND table_name IN ('organizations', 'api_keys', 'api_key_usage', 'rate_limit_tracking')
          AND data_type = 'timestamp without time zone'
    LOOP
        -- Naive values were written in UTC by the seed's scripts (datetime.utcnow()).
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I TYPE timestamptz USING %I AT TIME ZONE ''UTC''',
                       c.table_name, c.column_name, c.column_name);
    END LOOP;
END $$;

ALTER TABLE api_keys ALTER COLUMN scopes TYPE jsonb USING scopes::text::jsonb;
UPDATE api_keys SET scopes = '[]'::jsonb WHERE scopes IS NULL OR scopes = 'null'::jsonb;
ALTER TABLE api_keys ALTER COLUMN scopes SET DEFAULT '[]'::jsonb,
                     ALTER COLUMN scopes SET NOT NULL;
ALTER TABLE api_keys ALTER COLUMN total_requests TYPE bigint;
ALTER TABLE rate_limit_tracking ALTER COLUMN request_count TYPE bigint;

-- 2. Defaults and NOT NULL where the product relies on a value.
UPDATE organizations SET plan = 'free' WHERE plan IS NULL;
UPDATE organizations SET is_active = true WHERE is_active IS NULL;
UPDATE organizations SET monthly_request_limit = 10000 WHERE monthly_request_limit IS NULL;
UPDATE organizations SET rate_limit_per_minute = 60 WHERE rate_limit_per_minute IS NULL;
UPDATE organizations SET max_api_keys = 10 WHERE max_api_keys IS NULL;
UPDATE organizations SET created_at = now() WHERE created_at IS NULL;
UPDATE organizations SET updated_at = created_at WHERE updated_at IS NULL;
ALTER TABLE organizations
    ALTER COLUMN id SET DEFAULT gen_random_uuid(),
    ALTER COLUMN plan SET DEFAULT 'free', ALTER COLUMN plan SET NOT NULL,
    ALTER COLUMN is_active SET DEFAULT true, ALTER COLUMN is_active SET NOT NULL,
    ALTER COLUMN monthly_request_limit SET DEFAULT 10000, ALTER COLUMN monthly_request_limit SET NOT NULL,
    ALTER COLUMN rate_limit_per_minute SET DEFAULT 60, ALTER COLUMN rate_limit_per_minute SET NOT NULL,
    ALTER COLUMN max_api_keys SET DEFAULT 10, ALTER COLUMN max_api_keys SET NOT NULL,
    ALTER COLUMN created_at SET DEFAULT now(), ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN updated_at SET DEFAULT now(), ALTER COLUMN updated_at SET NOT NULL;

UPDATE api_keys SET is_active = true WHERE is_active IS NULL;
UPDATE api_keys SET total_requests = 0 WHERE total_requests IS NULL;
UPDATE api_keys SET environment = 'test' WHERE environment IS NULL;
UPDATE api_keys SET created_at = now() WHERE created_at IS NULL;
ALTER TABLE api_keys
    ALTER COLUMN id SET DEFAULT gen_random_uuid(),
    ALTER COLUMN is_active SET DEFAULT true, ALTER COLUMN is_active SET NOT NULL,
    ALTER COLUMN total_requests SET DEFAULT 0, ALTER COLUMN total_requests SET NOT NULL,
    ALTER COLUMN environment SET DEFAULT 'test', ALTER COLUMN environment SET NOT NULL,
    ALTER COLUMN created_at SET DEFAULT now(), ALTER COLUMN created_at SET NOT NULL;

ALTER TABLE api_key_usage ALTER COLUMN id SET DEFAULT gen_random_uuid();
ALTER TABLE rate_limit_tracking ALTER COLUMN id SET DEFAULT gen_random_uuid();

-- 3. Columns keygate adds: change tracking for cache resync, and rotation lineage.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS replaced_by uuid;

-- 4. Checks.
ALTER TABLE organizations
    ADD CONSTRAINT kg_organizations_plan_check CHECK (plan IN ('free', 'pro', 'enterprise')),
    ADD CONSTRAINT kg_organizations_limits_check CHECK (
        monthly_request_limit >= 0 AND rate_limit_per_minute >= 0 AND max_api_keys >= 0);
ALTER TABLE api_keys
    ADD CONSTRAINT kg_api_keys_environment_check CHECK (environment IN ('test', 'live')),
    ADD CONSTRAINT kg_api_keys_rate_limit_check CHECK (custom_rate_limit IS NULL OR custom_rate_limit >= 0),
    ADD CONSTRAINT kg_api_keys_hash_check CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    ADD CONSTRAINT kg_api_keys_scopes_check CHECK (jsonb_typeof(scopes) = 'array');

-- 5. Uniqueness, only where the adopted schema does not already have it.
DO $$
BEGIN
    IF NOT pg_temp.kg_has_unique('organizations', ARRAY['slug']) THEN
        CREATE UNIQUE INDEX kg_organizations_slug_key ON organizations (slug);
    END IF;
    IF NOT pg_temp.kg_has_unique('api_keys', ARRAY['key_hash']) THEN
        CREATE UNIQUE INDEX kg_api_keys_key_hash_key ON api_keys (key_hash);
    END IF;
END $$;

-- Older trackers may hold several rows for one window; fold them into one.
WITH dup AS (
    SELECT api_key_id, window_start, min(id::text)::uuid AS keep_id, sum(request_count) AS total
    FROM rate_limit_tracking GROUP BY api_key_id, window_start HAVING count(*) > 1
), kept AS (
    UPDATE rate_limit_tracking r SET request_count = dup.total FROM dup WHERE r.id = dup.keep_id
)
DELETE FROM rate_limit_tracking r USING dup
WHERE r.api_key_id = dup.api_key_id AND r.window_start = dup.window_start AND r.id <> dup.keep_id;

ALTER TABLE rate_limit_tracking
    ADD CONSTRAINT kg_rate_limit_tracking_window_key UNIQUE (api_key_id, window_start);

-- 6. Foreign keys with deliberate delete rules. Keys die with their organisation;
-- counters die with their key; usage rows are billing records, so they block deletes.
SELECT pg_temp.kg_drop_fks('api_keys', 'organization_id');
SELECT pg_temp.kg_drop_fks('api_key_usage', 'api_key_id');
SELECT pg_temp.kg_drop_fks('api_key_usage', 'organization_id');
SELECT pg_temp.kg_drop_fks('rate_limit_tracking', 'api_key_id');
ALTER TABLE api_keys
    ADD CONSTRAINT kg_api_keys_organization_fk FOREIGN KEY (organization_id)
        REFERENCES organizations (id) ON DELETE CASCADE,
    ADD CONSTRAINT kg_api_keys_replaced_by_fk FOREIGN KEY (replaced_by)
        REFERENCES api_keys (id) ON DELETE SET NULL;
ALTER TABLE api_key_usage
    ADD CONSTRAINT kg_api_key_usage_key_fk FOREIGN KEY (api_key_id)
        REFERENCES api_keys (id) ON DELETE RESTRICT,
    ADD CONSTRAINT kg_api_key_usage_org_fk FOREIGN KEY (organization_id)
        REFERENCES organizations (id) ON DELETE RESTRICT;
ALTER TABLE rate_limit_tracking
    ADD CONSTRAINT kg_rate_limit_tracking_key_fk FOREIGN KEY (api_key_id)
        REFERENCES api_keys (id) ON DELETE CASCADE;

-- 7. Indexes for the queries keygate makes.
CREATE INDEX kg_api_keys_organization_idx ON api_keys (organization_id);
CREATE INDEX kg_api_key_usage_org_time_idx ON api_key_usage (organization_id, "timestamp");
CREATE INDEX kg_api_key_usage_key_time_idx ON api_key_usage (api_key_id, "timestamp");
CREATE INDEX kg_rate_limit_tracking_window_end_idx ON rate_limit_tracking (window_end);

-- 8. updated_at maintained by the database, whoever writes the row.
CREATE FUNCTION keygate_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER kg_organizations_touch BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();
CREATE TRIGGER kg_api_keys_touch BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();
CREATE TRIGGER kg_rate_limit_tracking_touch BEFORE UPDATE ON rate_limit_tracking
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();
