//! The HTTP API: one router module per resource, each the same shape (request/response types, handlers,
//! `router()`), composed here. Routers sit on top of the module graph: they use `state`, `caller`,
//! `org`, `tx`, `db` and `error`, and nothing below imports them.

use crate::error::ApiError;
use crate::state::AppState;
use axum::http::StatusCode;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

pub mod api_keys;
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

/// Every resource router, with the document they describe.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .merge(providers::router())
        .merge(configs::router())
        .merge(api_keys::router())
        .merge(settings::router())
        .merge(hosted_model_specs::router())
        .merge(usage::router())
        .merge(report::router())
        .merge(internal::router())
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
    let mut text = doc.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

pub fn router(state: AppState) -> Router {
    let (router, _) = api().split_for_parts();
    router
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
