//! `/v1/llm/providers`: provider registrations (keys sealed in the vault, write-only).

use crate::caller::Caller;
use crate::db::{self, PriceOverrides, StoredProvider};
use crate::error::{ApiError, ApiResult};
use crate::org::{check_destination, specs_of, valid_name};
use crate::state::AppState;
use crate::tx::OrgWrite;
use crate::util::{now_ms, rfc3339, JsonBody};
use crate::vault::Vault;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use llm_gateway::config::{last4, ModelSpec, ProviderKind, ProviderSpec};
use llm_gateway::destination::Policy;
use serde::{Deserialize, Serialize};

use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProviderIn {
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._+:@-]{1,128}$")]
    name: Option<String>,
    #[serde(alias = "type", alias = "supported_provider")]
    #[schema(value_type = llm_gateway::config::ProviderKind)]
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
    #[schema(value_type = Option<std::collections::HashMap<String, crate::db::PriceOverride>>)]
    prices: Option<PriceOverrides>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ProvidersIn {
    #[schema(min_items = 1)]
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
    fn to_spec(&self, name: &str, policy: &Policy) -> ApiResult<ProviderSpec> {
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
        let url = self.url.clone().filter(|u| !u.trim().is_empty());
        if let Some(u) = &url {
            check_destination(policy, u, self.is_hosted).map_err(|e| e.with_param("url"))?;
        }
        let api_version = self.api_version.clone().filter(|v| !v.trim().is_empty());
        if let Some(v) = &api_version {
            if v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("provider '{name}': apiVersion must be 1-64 letters, digits or -_."),
                )
                .with_param("apiVersion"));
            }
        }
        for m in &self.models {
            let names = match m {
                ModelSpec::Name(n) => [n.as_str(), n.as_str()],
                ModelSpec::Mapped {
                    name,
                    upstream_name,
                } => [name.as_str(), upstream_name.as_str()],
            };
            if names
                .iter()
                .any(|n| n.is_empty() || n.len() > 256 || !n.chars().all(|c| c.is_ascii_graphic()))
            {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!(
                        "provider '{name}': model names must be 1-256 printable ASCII characters without spaces"
                    ),
                )
                .with_param("models"));
            }
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
            url,
            api_version,
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

/// Providers the gateway could not use without a key of their own.
fn requires_key(spec: &ProviderSpec) -> bool {
    ProviderKind::parse(&spec.supported_provider) == Some(ProviderKind::Azure) && !spec.is_hosted
}

fn missing_key(name: &str) -> ApiError {
    ApiError::bad_request(
        "missing_api_key",
        format!("provider '{name}': AZURE providers need an apiKey (the gateway cannot call Azure OpenAI without one)"),
    )
    .with_param("apiKey")
}

/// A provider registration as the API returns it (the key itself never: its last 4 characters only).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ProviderOut {
    name: String,
    #[schema(value_type = llm_gateway::config::ProviderKind)]
    supported_provider: String,
    models: Vec<ModelSpec>,
    url: Option<String>,
    api_version: Option<String>,
    is_hosted: bool,
    cluster_id: Option<String>,
    fallback: Vec<String>,
    api: Option<String>,
    fallback_on429: bool,
    timeouts: Option<llm_gateway::plan::Timeouts>,
    #[schema(value_type = std::collections::HashMap<String, crate::db::PriceOverride>)]
    prices: PriceOverrides,
    api_key_last4: Option<String>,
    create_time: String,
    update_time: String,
}

#[derive(Serialize, ToSchema)]
struct ProvidersOut {
    providers: Vec<ProviderOut>,
}

