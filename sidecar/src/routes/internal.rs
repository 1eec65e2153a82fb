//! `/internal/v1/*`: what the Envoy filter and operators call, guarded by the shared `x-gateway-token`:
//! key resolution (compiled by the filter's own compiler), organizations, usage ingestion.

use crate::caller::check_internal_token;
use crate::db::{self, StoredKey, StoredSettings};
use crate::error::{ApiError, ApiResult};
use crate::metrics;
use crate::org::{config_secrets, config_spec, NoSecrets};
use crate::state::AppState;
use crate::util::{new_api_key, parse_json};
use crate::vault::Vault;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use llm_gateway::config::{compile, Identity, KeySpec, RawConfig};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::AnyConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResolveIn {
    #[serde(rename = "keySha256", alias = "key_sha256")]
    key_sha256: String,
}

#[utoipa::path(
    post,
    path = "/internal/v1/resolve",
    tag = "internal",
    request_body = ResolveIn,
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("gatewayToken" = []))
)]
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
    let started = std::time::Instant::now();
    let mut conn = st.pool.acquire().await?;
    let Some(key) = db::active_key_by_hash(&mut conn, &hash).await? else {
        st.metrics.db_resolve.observe(started.elapsed());
        metrics::add(&st.metrics.resolve_misses, 1);
        return Err(ApiError::not_found("unknown or revoked API key"));
    };
    let (identity, store_prompts) = identity_for(&st.vault, &mut conn, &key).await?;
    let stored = db::providers(&mut conn, &key.org_id).await?;
    st.metrics.db_resolve.observe(started.elapsed());
    metrics::add(&st.metrics.resolve_hits, 1);
    let prices = identity_prices(&st.catalogs().pricing, &stored, &identity);
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
        settings: db::routing(&settings),
        providers: provider_specs,
        configs: config_list,
        keys: vec![KeySpec {
            id: key.id.clone(),
            sha256: key.sha256.clone(),
            config: key.config_id.clone(),
            settings: db::routing(&key.settings),
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct OrgIn {
    #[serde(default)]
    name: Option<String>,
}

/// Operator endpoint: a new organization with its first organization-scoped key.
#[utoipa::path(
    post,
    path = "/internal/v1/organizations",
    tag = "internal",
    request_body = OrgIn,
    responses((status = 201, description = "created", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("gatewayToken" = []))
)]
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

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(super::usage::ingest))
        .routes(routes!(resolve))
        .routes(routes!(create_organization))
}
