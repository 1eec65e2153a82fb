//! Provider shaping: one file per provider, every one with the same shape. Given the provider as the
//! caller's config sees it and the chosen model, each returns the upstream [`Target`]: path, auth
//! header and the model name the body must carry. Adding a provider is adding a file and a match arm.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::api::Api;
use crate::error::GatewayError;
use crate::plan::{Model, ProviderKind, ResolvedProvider};

mod anthropic;
mod azure;
mod gemini;
mod groq;
mod mistral;
mod openai;
mod openai_compatible;
mod vertex;

/// Response translation a native provider API needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    Anthropic,
    Gemini,
}

/// Where and how one attempt goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Upstream `:path` (with query string if any).
    pub path: String,
    /// The auth header to set, if the provider has a key.
    pub auth: Option<(&'static str, String)>,
    /// The `model` the request body must carry; `None`: leave the body's model alone.
    pub body_model: Option<String>,
    /// Other request headers the provider needs (e.g. `anthropic-version`).
    pub extra_headers: Vec<(&'static str, String)>,
    /// A whole new body (native APIs), replacing the client's.
    pub native_body: Option<Vec<u8>>,
    /// How responses must be translated back to OpenAI's shape.
    pub translation: Option<Translation>,
}

/// Whether the provider type has a native API the gateway translates to.
pub fn has_native_api(kind: ProviderKind) -> bool {
    matches!(
        kind,
        ProviderKind::Anthropic | ProviderKind::Gemini | ProviderKind::VertexAiGemini
    )
}

/// Native API unless the registration says `api: openai`: Anthropic's OpenAI compatibility is partial;
/// Gemini's and Vertex's OpenAI endpoints are complete and need no translation.
pub fn native_by_default(kind: ProviderKind) -> bool {
    matches!(kind, ProviderKind::Anthropic)
}

/// Public base URL of a provider type; `None` where the user must give one.
pub fn default_base(kind: ProviderKind, native: bool) -> Option<&'static str> {
    match kind {
        ProviderKind::Gemini if native => gemini::NATIVE_BASE,
        ProviderKind::OpenAi => openai::DEFAULT_BASE,
        ProviderKind::Azure => azure::DEFAULT_BASE,
        ProviderKind::Gemini => gemini::DEFAULT_BASE,
        ProviderKind::VertexAiGemini => vertex::DEFAULT_BASE,
        ProviderKind::Mistral => mistral::DEFAULT_BASE,
        ProviderKind::Groq => groq::DEFAULT_BASE,
        ProviderKind::Anthropic => anthropic::DEFAULT_BASE,
        ProviderKind::OpenAiCompatible => openai_compatible::DEFAULT_BASE,
    }
}

/// Whether the provider honours `stream_options.include_usage` (so the gateway may ask for it).
pub fn supports_stream_usage(kind: ProviderKind) -> bool {
    match kind {
        ProviderKind::OpenAi
        | ProviderKind::Azure
        | ProviderKind::Gemini
        | ProviderKind::VertexAiGemini
        | ProviderKind::Groq
        | ProviderKind::OpenAiCompatible => true,
        // Mistral reports usage in its last chunk unasked and refuses unknown fields.
        ProviderKind::Mistral | ProviderKind::Anthropic => false,
    }
}

/// Shapes a request for a provider's native API, translating the OpenAI body.
pub fn native_target(
    provider: &ResolvedProvider,
    model: &Model,
    doc: &crate::body::Doc,
    stream: bool,
) -> Result<Target, GatewayError> {
    match provider.kind {
        ProviderKind::Anthropic => anthropic::native(provider, model, doc),
        ProviderKind::Gemini => gemini::native(provider, model, doc, stream),
        ProviderKind::VertexAiGemini => vertex::native(provider, model, doc, stream),
        _ => chat_target(provider, model),
    }
}

/// Shapes a chat-completions request for `provider` and `model`.
pub fn chat_target(provider: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    match provider.kind {
        ProviderKind::OpenAi => openai::chat(provider, model),
        ProviderKind::Azure => azure::chat(provider, model),
        ProviderKind::Gemini => gemini::chat(provider, model),
        ProviderKind::VertexAiGemini => vertex::chat(provider, model),
        ProviderKind::Mistral => mistral::chat(provider, model),
        ProviderKind::Groq => groq::chat(provider, model),
        ProviderKind::Anthropic => anthropic::chat(provider, model),
        ProviderKind::OpenAiCompatible => openai_compatible::chat(provider, model),
    }
}

