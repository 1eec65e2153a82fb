//! Who is calling: the public API's gateway API key ([`Caller`], an axum extractor) and the internal
//! endpoints' shared token. Below the routers; imports only state, db and errors.

use crate::db;
use crate::error::{ApiError, ApiResult};
use crate::org::visible_to;
use crate::state::AppState;
use crate::util::secret_eq;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use llm_gateway::config::{hash_key, ProviderSpec};

/// The authenticated caller: a gateway API key of an organization, optionally cluster-scoped.
pub struct Caller {
    pub org_id: String,
    pub key_id: String,
    pub cluster_id: Option<String>,
}

impl Caller {
    pub fn require_org(&self) -> ApiResult<()> {
        match &self.cluster_id {
            None => Ok(()),
            Some(c) => Err(ApiError::forbidden(format!(
                "this endpoint needs an organization-scoped API key; this key is scoped to cluster '{c}'"
            ))),
        }
    }

    /// Cluster-scoped callers only see hosted providers of their cluster.
    pub fn sees(&self, spec: &ProviderSpec) -> bool {
        visible_to(spec, self.cluster_id.as_deref())
    }
}

/// The caller's key from `X-API-Key` or `Authorization: Bearer`.
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some(v.to_string());
        }
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = presented_key(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized("missing API key: send it in the X-API-Key header or as Authorization: Bearer <key>")
        })?;
        let mut conn = state.pool.acquire().await?;
        let k = db::active_key_by_hash(&mut conn, &hash_key(&key))
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid or revoked API key"))?;
        Ok(Caller {
            org_id: k.org_id,
            key_id: k.id,
            cluster_id: k.cluster_id,
        })
    }
}

pub fn check_internal_token(st: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let given = headers
        .get("x-gateway-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given.is_empty() || !secret_eq(given.trim(), &st.internal_token) {
        return Err(ApiError::unauthorized("missing or invalid x-gateway-token"));
    }
    Ok(())
}
