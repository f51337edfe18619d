-- Change notifications for the authentication caches of every replica.
-- Each committed change to a key or an organisation sends one NOTIFY on
-- `keygate_changes` with a small JSON payload naming the row:
--   {"table": "api_keys", "op": "UPDATE", "id": "<key id>", "organization_id": "<org id>"}
--   {"table": "organizations", "op": "UPDATE", "id": "<org id>"}
--   {"table": "api_keys", "op": "TRUNCATE"}            (no row: every cache resyncs)
-- NOTIFY is transactional: listeners hear of a change only once it has committed, so a
-- reload triggered by it sees the new row. Payloads never carry key hashes or secrets.

CREATE FUNCTION keygate_notify_api_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- NEW is NULL for DELETE and OLD for INSERT, so COALESCE picks the row there is.
    PERFORM pg_notify('keygate_changes', json_build_object(
        'table', 'api_keys',
        'op', TG_OP,
        'id', COALESCE(NEW.id, OLD.id),
        'organization_id', COALESCE(NEW.organization_id, OLD.organization_id))::text);
    RETURN NULL;
END $$;

CREATE FUNCTION keygate_notify_organization() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keygate_changes', json_build_object(
        'table', 'organizations',
        'op', TG_OP,
        'id', COALESCE(NEW.id, OLD.id))::text);
    RETURN NULL;
END $$;

CREATE FUNCTION keygate_notify_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keygate_changes', json_build_object(
        'table', TG_TABLE_NAME, 'op', TG_OP)::text);
    RETURN NULL;
END $$;

-- Updates that only move bookkeeping columns (usage counters, last use, the touch
-- trigger's updated_at) change nothing a cache holds; without this filter every usage
-- flush would evict every active key on every replica. Comparing whole rows minus those
-- columns keeps columns added later covered without editing this list.
CREATE TRIGGER kg_api_keys_notify_insert_delete AFTER INSERT OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_notify_api_key();
CREATE TRIGGER kg_api_keys_notify_update AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'total_requests' - 'last_used_at' - 'updated_at')
          IS DISTINCT FROM (to_jsonb(NEW) - 'total_requests' - 'last_used_at' - 'updated_at'))
    EXECUTE FUNCTION keygate_notify_api_key();
CREATE TRIGGER kg_api_keys_notify_truncate AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_notify_truncate();

CREATE TRIGGER kg_organizations_notify_insert_delete AFTER INSERT OR DELETE ON organizations
    FOR EACH ROW EXECUTE FUNCTION keygate_notify_organization();
CREATE TRIGGER kg_organizations_notify_update AFTER UPDATE ON organizations
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'updated_at') IS DISTINCT FROM (to_jsonb(NEW) - 'updated_at'))
    EXECUTE FUNCTION keygate_notify_organization();
CREATE TRIGGER kg_organizations_notify_truncate AFTER TRUNCATE ON organizations
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_notify_truncate();
