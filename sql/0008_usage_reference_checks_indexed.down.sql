-- Back to migration 7's function, exactly as 0007 made it (CREATE OR REPLACE also drops
-- 0008's plan_cache_mode setting). Its triggers are 0007's and stay as they are.

CREATE OR REPLACE FUNCTION keygate_usage_check_references() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    wanted bigint;
    found bigint;
BEGIN
    SELECT count(DISTINCT api_key_id) INTO wanted FROM keygate_new_usage;
    SELECT count(*) INTO found FROM (
        SELECT 1 FROM api_keys
        WHERE id IN (SELECT api_key_id FROM keygate_new_usage)
        ORDER BY id FOR KEY SHARE) k;
    IF found <> wanted THEN
        RAISE EXCEPTION 'api_key_usage rows name an API key that does not exist'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT count(DISTINCT organization_id) INTO wanted FROM keygate_new_usage;
    SELECT count(*) INTO found FROM (
        SELECT 1 FROM organizations
        WHERE id IN (SELECT organization_id FROM keygate_new_usage)
        ORDER BY id FOR KEY SHARE) o;
    IF found <> wanted THEN
        RAISE EXCEPTION 'api_key_usage rows name an organization that does not exist'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
