//! `GET /ai-optimizer/v1beta/hosted-model-specs`: the hosted model catalog.

use crate::caller::Caller;
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[utoipa::path(
    get,
    path = "/ai-optimizer/v1beta/hosted-model-specs",
    tag = "hosted-model-specs",
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn hosted_model_specs(State(st): State<AppState>, _caller: Caller) -> Json<Value> {
    Json(st.catalogs().model_specs.clone())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(hosted_model_specs))
}
