//! The HTTP API: public control plane (providers, configs, API keys, settings, model specs) and the
//! internal endpoints the Envoy filter and operators call.

use crate::db::{
    self, PriceOverrides, StoredConfig, StoredEntry, StoredKey, StoredProvider, StoredSettings,
};
use crate::error::{ApiError, ApiResult};
use crate::util::{new_api_key, new_id, now_ms, parse_json, rfc3339, secret_eq, JsonBody};
use crate::vault::Vault;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_gateway::config::{
    compile, flatten_configs, hash_key, last4, ConfigProviderSpec, ConfigSpec, Identity, KeySpec,
    ModelSpec, ProviderKind, ProviderSpec, RawConfig, SecretSource, DEFAULT_CONFIG_ID,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::AnyConnection;
use sqlx::AnyPool;
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct Inner {
    pub pool: AnyPool,
    pub vault: Vault,
    pub internal_token: String,
    pub ttl_seconds: u32,
    /// Serializes writes inside one process (SQLite has a single writer; PostgreSQL also locks the org row).
    pub write_lock: tokio::sync::Mutex<()>,
    pub model_specs: Value,
    pub pricing: crate::prices::Pricing,
}

pub type AppState = Arc<Inner>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route(
            "/v1/llm/providers",
            post(create_providers).get(list_providers),
        )
        .route(
            "/v1/llm/providers/{name}",
            get(get_provider)
                .put(update_provider)
                .delete(delete_provider),
        )
        .route("/config", post(create_config).get(list_configs))
        .route(
            "/config/{id}",
            get(get_config)
                .put(put_config)
                .patch(patch_config)
                .delete(delete_config),
        )
        .route("/v1/llm/api-keys", post(create_key).get(list_keys))
        .route("/v1/llm/api-keys/{id}", get(get_key).delete(revoke_key))
        .route(
            "/v1/llm/api-keys/{id}/settings",
            get(get_key_settings).put(put_key_settings),
        )
        .route("/v1/llm/settings", get(get_settings).put(put_settings))
        .route(
            "/ai-optimizer/v1beta/hosted-model-specs",
            get(hosted_model_specs),
        )
        .route("/v1/llm/usage", get(crate::usage::usage))
        .route("/v1/llm/usage/records", get(crate::usage::records))
        .route("/v1/llm/prices", get(crate::usage::prices))
        .route("/v1/llm/report", get(crate::report::report))
        .route("/v1/llm/report/link", post(crate::report::create_link))
        .route("/internal/v1/usage", post(crate::usage::ingest))
        .route("/internal/v1/resolve", post(resolve))
        .route("/internal/v1/organizations", post(create_organization))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn unknown_route() -> ApiError {
    ApiError::not_found("no such endpoint (see /openapi.json)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "method not allowed",
    )
}

// ----------------------------------------------------------------------------------------------
// Callers.
// ----------------------------------------------------------------------------------------------

/// The authenticated caller: a gateway API key of an organization, optionally cluster-scoped.
pub struct Caller {
    pub org_id: String,
    pub key_id: String,
    pub cluster_id: Option<String>,
}

impl Caller {
    fn require_org(&self) -> ApiResult<()> {
        match &self.cluster_id {
            None => Ok(()),
            Some(c) => Err(ApiError::forbidden(format!(
                "this endpoint needs an organization-scoped API key; this key is scoped to cluster '{c}'"
            ))),
        }
    }

    /// Cluster-scoped callers only see hosted providers of their cluster.
    fn sees(&self, spec: &ProviderSpec) -> bool {
        visible_to(spec, self.cluster_id.as_deref())
    }
}

fn visible_to(spec: &ProviderSpec, cluster: Option<&str>) -> bool {
    match cluster {
        None => true,
        Some(c) => spec.is_hosted && spec.cluster_id.as_deref() == Some(c),
    }
}

/// The caller's key from `X-API-Key` or `Authorization: Bearer`.
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some(v.to_string());
        }
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = presented_key(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized("missing API key: send it in the X-API-Key header or as Authorization: Bearer <key>")
        })?;
        let mut conn = state.pool.acquire().await?;
        let k = db::active_key_by_hash(&mut conn, &hash_key(&key))
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid or revoked API key"))?;
        Ok(Caller {
            org_id: k.org_id,
            key_id: k.id,
            cluster_id: k.cluster_id,
        })
    }
}

// ----------------------------------------------------------------------------------------------
// Validation through the filter's own compiler.
// ----------------------------------------------------------------------------------------------

struct NoSecrets;

