//! `GET /ai-optimizer/v1beta/hosted-model-specs`: the hosted model catalog.

use crate::caller::Caller;
use crate::state::AppState;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

async fn hosted_model_specs(State(st): State<AppState>, _caller: Caller) -> Json<Value> {
    Json(st.model_specs.clone())
}

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/ai-optimizer/v1beta/hosted-model-specs",
        get(hosted_model_specs),
    )
}
