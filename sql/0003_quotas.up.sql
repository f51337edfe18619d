-- Monthly request counts per organisation, the shared state behind the monthly quota.
-- Every replica adds its deltas with an upsert and reads back the total, so the count
-- survives restarts and holds across replicas. Months are UTC calendar months.
CREATE TABLE organization_monthly_usage (
    organization_id uuid        NOT NULL,
    month_start     timestamptz NOT NULL,
    request_count   bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, month_start),
    CONSTRAINT kg_organization_monthly_usage_org_fk FOREIGN KEY (organization_id)
        REFERENCES organizations (id) ON DELETE CASCADE,
    CONSTRAINT kg_organization_monthly_usage_count_check CHECK (request_count >= 0),
    -- A row for a mid-month instant would never be found again by the month's lookups.
    CONSTRAINT kg_organization_monthly_usage_month_check CHECK (
        month_start = date_trunc('month', month_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
);

CREATE TRIGGER kg_organization_monthly_usage_touch BEFORE UPDATE ON organization_monthly_usage
    FOR EACH ROW EXECUTE FUNCTION keygate_touch_updated_at();
