-- The monthly counts go with their table; the trigger goes with it.
DROP TABLE IF EXISTS organization_monthly_usage;