impl SecretSource for NoSecrets {
    fn env(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Validates an organization's providers and configs exactly as the filter would: every config is
/// compiled through a synthetic key bound to it.
fn validate_org(providers: &[ProviderSpec], configs: &[ConfigSpec]) -> Result<(), String> {
    if configs.iter().any(|c| c.id == DEFAULT_CONFIG_ID) {
        return Err("'default' is the built-in config and cannot be stored".to_string());
    }
    let keys = configs
        .iter()
        .map(|c| c.id.as_str())
        .chain(std::iter::once(DEFAULT_CONFIG_ID))
        .map(|id| KeySpec {
            id: format!("validate:{id}"),
            sha256: hash_key(&format!("validate\u{0}{id}")),
            config: id.to_string(),
            ..Default::default()
        })
        .collect();
    let raw = RawConfig {
        providers: providers.to_vec(),
        configs: configs.to_vec(),
        keys,
        ..Default::default()
    };
    compile(&raw, &NoSecrets).map(|_| ())
}

fn config_error(msg: String) -> ApiError {
    let code = if msg.contains("loop") {
        "inheritance_loop"
    } else if msg.contains("levels deep") {
        "inheritance_too_deep"
    } else if msg.contains("unknown parent") {
        "unknown_parent"
    } else if msg.contains("unknown provider") {
        "unknown_provider"
    } else {
        "invalid_config"
    };
    ApiError::bad_request(code, msg)
}

fn specs_of(providers: &[StoredProvider]) -> Vec<ProviderSpec> {
    providers.iter().map(|p| p.spec.clone()).collect()
}

fn config_spec(c: &StoredConfig, secrets: Option<&BTreeMap<String, String>>) -> ConfigSpec {
    ConfigSpec {
        id: c.id.clone(),
        name: c.name.clone(),
        inherits: c.inherits.clone(),
        providers: c
            .entries
            .iter()
            .map(|e| ConfigProviderSpec {
                name: e.name.clone(),
                models: e.models.clone(),
                api_key: secrets.and_then(|s| s.get(&e.name).cloned()),
                api_base: e.api_base.clone(),
            })
            .collect(),
    }
}

fn config_specs(configs: &[StoredConfig]) -> Vec<ConfigSpec> {
    configs.iter().map(|c| config_spec(c, None)).collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+:@".contains(c))
}

// ----------------------------------------------------------------------------------------------
// Health, readiness, OpenAPI, model specs.
// ----------------------------------------------------------------------------------------------

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(std::time::Duration::from_secs(2), db::ping(&st.pool)).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "database unreachable"})),
        ),
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}

async fn hosted_model_specs(State(st): State<AppState>, _caller: Caller) -> Json<Value> {
    Json(st.model_specs.clone())
}

// ----------------------------------------------------------------------------------------------
// Providers.
// ----------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProviderIn {
    #[serde(default)]
    name: Option<String>,
    #[serde(alias = "type", alias = "supported_provider")]
    supported_provider: String,
    #[serde(default, alias = "api_key")]
    api_key: Option<String>,
    #[serde(default)]
    models: Vec<ModelSpec>,
    #[serde(default, alias = "api_base", alias = "apiBase")]
    url: Option<String>,
    #[serde(default, alias = "api_version")]
    api_version: Option<String>,
    #[serde(default, alias = "is_hosted")]
    is_hosted: bool,
    #[serde(default, alias = "cluster_id")]
    cluster_id: Option<String>,
    #[serde(default)]
    fallback: Option<OneOrMany>,
    /// `native` or `openai` for ANTHROPIC, GEMINI and VERTEXAIGEMINI (the filter's `api`).
    #[serde(default)]
    api: Option<String>,
    /// Fall back to the next provider on 429 too (5xx and connection failures always fall back).
    #[serde(default, alias = "fallback_on_429")]
    fallback_on429: bool,
    /// Upstream timeouts (`totalMs`, `perTryMs`), set by the filter as Envoy per-request headers.
    #[serde(default)]
    timeouts: Option<llm_gateway::plan::Timeouts>,
    /// Price overrides, USD per 1M tokens, by model (stored with the registration, not in the filter's spec).
    #[serde(default)]
    prices: Option<PriceOverrides>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersIn {
    providers: Vec<ProviderIn>,
}

impl ProviderIn {
    /// The validated price overrides: every model must be one the provider serves (public or upstream name).
    fn prices(&self, spec: &ProviderSpec) -> ApiResult<PriceOverrides> {
        let prices = self.prices.clone().unwrap_or_default();
        for (model, p) in &prices {
            let served = spec.models.iter().any(|m| match m {
                ModelSpec::Name(n) => n == model,
                ModelSpec::Mapped {
                    name,
                    upstream_name,
                } => name == model || upstream_name == model,
            });
            if !served {
                return Err(ApiError::bad_request(
                    "unknown_model",
                    format!(
                        "provider '{}': prices names model '{model}' which the provider does not serve",
                        spec.name
                    ),
                )
                .with_param("prices"));
            }
            if !crate::prices::valid_override(p) {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!(
                        "provider '{}': prices of '{model}' must be non-negative USD per 1M tokens",
                        spec.name
                    ),
                )
                .with_param("prices"));
            }
        }
        Ok(prices)
    }

    /// The registration without its key (keys go to the vault separately).
    fn to_spec(&self, name: &str) -> ApiResult<ProviderSpec> {
        if !valid_name(name) {
            return Err(ApiError::bad_request(
                "invalid_name",
                format!("provider name '{name}' is invalid: use 1-128 letters, digits or -_.+:@"),
            )
            .with_param("name"));
        }
        let kind = ProviderKind::parse(&self.supported_provider).ok_or_else(|| {
            ApiError::bad_request(
                "unknown_provider_type",
                format!(
                    "unknown supportedProvider '{}' (OPENAI, AZURE, GEMINI, VERTEXAIGEMINI, MISTRAL, GROQ, \
                     ANTHROPIC, OPENAI_COMPATIBLE)",
                    self.supported_provider
                ),
            )
            .with_param("supportedProvider")
        })?;
        let cluster_id = self.cluster_id.clone().filter(|c| !c.trim().is_empty());
        if cluster_id.is_some() && !self.is_hosted {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("provider '{name}': clusterId is only meaningful for hosted providers (isHosted: true)"),
            )
            .with_param("clusterId"));
        }
        let fallback = match &self.fallback {
            None => Vec::new(),
            Some(OneOrMany::One(s)) if s.is_empty() => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        Ok(ProviderSpec {
            name: name.to_string(),
            supported_provider: kind.as_str().to_string(),
            url: self.url.clone().filter(|u| !u.trim().is_empty()),
            api_version: self.api_version.clone().filter(|v| !v.trim().is_empty()),
            models: self.models.clone(),
            is_hosted: self.is_hosted,
            api_key: None,
            api_key_env: None,
            cluster: None,
            cluster_id,
            fallback,
            api: self.api.clone().filter(|a| !a.trim().is_empty()),
            fallback_on429: self.fallback_on429,
            timeouts: self.timeouts,
        })
    }
}

