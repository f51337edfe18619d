-- Back to one plain table with the columns of 0002 (token parts and model are dropped).
CREATE TABLE api_key_usage_plain (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    api_key_id       uuid         NOT NULL,
    organization_id  uuid         NOT NULL,
    "timestamp"      timestamptz  NOT NULL DEFAULT now(),
    endpoint         varchar(255) NOT NULL,
    method           varchar(10)  NOT NULL,
    status_code      integer      NOT NULL,
    response_time_ms integer,
    tokens_used      integer,
    cost_usd         numeric(12, 6),
    ip_address       varchar(45),
    user_agent       varchar(500),
    error_message    text,
    error_code       varchar(50)
);
INSERT INTO api_key_usage_plain
SELECT id, api_key_id, organization_id, "timestamp", endpoint, method, status_code, response_time_ms,
       tokens_used, cost_usd, ip_address, user_agent, error_message, error_code
FROM api_key_usage
ON CONFLICT (id) DO NOTHING;
DROP TABLE api_key_usage;
DROP FUNCTION IF EXISTS keygate_usage_partition(timestamptz);
ALTER TABLE api_key_usage_plain RENAME TO api_key_usage;
ALTER INDEX api_key_usage_plain_pkey RENAME TO api_key_usage_pkey;
ALTER TABLE api_key_usage
    ADD CONSTRAINT kg_api_key_usage_key_fk FOREIGN KEY (api_key_id)
        REFERENCES api_keys (id) ON DELETE RESTRICT,
    ADD CONSTRAINT kg_api_key_usage_org_fk FOREIGN KEY (organization_id)
        REFERENCES organizations (id) ON DELETE RESTRICT;
CREATE INDEX kg_api_key_usage_org_time_idx ON api_key_usage (organization_id, "timestamp");
CREATE INDEX kg_api_key_usage_key_time_idx ON api_key_usage (api_key_id, "timestamp");
