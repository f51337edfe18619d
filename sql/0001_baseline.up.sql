-- The seed's schema (the Python-era Alembic migration 083cef45dd3e), as it was.
-- A database that already has these tables (an `alembic_version` table is present)
-- is adopted instead: its columns are checked and this migration is recorded, not run.
-- Everything keygate adds comes in later migrations, so both paths converge.

CREATE TABLE organizations (
    id                    uuid PRIMARY KEY,
    name                  varchar(255) NOT NULL,
    slug                  varchar(100) NOT NULL,
    email                 varchar(255),
    plan                  varchar(50)  NOT NULL DEFAULT 'free',
    is_active             boolean      NOT NULL DEFAULT true,
    monthly_request_limit integer      NOT NULL DEFAULT 10000,
    rate_limit_per_minute integer      NOT NULL DEFAULT 60,
    max_api_keys          integer      NOT NULL DEFAULT 10,
    created_at            timestamptz  NOT NULL DEFAULT now(),
    updated_at            timestamptz  NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id                uuid PRIMARY KEY,
    organization_id   uuid         NOT NULL REFERENCES organizations (id),
    key_prefix        varchar(20)  NOT NULL,
    key_hash          varchar(64)  NOT NULL UNIQUE,
    key_hint          varchar(8)   NOT NULL,
    name              varchar(255) NOT NULL,
    description       text,
    environment       varchar(20)  NOT NULL DEFAULT 'test',
    is_active         boolean      NOT NULL DEFAULT true,
    expires_at        timestamptz,
    revoked_at        timestamptz,
    scopes            json,
    custom_rate_limit integer,
    total_requests    integer      NOT NULL DEFAULT 0,
    last_used_at      timestamptz,
    created_at        timestamptz  NOT NULL DEFAULT now()
);

CREATE TABLE api_key_usage (
    id               uuid PRIMARY KEY,
    api_key_id       uuid        NOT NULL REFERENCES api_keys (id),
    organization_id  uuid        NOT NULL REFERENCES organizations (id),
    "timestamp"      timestamptz NOT NULL DEFAULT now(),
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

CREATE TABLE rate_limit_tracking (
    id            uuid PRIMARY KEY,
    api_key_id    uuid        NOT NULL REFERENCES api_keys (id),
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    request_count integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
