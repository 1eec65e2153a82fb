//! Database access (sqlx `Any`: SQLite or PostgreSQL chosen at run time, one set of runtime queries and
//! migrations for both; placeholders are `$n`, which both drivers accept).

use crate::error::{ApiError, ApiResult};
use crate::util::{new_api_key, new_id, now_ms};
use llm_gateway::config::{hash_key, ProviderSpec, Settings};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::AnyConnection;
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;
use std::time::Duration;

/// The schema migrations (`sidecar/migrations/`), embedded with their checksums: a migration file changed
/// after it was applied is refused at start (`_sqlx_migrations` records what ran).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
/// PostgreSQL advisory lock held while migrating and bootstrapping (replicas start concurrently).
const STARTUP_LOCK: i64 = 7_426_001;

/// True when the pool is SQLite (set once by [`connect`]).
static SQLITE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A write transaction. On SQLite it starts with `BEGIN IMMEDIATE`: the write lock is taken up front, so a
/// second writer (another process on the same file) waits up to the busy timeout instead of failing with
/// "database is locked" when its read transaction would have to be upgraded.
pub async fn begin_write(
    pool: &AnyPool,
) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
    if SQLITE.load(std::sync::atomic::Ordering::Relaxed) {
        pool.begin_with("BEGIN IMMEDIATE").await
    } else {
        pool.begin().await
    }
}

pub async fn connect(url: &str, is_pg: bool) -> Result<AnyPool, String> {
    sqlx::any::install_default_drivers();
    SQLITE.store(!is_pg, std::sync::atomic::Ordering::Relaxed);
    let pool = AnyPoolOptions::new()
        .max_connections(if is_pg { 8 } else { 4 })
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if !is_pg {
                    // Writers of other processes wait (up to 15 s) rather than fail.
                    sqlx::query("PRAGMA busy_timeout = 15000")
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .map_err(|e| format!("cannot open the database: {e}"))?;
    if !is_pg {
        sqlx::query("PRAGMA journal_mode=WAL")
            .execute(&pool)
            .await
            .map_err(|e| format!("cannot enable WAL: {e}"))?;
    }
    Ok(pool)
}

pub struct Bootstrap {
    pub org_id: String,
    /// The generated admin key (None when it came from the environment).
    pub printed_key: Option<String>,
}

/// Applies migrations and, on first start, creates an organization and its admin key.
pub async fn init(
    pool: &AnyPool,
    is_pg: bool,
    admin_key: Option<String>,
) -> Result<Option<Bootstrap>, String> {
    let mut conn = pool.acquire().await.map_err(|e| format!("database: {e}"))?;
    if is_pg {
        sqlx::query("SELECT CAST(1 AS BIGINT) FROM (SELECT pg_advisory_lock($1)) AS l")
            .bind(STARTUP_LOCK)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| format!("database lock: {e}"))?;
    }
    let res = init_locked(&mut conn, admin_key).await;
    if is_pg {
        let _ = sqlx::query("SELECT CAST(1 AS BIGINT) FROM (SELECT pg_advisory_unlock($1)) AS l")
            .bind(STARTUP_LOCK)
            .fetch_all(&mut *conn)
            .await;
    }
    res.map_err(|e| format!("database initialisation: {e}"))
}

async fn init_locked(
    conn: &mut AnyConnection,
    admin_key: Option<String>,
) -> Result<Option<Bootstrap>, sqlx::Error> {
    migrate_locked(&mut *conn).await?;
    let n: i64 = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM organizations")
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?;
    if n > 0 {
        return Ok(None);
    }
    let (key, printed) = match admin_key {
        Some(k) => (k, false),
        None => (new_api_key(), true),
    };
    let org_id = create_org(conn, "default organization", &key).await?;
    Ok(Some(Bootstrap {
        org_id,
        printed_key: printed.then_some(key),
    }))
}

/// Applies pending migrations (what `llm-gateway-sidecar migrate` runs before an upgrade).
pub async fn migrate(pool: &AnyPool, is_pg: bool) -> Result<Vec<i64>, String> {
    let mut conn = pool.acquire().await.map_err(|e| format!("database: {e}"))?;
    if is_pg {
        sqlx::query("SELECT CAST(1 AS BIGINT) FROM (SELECT pg_advisory_lock($1)) AS l")
            .bind(STARTUP_LOCK)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| format!("database lock: {e}"))?;
    }
    let res = migrate_locked(&mut conn).await;
    if is_pg {
        let _ = sqlx::query("SELECT CAST(1 AS BIGINT) FROM (SELECT pg_advisory_unlock($1)) AS l")
            .bind(STARTUP_LOCK)
            .fetch_all(&mut *conn)
            .await;
    }
    res.map_err(|e| format!("migrations: {e}"))?;
    let applied =
        sqlx::query("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| format!("migrations: {e}"))?;
    applied
        .iter()
        .map(|r| r.try_get::<i64, _>("version").map_err(|e| e.to_string()))
        .collect()
}

