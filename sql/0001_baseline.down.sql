-- The seed's rollback (`alembic downgrade -1`): the four tables go, data and all.
DROP TABLE IF EXISTS rate_limit_tracking;
DROP TABLE IF EXISTS api_key_usage;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS organizations;
