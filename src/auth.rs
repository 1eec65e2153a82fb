//! Auth: find the caller's gateway key and resolve it to an [`Identity`].

#[allow(unused_imports)]
use crate::prelude::*;

use crate::config::{hash_key, Identity, Plan};
use crate::error::GatewayError;
use alloc::rc::Rc;

/// The key from `X-API-Key`, else from `Authorization: Bearer <key>`.
pub fn extract_key(x_api_key: Option<&str>, authorization: Option<&str>) -> Option<String> {
    if let Some(k) = x_api_key.map(str::trim).filter(|k| !k.is_empty()) {
        return Some(k.to_string());
    }
    let auth = authorization?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

/// The digest to look up: the sent key's, or the fallback key's when none was sent.
pub fn key_hash(plan: &Plan, key: Option<&str>) -> Result<String, GatewayError> {
    match key {
        Some(k) => Ok(hash_key(k)),
        None => plan
            .fallback_key_hash
            .clone()
            .ok_or(GatewayError::MissingApiKey),
    }
}

/// Static-mode authentication against the keys compiled into the plan.
pub fn authenticate(plan: &Plan, key: Option<&str>) -> Result<Rc<Identity>, GatewayError> {
    let hash = key_hash(plan, key)?;
    plan.identity_for_hash(&hash)
        .ok_or(GatewayError::InvalidApiKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_keys() {
        assert_eq!(
            extract_key(Some("k1"), Some("Bearer k2")).as_deref(),
            Some("k1")
        );
        assert_eq!(extract_key(None, Some("Bearer k2")).as_deref(), Some("k2"));
        assert_eq!(
            extract_key(None, Some("bearer   k3 ")).as_deref(),
            Some("k3")
        );
        assert_eq!(extract_key(Some("  "), Some("Basic abc")), None);
        assert_eq!(extract_key(None, Some("Bearer")), None);
        assert_eq!(extract_key(None, None), None);
    }

    #[test]
    fn fallback_and_unknown() {
        let plan = Plan::default();
        assert_eq!(
            authenticate(&plan, None).unwrap_err(),
            GatewayError::MissingApiKey
        );
        assert_eq!(
            authenticate(&plan, Some("x")).unwrap_err(),
            GatewayError::InvalidApiKey
        );
        let plan = Plan {
            fallback_key_hash: Some(hash_key("fb")),
            ..Default::default()
        };
        assert_eq!(key_hash(&plan, None).unwrap(), hash_key("fb"));
    }
}