fn provider_out(p: &StoredProvider) -> Value {
    json!({
        "name": p.spec.name,
        "supportedProvider": p.spec.supported_provider,
        "models": p.spec.models,
        "url": p.spec.url,
        "apiVersion": p.spec.api_version,
        "isHosted": p.spec.is_hosted,
        "clusterId": p.spec.cluster_id,
        "fallback": p.spec.fallback,
        "api": p.spec.api,
        "fallbackOn429": p.spec.fallback_on429,
        "timeouts": p.spec.timeouts,
        "prices": p.prices,
        "apiKeyLast4": p.last4,
        "createTime": rfc3339(p.created_at),
        "updateTime": rfc3339(p.updated_at),
    })
}

fn seal_provider_key(
    vault: &Vault,
    org: &str,
    name: &str,
    key: &str,
) -> ApiResult<(String, String)> {
    let sealed = vault
        .seal(key, &format!("provider:{org}:{name}"))
        .map_err(ApiError::internal)?;
    Ok((sealed, last4(key)))
}

async fn create_providers(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<ProvidersIn>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_org()?;
    if body.providers.is_empty() {
        return Err(
            ApiError::bad_request("invalid_value", "providers must not be empty")
                .with_param("providers"),
        );
    }
    let mut new = Vec::with_capacity(body.providers.len());
    for (i, p) in body.providers.iter().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let spec = p
            .to_spec(&name)
            .map_err(|e| e.with_param(format!("providers[{i}]")))?;
        let prices = p
            .prices(&spec)
            .map_err(|e| e.with_param(format!("providers[{i}].prices")))?;
        new.push((
            spec,
            p.api_key.clone().filter(|k| !k.trim().is_empty()),
            prices,
        ));
    }
    let org = caller.org_id.as_str();
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    let existing = db::providers(&mut tx, org).await?;
    let configs = db::configs(&mut tx, org).await?;
    let mut all = specs_of(&existing);
    for (spec, _, _) in &new {
        if all.iter().any(|s| s.name == spec.name) {
            return Err(ApiError::conflict(
                "provider_exists",
                format!(
                    "provider '{}' already exists (update it with PUT /v1/llm/providers/{})",
                    spec.name, spec.name
                ),
            )
            .with_param("name"));
        }
        all.push(spec.clone());
    }
    validate_org(&all, &config_specs(&configs))
        .map_err(|m| ApiError::bad_request("invalid_provider", m))?;
    let now = now_ms();
    let mut out = Vec::with_capacity(new.len());
    for (i, (spec, key, prices)) in new.into_iter().enumerate() {
        let t = now + i as i64;
        let (key_enc, last4) = match key {
            Some(k) => {
                let (s, l) = seal_provider_key(&st.vault, org, &spec.name, &k)?;
                (Some(s), Some(l))
            }
            None => (None, None),
        };
        let sp = StoredProvider {
            spec,
            prices,
            key_enc,
            last4,
            created_at: t,
            updated_at: t,
        };
        db::insert_provider(&mut tx, org, &sp).await?;
        out.push(provider_out(&sp));
    }
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!({ "providers": out }))))
}

async fn list_providers(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    let mut conn = st.pool.acquire().await?;
    let list = db::providers(&mut conn, &caller.org_id).await?;
    let out: Vec<Value> = list
        .iter()
        .filter(|p| caller.sees(&p.spec))
        .map(provider_out)
        .collect();
    Ok(Json(json!({ "providers": out })))
}

fn provider_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("provider '{name}' not found"))
}

async fn get_provider(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let mut conn = st.pool.acquire().await?;
    let list = db::providers(&mut conn, &caller.org_id).await?;
    let p = list
        .iter()
        .find(|p| p.spec.name == name && caller.sees(&p.spec))
        .ok_or_else(|| provider_not_found(&name))?;
    Ok(Json(provider_out(p)))
}

