-- Restores migration 4's whole-row comparison for api_keys updates.
DROP TRIGGER IF EXISTS kg_api_keys_notify_update ON api_keys;
CREATE TRIGGER kg_api_keys_notify_update AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'total_requests' - 'last_used_at' - 'updated_at')
          IS DISTINCT FROM (to_jsonb(NEW) - 'total_requests' - 'last_used_at' - 'updated_at'))
    EXECUTE FUNCTION keygate_notify_api_key();
