//! `GET /ai-optimizer/v1beta/hosted-model-specs`: the hosted model catalog, linked to the organization's
//! registered hosted providers.
//!
//! Each catalog item gets `deployments`: the registered hosted providers (`isHosted: true`) serving that
//! model (a provider model whose name or upstream name equals the item's `model`), with their cluster.
//! Organization-scoped callers see every deployment; cluster-scoped callers only their cluster's.

use crate::caller::Caller;
use crate::db;
use crate::error::ApiResult;
use crate::org::visible_to;
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[utoipa::path(
    get,
    path = "/ai-optimizer/v1beta/hosted-model-specs",
    tag = "hosted-model-specs",
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn hosted_model_specs(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    let mut conn = st.pool.acquire().await?;
    let providers = db::providers(&mut conn, &caller.org_id).await?;
    let hosted: Vec<_> = providers
        .iter()
        .map(|p| &p.spec)
        .filter(|p| p.is_hosted && visible_to(p, caller.cluster_id.as_deref()))
        .collect();
    let mut out = st.catalogs().model_specs.clone();
    if let Some(items) = out.get_mut("items").and_then(Value::as_array_mut) {
        for item in items.iter_mut() {
            let Some(spec_model) = item
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                continue;
            };
            let deployments: Vec<Value> = hosted
                .iter()
                .flat_map(|p| {
                    p.models
                        .iter()
                        .map(|m| m.to_model())
                        .filter(|m| m.name == spec_model || m.upstream == spec_model)
                        .map(|m| {
                            json!({"provider": p.name, "clusterId": p.cluster_id, "model": m.name})
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            if let Some(obj) = item.as_object_mut() {
                obj.insert("deployments".to_string(), Value::Array(deployments));
            }
        }
    }
    Ok(Json(out))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(hosted_model_specs))
}
