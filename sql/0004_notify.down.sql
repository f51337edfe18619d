-- Removes the change notifications; caches fall back to their TTL.
DROP TRIGGER IF EXISTS kg_organizations_notify_truncate ON organizations;
DROP TRIGGER IF EXISTS kg_organizations_notify_update ON organizations;
DROP TRIGGER IF EXISTS kg_organizations_notify_insert_delete ON organizations;
DROP TRIGGER IF EXISTS kg_api_keys_notify_truncate ON api_keys;
DROP TRIGGER IF EXISTS kg_api_keys_notify_update ON api_keys;
DROP TRIGGER IF EXISTS kg_api_keys_notify_insert_delete ON api_keys;
DROP FUNCTION IF EXISTS keygate_notify_truncate();
DROP FUNCTION IF EXISTS keygate_notify_organization();
DROP FUNCTION IF EXISTS keygate_notify_api_key();