async fn update_provider(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ProviderIn>,
) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    if let Some(n) = &body.name {
        if n != &name {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("the body names provider '{n}' but the path names '{name}'; providers cannot be renamed"),
            )
            .with_param("name"));
        }
    }
    let spec = body.to_spec(&name)?;
    let prices = body.prices(&spec)?;
    let org = caller.org_id.as_str();
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    let existing = db::providers(&mut tx, org).await?;
    let configs = db::configs(&mut tx, org).await?;
    let old = existing
        .iter()
        .find(|p| p.spec.name == name)
        .ok_or_else(|| provider_not_found(&name))?;
    let all: Vec<ProviderSpec> = existing
        .iter()
        .map(|p| {
            if p.spec.name == name {
                spec.clone()
            } else {
                p.spec.clone()
            }
        })
        .collect();
    validate_org(&all, &config_specs(&configs))
        .map_err(|m| ApiError::bad_request("invalid_provider", m))?;
    // Keys are write-only: absent keeps the stored key, "" removes it.
    let (key_enc, last4) = match body.api_key.as_deref() {
        None => (old.key_enc.clone(), old.last4.clone()),
        Some(k) if k.trim().is_empty() => (None, None),
        Some(k) => {
            let (s, l) = seal_provider_key(&st.vault, org, &name, k)?;
            (Some(s), Some(l))
        }
    };
    let sp = StoredProvider {
        spec,
        prices,
        key_enc,
        last4,
        created_at: old.created_at,
        updated_at: now_ms(),
    };
    db::update_provider(&mut tx, org, &sp).await?;
    tx.commit().await?;
    Ok(Json(provider_out(&sp)))
}

async fn delete_provider(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_org()?;
    let org = caller.org_id.as_str();
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    let existing = db::providers(&mut tx, org).await?;
    let configs = db::configs(&mut tx, org).await?;
    if !existing.iter().any(|p| p.spec.name == name) {
        return Err(provider_not_found(&name));
    }
    if let Some(c) = configs
        .iter()
        .find(|c| c.entries.iter().any(|e| e.name == name))
    {
        return Err(ApiError::conflict(
            "provider_in_use",
            format!(
                "provider '{name}' is used by config '{}'; remove it from the config first",
                c.id
            ),
        ));
    }
    if let Some(p) = existing.iter().find(|p| p.spec.fallback.contains(&name)) {
        return Err(ApiError::conflict(
            "provider_in_use",
            format!(
                "provider '{name}' is the fallback of provider '{}'",
                p.spec.name
            ),
        ));
    }
    let rest: Vec<ProviderSpec> = existing
        .iter()
        .filter(|p| p.spec.name != name)
        .map(|p| p.spec.clone())
        .collect();
    validate_org(&rest, &config_specs(&configs))
        .map_err(|m| ApiError::conflict("provider_in_use", m))?;
    db::delete_provider(&mut tx, org, &name).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----------------------------------------------------------------------------------------------
// Custom configurations.
// ----------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigIn {
    #[serde(default)]
    name: Option<String>,
    #[serde(
        default,
        alias = "parent",
        alias = "inherits_from",
        alias = "inheritsFrom",
        alias = "parent_id"
    )]
    inherits: Option<String>,
    #[serde(default)]
    providers: Vec<ConfigProviderSpec>,
}

fn config_secrets(
    vault: &Vault,
    org: &str,
    c: &StoredConfig,
) -> ApiResult<BTreeMap<String, String>> {
    match &c.secrets_enc {
        None => Ok(BTreeMap::new()),
        Some(s) => {
            let text = vault
                .open(s, &format!("config:{org}:{}", c.id))
                .map_err(ApiError::internal)?;
            serde_json::from_str(&text).map_err(ApiError::internal)
        }
    }
}

/// Builds the stored form of a config; per-provider keys without a new value keep the previous one.
fn build_config(
    vault: &Vault,
    org: &str,
    id: &str,
    input: ConfigIn,
    prev: Option<&StoredConfig>,
) -> ApiResult<StoredConfig> {
    let prev_secrets = match prev {
        Some(p) => config_secrets(vault, org, p)?,
        None => BTreeMap::new(),
    };
    let mut secrets = BTreeMap::new();
    let mut entries = Vec::with_capacity(input.providers.len());
    for (i, e) in input.providers.iter().enumerate() {
        if e.name.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid_value",
                "a config provider entry has an empty name",
            )
            .with_param(format!("providers[{i}].name")));
        }
        if entries.iter().any(|x: &StoredEntry| x.name == e.name) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("provider '{}' is listed twice in the config", e.name),
            )
            .with_param(format!("providers[{i}].name")));
        }
        let key = match e.api_key.as_deref() {
            Some(k) if k.trim().is_empty() => None,
            Some(k) => Some(k.to_string()),
            None => prev_secrets.get(&e.name).cloned(),
        };
        let api_key_last4 = key.as_deref().map(last4);
        if let Some(k) = key {
            secrets.insert(e.name.clone(), k);
        }
        entries.push(StoredEntry {
            name: e.name.clone(),
            models: e.models.clone(),
            api_base: e.api_base.clone().filter(|b| !b.trim().is_empty()),
            api_key_last4,
        });
    }
    let inherits = input.inherits.filter(|p| !p.trim().is_empty());
    if inherits.is_none() && entries.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_config",
            "a config needs providers, a parent (inherits: \"default\" or a config id), or both",
        )
        .with_param("providers"));
    }
    let secrets_enc = if secrets.is_empty() {
        None
    } else {
        let text = serde_json::to_string(&secrets).map_err(ApiError::internal)?;
        Some(
            vault
                .seal(&text, &format!("config:{org}:{id}"))
                .map_err(ApiError::internal)?,
        )
    };
    let now = now_ms();
    Ok(StoredConfig {
        id: id.to_string(),
        name: input.name.filter(|n| !n.trim().is_empty()),
        inherits,
        entries,
        secrets_enc,
        created_at: prev.map_or(now, |p| p.created_at),
        updated_at: now,
    })
}

