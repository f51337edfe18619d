-- updated_at is still maintained by the database for every writer, but the trigger is
-- skipped when the statement set updated_at itself.
--
-- Migration 2's BEFORE UPDATE triggers run a PL/pgSQL function on every updated row.
-- Two of those updates happen on every flush: each usage batch bumps its keys'
-- total_requests and last_used_at in api_keys, and each limiter flush (once a second)
-- upserts every active key's minute in rate_limit_tracking and its organisation's month
-- in organization_monthly_usage. With 10,000 keys in rotation (benches/load.sh's
-- kg-Nkeys), the function ran ~490,000 times in 10 s: 1.2 s of PostgreSQL's time,
-- about 2.5 us per proxied request.
--
-- keygate's counter statements now write `updated_at = now()` themselves: the same
-- value the trigger would have written (the transaction's start), with no function
-- call. A WHEN clause, evaluated without entering PL/pgSQL, runs the trigger only when
-- the statement left updated_at as it was, so every other writer (keygate's own admin
-- statements, an operator's psql, a seed-era script) still gets it touched. The one
-- difference: an UPDATE that sets updated_at to a new value explicitly now keeps that
-- value instead of having it replaced.

DROP TRIGGER kg_organizations_touch ON organizations;
CREATE TRIGGER kg_organizations_touch BEFORE UPDATE ON organizations
    FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION keygate_touch_updated_at();

DROP TRIGGER kg_api_keys_touch ON api_keys;
CREATE TRIGGER kg_api_keys_touch BEFORE UPDATE ON api_keys
    FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION keygate_touch_updated_at();

DROP TRIGGER kg_rate_limit_tracking_touch ON rate_limit_tracking;
CREATE TRIGGER kg_rate_limit_tracking_touch BEFORE UPDATE ON rate_limit_tracking
    FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION keygate_touch_updated_at();

DROP TRIGGER kg_organization_monthly_usage_touch ON organization_monthly_usage;
CREATE TRIGGER kg_organization_monthly_usage_touch BEFORE UPDATE ON organization_monthly_usage
    FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION keygate_touch_updated_at();
