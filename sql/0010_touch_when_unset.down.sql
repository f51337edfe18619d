-- Back to migration 2's triggers: updated_at replaced by now() on every update.

DROP TRIGGER kg_organizations_touch ON organizations;
CREATE TRIGGER kg_organizations_touch BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();

DROP TRIGGER kg_api_keys_touch ON api_keys;
CREATE TRIGGER kg_api_keys_touch BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();

DROP TRIGGER kg_rate_limit_tracking_touch ON rate_limit_tracking;
CREATE TRIGGER kg_rate_limit_tracking_touch BEFORE UPDATE ON rate_limit_tracking
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();

DROP TRIGGER kg_organization_monthly_usage_touch ON organization_monthly_usage;
CREATE TRIGGER kg_organization_monthly_usage_touch BEFORE UPDATE ON organization_monthly_usage
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();