fn config_out(c: &StoredConfig) -> Value {
    json!({
        "config_id": c.id,
        "name": c.name,
        "inherits": c.inherits,
        "providers": c.entries,
        "created_at": rfc3339(c.created_at),
        "updated_at": rfc3339(c.updated_at),
    })
}

/// The providers and models a config ends up with after inheritance.
fn resolved_providers(providers: &[StoredProvider], configs: &[StoredConfig], id: &str) -> Value {
    let specs = specs_of(providers);
    let flat = match flatten_configs(&specs, &config_specs(configs)) {
        Ok(f) => f,
        Err(_) => return Value::Null,
    };
    let entries = flat.get(id).cloned().unwrap_or_default();
    let out: Vec<Value> = entries
        .iter()
        .map(|e| {
            let all: Vec<String> = specs
                .iter()
                .find(|p| p.name == e.name)
                .map(|p| p.models.iter().map(|m| m.name().to_string()).collect())
                .unwrap_or_default();
            json!({"name": e.name, "models": e.models.clone().unwrap_or(all), "api_base": e.api_base})
        })
        .collect();
    Value::Array(out)
}

fn default_config_out(providers: &[StoredProvider], configs: &[StoredConfig]) -> Value {
    let entries: Vec<Value> = providers
        .iter()
        .map(|p| json!({"name": p.spec.name}))
        .collect();
    json!({
        "config_id": DEFAULT_CONFIG_ID,
        "name": "default",
        "builtin": true,
        "inherits": null,
        "providers": entries,
        "resolved_providers": resolved_providers(providers, configs, DEFAULT_CONFIG_ID),
    })
}

fn config_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("config '{id}' not found"))
}

fn builtin_refused() -> ApiError {
    ApiError::bad_request(
        "builtin_config",
        "the 'default' config is built in (all providers of the organization) and cannot be changed or deleted",
    )
}

async fn create_config(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<ConfigIn>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_org()?;
    let org = caller.org_id.as_str();
    let id = new_id("cfg");
    let stored = build_config(&st.vault, org, &id, input, None)?;
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    let providers = db::providers(&mut tx, org).await?;
    let mut configs = db::configs(&mut tx, org).await?;
    let mut specs = config_specs(&configs);
    specs.push(config_spec(&stored, None));
    validate_org(&specs_of(&providers), &specs).map_err(config_error)?;
    db::insert_config(&mut tx, org, &stored).await?;
    tx.commit().await?;
    let mut out = config_out(&stored);
    configs.push(stored);
    if let Value::Object(m) = &mut out {
        m.insert(
            "resolved_providers".into(),
            resolved_providers(&providers, &configs, &id),
        );
    }
    Ok((StatusCode::CREATED, Json(out)))
}

async fn list_configs(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    let mut conn = st.pool.acquire().await?;
    let configs = db::configs(&mut conn, &caller.org_id).await?;
    let mut out = vec![
        json!({"config_id": DEFAULT_CONFIG_ID, "name": "default", "builtin": true, "inherits": null}),
    ];
    out.extend(configs.iter().map(|c| {
        json!({
            "config_id": c.id,
            "name": c.name,
            "inherits": c.inherits,
            "created_at": rfc3339(c.created_at),
            "updated_at": rfc3339(c.updated_at),
        })
    }));
    Ok(Json(json!({ "configs": out })))
}

async fn get_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    let mut conn = st.pool.acquire().await?;
    let providers = db::providers(&mut conn, &caller.org_id).await?;
    let configs = db::configs(&mut conn, &caller.org_id).await?;
    if id == DEFAULT_CONFIG_ID {
        return Ok(Json(default_config_out(&providers, &configs)));
    }
    let c = configs
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| config_not_found(&id))?;
    let mut out = config_out(c);
    if let Value::Object(m) = &mut out {
        m.insert(
            "resolved_providers".into(),
            resolved_providers(&providers, &configs, &id),
        );
    }
    Ok(Json(out))
}

async fn replace_config(
    st: &AppState,
    caller: &Caller,
    id: &str,
    input: ConfigIn,
) -> ApiResult<Json<Value>> {
    let org = caller.org_id.as_str();
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    let providers = db::providers(&mut tx, org).await?;
    let mut configs = db::configs(&mut tx, org).await?;
    let idx = configs
        .iter()
        .position(|c| c.id == id)
        .ok_or_else(|| config_not_found(id))?;
    let stored = build_config(&st.vault, org, id, input, configs.get(idx))?;
    let specs: Vec<ConfigSpec> = configs
        .iter()
        .map(|c| {
            if c.id == id {
                config_spec(&stored, None)
            } else {
                config_spec(c, None)
            }
        })
        .collect();
    validate_org(&specs_of(&providers), &specs).map_err(config_error)?;
    db::update_config(&mut tx, org, &stored).await?;
    tx.commit().await?;
    let mut out = config_out(&stored);
    if let Some(slot) = configs.get_mut(idx) {
        *slot = stored;
    }
    if let Value::Object(m) = &mut out {
        m.insert(
            "resolved_providers".into(),
            resolved_providers(&providers, &configs, id),
        );
    }
    Ok(Json(out))
}