fn provider_out(p: &StoredProvider) -> ProviderOut {
    ProviderOut {
        name: p.spec.name.clone(),
        supported_provider: p.spec.supported_provider.clone(),
        models: p.spec.models.clone(),
        url: p.spec.url.clone(),
        api_version: p.spec.api_version.clone(),
        is_hosted: p.spec.is_hosted,
        cluster_id: p.spec.cluster_id.clone(),
        fallback: p.spec.fallback.clone(),
        api: p.spec.api.clone(),
        fallback_on429: p.spec.fallback_on429,
        timeouts: p.spec.timeouts,
        prices: p.prices.clone(),
        api_key_last4: p.last4.clone(),
        create_time: rfc3339(p.created_at),
        update_time: rfc3339(p.updated_at),
    }
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

#[utoipa::path(
    post,
    path = "/v1/llm/providers",
    tag = "providers",
    request_body = ProvidersIn,
    responses((status = 201, description = "created", body = ProvidersOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn create_providers(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<ProvidersIn>,
) -> ApiResult<(StatusCode, Json<ProvidersOut>)> {
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
            .to_spec(&name, &st.destinations)
            .map_err(|e| e.with_param(format!("providers[{i}]")))?;
        let key = p.api_key.clone().filter(|k| !k.trim().is_empty());
        let prices = p
            .prices(&spec)
            .map_err(|e| e.with_param(format!("providers[{i}].prices")))?;
        new.push((spec, key, prices));
    }
    let org = caller.org_id.as_str();
    let mut w = OrgWrite::begin(&st, org).await?;
    let existing = std::mem::take(&mut w.providers);
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
    w.validate(&all, &w.config_specs(), |m| {
        ApiError::bad_request("invalid_provider", m)
    })?;
    if let Some(i) = new
        .iter()
        .position(|(spec, key, _)| key.is_none() && requires_key(spec))
    {
        let name = new.get(i).map(|n| n.0.name.as_str()).unwrap_or_default();
        return Err(missing_key(name).with_param(format!("providers[{i}].apiKey")));
    }
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
        db::insert_provider(&mut w.tx, org, &sp).await?;
        out.push(provider_out(&sp));
    }
    w.commit().await?;
    Ok((StatusCode::CREATED, Json(ProvidersOut { providers: out })))
}

#[utoipa::path(
    get,
    path = "/v1/llm/providers",
    tag = "providers",
    responses((status = 200, description = "OK", body = ProvidersOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn list_providers(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<ProvidersOut>> {
    let mut conn = st.pool.acquire().await?;
    let list = db::providers(&mut conn, &caller.org_id).await?;
    let out: Vec<ProviderOut> = list
        .iter()
        .filter(|p| caller.sees(&p.spec))
        .map(provider_out)
        .collect();
    Ok(Json(ProvidersOut { providers: out }))
}

fn provider_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("provider '{name}' not found"))
}

#[utoipa::path(
    get,
    path = "/v1/llm/providers/{name}",
    tag = "providers",
    params(("name" = String, Path)),
    responses((status = 200, description = "OK", body = ProviderOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn get_provider(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<ProviderOut>> {
    let mut conn = st.pool.acquire().await?;
    let list = db::providers(&mut conn, &caller.org_id).await?;
    let p = list
        .iter()
        .find(|p| p.spec.name == name && caller.sees(&p.spec))
        .ok_or_else(|| provider_not_found(&name))?;
    Ok(Json(provider_out(p)))
}

#[utoipa::path(
    put,
    path = "/v1/llm/providers/{name}",
    tag = "providers",
    request_body = ProviderIn,
    params(("name" = String, Path)),
    responses((status = 200, description = "OK", body = ProviderOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn update_provider(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ProviderIn>,
) -> ApiResult<Json<ProviderOut>> {
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
    let spec = body.to_spec(&name, &st.destinations)?;
    let prices = body.prices(&spec)?;
    let org = caller.org_id.as_str();
    let mut w = OrgWrite::begin(&st, org).await?;
    let existing = std::mem::take(&mut w.providers);
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
    w.validate(&all, &w.config_specs(), |m| {
        ApiError::bad_request("invalid_provider", m)
    })?;
    // Keys are write-only: absent keeps the stored key, "" removes it.
    let (key_enc, last4) = match body.api_key.as_deref() {
        None => (old.key_enc.clone(), old.last4.clone()),
        Some(k) if k.trim().is_empty() => (None, None),
        Some(k) => {
            let (s, l) = seal_provider_key(&st.vault, org, &name, k)?;
            (Some(s), Some(l))
        }
    };
    if key_enc.is_none() && requires_key(&spec) {
        return Err(missing_key(&name));
    }
    let sp = StoredProvider {
        spec,
        prices,
        key_enc,
        last4,
        created_at: old.created_at,
        updated_at: now_ms(),
    };
    db::update_provider(&mut w.tx, org, &sp).await?;
    w.commit().await?;
    Ok(Json(provider_out(&sp)))
}

#[utoipa::path(
    delete,
    path = "/v1/llm/providers/{name}",
    tag = "providers",
    params(("name" = String, Path)),
    responses((status = 204, description = "deleted"), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn delete_provider(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_org()?;
    let org = caller.org_id.as_str();
    let mut w = OrgWrite::begin(&st, org).await?;
    let existing = std::mem::take(&mut w.providers);
    if !existing.iter().any(|p| p.spec.name == name) {
        return Err(provider_not_found(&name));
    }
    if let Some(c) = w
        .configs
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
    w.validate(&rest, &w.config_specs(), |m| {
        ApiError::conflict("provider_in_use", m)
    })?;
    db::delete_provider(&mut w.tx, org, &name).await?;
    w.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_providers, list_providers))
        .routes(routes!(get_provider, update_provider, delete_provider))
}
