-- Cheaper change detection for api_keys updates made by the usage writer.
--
-- Migration 4's WHEN clause builds two JSON documents per updated row
-- (to_jsonb(OLD) and to_jsonb(NEW)) to tell bookkeeping updates from real changes.
-- Every usage batch updates total_requests and last_used_at of each key it counts, so
-- that test ran about once per proxied request: benches/load.sh measured it at roughly
-- half of PostgreSQL's CPU per request with 10,000 keys (docs/performance.md).
--
-- Only the usage writer moves total_requests or last_used_at. When one of them moved,
-- the row is compared column by column on what the authentication cache holds; any
-- other update keeps migration 4's whole-row comparison, so an update that touches
-- only columns added later still notifies.
--
-- The list below is the api_keys half of db::auth_queries::SELECT (plus environment,
-- which key_prefix encodes). A column added later that the cache reads must be added
-- here too, in a new migration: otherwise a statement that changed it together with a
-- usage counter would not notify.
DROP TRIGGER IF EXISTS kg_api_keys_notify_update ON api_keys;
CREATE TRIGGER kg_api_keys_notify_update AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (CASE
        WHEN OLD.total_requests IS DISTINCT FROM NEW.total_requests
          OR OLD.last_used_at IS DISTINCT FROM NEW.last_used_at
        THEN (OLD.id, OLD.organization_id, OLD.key_hash, OLD.key_prefix, OLD.key_hint, OLD.environment,
              OLD.is_active, OLD.expires_at, OLD.revoked_at, OLD.scopes, OLD.custom_rate_limit)
             IS DISTINCT FROM
             (NEW.id, NEW.organization_id, NEW.key_hash, NEW.key_prefix, NEW.key_hint, NEW.environment,
              NEW.is_active, NEW.expires_at, NEW.revoked_at, NEW.scopes, NEW.custom_rate_limit)
        ELSE (to_jsonb(OLD) - 'total_requests' - 'last_used_at' - 'updated_at')
             IS DISTINCT FROM (to_jsonb(NEW) - 'total_requests' - 'last_used_at' - 'updated_at')
    END)
    EXECUTE FUNCTION keygate_notify_api_key();
