-- Usage rows keep their references to keys and organisations, checked per statement
-- instead of per row.
--
-- The two foreign keys on api_key_usage ran two referential-integrity queries for every
-- inserted row, each locking the referenced key or organisation row FOR KEY SHARE. A
-- usage batch of 2,000 rows for one key locked that one row 4,000 times; measured on a
-- migrated database, the checks were about a third of PostgreSQL's time per usage row,
-- with one key and with 10,000 (docs/performance.md). The same guarantees, kept here:
--
-- 1. No usage row names a key or organisation that does not exist: a statement-level
--    trigger reads the statement's new rows (a transition table), locks each distinct
--    key and organisation once FOR KEY SHARE, as the foreign key did, and refuses the
--    statement with SQLSTATE 23503 (foreign_key_violation) when one is missing.
-- 2. A key or organisation with usage rows cannot be deleted, nor its id changed, nor
--    its table truncated (ON DELETE RESTRICT, as before): row triggers refuse the
--    DELETE or UPDATE OF id with 23503; statement triggers refuse TRUNCATE.
--
-- Why these cannot race: a DELETE locks the row FOR UPDATE before its BEFORE trigger
-- runs, and that conflicts with an inserter's FOR KEY SHARE. If the inserter locked
-- first, the delete waits for its commit and its check (a fresh snapshot, since each
-- statement of a plpgsql function takes one under READ COMMITTED) sees the new rows. If
-- the delete locked first, the inserter waits, finds the row gone and is refused.

ALTER TABLE api_key_usage
    DROP CONSTRAINT IF EXISTS kg_api_key_usage_key_fk,
    DROP CONSTRAINT IF EXISTS kg_api_key_usage_org_fk;

CREATE FUNCTION keygate_usage_check_references() RETURNS trigger
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

-- One trigger per event: a trigger with a transition table may fire on one event only.
CREATE TRIGGER kg_api_key_usage_references_insert AFTER INSERT ON api_key_usage
    REFERENCING NEW TABLE AS keygate_new_usage
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_usage_check_references();
CREATE TRIGGER kg_api_key_usage_references_update AFTER UPDATE ON api_key_usage
    REFERENCING NEW TABLE AS keygate_new_usage
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_usage_check_references();

CREATE FUNCTION keygate_usage_restrict_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM api_key_usage WHERE api_key_id = OLD.id) THEN
        RAISE EXCEPTION 'API key % has usage rows (billing records); revoke it instead', OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

CREATE FUNCTION keygate_usage_restrict_organization() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM api_key_usage WHERE organization_id = OLD.id) THEN
        RAISE EXCEPTION 'organization % has usage rows (billing records); disable it instead', OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

CREATE FUNCTION keygate_usage_restrict_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM api_key_usage) THEN
        RAISE EXCEPTION '% is referenced by usage rows (billing records)', TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER kg_api_keys_usage_restrict BEFORE DELETE OR UPDATE OF id ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keygate_usage_restrict_key();
CREATE TRIGGER kg_organizations_usage_restrict BEFORE DELETE OR UPDATE OF id ON organizations
    FOR EACH ROW EXECUTE FUNCTION keygate_usage_restrict_organization();
CREATE TRIGGER kg_api_keys_usage_restrict_truncate BEFORE TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_usage_restrict_truncate();
CREATE TRIGGER kg_organizations_usage_restrict_truncate BEFORE TRUNCATE ON organizations
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_usage_restrict_truncate();
