-- Portable between SQLite and PostgreSQL: TEXT and BIGINT only, timestamps in Unix milliseconds.
CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    settings TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE cluster_settings (
    org_id TEXT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    cluster_id TEXT NOT NULL,
    settings TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, cluster_id)
);

-- spec: the ProviderSpec JSON without apiKey; api_key_enc: vault-sealed key.
CREATE TABLE providers (
    org_id TEXT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    api_key_enc TEXT,
    api_key_last4 TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, name)
);

-- entries: provider entries without keys; secrets_enc: vault-sealed JSON {provider: api key}.
CREATE TABLE configs (
    org_id TEXT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    name TEXT,
    inherits TEXT,
    entries TEXT NOT NULL,
    secrets_enc TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, id)
);

-- Gateway API keys: only the SHA-256 hex of the secret is kept.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL UNIQUE,
    name TEXT,
    config_id TEXT NOT NULL,
    cluster_id TEXT,
    settings TEXT NOT NULL,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE INDEX api_keys_org ON api_keys (org_id);