/// Shapes a request of an OpenAI-style `api` (chat, Responses, embeddings, legacy completions) for
/// `provider` and `model`; a clear 400 when the provider has no such API.
pub fn api_target(
    provider: &ResolvedProvider,
    model: &Model,
    api: Api,
) -> Result<Target, GatewayError> {
    if api == Api::Chat {
        return chat_target(provider, model);
    }
    if !crate::api::supports(provider, api) {
        return Err(crate::api::unsupported(provider, api));
    }
    match provider.kind {
        ProviderKind::Azure => azure::api(provider, model, api),
        ProviderKind::OpenAiCompatible => openai_compatible::at(provider, model, api.path()),
        _ => openai_style_at(provider, model, api.path()),
    }
}

/// The common OpenAI-style shape: `{base}/chat/completions`, `Authorization: Bearer <key>` (required),
/// the model's upstream name in the body.
pub(crate) fn openai_style(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    openai_style_at(p, model, "/chat/completions")
}

/// The OpenAI-style shape at `{base}{suffix}`.
pub(crate) fn openai_style_at(
    p: &ResolvedProvider,
    model: &Model,
    suffix: &str,
) -> Result<Target, GatewayError> {
    Ok(Target {
        path: p.base.join(suffix),
        auth: bearer(required_key(p)?),
        body_model: Some(model.upstream.clone()),
        ..Default::default()
    })
}

/// The provider's key, or a clear error for providers that cannot work without one.
pub(crate) fn required_key(p: &ResolvedProvider) -> Result<&str, GatewayError> {
    p.api_key
        .as_deref()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| GatewayError::ProviderMisconfigured {
            provider: p.name.clone(),
            reason: "no API key is configured for it".to_string(),
        })
}

/// `Authorization: Bearer <key>`.
pub(crate) fn bearer(key: &str) -> Option<(&'static str, String)> {
    Some(("authorization", format!("Bearer {key}")))
}

/// Percent-encodes a path segment (RFC 3986 unreserved characters pass through).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::plan::{Model, ProviderKind, ResolvedProvider};
    use crate::url::BaseUrl;

    pub fn provider(kind: ProviderKind, url: &str, key: Option<&str>) -> ResolvedProvider {
        ResolvedProvider {
            name: "p".into(),
            kind,
            base: BaseUrl::parse(url).unwrap(),
            api_version: None,
            models: vec![],
            is_hosted: false,
            api_key: key.map(str::to_string),
            envoy_cluster: "c".into(),
            cluster_id: None,
            fallback: vec![],
            native: false,
            fallback_on429: false,
            timeouts: None,
        }
    }

    pub fn model(name: &str, upstream: &str) -> Model {
        Model {
            name: name.into(),
            upstream: upstream.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_other_apis() {
        use test_support::{model, provider};
        let p = provider(
            ProviderKind::OpenAi,
            "https://api.openai.com/v1",
            Some("sk"),
        );
        let m = model("m", "m-up");
        for (api, path) in [
            (Api::Responses, "/v1/responses"),
            (Api::Embeddings, "/v1/embeddings"),
            (Api::Completions, "/v1/completions"),
            (Api::Chat, "/v1/chat/completions"),
        ] {
            let t = api_target(&p, &m, api).unwrap();
            assert_eq!(t.path, path);
            assert_eq!(t.body_model.as_deref(), Some("m-up"));
            assert_eq!(t.auth, Some(("authorization", "Bearer sk".to_string())));
        }
        let g = provider(
            ProviderKind::Gemini,
            "https://g.example/v1beta/openai",
            Some("g"),
        );
        assert_eq!(
            api_target(&g, &m, Api::Embeddings).unwrap().path,
            "/v1beta/openai/embeddings"
        );
        assert_eq!(
            api_target(&g, &m, Api::Responses).unwrap_err().status(),
            400
        );
        let v = provider(
            ProviderKind::VertexAiGemini,
            "https://v.example/v1",
            Some("t"),
        );
        assert_eq!(
            api_target(&v, &m, Api::Completions).unwrap_err().status(),
            400
        );
    }

    #[test]
    fn encodes_segments() {
        assert_eq!(encode_segment("gpt-4o_mini.v1"), "gpt-4o_mini.v1");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn every_kind_without_url_needs_default_or_fails_cleanly() {
        for kind in [
            ProviderKind::Azure,
            ProviderKind::VertexAiGemini,
            ProviderKind::OpenAiCompatible,
        ] {
            assert!(default_base(kind, false).is_none());
        }
        for kind in [
            ProviderKind::OpenAi,
            ProviderKind::Gemini,
            ProviderKind::Mistral,
            ProviderKind::Groq,
            ProviderKind::Anthropic,
        ] {
            assert!(default_base(kind, false).unwrap().starts_with("https://"));
        }
    }
}