async fn migrate_locked(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    adopt_legacy_migrations(&mut *conn).await?;
    MIGRATOR
        .run(&mut *conn)
        .await
        .map_err(|e| sqlx::Error::Migrate(Box::new(e)))
}

/// Databases created before `sqlx::migrate!` recorded their versions in `schema_migrations`: record those
/// versions (with the embedded checksums) in sqlx's table once, so they are not run again.
async fn adopt_legacy_migrations(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    use sqlx::migrate::Migrate;
    let Ok(rows) = sqlx::query("SELECT version FROM schema_migrations")
        .fetch_all(&mut *conn)
        .await
    else {
        return Ok(()); // no legacy table
    };
    let legacy: Vec<i64> = rows
        .iter()
        .map(|r| r.try_get::<i64, _>("version"))
        .collect::<Result<_, _>>()?;
    conn.ensure_migrations_table()
        .await
        .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    for m in MIGRATOR.iter().filter(|m| legacy.contains(&m.version)) {
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, TRUE, $3, 0)",
        )
        .bind(m.version)
        .bind(m.description.to_string())
        .bind(m.checksum.to_vec())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DROP TABLE schema_migrations")
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Creates an organization with an organization-scoped admin key bound to its `default` config.
pub async fn create_org(
    conn: &mut AnyConnection,
    name: &str,
    admin_key: &str,
) -> Result<String, sqlx::Error> {
    let org_id = new_id("org");
    let now = now_ms();
    let mut tx = if SQLITE.load(std::sync::atomic::Ordering::Relaxed) {
        sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?
    } else {
        sqlx::Connection::begin(&mut *conn).await?
    };
    sqlx::query(
        "INSERT INTO organizations (id, name, settings, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&org_id)
    .bind(name)
    .bind("{}")
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let key = StoredKey {
        id: new_id("key"),
        org_id: org_id.clone(),
        sha256: hash_key(admin_key),
        name: Some("admin".to_string()),
        config_id: llm_gateway::config::DEFAULT_CONFIG_ID.to_string(),
        cluster_id: None,
        settings: StoredSettings::default(),
        prefix: key_prefix(admin_key),
        created_at: now,
        revoked_at: None,
    };
    insert_key(&mut tx, &key).await?;
    tx.commit().await?;
    Ok(org_id)
}

/// `llm-gateway-sidecar admin-key rotate`: a new admin key (organization scope, `default` config, named
/// `admin`) for `org` (optional when there is one organization); the organization's previous admin keys
/// are revoked unless `keep_old`. Returns (organization, new key).
pub async fn rotate_admin_key(
    pool: &AnyPool,
    org: Option<&str>,
    keep_old: bool,
) -> Result<(String, String), String> {
    let err = |e: sqlx::Error| format!("database: {e}");
    let mut conn = pool.acquire().await.map_err(err)?;
    let orgs: Vec<(String, String)> =
        sqlx::query("SELECT id, name FROM organizations ORDER BY created_at, id")
            .fetch_all(&mut *conn)
            .await
            .map_err(err)?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("id")?,
                    r.try_get::<String, _>("name")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(err)?;
    let known = || {
        orgs.iter()
            .map(|(id, name)| format!("{id} ({name})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // By id or unique name; omitted: the first organization (the one created at first start).
    let org_id = match org {
        Some(o) => {
            let hits: Vec<&(String, String)> = orgs
                .iter()
                .filter(|(id, name)| id == o || name == o)
                .collect();
            match hits.as_slice() {
                [one] => one.0.clone(),
                [] => {
                    return Err(format!(
                        "organization '{o}' does not exist (known: {})",
                        known()
                    ))
                }
                _ => {
                    return Err(format!(
                        "several organizations are named '{o}': pass the id ({})",
                        known()
                    ))
                }
            }
        }
        None => match orgs.first() {
            Some((id, _)) => id.clone(),
            None => {
                return Err(
                    "no organization yet: start the sidecar once (serve) to create it".into(),
                )
            }
        },
    };
    let secret = new_api_key();
    let now = now_ms();
    let mut tx = if SQLITE.load(std::sync::atomic::Ordering::Relaxed) {
        sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE")
            .await
            .map_err(err)?
    } else {
        sqlx::Connection::begin(&mut *conn).await.map_err(err)?
    };
    if !keep_old {
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE org_id = $2 AND name = 'admin' AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(&org_id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    }
    let key = StoredKey {
        id: new_id("key"),
        org_id: org_id.clone(),
        sha256: hash_key(&secret),
        name: Some("admin".to_string()),
        config_id: llm_gateway::config::DEFAULT_CONFIG_ID.to_string(),
        cluster_id: None,
        settings: StoredSettings::default(),
        prefix: key_prefix(&secret),
        created_at: now,
        revoked_at: None,
    };
    insert_key(&mut tx, &key)
        .await
        .map_err(|e| format!("{e:?}"))?;
    tx.commit().await.map_err(err)?;
    Ok((org_id, secret))
}

/// Whether any key (active or revoked) has this digest.
pub async fn sha_exists(conn: &mut AnyConnection, sha256: &str) -> ApiResult<bool> {
    Ok(sqlx::query("SELECT id FROM api_keys WHERE sha256 = $1")
        .bind(sha256)
        .fetch_optional(conn)
        .await?
        .is_some())
}

pub fn key_prefix(secret: &str) -> String {
    secret.chars().take(8).collect()
}

// ----------------------------------------------------------------------------------------------
// Rows.
// ----------------------------------------------------------------------------------------------

/// Settings as stored and served: the filter's [`Settings`] itself (one definition); `storePrompts` is
/// only acted on here.
pub type StoredSettings = Settings;

/// The routing part the filter sees in `Identity` (`storePrompts` travels separately).
pub fn routing(s: &Settings) -> Settings {
    Settings {
        store_prompts: None,
        ..s.clone()
    }
}

/// Per-model price override of a provider registration, USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceOverride {
    pub input: f64,
    pub output: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<f64>,
}

pub type PriceOverrides = BTreeMap<String, PriceOverride>;

pub struct StoredProvider {
    /// The registration without its key.
    pub spec: ProviderSpec,
    /// Price overrides (`prices` of the registration), kept out of the filter's spec.
    pub prices: PriceOverrides,
    pub key_enc: Option<String>,
    pub last4: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A config's own provider entry as stored (its key override, if any, is in the sealed secrets).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_last4: Option<String>,
}

pub struct StoredConfig {
    pub id: String,
    pub name: Option<String>,
    pub inherits: Option<String>,
    pub entries: Vec<StoredEntry>,
    /// Narrowing of the merged provider list (`only`); `None`: no narrowing.
    pub only: Option<Vec<String>>,
    pub secrets_enc: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone)]
pub struct StoredKey {
    pub id: String,
    pub org_id: String,
    pub sha256: String,
    pub name: Option<String>,
    pub config_id: String,
    pub cluster_id: Option<String>,
    pub settings: StoredSettings,
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

fn json_col<T: serde::de::DeserializeOwned>(row: &AnyRow, col: &str) -> ApiResult<T> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text)
        .map_err(|e| ApiError::internal(format!("corrupt column {col}: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> ApiResult<String> {
    serde_json::to_string(v).map_err(ApiError::internal)
}

// ----------------------------------------------------------------------------------------------
// Organizations and settings.
// ----------------------------------------------------------------------------------------------

/// Serializes writers of one organization (row lock on PostgreSQL, write lock on SQLite).
pub async fn lock_org(conn: &mut AnyConnection, org: &str) -> ApiResult<()> {
    sqlx::query("UPDATE organizations SET name = name WHERE id = $1")
        .bind(org)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn org_settings(conn: &mut AnyConnection, org: &str) -> ApiResult<StoredSettings> {
    let row = sqlx::query("SELECT settings FROM organizations WHERE id = $1")
        .bind(org)
        .fetch_optional(conn)
        .await?;
    match row {
        Some(r) => json_col(&r, "settings"),
        None => Ok(StoredSettings::default()),
    }
}

pub async fn set_org_settings(
    conn: &mut AnyConnection,
    org: &str,
    s: &StoredSettings,
) -> ApiResult<()> {
    sqlx::query("UPDATE organizations SET settings = $1 WHERE id = $2")
        .bind(to_json(s)?)
        .bind(org)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn cluster_settings(
    conn: &mut AnyConnection,
    org: &str,
    cluster: &str,
) -> ApiResult<StoredSettings> {
    let row =
        sqlx::query("SELECT settings FROM cluster_settings WHERE org_id = $1 AND cluster_id = $2")
            .bind(org)
            .bind(cluster)
            .fetch_optional(conn)
            .await?;
    match row {
        Some(r) => json_col(&r, "settings"),
        None => Ok(StoredSettings::default()),
    }
}

pub async fn set_cluster_settings(
    conn: &mut AnyConnection,
    org: &str,
    cluster: &str,
    s: &StoredSettings,
) -> ApiResult<()> {
    sqlx::query("DELETE FROM cluster_settings WHERE org_id = $1 AND cluster_id = $2")
        .bind(org)
        .bind(cluster)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO cluster_settings (org_id, cluster_id, settings, updated_at) VALUES ($1, $2, $3, $4)")
        .bind(org)
        .bind(cluster)
        .bind(to_json(s)?)
        .bind(now_ms())
        .execute(conn)
        .await?;
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Providers.
// ----------------------------------------------------------------------------------------------

fn provider_row(r: &AnyRow) -> ApiResult<StoredProvider> {
    Ok(StoredProvider {
        spec: json_col(r, "spec")?,
        prices: match r.try_get::<Option<String>, _>("prices")? {
            Some(t) if !t.is_empty() => serde_json::from_str(&t)
                .map_err(|e| ApiError::internal(format!("corrupt column prices: {e}")))?,
            _ => PriceOverrides::new(),
        },
        key_enc: r.try_get("api_key_enc")?,
        last4: r.try_get("api_key_last4")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub async fn providers(conn: &mut AnyConnection, org: &str) -> ApiResult<Vec<StoredProvider>> {
    sqlx::query(
        "SELECT spec, prices, api_key_enc, api_key_last4, created_at, updated_at FROM providers \
         WHERE org_id = $1 ORDER BY created_at, name",
    )
    .bind(org)
    .fetch_all(conn)
    .await?
    .iter()
    .map(provider_row)
    .collect()
}

pub async fn insert_provider(
    conn: &mut AnyConnection,
    org: &str,
    p: &StoredProvider,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO providers (org_id, name, spec, api_key_enc, api_key_last4, created_at, updated_at, prices) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(org)
    .bind(&p.spec.name)
    .bind(to_json(&p.spec)?)
    .bind(p.key_enc.clone())
    .bind(p.last4.clone())
    .bind(p.created_at)
    .bind(p.updated_at)
    .bind(prices_json(&p.prices)?)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn update_provider(
    conn: &mut AnyConnection,
    org: &str,
    p: &StoredProvider,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE providers SET spec = $1, api_key_enc = $2, api_key_last4 = $3, updated_at = $4, \
         prices = $7 WHERE org_id = $5 AND name = $6",
    )
    .bind(to_json(&p.spec)?)
    .bind(p.key_enc.clone())
    .bind(p.last4.clone())
    .bind(p.updated_at)
    .bind(org)
    .bind(&p.spec.name)
    .bind(prices_json(&p.prices)?)
    .execute(conn)
    .await?;
    Ok(())
}

fn prices_json(p: &PriceOverrides) -> ApiResult<Option<String>> {
    if p.is_empty() {
        Ok(None)
    } else {
        to_json(p).map(Some)
    }
}

pub async fn delete_provider(conn: &mut AnyConnection, org: &str, name: &str) -> ApiResult<()> {
    sqlx::query("DELETE FROM providers WHERE org_id = $1 AND name = $2")
        .bind(org)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Configs.
// ----------------------------------------------------------------------------------------------

fn config_row(r: &AnyRow) -> ApiResult<StoredConfig> {
    Ok(StoredConfig {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        inherits: r.try_get("inherits")?,
        entries: json_col(r, "entries")?,
        only: match r.try_get::<Option<String>, _>("only_providers")? {
            Some(t) => Some(serde_json::from_str(&t).map_err(ApiError::internal)?),
            None => None,
        },
        secrets_enc: r.try_get("secrets_enc")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub async fn configs(conn: &mut AnyConnection, org: &str) -> ApiResult<Vec<StoredConfig>> {
    sqlx::query(
        "SELECT id, name, inherits, entries, only_providers, secrets_enc, created_at, updated_at FROM configs \
         WHERE org_id = $1 ORDER BY created_at, id",
    )
    .bind(org)
    .fetch_all(conn)
    .await?
    .iter()
    .map(config_row)
    .collect()
}

pub async fn insert_config(conn: &mut AnyConnection, org: &str, c: &StoredConfig) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO configs (org_id, id, name, inherits, entries, secrets_enc, created_at, updated_at, only_providers) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(org)
    .bind(&c.id)
    .bind(c.name.clone())
    .bind(c.inherits.clone())
    .bind(to_json(&c.entries)?)
    .bind(c.secrets_enc.clone())
    .bind(c.created_at)
    .bind(c.updated_at)
    .bind(c.only.as_ref().map(to_json).transpose()?)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn update_config(conn: &mut AnyConnection, org: &str, c: &StoredConfig) -> ApiResult<()> {
    sqlx::query(
        "UPDATE configs SET name = $1, inherits = $2, entries = $3, secrets_enc = $4, updated_at = $5, \
         only_providers = $8 WHERE org_id = $6 AND id = $7",
    )
    .bind(c.name.clone())
    .bind(c.inherits.clone())
    .bind(to_json(&c.entries)?)
    .bind(c.secrets_enc.clone())
    .bind(c.updated_at)
    .bind(org)
    .bind(&c.id)
    .bind(c.only.as_ref().map(to_json).transpose()?)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn delete_config(conn: &mut AnyConnection, org: &str, id: &str) -> ApiResult<()> {
    sqlx::query("DELETE FROM configs WHERE org_id = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// API keys.
// ----------------------------------------------------------------------------------------------

const KEY_COLS: &str =
    "id, org_id, sha256, name, config_id, cluster_id, settings, prefix, created_at, revoked_at";

fn key_row(r: &AnyRow) -> ApiResult<StoredKey> {
    Ok(StoredKey {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        sha256: r.try_get("sha256")?,
        name: r.try_get("name")?,
        config_id: r.try_get("config_id")?,
        cluster_id: r.try_get("cluster_id")?,
        settings: json_col(r, "settings")?,
        prefix: r.try_get("prefix")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

pub async fn insert_key(conn: &mut AnyConnection, k: &StoredKey) -> Result<(), sqlx::Error> {
    let settings = serde_json::to_string(&k.settings).unwrap_or_else(|_| "{}".to_string());
    sqlx::query(
        "INSERT INTO api_keys (id, org_id, sha256, name, config_id, cluster_id, settings, prefix, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&k.id)
    .bind(&k.org_id)
    .bind(&k.sha256)
    .bind(k.name.clone())
    .bind(&k.config_id)
    .bind(k.cluster_id.clone())
    .bind(settings)
    .bind(&k.prefix)
    .bind(k.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// An active (not revoked) key by the SHA-256 hex of its secret.
pub async fn active_key_by_hash(
    conn: &mut AnyConnection,
    sha256: &str,
) -> ApiResult<Option<StoredKey>> {
    let q = format!("SELECT {KEY_COLS} FROM api_keys WHERE sha256 = $1 AND revoked_at IS NULL");
    sqlx::query(&q)
        .bind(sha256)
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(key_row)
        .transpose()
}

pub async fn key_by_id(
    conn: &mut AnyConnection,
    org: &str,
    id: &str,
) -> ApiResult<Option<StoredKey>> {
    let q = format!("SELECT {KEY_COLS} FROM api_keys WHERE org_id = $1 AND id = $2");
    sqlx::query(&q)
        .bind(org)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(key_row)
        .transpose()
}

pub async fn keys(conn: &mut AnyConnection, org: &str) -> ApiResult<Vec<StoredKey>> {
    let q = format!("SELECT {KEY_COLS} FROM api_keys WHERE org_id = $1 ORDER BY created_at, id");
    sqlx::query(&q)
        .bind(org)
        .fetch_all(conn)
        .await?
        .iter()
        .map(key_row)
        .collect()
}

pub async fn revoke_key(conn: &mut AnyConnection, org: &str, id: &str) -> ApiResult<()> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE org_id = $2 AND id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(org)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_key_settings(
    conn: &mut AnyConnection,
    org: &str,
    id: &str,
    s: &StoredSettings,
) -> ApiResult<()> {
    sqlx::query("UPDATE api_keys SET settings = $1 WHERE org_id = $2 AND id = $3")
        .bind(to_json(s)?)
        .bind(org)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn ping(pool: &AnyPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT CAST(1 AS BIGINT)")
        .fetch_one(pool)
        .await
        .map(|_| ())
}
