//! The one error type of the gateway, rendered once as an OpenAI-style error body.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::translate::obj;
use serde_json::Value;

/// Everything that can go wrong while handling a request, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// No key on the request and no fallback key configured.
    MissingApiKey,
    /// A key was sent but is not known (or revoked).
    InvalidApiKey,
    /// The path is under the gateway prefix but is not an endpoint we serve.
    UnknownEndpoint { path: String },
    /// The endpoint exists but not for this method.
    MethodNotAllowed { method: String, allow: &'static str },
    /// The selected provider has no such API (e.g. `/v1/responses` on a native Anthropic provider).
    EndpointNotSupported {
        provider: String,
        kind: &'static str,
        endpoint: String,
        detail: String,
    },
    /// The request body exceeds the configured limit.
    BodyTooLarge { limit: usize },
    /// The request body is missing or is not the JSON object we expect.
    InvalidBody { reason: String },
    /// The request's tags header is malformed.
    InvalidTags { reason: String },
    /// A request header the gateway must read as text is not valid UTF-8.
    InvalidHeader { name: String },
    /// `X-Provider-Name` names a provider the caller may not use.
    UnknownProvider { name: String },
    /// The model is not allowed by the caller's configuration (or by the chosen provider).
    ModelNotAllowed {
        model: String,
        provider: Option<String>,
    },
    /// The model is in the key's config but not in its scope (a cluster-scoped key asking for a model only
    /// SaaS providers or other clusters' hosted providers serve).
    ModelOutOfScope { model: String, cluster: String },
    /// The caller's configuration has no provider or model at all.
    NoProviderConfigured,
    /// A provider is configured in a way that cannot be used (e.g. missing URL or key).
    ProviderMisconfigured { provider: String, reason: String },
    /// The control plane could not be reached to authenticate an unknown key.
    ControlPlaneUnavailable,
    /// Too many lookups of keys this gateway instance does not know (key spraying); retry later.
    KeyLookupRateLimited,
    /// The provider's destination is refused by the gateway's destination policy (SSRF guard).
    DestinationForbidden { provider: String, reason: String },
    /// The provider answered with a body the gateway cannot translate (e.g. not the JSON it documents).
    BadUpstreamResponse { reason: String },
    /// A budget of the key, its config or organization is used up (or this instance's allowance is).
    BudgetExceeded {
        message: String,
        retry_after: u64,
        /// Not the budget itself: this instance's allowance of it, until the next renewal.
        renewing: bool,
    },
    /// A per-minute request or token limit is reached; `headers` are the `x-ratelimit-*` headers.
    RateLimited {
        message: String,
        retry_after: u64,
        headers: Vec<(&'static str, String)>,
    },
    /// Budgets cannot be enforced: the control plane did not renew the allowance within its lease
    /// and the policy is to fail closed.
    LimitsUnavailable,
    /// Anything else that is our fault.
    Internal { reason: String },
    /// Anthropic `count_tokens` for a provider without that API.
    CountTokensUnsupported {
        provider: String,
        kind: &'static str,
    },
}

impl GatewayError {
    /// HTTP status of the error. One exhaustive match: adding a variant forces a decision here.
    pub fn status(&self) -> u32 {
        match self {
            GatewayError::MissingApiKey | GatewayError::InvalidApiKey => 401,
            GatewayError::UnknownEndpoint { .. } => 404,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::InvalidBody { .. }
            | GatewayError::InvalidTags { .. }
            | GatewayError::InvalidHeader { .. }
            | GatewayError::UnknownProvider { .. }
            | GatewayError::EndpointNotSupported { .. } => 400,
            GatewayError::ModelNotAllowed { .. } => 404,
            GatewayError::ModelOutOfScope { .. } => 403,
            GatewayError::NoProviderConfigured | GatewayError::ProviderMisconfigured { .. } => 500,
            GatewayError::ControlPlaneUnavailable => 503,
            GatewayError::KeyLookupRateLimited
            | GatewayError::BudgetExceeded { .. }
            | GatewayError::RateLimited { .. } => 429,
            GatewayError::LimitsUnavailable => 503,
            GatewayError::DestinationForbidden { .. } => 403,
            GatewayError::BadUpstreamResponse { .. } => 502,
            GatewayError::Internal { .. } => 500,
            GatewayError::CountTokensUnsupported { .. } => 400,
        }
    }

    /// OpenAI error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey | GatewayError::InvalidApiKey => "authentication_error",
            GatewayError::UnknownEndpoint { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::InvalidBody { .. }
            | GatewayError::InvalidTags { .. }
            | GatewayError::InvalidHeader { .. }
            | GatewayError::UnknownProvider { .. }
            | GatewayError::ModelNotAllowed { .. }
            | GatewayError::EndpointNotSupported { .. }
            | GatewayError::CountTokensUnsupported { .. } => "invalid_request_error",
            GatewayError::NoProviderConfigured
            | GatewayError::ProviderMisconfigured { .. }
            | GatewayError::BadUpstreamResponse { .. }
            | GatewayError::Internal { .. } => "server_error",
            GatewayError::ControlPlaneUnavailable | GatewayError::LimitsUnavailable => {
                "service_unavailable"
            }
            GatewayError::KeyLookupRateLimited | GatewayError::RateLimited { .. } => {
                "rate_limit_error"
            }
            GatewayError::BudgetExceeded { .. } => "insufficient_quota",
            GatewayError::DestinationForbidden { .. } | GatewayError::ModelOutOfScope { .. } => {
                "permission_error"
            }
        }
    }

    /// OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => "missing_api_key",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::UnknownEndpoint { .. } => "unknown_url",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::InvalidBody { .. } => "invalid_body",
            GatewayError::InvalidTags { .. } => "invalid_tags",
            GatewayError::InvalidHeader { .. } => "invalid_header",
            GatewayError::UnknownProvider { .. } => "unknown_provider",
            GatewayError::EndpointNotSupported { .. } => "endpoint_not_supported",
            GatewayError::ModelNotAllowed { .. } => "model_not_found",
            GatewayError::ModelOutOfScope { .. } => "model_not_in_scope",
            GatewayError::NoProviderConfigured => "no_provider_configured",
            GatewayError::ProviderMisconfigured { .. } => "provider_misconfigured",
            GatewayError::ControlPlaneUnavailable => "control_plane_unavailable",
            GatewayError::KeyLookupRateLimited => "key_lookup_rate_limited",
            GatewayError::BudgetExceeded {
                renewing: false, ..
            } => "budget_exceeded",
            GatewayError::BudgetExceeded { renewing: true, .. } => "budget_allowance_renewing",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::LimitsUnavailable => "limits_unavailable",
            GatewayError::DestinationForbidden { .. } => "destination_forbidden",
            GatewayError::BadUpstreamResponse { .. } => "bad_upstream_response",
            GatewayError::Internal { .. } => "internal_error",
            GatewayError::CountTokensUnsupported { .. } => "unsupported_endpoint",
        }
    }

    /// The request field the error is about, if any.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::ModelNotAllowed { .. } | GatewayError::ModelOutOfScope { .. } => {
                Some("model")
            }
            GatewayError::UnknownProvider { .. } => Some("X-Provider-Name"),
            GatewayError::InvalidTags { .. } => Some("X-LLM-Gateway-Tags"),
            _ => None,
        }
    }

    /// Human-readable message. Never contains secrets.
    pub fn message(&self) -> String {
        match self {
            GatewayError::MissingApiKey => {
                "Missing API key: send it in the X-API-Key header or as Authorization: Bearer <key>."
                    .to_string()
            }
            GatewayError::InvalidApiKey => "Invalid API key.".to_string(),
            GatewayError::UnknownEndpoint { path } => format!(
                "Unknown endpoint {path}. Supported: POST /openai/v1/chat/completions, /openai/v1/responses, /openai/v1/embeddings, /openai/v1/completions; GET /openai/v1/models."
            ),
            GatewayError::EndpointNotSupported {
                provider,
                kind,
                endpoint,
                detail,
            } => format!(
                "Provider '{provider}' ({kind}{detail}) does not support {endpoint}; choose another provider with X-Provider-Name or the model."
            ),
            GatewayError::MethodNotAllowed { method, allow } => {
                format!("Method {method} is not allowed on this endpoint; use {allow}.")
            }
            GatewayError::BodyTooLarge { limit } => {
                format!("Request body is larger than the gateway limit of {limit} bytes.")
            }
            GatewayError::InvalidBody { reason } => format!("Invalid request body: {reason}"),
            GatewayError::InvalidTags { reason } => {
                format!("Invalid X-LLM-Gateway-Tags header: {reason}")
            }
            GatewayError::InvalidHeader { name } => {
                format!("The {name} header is not valid UTF-8.")
            }
            GatewayError::UnknownProvider { name } => format!(
                "Provider '{name}' (from X-Provider-Name) is not one of the providers available to this API key."
            ),
            GatewayError::ModelNotAllowed { model, provider: Some(p) } => format!(
                "The model '{model}' is not allowed for provider '{p}' by this API key's configuration."
            ),
            GatewayError::ModelNotAllowed { model, provider: None } => format!(
                "The model '{model}' does not exist or is not allowed by this API key's configuration."
            ),
            GatewayError::ModelOutOfScope { model, cluster } => format!(
                "The model '{model}' is outside this API key's scope: the key is scoped to cluster '{cluster}', which may use only that cluster's hosted models, and no such provider serves it (SaaS models and other clusters' models need an organization-scoped API key)."
            ),
            GatewayError::NoProviderConfigured => {
                "This API key's configuration has no provider with a model.".to_string()
            }
            GatewayError::ProviderMisconfigured { provider, reason } => {
                format!("Provider '{provider}' is misconfigured: {reason}")
            }
            GatewayError::ControlPlaneUnavailable => {
                "The gateway control plane is unavailable; try again shortly.".to_string()
            }
            GatewayError::KeyLookupRateLimited => {
                "Too many requests with API keys this gateway does not know; try again shortly."
                    .to_string()
            }
            GatewayError::DestinationForbidden { provider, reason } => format!(
                "Provider '{provider}' points at a destination this gateway does not allow: {reason}"
            ),
            GatewayError::BadUpstreamResponse { reason } => {
                format!("The provider returned a response the gateway cannot translate: {reason}")
            }
            GatewayError::BudgetExceeded { message, .. }
            | GatewayError::RateLimited { message, .. } => message.clone(),
            GatewayError::LimitsUnavailable => {
                "Budgets cannot be checked: the gateway control plane is unavailable; try again shortly."
                    .to_string()
            }
            GatewayError::Internal { reason } => format!("Internal gateway error: {reason}"),
            GatewayError::CountTokensUnsupported { provider, kind } => format!(
                "Provider '{provider}' ({kind}) has no token counting API; /anthropic/v1/messages/count_tokens is available for ANTHROPIC providers only."
            ),
        }
    }

    /// Extra response headers (e.g. `Allow` for 405).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("content-type", "application/json".to_string())];
        match self {
            GatewayError::MethodNotAllowed { allow, .. } => h.push(("allow", (*allow).to_string())),
            GatewayError::MissingApiKey | GatewayError::InvalidApiKey => {
                h.push(("www-authenticate", "Bearer".to_string()))
            }
            GatewayError::ControlPlaneUnavailable
            | GatewayError::KeyLookupRateLimited
            | GatewayError::LimitsUnavailable => h.push(("retry-after", "1".to_string())),
            GatewayError::BudgetExceeded { retry_after, .. } => {
                h.push(("retry-after", retry_after.to_string()))
            }
            GatewayError::RateLimited {
                retry_after,
                headers,
                ..
            } => {
                h.push(("retry-after", retry_after.to_string()));
                h.extend(headers.iter().cloned());
            }
            _ => {}
        }
        h
    }

    /// The OpenAI error JSON: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> String {
        let error = obj(&mut [
            ("message", Value::from(self.message())),
            ("type", Value::from(self.kind())),
            ("param", Value::from(self.param())),
            ("code", Value::from(self.code())),
        ]);
        crate::translate::json_string(&obj(&mut [("error", error)]))
    }
}

impl core::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_shape() {
        let e = GatewayError::ModelNotAllowed {
            model: "gpt-9".into(),
            provider: None,
        };
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn bad_upstream_response_is_502() {
        let e = GatewayError::BadUpstreamResponse {
            reason: "not JSON".into(),
        };
        assert_eq!(e.status(), 502);
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "bad_upstream_response");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("not JSON"));
    }

    #[test]
    fn method_not_allowed_has_allow_header() {
        let e = GatewayError::MethodNotAllowed {
            method: "GET".into(),
            allow: "POST",
        };
        assert_eq!(e.status(), 405);
        assert!(e.headers().contains(&("allow", "POST".to_string())));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert!(v["error"]["param"].is_null());
    }
}
