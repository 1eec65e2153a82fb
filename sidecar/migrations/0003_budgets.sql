-- Budgets (spend and token caps per key, config or organization over a window), per-minute rate
-- limits, and the filter VMs holding allowances (to split grants and rate limits across replicas).
CREATE TABLE budgets (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    period TEXT NOT NULL,
    window_seconds BIGINT NOT NULL,
    starts_at_ms BIGINT NOT NULL,
    max_nusd BIGINT,
    max_tokens BIGINT,
    soft BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX budgets_org ON budgets (org_id);

CREATE TABLE rate_limits (
    org_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    rpm BIGINT,
    tpm BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, scope, scope_id)
);

CREATE TABLE limit_holders (
    holder TEXT NOT NULL,
    org_id TEXT NOT NULL,
    seen_ms BIGINT NOT NULL,
    PRIMARY KEY (holder, org_id)
);
