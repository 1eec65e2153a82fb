-- Usage records posted by the filter (POST /internal/v1/usage) and per-provider price overrides.
-- Costs are integers in nano-USD (1e-9 USD) so sums are exact on both databases.
ALTER TABLE providers ADD COLUMN prices TEXT;

-- No foreign key to organizations: records of unknown organizations are kept, not lost.
CREATE TABLE usage_records (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    day TEXT NOT NULL,
    cluster_id TEXT,
    api_key_id TEXT,
    config_id TEXT,
    provider TEXT NOT NULL,
    provider_type TEXT,
    provider_key_last4 TEXT,
    model_requested TEXT NOT NULL,
    model_used TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    estimated BIGINT NOT NULL,
    status BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    ttft_ms BIGINT,
    stream BIGINT NOT NULL,
    fallback BIGINT NOT NULL,
    truncated BIGINT NOT NULL,
    tags TEXT NOT NULL,
    prompt TEXT,
    completion TEXT,
    cost_nusd BIGINT NOT NULL,
    list_cost_nusd BIGINT NOT NULL,
    price_source TEXT NOT NULL,
    catalog_version TEXT NOT NULL,
    received_at BIGINT NOT NULL
);

CREATE INDEX usage_records_org_time ON usage_records (org_id, time_ms);

CREATE TABLE usage_tags (
    usage_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    k TEXT NOT NULL,
    v TEXT NOT NULL,
    PRIMARY KEY (usage_id, k)
);

CREATE INDEX usage_tags_org_kv ON usage_tags (org_id, k, v);
