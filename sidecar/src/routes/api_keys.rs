//! `/v1/llm/api-keys`: gateway API keys (stored as SHA-256 digests) and their settings.

use crate::caller::Caller;
use crate::db::{self, StoredKey, StoredSettings};
use crate::error::{ApiError, ApiResult};
use crate::org::{check_settings, check_settings_in_config};
use crate::state::AppState;
use crate::tx::OrgWrite;
use crate::util::{new_api_key, new_id, now_ms, rfc3339, JsonBody};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use llm_gateway::config::{hash_key, DEFAULT_CONFIG_ID};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Deserialize, ToSchema)]
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
    /// Bring your own key value (20 to 200 printable ASCII characters, no spaces), e.g. to keep a key
    /// that already exists elsewhere; normally omitted and generated. Stored only as its SHA-256.
    #[serde(default)]
    key: Option<String>,
}

/// A gateway API key as the API returns it (the secret only once, at creation).
#[derive(Serialize, ToSchema)]
struct KeyOut {
    id: String,
    name: Option<String>,
    config_id: String,
    scope: KeyScope,
    cluster_id: Option<String>,
    settings: StoredSettings,
    key_prefix: String,
    created_at: String,
    revoked: bool,
    revoked_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum KeyScope {
    Organization,
    Cluster,
}

/// `POST /v1/llm/api-keys`: the key and, once, its secret.
#[derive(Serialize, ToSchema)]
struct KeyCreated {
    #[serde(flatten)]
    key_info: KeyOut,
    /// The secret: shown once, stored only as a SHA-256 digest.
    key: String,
}

#[derive(Serialize, ToSchema)]
struct KeysOut {
    api_keys: Vec<KeyOut>,
}

fn key_out(k: &StoredKey) -> KeyOut {
    KeyOut {
        id: k.id.clone(),
        name: k.name.clone(),
        config_id: k.config_id.clone(),
        scope: if k.cluster_id.is_some() {
            KeyScope::Cluster
        } else {
            KeyScope::Organization
        },
        cluster_id: k.cluster_id.clone(),
        settings: k.settings.clone(),
        key_prefix: k.prefix.clone(),
        created_at: rfc3339(k.created_at),
        revoked: k.revoked_at.is_some(),
        revoked_at: k.revoked_at.map(rfc3339),
    }
}

#[utoipa::path(
    post,
    path = "/v1/llm/api-keys",
    tag = "api-keys",
    request_body = KeyIn,
    responses((status = 201, description = "created", body = KeyCreated), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn create_key(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<KeyIn>,
) -> ApiResult<(StatusCode, Json<KeyCreated>)> {
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
    let mut w = OrgWrite::begin(&st, org).await?;
    if config_id != DEFAULT_CONFIG_ID && !w.configs.iter().any(|c| c.id == config_id) {
        return Err(ApiError::bad_request(
            "unknown_config",
            format!("config '{config_id}' does not exist"),
        )
        .with_param("config_id"));
    }
    check_settings(&settings, &w.providers, cluster_id.as_deref())?;
    check_settings_in_config(&settings, &w.providers, &w.configs, &config_id)?;
    let secret = match input.key.as_deref() {
        None => new_api_key(),
        Some(k) => {
            if k.len() < 20 || k.len() > 200 || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "key must be 20 to 200 printable ASCII characters without spaces",
                )
                .with_param("key"));
            }
            if db::sha_exists(&mut w.tx, &hash_key(k)).await? {
                return Err(ApiError::conflict(
                    "key_exists",
                    "this key value is already in use (or was revoked); choose another",
                ));
            }
            k.to_string()
        }
    };
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
    db::insert_key(&mut w.tx, &key).await?;
    w.commit().await?;
    let out = KeyCreated {
        key_info: key_out(&key),
        key: secret,
    };
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(
    get,
    path = "/v1/llm/api-keys",
    tag = "api-keys",
    responses((status = 200, description = "OK", body = KeysOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn list_keys(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<KeysOut>> {
    caller.require_org()?;
    let mut conn = st.pool.acquire().await?;
    let keys = db::keys(&mut conn, &caller.org_id).await?;
    Ok(Json(KeysOut {
        api_keys: keys.iter().map(key_out).collect(),
    }))
}

async fn find_key(st: &AppState, caller: &Caller, id: &str) -> ApiResult<StoredKey> {
    let mut conn = st.pool.acquire().await?;
    db::key_by_id(&mut conn, &caller.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("API key '{id}' not found")))
}

#[utoipa::path(
    get,
    path = "/v1/llm/api-keys/{id}",
    tag = "api-keys",
    params(("id" = String, Path)),
    responses((status = 200, description = "OK", body = KeyOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn get_key(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyOut>> {
    caller.require_org()?;
    Ok(Json(key_out(&find_key(&st, &caller, &id).await?)))
}

#[utoipa::path(
    delete,
    path = "/v1/llm/api-keys/{id}",
    tag = "api-keys",
    params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
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

#[utoipa::path(
    get,
    path = "/v1/llm/api-keys/{id}/settings",
    tag = "api-keys",
    params(("id" = String, Path)),
    responses((status = 200, description = "OK", body = StoredSettings), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn get_key_settings(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<StoredSettings>> {
    caller.require_org()?;
    Ok(Json(find_key(&st, &caller, &id).await?.settings))
}

#[utoipa::path(
    put,
    path = "/v1/llm/api-keys/{id}/settings",
    tag = "api-keys",
    request_body = StoredSettings,
    params(("id" = String, Path)),
    responses((status = 200, description = "OK", body = StoredSettings), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
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
    let configs = db::configs(&mut conn, &caller.org_id).await?;
    check_settings_in_config(&settings, &providers, &configs, &key.config_id)?;
    db::set_key_settings(&mut conn, &caller.org_id, &id, &settings).await?;
    Ok(Json(settings))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(get_key, revoke_key))
        .routes(routes!(get_key_settings, put_key_settings))
}
