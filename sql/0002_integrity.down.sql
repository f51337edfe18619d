-- Back to the seed's shape. Normalised column types (timestamptz, jsonb, bigint) are
-- kept: they hold every value the seed's types held, and narrowing could lose data.
DROP TRIGGER IF EXISTS kg_rate_limit_tracking_touch ON rate_limit_tracking;
DROP TRIGGER IF EXISTS kg_api_keys_touch ON api_keys;
DROP TRIGGER IF EXISTS kg_organizations_touch ON organizations;
DROP FUNCTION IF EXISTS keygate_touch_updated_at();

DROP INDEX IF EXISTS kg_rate_limit_tracking_window_end_idx;
DROP INDEX IF EXISTS kg_api_key_usage_key_time_idx;
DROP INDEX IF EXISTS kg_api_key_usage_org_time_idx;
DROP INDEX IF EXISTS kg_api_keys_organization_idx;

ALTER TABLE rate_limit_tracking DROP CONSTRAINT IF EXISTS kg_rate_limit_tracking_key_fk;
ALTER TABLE api_key_usage DROP CONSTRAINT IF EXISTS kg_api_key_usage_org_fk,
                          DROP CONSTRAINT IF EXISTS kg_api_key_usage_key_fk;
ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS kg_api_keys_replaced_by_fk,
                     DROP CONSTRAINT IF EXISTS kg_api_keys_organization_fk;
ALTER TABLE api_keys ADD FOREIGN KEY (organization_id) REFERENCES organizations (id);
ALTER TABLE api_key_usage ADD FOREIGN KEY (api_key_id) REFERENCES api_keys (id),
                          ADD FOREIGN KEY (organization_id) REFERENCES organizations (id);
ALTER TABLE rate_limit_tracking ADD FOREIGN KEY (api_key_id) REFERENCES api_keys (id);

ALTER TABLE rate_limit_tracking DROP CONSTRAINT IF EXISTS kg_rate_limit_tracking_window_key;
DROP INDEX IF EXISTS kg_api_keys_key_hash_key;
DROP INDEX IF EXISTS kg_organizations_slug_key;

ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS kg_api_keys_scopes_check,
                     DROP CONSTRAINT IF EXISTS kg_api_keys_hash_check,
                     DROP CONSTRAINT IF EXISTS kg_api_keys_rate_limit_check,
                     DROP CONSTRAINT IF EXISTS kg_api_keys_environment_check;
ALTER TABLE organizations DROP CONSTRAINT IF EXISTS kg_organizations_limits_check,
                          DROP CONSTRAINT IF EXISTS kg_organizations_plan_check;

ALTER TABLE api_keys DROP COLUMN IF EXISTS replaced_by;
ALTER TABLE api_keys DROP COLUMN IF EXISTS updated_at;
