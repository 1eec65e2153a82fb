//! `/config`: custom configurations (inheritance, per-config provider keys sealed in the vault).

use crate::caller::Caller;
use crate::db::{self, StoredConfig, StoredEntry, StoredProvider};
use crate::error::{ApiError, ApiResult};
use crate::org::{
    check_destination, config_error, config_secrets, config_spec, config_specs, specs_of,
};
use crate::state::AppState;
use crate::tx::OrgWrite;
use crate::util::{new_id, now_ms, parse_json, rfc3339, JsonBody};
use crate::vault::Vault;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use llm_gateway::config::{
    flatten_configs, last4, ConfigProviderSpec, ConfigSpec, DEFAULT_CONFIG_ID,
};
use llm_gateway::destination::Policy;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Deserialize, ToSchema)]
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
    /// Additions and overrides, merged by provider name into the parent's providers.
    #[serde(default)]
    providers: Vec<ConfigProviderSpec>,
    /// Narrowing: keep only these providers (of the merged list), in this order.
    #[serde(default, alias = "restrictTo", alias = "restrict_to")]
    only: Option<Vec<String>>,
}

/// The body of `PATCH /config/{id}` (JSON merge patch): a member set to `null` is removed.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ConfigPatch {
    name: Option<String>,
    inherits: Option<String>,
    providers: Option<Vec<ConfigProviderSpec>>,
    only: Option<Vec<String>>,
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
    // Without a parent a config builds on the organization's default config.
    let inherits = Some(
        input
            .inherits
            .filter(|p| !p.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_CONFIG_ID.to_string()),
    );
    let only = input.only;
    if let Some(names) = &only {
        if names.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_value",
                "'only' must name at least one provider (omit it to keep every provider)",
            )
            .with_param("only"));
        }
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
        only,
        secrets_enc,
        created_at: prev.map_or(now, |p| p.created_at),
        updated_at: now,
    })
}

/// A config's `api_base` overrides meet the same destination policy as the provider URLs.
fn check_config_destinations(
    policy: &Policy,
    providers: &[StoredProvider],
    c: &StoredConfig,
) -> ApiResult<()> {
    for (i, e) in c.entries.iter().enumerate() {
        if let Some(base) = &e.api_base {
            let hosted = providers
                .iter()
                .any(|p| p.spec.name == e.name && p.spec.is_hosted);
            check_destination(policy, base, hosted)
                .map_err(|err| err.with_param(format!("providers[{i}].api_base")))?;
        }
    }
    Ok(())
}

/// A config as the API returns it: its own entries and what it resolves to after inheritance.
#[derive(Serialize, ToSchema)]
struct ConfigOut {
    config_id: String,
    name: Option<String>,
    /// Present (true) only for the built-in `default` config.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    builtin: bool,
    inherits: Option<String>,
    /// Additions and overrides merged by name into the parent's providers.
    providers: Vec<StoredEntry>,
    /// Narrowing to these providers (after the merge); absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    only: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<String>,
    /// Null when the organization's configs do not resolve.
    resolved_providers: Option<Vec<ResolvedEntry>>,
}

/// A provider a config ends up with after inheritance.
#[derive(Serialize, ToSchema)]
struct ResolvedEntry {
    name: String,
    models: Vec<String>,
    api_base: Option<String>,
}