async fn put_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<ConfigIn>,
) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    if id == DEFAULT_CONFIG_ID {
        return Err(builtin_refused());
    }
    replace_config(&st, &caller, &id, input).await
}

/// JSON merge patch (RFC 7396) over `{name, inherits, providers}`; `providers` is replaced as a whole.
async fn patch_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    if id == DEFAULT_CONFIG_ID {
        return Err(builtin_refused());
    }
    let Value::Object(patch) = patch else {
        return Err(ApiError::bad_request(
            "invalid_value",
            "a PATCH body must be a JSON object",
        ));
    };
    let current = {
        let mut conn = st.pool.acquire().await?;
        let configs = db::configs(&mut conn, &caller.org_id).await?;
        let c = configs
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| config_not_found(&id))?;
        let entries: Vec<Value> = c
            .entries
            .iter()
            .map(|e| json!({"name": e.name, "models": e.models, "api_base": e.api_base}))
            .collect();
        json!({"name": c.name, "inherits": c.inherits, "providers": entries})
    };
    let mut merged = match current {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    for (k, v) in patch {
        // Aliases of `inherits` replace it rather than clash with it.
        let key = match k.as_str() {
            "parent" | "inherits_from" | "inheritsFrom" | "parent_id" => "inherits".to_string(),
            _ => k,
        };
        merged.insert(key, v);
    }
    let merged = strip_nulls(Value::Object(merged));
    let bytes = serde_json::to_vec(&merged).map_err(ApiError::internal)?;
    let input: ConfigIn = parse_json(&bytes)?;
    replace_config(&st, &caller, &id, input).await
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

async fn delete_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_org()?;
    if id == DEFAULT_CONFIG_ID {
        return Err(builtin_refused());
    }
    let org = caller.org_id.as_str();
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    let configs = db::configs(&mut tx, org).await?;
    if !configs.iter().any(|c| c.id == id) {
        return Err(config_not_found(&id));
    }
    let children: Vec<&str> = configs
        .iter()
        .filter(|c| c.inherits.as_deref() == Some(id.as_str()))
        .map(|c| c.id.as_str())
        .collect();
    if !children.is_empty() {
        return Err(ApiError::conflict(
            "config_inherited",
            format!(
                "config '{id}' is inherited by config(s) {}; change or delete them first",
                children.join(", ")
            ),
        ));
    }
    let keys = db::keys(&mut tx, org).await?;
    let bound: Vec<&str> = keys
        .iter()
        .filter(|k| k.revoked_at.is_none() && k.config_id == id)
        .map(|k| k.id.as_str())
        .collect();
    if !bound.is_empty() {
        return Err(ApiError::conflict(
            "config_in_use",
            format!(
                "config '{id}' is bound to API key(s) {}; revoke them first",
                bound.join(", ")
            ),
        ));
    }
    db::delete_config(&mut tx, org, &id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----------------------------------------------------------------------------------------------
// API keys.
// ----------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyIn {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, alias = "configId")]
    config_id: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default, alias = "clusterId")]
    cluster_id: Option<String>,
    #[serde(default)]
    settings: Option<StoredSettings>,
}

fn key_out(k: &StoredKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "config_id": k.config_id,
        "scope": if k.cluster_id.is_some() { "cluster" } else { "organization" },
        "cluster_id": k.cluster_id,
        "settings": k.settings,
        "key_prefix": k.prefix,
        "created_at": rfc3339(k.created_at),
        "revoked": k.revoked_at.is_some(),
        "revoked_at": k.revoked_at.map(rfc3339),
    })
}

/// Settings may only name providers (and models) the scope can reach.
fn check_settings(
    s: &StoredSettings,
    providers: &[StoredProvider],
    cluster: Option<&str>,
) -> ApiResult<()> {
    let visible: Vec<&ProviderSpec> = providers
        .iter()
        .map(|p| &p.spec)
        .filter(|p| visible_to(p, cluster))
        .collect();
    let scope = match cluster {
        Some(c) => format!(" to cluster '{c}'"),
        None => String::new(),
    };
    let serves = |p: &ProviderSpec, m: &str| p.models.iter().any(|x| x.name() == m);
    if let Some(name) = &s.provider {
        let p = visible.iter().find(|p| &p.name == name).ok_or_else(|| {
            ApiError::bad_request(
                "unknown_provider",
                format!("provider '{name}' is not available{scope}"),
            )
            .with_param("provider")
        })?;
        if let Some(m) = &s.model {
            if !serves(p, m) {
                return Err(ApiError::bad_request(
                    "unknown_model",
                    format!("provider '{name}' does not serve model '{m}'"),
                )
                .with_param("model"));
            }
        }
    } else if let Some(m) = &s.model {
        if !visible.iter().any(|p| serves(p, m)) {
            return Err(ApiError::bad_request(
                "unknown_model",
                format!("no provider available{scope} serves model '{m}'"),
            )
            .with_param("model"));
        }
    }
    Ok(())
}

