//! The HTTP API: one router module per resource, each the same shape (request/response types, handlers,
//! `router()`), composed here. Routers sit on top of the module graph: they use `state`, `caller`,
//! `org`, `tx`, `db` and `error`, and nothing below imports them.

use crate::error::ApiError;
use crate::state::AppState;
use axum::http::StatusCode;
use axum::Router;

pub mod api_keys;
pub mod configs;
pub mod health;
pub mod hosted_model_specs;
pub mod internal;
pub mod providers;
pub mod report;
pub mod settings;
pub mod usage;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(providers::router())
        .merge(configs::router())
        .merge(api_keys::router())
        .merge(settings::router())
        .merge(hosted_model_specs::router())
        .merge(usage::router())
        .merge(report::router())
        .merge(internal::router())
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
