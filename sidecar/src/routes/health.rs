//! Liveness, readiness and the OpenAPI document.

use crate::db::{self};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(())
)]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses((status = 200, description = "OK", body = serde_json::Value), (status = 503, description = "database unreachable", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(())
)]
async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(std::time::Duration::from_secs(2), db::ping(&st.pool)).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "database unreachable"})),
        ),
    }
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(())
)]
async fn openapi(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.clone(),
    )
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi))
}