async fn create_key(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<KeyIn>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_org()?;
    let config_id = input.config_id.clone().filter(|c| !c.trim().is_empty()).ok_or_else(|| {
        ApiError::bad_request(
            "missing_field",
            "config_id is required: every API key is bound to a config (\"default\" for the organization's default)",
        )
        .with_param("config_id")
    })?;
    let cluster_id = input.cluster_id.clone().filter(|c| !c.trim().is_empty());
    let scope = input.scope.as_deref().map(str::to_ascii_lowercase);
    let cluster_id = match (scope.as_deref(), cluster_id) {
        (None | Some("organization") | Some("org"), None) => None,
        (None | Some("cluster"), Some(c)) => Some(c),
        (Some("cluster"), None) => {
            return Err(ApiError::bad_request(
                "missing_field",
                "a cluster-scoped key needs cluster_id",
            )
            .with_param("cluster_id"))
        }
        (Some("organization") | Some("org"), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "cluster_id is only allowed with scope \"cluster\"",
            )
            .with_param("cluster_id"))
        }
        (Some(other), _) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("unknown scope '{other}': use \"organization\" or \"cluster\""),
            )
            .with_param("scope"))
        }
    };
    let settings = input.settings.clone().unwrap_or_default();
    let org = caller.org_id.as_str();
    let _w = st.write_lock.lock().await;
    let mut tx = st.pool.begin().await?;
    db::lock_org(&mut tx, org).await?;
    if config_id != DEFAULT_CONFIG_ID
        && !db::configs(&mut tx, org)
            .await?
            .iter()
            .any(|c| c.id == config_id)
    {
        return Err(ApiError::bad_request(
            "unknown_config",
            format!("config '{config_id}' does not exist"),
        )
        .with_param("config_id"));
    }
    let providers = db::providers(&mut tx, org).await?;
    check_settings(&settings, &providers, cluster_id.as_deref())?;
    let secret = new_api_key();
    let key = StoredKey {
        id: new_id("key"),
        org_id: org.to_string(),
        sha256: hash_key(&secret),
        name: input.name.clone().filter(|n| !n.trim().is_empty()),
        config_id,
        cluster_id,
        settings,
        prefix: db::key_prefix(&secret),
        created_at: now_ms(),
        revoked_at: None,
    };
    db::insert_key(&mut tx, &key).await?;
    tx.commit().await?;
    let mut out = key_out(&key);
    if let Value::Object(m) = &mut out {
        m.insert("key".into(), Value::String(secret));
    }
    Ok((StatusCode::CREATED, Json(out)))
}

async fn list_keys(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    let mut conn = st.pool.acquire().await?;
    let keys = db::keys(&mut conn, &caller.org_id).await?;
    Ok(Json(
        json!({ "api_keys": keys.iter().map(key_out).collect::<Vec<_>>() }),
    ))
}

async fn find_key(st: &AppState, caller: &Caller, id: &str) -> ApiResult<StoredKey> {
    let mut conn = st.pool.acquire().await?;
    db::key_by_id(&mut conn, &caller.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("API key '{id}' not found")))
}

async fn get_key(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_org()?;
    Ok(Json(key_out(&find_key(&st, &caller, &id).await?)))
}

