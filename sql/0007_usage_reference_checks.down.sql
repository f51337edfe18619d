-- Back to the foreign keys of 0005. Refused (nothing changes) if rows written meanwhile
-- name a key or organisation that is gone, which the triggers would have prevented.
DROP TRIGGER IF EXISTS kg_organizations_usage_restrict_truncate ON organizations;
DROP TRIGGER IF EXISTS kg_api_keys_usage_restrict_truncate ON api_keys;
DROP TRIGGER IF EXISTS kg_organizations_usage_restrict ON organizations;
DROP TRIGGER IF EXISTS kg_api_keys_usage_restrict ON api_keys;
DROP TRIGGER IF EXISTS kg_api_key_usage_references_update ON api_key_usage;
DROP TRIGGER IF EXISTS kg_api_key_usage_references_insert ON api_key_usage;
DROP FUNCTION IF EXISTS keygate_usage_restrict_truncate();
DROP FUNCTION IF EXISTS keygate_usage_restrict_organization();
DROP FUNCTION IF EXISTS keygate_usage_restrict_key();
DROP FUNCTION IF EXISTS keygate_usage_check_references();
ALTER TABLE api_key_usage
    ADD CONSTRAINT kg_api_key_usage_key_fk FOREIGN KEY (api_key_id)
        REFERENCES api_keys (id) ON DELETE RESTRICT,
    ADD CONSTRAINT kg_api_key_usage_org_fk FOREIGN KEY (organization_id)
        REFERENCES organizations (id) ON DELETE RESTRICT;