/// One line of `GET /config`.
#[derive(Serialize, ToSchema)]
struct ConfigSummary {
    config_id: String,
    name: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    builtin: bool,
    inherits: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ConfigsOut {
    configs: Vec<ConfigSummary>,
}

fn config_out(
    c: &StoredConfig,
    providers: &[StoredProvider],
    configs: &[StoredConfig],
) -> ConfigOut {
    ConfigOut {
        config_id: c.id.clone(),
        name: c.name.clone(),
        builtin: false,
        inherits: c.inherits.clone(),
        providers: c.entries.clone(),
        only: c.only.clone(),
        created_at: Some(rfc3339(c.created_at)),
        updated_at: Some(rfc3339(c.updated_at)),
        resolved_providers: resolved_providers(providers, configs, &c.id),
    }
}

/// The providers and models a config ends up with after inheritance.
fn resolved_providers(
    providers: &[StoredProvider],
    configs: &[StoredConfig],
    id: &str,
) -> Option<Vec<ResolvedEntry>> {
    let specs = specs_of(providers);
    let flat = flatten_configs(&specs, &config_specs(configs)).ok()?;
    let entries = flat.get(id).cloned().unwrap_or_default();
    Some(
        entries
            .iter()
            .map(|e| {
                let all: Vec<String> = specs
                    .iter()
                    .find(|p| p.name == e.name)
                    .map(|p| p.models.iter().map(|m| m.name().to_string()).collect())
                    .unwrap_or_default();
                ResolvedEntry {
                    name: e.name.clone(),
                    models: e.models.clone().unwrap_or(all),
                    api_base: e.api_base.clone(),
                }
            })
            .collect(),
    )
}

fn default_config_out(providers: &[StoredProvider], configs: &[StoredConfig]) -> ConfigOut {
    ConfigOut {
        config_id: DEFAULT_CONFIG_ID.to_string(),
        name: Some("default".to_string()),
        builtin: true,
        inherits: None,
        providers: providers
            .iter()
            .map(|p| StoredEntry {
                name: p.spec.name.clone(),
                ..Default::default()
            })
            .collect(),
        only: None,
        created_at: None,
        updated_at: None,
        resolved_providers: resolved_providers(providers, configs, DEFAULT_CONFIG_ID),
    }
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

#[utoipa::path(
    post,
    path = "/config",
    tag = "configs",
    request_body = ConfigIn,
    responses((status = 201, description = "created", body = ConfigOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn create_config(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<ConfigIn>,
) -> ApiResult<(StatusCode, Json<ConfigOut>)> {
    caller.require_org()?;
    let org = caller.org_id.as_str();
    let id = new_id("cfg");
    let stored = build_config(&st.vault, org, &id, input, None)?;
    let mut w = OrgWrite::begin(&st, org).await?;
    let providers = std::mem::take(&mut w.providers);
    check_config_destinations(&st.destinations, &providers, &stored)?;
    let mut configs = std::mem::take(&mut w.configs);
    let mut specs = config_specs(&configs);
    specs.push(config_spec(&stored, None));
    // The generated id means nothing to the caller yet: errors name the config as it was sent.
    let label = match &stored.name {
        Some(n) => format!("the new config '{n}'"),
        None => "the new config".to_string(),
    };
    w.validate(&specs_of(&providers), &specs, |msg| {
        config_error(msg.replace(&format!("config '{id}'"), &label))
    })?;
    db::insert_config(&mut w.tx, org, &stored).await?;
    w.commit().await?;
    configs.push(stored);
    let out = configs
        .last()
        .map(|c| config_out(c, &providers, &configs))
        .ok_or_else(|| ApiError::internal("config vanished"))?;
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(
    get,
    path = "/config",
    tag = "configs",
    responses((status = 200, description = "OK", body = ConfigsOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn list_configs(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<ConfigsOut>> {
    caller.require_org()?;
    let mut conn = st.pool.acquire().await?;
    let configs = db::configs(&mut conn, &caller.org_id).await?;
    let mut out = vec![ConfigSummary {
        config_id: DEFAULT_CONFIG_ID.to_string(),
        name: Some("default".to_string()),
        builtin: true,
        inherits: None,
        created_at: None,
        updated_at: None,
    }];
    out.extend(configs.iter().map(|c| ConfigSummary {
        config_id: c.id.clone(),
        name: c.name.clone(),
        builtin: false,
        inherits: c.inherits.clone(),
        created_at: Some(rfc3339(c.created_at)),
        updated_at: Some(rfc3339(c.updated_at)),
    }));
    Ok(Json(ConfigsOut { configs: out }))
}

#[utoipa::path(
    get,
    path = "/config/{config_id}",
    tag = "configs",
    params(("config_id" = String, Path)),
    responses((status = 200, description = "OK", body = ConfigOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn get_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ConfigOut>> {
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
    Ok(Json(config_out(c, &providers, &configs)))
}

async fn replace_config(
    st: &AppState,
    caller: &Caller,
    id: &str,
    input: ConfigIn,
) -> ApiResult<Json<ConfigOut>> {
    let org = caller.org_id.as_str();
    let mut w = OrgWrite::begin(st, org).await?;
    let providers = std::mem::take(&mut w.providers);
    let mut configs = std::mem::take(&mut w.configs);
    let idx = configs
        .iter()
        .position(|c| c.id == id)
        .ok_or_else(|| config_not_found(id))?;
    let stored = build_config(&st.vault, org, id, input, configs.get(idx))?;
    check_config_destinations(&st.destinations, &providers, &stored)?;
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
    w.validate(&specs_of(&providers), &specs, config_error)?;
    db::update_config(&mut w.tx, org, &stored).await?;
    w.commit().await?;
    if let Some(slot) = configs.get_mut(idx) {
        *slot = stored;
    }
    let out = configs
        .get(idx)
        .map(|c| config_out(c, &providers, &configs))
        .ok_or_else(|| ApiError::internal("config vanished"))?;
    Ok(Json(out))
}

#[utoipa::path(
    put,
    path = "/config/{config_id}",
    tag = "configs",
    request_body = ConfigIn,
    params(("config_id" = String, Path)),
    responses((status = 200, description = "OK", body = ConfigOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn put_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<ConfigIn>,
) -> ApiResult<Json<ConfigOut>> {
    caller.require_org()?;
    if id == DEFAULT_CONFIG_ID {
        return Err(builtin_refused());
    }
    replace_config(&st, &caller, &id, input).await
}

/// JSON merge patch (RFC 7396) over `{name, inherits, providers}`; `providers` is replaced as a whole.
#[utoipa::path(
    patch,
    path = "/config/{config_id}",
    tag = "configs",
    request_body = ConfigPatch,
    params(("config_id" = String, Path)),
    responses((status = 200, description = "OK", body = ConfigOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn patch_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Json<ConfigOut>> {
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
        json!({"name": c.name, "inherits": c.inherits, "providers": entries, "only": c.only})
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

#[utoipa::path(
    delete,
    path = "/config/{config_id}",
    tag = "configs",
    params(("config_id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
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
    let mut w = OrgWrite::begin(&st, org).await?;
    let configs = std::mem::take(&mut w.configs);
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
    let keys = db::keys(&mut w.tx, org).await?;
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
    db::delete_config(&mut w.tx, org, &id).await?;
    w.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_config, list_configs))
        .routes(routes!(get_config, put_config, patch_config, delete_config))
}