async fn revoke_key(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_org()?;
    find_key(&st, &caller, &id).await?;
    if id == caller.key_id {
        return Err(ApiError::conflict(
            "own_key",
            "a key cannot revoke itself; revoke it with another organization-scoped key",
        ));
    }
    let mut conn = st.pool.acquire().await?;
    db::revoke_key(&mut conn, &caller.org_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_key_settings(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<StoredSettings>> {
    caller.require_org()?;
    Ok(Json(find_key(&st, &caller, &id).await?.settings))
}

async fn put_key_settings(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(settings): JsonBody<StoredSettings>,
) -> ApiResult<Json<StoredSettings>> {
    caller.require_org()?;
    let key = find_key(&st, &caller, &id).await?;
    let mut conn = st.pool.acquire().await?;
    let providers = db::providers(&mut conn, &caller.org_id).await?;
    check_settings(&settings, &providers, key.cluster_id.as_deref())?;
    db::set_key_settings(&mut conn, &caller.org_id, &id, &settings).await?;
    Ok(Json(settings))
}

// ----------------------------------------------------------------------------------------------
// Settings (org level, or the cluster context for cluster-scoped keys).
// ----------------------------------------------------------------------------------------------

/// Organization settings always show `storePrompts` (default false); a cluster context only when set
/// (absent: inherited from the organization).
fn settings_out(s: StoredSettings, org_level: bool) -> StoredSettings {
    if org_level {
        StoredSettings {
            store_prompts: Some(s.store_prompts.unwrap_or(false)),
            ..s
        }
    } else {
        s
    }
}

async fn get_settings(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<StoredSettings>> {
    let mut conn = st.pool.acquire().await?;
    let s = match &caller.cluster_id {
        Some(c) => db::cluster_settings(&mut conn, &caller.org_id, c).await?,
        None => db::org_settings(&mut conn, &caller.org_id).await?,
    };
    Ok(Json(settings_out(s, caller.cluster_id.is_none())))
}

async fn put_settings(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(settings): JsonBody<StoredSettings>,
) -> ApiResult<Json<StoredSettings>> {
    let mut conn = st.pool.acquire().await?;
    let providers = db::providers(&mut conn, &caller.org_id).await?;
    check_settings(&settings, &providers, caller.cluster_id.as_deref())?;
    match &caller.cluster_id {
        Some(c) => db::set_cluster_settings(&mut conn, &caller.org_id, c, &settings).await?,
        None => db::set_org_settings(&mut conn, &caller.org_id, &settings).await?,
    }
    Ok(Json(settings_out(settings, caller.cluster_id.is_none())))
}

// ----------------------------------------------------------------------------------------------
// Internal endpoints (guarded by the shared x-gateway-token).
// ----------------------------------------------------------------------------------------------

pub fn check_internal_token(st: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let given = headers
        .get("x-gateway-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given.is_empty() || !secret_eq(given.trim(), &st.internal_token) {
        return Err(ApiError::unauthorized("missing or invalid x-gateway-token"));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveIn {
    #[serde(rename = "keySha256", alias = "key_sha256")]
    key_sha256: String,
}

async fn resolve(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    check_internal_token(&st, &headers)?;
    let input: ResolveIn = parse_json(&body)?;
    let hash = input.key_sha256.trim().to_ascii_lowercase();
    if !crate::util::is_sha256_hex(&hash) {
        return Err(
            ApiError::bad_request("invalid_value", "keySha256 must be 64 hex characters")
                .with_param("keySha256"),
        );
    }
    let mut conn = st.pool.acquire().await?;
    let key = db::active_key_by_hash(&mut conn, &hash)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown or revoked API key"))?;
    let (identity, store_prompts) = identity_for(&st.vault, &mut conn, &key).await?;
    let prices = identity_prices(
        &st.pricing,
        &db::providers(&mut conn, &key.org_id).await?,
        &identity,
    );
    Ok(Json(json!({
        "identity": identity,
        "ttlSeconds": st.ttl_seconds,
        "storePrompts": store_prompts,
        "prices": prices,
    })))
}

/// Prices (USD per 1M tokens) of every model the identity can reach, keyed `provider/upstream model`,
/// for the filter's cost metric: the same price the usage records are costed with.
fn identity_prices(
    pricing: &crate::prices::Pricing,
    stored: &[db::StoredProvider],
    identity: &Identity,
) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for p in identity
        .providers
        .iter()
        .chain(identity.fallback_providers.iter())
    {
        let sp = stored.iter().find(|s| s.spec.name == p.name);
        for m in &p.models {
            if let (Some(price), _) = pricing.price(sp, Some(p.kind.as_str()), &m.upstream) {
                out.insert(
                    format!("{}/{}", p.name, m.upstream),
                    json!({"input": price.input, "output": price.output, "cached": price.cached}),
                );
            }
        }
    }
    out
}

/// Assembles the organization's `RawConfig` for one key (provider keys decrypted) and compiles it with
/// the filter's compiler, so that the filter and the sidecar can never disagree.
async fn identity_for(
    vault: &Vault,
    conn: &mut AnyConnection,
    key: &StoredKey,
) -> ApiResult<(Identity, bool)> {
    let org = key.org_id.as_str();
    let providers = db::providers(&mut *conn, org).await?;
    let configs = db::configs(&mut *conn, org).await?;
    let mut settings = db::org_settings(&mut *conn, org).await?;
    if let Some(c) = &key.cluster_id {
        let cs = db::cluster_settings(&mut *conn, org, c).await?;
        settings = StoredSettings {
            provider: cs.provider.or(settings.provider),
            model: cs.model.or(settings.model),
            store_prompts: cs.store_prompts.or(settings.store_prompts),
        };
    }
    let store_prompts = key
        .settings
        .store_prompts
        .or(settings.store_prompts)
        .unwrap_or(false);
    let mut provider_specs = Vec::with_capacity(providers.len());
    for p in &providers {
        let mut spec = p.spec.clone();
        if let Some(enc) = &p.key_enc {
            spec.api_key = Some(
                vault
                    .open(enc, &format!("provider:{org}:{}", spec.name))
                    .map_err(ApiError::internal)?,
            );
        }
        provider_specs.push(spec);
    }
    let mut config_list = Vec::with_capacity(configs.len());
    for c in &configs {
        let secrets = config_secrets(vault, org, c)?;
        config_list.push(config_spec(c, Some(&secrets)));
    }
    let raw = RawConfig {
        org_id: Some(org.to_string()),
        settings: settings.routing(),
        providers: provider_specs,
        configs: config_list,
        keys: vec![KeySpec {
            id: key.id.clone(),
            sha256: key.sha256.clone(),
            config: key.config_id.clone(),
            settings: key.settings.routing(),
            cluster_id: key.cluster_id.clone(),
        }],
        ..Default::default()
    };
    Ok((compile_identity(&raw, &key.sha256)?, store_prompts))
}

fn compile_identity(raw: &RawConfig, sha256: &str) -> ApiResult<Identity> {
    let plan = compile(raw, &NoSecrets)
        .map_err(|e| ApiError::internal(format!("stored configuration does not compile: {e}")))?;
    plan.identity_for_hash(sha256)
        .map(|rc| (*rc).clone())
        .ok_or_else(|| ApiError::internal("compiled plan lacks the key"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgIn {
    #[serde(default)]
    name: Option<String>,
}

/// Operator endpoint: a new organization with its first organization-scoped key.
async fn create_organization(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_internal_token(&st, &headers)?;
    let input: OrgIn = if body.iter().all(|b| b.is_ascii_whitespace()) {
        OrgIn { name: None }
    } else {
        parse_json(&body)?
    };
    let name = input
        .name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "organization".to_string());
    let secret = new_api_key();
    let _w = st.write_lock.lock().await;
    let mut conn = st.pool.acquire().await?;
    let org_id = db::create_org(&mut conn, &name, &secret).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"orgId": org_id, "name": name, "apiKey": secret})),
    ))
}
