//! `/v1/llm/settings`: organization settings, or the cluster context for cluster-scoped keys.

use crate::caller::Caller;
use crate::db::{self, StoredSettings};
use crate::error::ApiResult;
use crate::org::check_settings;
use crate::state::AppState;
use crate::util::JsonBody;
use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Organization settings always show `storePrompts` (default false); a cluster context only when set
/// (absent: inherited from the organization).
fn settings_out(s: StoredSettings, org_level: bool) -> StoredSettings {
    if org_level {
        StoredSettings {
            store_prompts: Some(s.store_prompts.unwrap_or(false)),
            ..s
        }
    } else {
        s
    }
}

#[utoipa::path(
    get,
    path = "/v1/llm/settings",
    tag = "settings",
    responses((status = 200, description = "OK", body = StoredSettings), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn get_settings(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<StoredSettings>> {
    let mut conn = st.pool.acquire().await?;
    let s = match &caller.cluster_id {
        Some(c) => db::cluster_settings(&mut conn, &caller.org_id, c).await?,
        None => db::org_settings(&mut conn, &caller.org_id).await?,
    };
    Ok(Json(settings_out(s, caller.cluster_id.is_none())))
}

#[utoipa::path(
    put,
    path = "/v1/llm/settings",
    tag = "settings",
    request_body = StoredSettings,
    responses((status = 200, description = "OK", body = StoredSettings), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn put_settings(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(settings): JsonBody<StoredSettings>,
) -> ApiResult<Json<StoredSettings>> {
    let mut conn = st.pool.acquire().await?;
    let providers = db::providers(&mut conn, &caller.org_id).await?;
    check_settings(&settings, &providers, caller.cluster_id.as_deref())?;
    match &caller.cluster_id {
        Some(c) => db::set_cluster_settings(&mut conn, &caller.org_id, c, &settings).await?,
        None => db::set_org_settings(&mut conn, &caller.org_id, &settings).await?,
    }
    Ok(Json(settings_out(settings, caller.cluster_id.is_none())))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_settings, put_settings))
}
