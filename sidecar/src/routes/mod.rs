//! The HTTP API: one router module per resource, each the same shape (request/response types, handlers,
//! `router()`), composed here. Routers sit on top of the module graph: they use `state`, `caller`,
//! `org`, `tx`, `db` and `error`, and nothing below imports them.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{MatchedPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

pub mod api_keys;
pub mod budgets;
pub mod configs;
pub mod health;
pub mod hosted_model_specs;
pub mod internal;
pub mod providers;
pub mod report;
pub mod settings;
pub mod usage;

/// The document's header and security schemes; paths and schemas come from the handlers' annotations
/// and the request types (`#[utoipa::path]`, `ToSchema`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "llm-gateway sidecar (control plane)",
        description = "Providers, custom configurations, API keys, settings, usage and the key vault of the LLM \
                       gateway. Generated from the sidecar's Rust types and handlers; see docs/api.md.",
        license(name = "Apache-2.0")
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "providers", description = "provider registrations (keys write-only)"),
        (name = "configs", description = "custom configurations"),
        (name = "api-keys", description = "gateway API keys"),
        (name = "settings", description = "routing settings"),
        (name = "hosted-model-specs", description = "hosted model catalog"),
        (name = "usage", description = "usage records and sums"),
        (name = "report", description = "savings report"),
        (name = "budgets", description = "budgets and rate limits"),
        (name = "internal", description = "filter and operator endpoints (x-gateway-token)"),
        (name = "health", description = "liveness, readiness, this document")
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "gatewayToken",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-gateway-token"))),
        );
    }
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Everything on one port (the default).
    All,
    /// The public API (no `/internal`, no `/metrics`).
    Public,
    /// `/internal/*`, health and `/metrics`: the port Envoy and Prometheus reach.
    Internal,
}

/// Every resource router, with the document they describe.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .merge(public())
        .merge(internal::router())
        .merge(budgets::internal_router())
}

fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(providers::router())
        .merge(configs::router())
        .merge(api_keys::router())
        .merge(settings::router())
        .merge(hosted_model_specs::router())
        .merge(usage::router())
        .merge(report::router())
        .merge(budgets::router())
}

/// The OpenAPI document (what `GET /openapi.json` serves and `llm-gateway-sidecar openapi` prints).
pub fn openapi_json() -> String {
    let (_, mut doc) = api().split_for_parts();
    // These two take an empty body as `{}` (what the annotations cannot say).
    for (path, item) in doc.paths.paths.iter_mut() {
        if path == "/internal/v1/organizations" || path == "/v1/llm/report/link" {
            if let Some(body) = item.post.as_mut().and_then(|op| op.request_body.as_mut()) {
                body.required = Some(utoipa::openapi::Required::False);
            }
        }
    }
    let mut value = serde_json::to_value(&doc).unwrap_or_default();
    add_aliases(&mut value);
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

/// Older member names the request types still accept (`#[serde(alias)]`), which utoipa cannot see:
/// (schema, alias, canonical member). They are documented as deprecated members with the canonical
/// member's schema, so that the document accepts what the server accepts.
const ALIASES: &[(&str, &str, &str)] = &[
    ("ProviderIn", "type", "supportedProvider"),
    ("ProviderIn", "supported_provider", "supportedProvider"),
    ("ProviderIn", "api_key", "apiKey"),
    ("ProviderIn", "api_base", "url"),
    ("ProviderIn", "apiBase", "url"),
    ("ProviderIn", "api_version", "apiVersion"),
    ("ProviderIn", "is_hosted", "isHosted"),
    ("ProviderIn", "cluster_id", "clusterId"),
    ("ProviderIn", "fallback_on_429", "fallbackOn429"),
    ("ConfigIn", "parent", "inherits"),
    ("ConfigIn", "inherits_from", "inherits"),
    ("ConfigIn", "inheritsFrom", "inherits"),
    ("ConfigIn", "parent_id", "inherits"),
    ("ConfigPatch", "parent", "inherits"),
    ("ConfigPatch", "inherits_from", "inherits"),
    ("ConfigPatch", "inheritsFrom", "inherits"),
    ("ConfigPatch", "parent_id", "inherits"),
    ("ConfigProviderSpec", "api_key", "apiKey"),
    ("ConfigProviderSpec", "api_base", "apiBase"),
    ("KeyIn", "configId", "config_id"),
    ("KeyIn", "clusterId", "cluster_id"),
    ("Settings", "providerName", "provider"),
    ("Settings", "store_prompts", "storePrompts"),
    ("ResolveIn", "key_sha256", "keySha256"),
    ("LinkIn", "ttl_seconds", "ttlSeconds"),
];

fn add_aliases(doc: &mut serde_json::Value) {
    for (schema, alias, canonical) in ALIASES {
        let Some(obj) = doc
            .pointer_mut(&format!("/components/schemas/{schema}"))
            .and_then(serde_json::Value::as_object_mut)
        else {
            continue;
        };
        // A member that may come under another name is not required under its canonical one.
        if let Some(req) = obj.get_mut("required").and_then(|r| r.as_array_mut()) {
            req.retain(|r| r != canonical);
            if req.is_empty() {
                obj.remove("required");
            }
        }
        let Some(props) = obj
            .get_mut("properties")
            .and_then(serde_json::Value::as_object_mut)
        else {
            continue;
        };
        let Some(mut member) = props.get(*canonical).cloned() else {
            continue;
        };
        if let Some(m) = member.as_object_mut() {
            m.insert("deprecated".into(), serde_json::Value::Bool(true));
            m.insert(
                "description".into(),
                serde_json::Value::String(format!("Deprecated alias of `{canonical}`.")),
            );
        }
        props.insert((*alias).to_string(), member);
    }
}

pub fn router(state: AppState, listener: Listener) -> Router {
    let (router, _) = match listener {
        Listener::All => api(),
        Listener::Public => OpenApiRouter::new().merge(health::router()).merge(public()),
        Listener::Internal => OpenApiRouter::new()
            .merge(health::router())
            .merge(internal::router())
            .merge(budgets::internal_router()),
    }
    .split_for_parts();
    let router = if listener == Listener::Public {
        router
    } else {
        router.route("/metrics", axum::routing::get(metrics))
    };
    router
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_log,
        ))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `GET /metrics`: Prometheus text (not in the OpenAPI document: it is the operators' port).
async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
}

/// The request log: one JSON line per request with method, route template, status and duration. Never
/// headers, bodies or query strings (keys, prompts and report tokens travel there).
async fn request_log(
    State(st): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.metrics.http(method.as_str(), &route, status);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(target: "request", method = %method, route = %route, status, ms, "request");
    } else {
        tracing::info!(target: "request", method = %method, route = %route, status, ms, "request");
    }
    resp
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
