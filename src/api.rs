//! The OpenAI-style APIs the gateway routes besides chat: Responses, embeddings and legacy
//! completions, plus the opt-in passthrough of the other `/openai/v1/*` paths. Which provider type has
//! which API, and how each endpoint reports usage (its own `usage` shape, and the Responses stream's
//! `response.completed` event). Pure: the exchange asks, this module answers.

use crate::error::GatewayError;
use crate::plan::{ProviderKind, ResolvedProvider};
use crate::usage::{ResponseFacts, Usage};
use serde::Deserialize;

/// A routed OpenAI-style API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Responses,
    Embeddings,
    Completions,
}

impl Api {
    /// The path under an OpenAI-style base URL (and the client-facing path under `/openai/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Responses => "/responses",
            Api::Embeddings => "/embeddings",
            Api::Completions => "/completions",
        }
    }

    /// The API for a client path under `/openai/v1` (without query).
    pub fn from_path(rest: &str) -> Option<Api> {
        [Api::Chat, Api::Responses, Api::Embeddings, Api::Completions]
            .into_iter()
            .find(|a| a.path() == rest)
    }

    /// Whether the provider is asked for a final usage chunk (`stream_options.include_usage`).
    pub fn stream_usage_option(self) -> bool {
        matches!(self, Api::Chat | Api::Completions)
    }
}

/// Whether `provider` serves `api`. Native-API registrations (Anthropic Messages, Gemini
/// `generateContent`) are translated for chat only; every other API needs an OpenAI-style endpoint.
pub fn supports(provider: &ResolvedProvider, api: Api) -> bool {
    if api == Api::Chat {
        return true;
    }
    if provider.native {
        return false;
    }
    kind_supports(provider.kind, api)
}

/// The OpenAI-style APIs each provider type documents.
pub fn kind_supports(kind: ProviderKind, api: Api) -> bool {
    use Api::*;
    use ProviderKind as K;
    match (kind, api) {
        (_, Chat) => true,
        (K::OpenAi | K::Azure | K::OpenAiCompatible, _) => true,
        // Mistral: embeddings (no Responses, no legacy completions — its FIM API is another shape).
        (K::Mistral, Embeddings) => true,
        // Groq: the Responses API (beta); no embeddings or legacy completions.
        (K::Groq, Responses) => true,
        // Gemini's OpenAI compatibility: embeddings only besides chat.
        (K::Gemini, Embeddings) => true,
        // Vertex's OpenAI endpoint is chat only; Anthropic's compatibility layer is chat only.
        _ => false,
    }
}

/// The clear 400 for a provider without the API.
pub fn unsupported(provider: &ResolvedProvider, api: Api) -> GatewayError {
    let how = if provider.native {
        " in native API mode"
    } else {
        ""
    };
    GatewayError::EndpointNotSupported {
        provider: provider.name.clone(),
        kind: provider.kind.as_str(),
        endpoint: format!("/v1{}", api.path()),
        detail: how.to_string(),
    }
}

/// Passthrough: the upstream path for a client path `rest` under `/openai/v1` (query kept).
/// Azure uses its `/openai/v1` API (the model is in the body, not a deployment path).
pub fn passthrough_path(provider: &ResolvedProvider, rest: &str) -> String {
    match provider.kind {
        ProviderKind::Azure => provider.base.join(&format!("/openai/v1{rest}")),
        _ => provider.base.join(rest),
    }
}

/// Whether a provider may take passthrough requests (OpenAI-style API registrations only).
pub fn passthrough_allowed(provider: &ResolvedProvider) -> bool {
    !provider.native
        && matches!(
            provider.kind,
            ProviderKind::OpenAi
                | ProviderKind::Azure
                | ProviderKind::OpenAiCompatible
                | ProviderKind::Mistral
                | ProviderKind::Groq
                | ProviderKind::Gemini
        )
}

/// Every usage shape an OpenAI-style endpoint reports: chat/completions/embeddings
/// (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`) and Responses,
/// images and audio (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`).
#[derive(Deserialize, Default)]
struct AnyUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl AnyUsage {
    fn usage(&self) -> Option<Usage> {
        if self.prompt_tokens.is_none() && self.completion_tokens.is_none() {
            return None;
        }
        Some(Usage {
            prompt_tokens: self.prompt_tokens.unwrap_or(0),
            completion_tokens: self.completion_tokens.unwrap_or(0),
            cached_tokens: self
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        })
    }
}

/// A response object (Responses API, or any JSON body with a top-level `usage`).
#[derive(Deserialize, Default)]
struct AnyResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<AnyUsage>,
}

/// Usage and model from a whole (non-streamed) JSON response of `api`; `None` api: passthrough.
pub fn response_facts(api: Option<Api>, body: &[u8]) -> ResponseFacts {
    match api {
        Some(Api::Chat | Api::Completions) => crate::usage::from_json_response(body),
        _ => match serde_json::from_slice::<AnyResponse>(body) {
            Ok(r) => ResponseFacts {
                usage: r.usage.as_ref().and_then(AnyUsage::usage),
                model: r.model,
                completion_chars: 0,
            },
            Err(_) => ResponseFacts::default(),
        },
    }
}

#[derive(Deserialize)]
struct PromptPeek<'a> {
    #[serde(default, borrow)]
    input: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    instructions: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    prompt: Option<&'a serde_json::value::RawValue>,
}

/// The request's prompt as JSON text, for prompt storage: chat `messages`, Responses `input` (with
/// `instructions`), embeddings `input`, completions `prompt`; nothing for the passthrough.
pub fn prompt_text(api: Option<Api>, body: &[u8]) -> Option<String> {
    let api = api?;
    if api == Api::Chat {
        return crate::usage::prompt_text(body);
    }
    let p: PromptPeek = serde_json::from_slice(body).ok()?;
    let text = match api {
        Api::Completions => p.prompt?.get().to_string(),
        Api::Responses => match (p.instructions, p.input) {
            (Some(i), Some(x)) => format!("{{\"instructions\":{},\"input\":{}}}", i.get(), x.get()),
            (None, Some(x)) => x.get().to_string(),
            (Some(i), None) => i.get().to_string(),
            (None, None) => return None,
        },
        _ => p.input?.get().to_string(),
    };
    Some(crate::usage::clip(&text, crate::usage::MAX_STORED_TEXT))
}

#[derive(Deserialize)]
struct OutputPeek {
    #[serde(default)]
    output: Vec<OutputItem>,
}

#[derive(Deserialize)]
struct OutputItem {
    #[serde(default)]
    content: Vec<OutputPart>,
}

#[derive(Deserialize)]
struct OutputPart {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// The answer's text of a whole response, for prompt storage (Responses: its `output_text` parts).
pub fn completion_text(api: Option<Api>, body: &[u8]) -> Option<String> {
    match api? {
        Api::Chat | Api::Completions => crate::usage::completion_text(body),
        Api::Embeddings => None,
        Api::Responses => {
            let r: OutputPeek = serde_json::from_slice(body).ok()?;
            let text: String = r
                .output
                .iter()
                .flat_map(|i| i.content.iter())
                .filter(|p| p.kind == "output_text")
                .filter_map(|p| p.text.as_deref())
                .collect();
            Some(text)
        }
    }
}

/// What one Responses stream event tells.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponsesEvent {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// Output text of an `response.output_text.delta` event.
    pub text: Option<String>,
    /// The terminal event (`response.completed`, `response.incomplete`, `response.failed`).
    pub done: bool,
}

#[derive(Deserialize)]
struct EventPeek {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    response: Option<AnyResponse>,
}

/// Reads one Responses API stream event (`data:` JSON).
pub fn responses_event(data: &str) -> ResponsesEvent {
    let Ok(ev) = serde_json::from_str::<EventPeek>(data) else {
        return ResponsesEvent::default();
    };
    let kind = ev.kind.as_deref().unwrap_or_default();
    let mut out = ResponsesEvent::default();
    match kind {
        "response.output_text.delta" => out.text = ev.delta,
        "response.completed" | "response.incomplete" | "response.failed" => {
            out.done = true;
            if let Some(r) = ev.response {
                out.usage = r.usage.as_ref().and_then(AnyUsage::usage);
                out.model = r.model;
            }
        }
        "response.created" => out.model = ev.response.and_then(|r| r.model),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::provider;

    #[test]
    fn paths_round_trip() {
        for a in [Api::Chat, Api::Responses, Api::Embeddings, Api::Completions] {
            assert_eq!(Api::from_path(a.path()), Some(a));
        }
        assert_eq!(Api::from_path("/images/generations"), None);
    }

    #[test]
    fn support_matrix() {
        let oa = provider(ProviderKind::OpenAi, "https://api.openai.com/v1", Some("k"));
        for a in [Api::Responses, Api::Embeddings, Api::Completions] {
            assert!(supports(&oa, a));
        }
        let mut an = provider(
            ProviderKind::Anthropic,
            "https://api.anthropic.com/v1",
            Some("k"),
        );
        an.native = true;
        assert!(supports(&an, Api::Chat));
        assert!(!supports(&an, Api::Responses));
        let e = unsupported(&an, Api::Responses);
        assert_eq!(e.status(), 400);
        assert!(e.message().contains("'p'"));
        assert!(e.message().contains("/v1/responses"));
        assert!(e.message().contains("ANTHROPIC"));
        let mut gem = provider(ProviderKind::Gemini, "https://g/v1beta/openai", Some("k"));
        assert!(supports(&gem, Api::Embeddings));
        assert!(!supports(&gem, Api::Completions));
        gem.native = true;
        assert!(!supports(&gem, Api::Embeddings));
        assert!(kind_supports(ProviderKind::Groq, Api::Responses));
        assert!(!kind_supports(ProviderKind::Mistral, Api::Responses));
        assert!(!kind_supports(
            ProviderKind::VertexAiGemini,
            Api::Embeddings
        ));
    }

    #[test]
    fn passthrough_paths() {
        let oa = provider(ProviderKind::OpenAi, "https://api.openai.com/v1", Some("k"));
        assert_eq!(
            passthrough_path(&oa, "/images/generations?x=1"),
            "/v1/images/generations?x=1"
        );
        let az = provider(ProviderKind::Azure, "https://r.openai.azure.com", Some("k"));
        assert_eq!(passthrough_path(&az, "/files"), "/openai/v1/files");
        let mut an = provider(ProviderKind::Anthropic, "https://a/v1", Some("k"));
        assert!(!passthrough_allowed(&an));
        an.kind = ProviderKind::OpenAiCompatible;
        assert!(passthrough_allowed(&an));
    }

    #[test]
    fn usage_shapes() {
        let r = br#"{"id":"resp_1","object":"response","model":"gpt-4o-2024","output":[],
            "usage":{"input_tokens":11,"output_tokens":7,"total_tokens":18,
                     "input_tokens_details":{"cached_tokens":3}}}"#;
        let f = response_facts(Some(Api::Responses), r);
        assert_eq!(
            f.usage,
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 7,
                cached_tokens: 3
            })
        );
        assert_eq!(f.model.as_deref(), Some("gpt-4o-2024"));
        let e = br#"{"object":"list","data":[{"embedding":[0.1]}],"model":"te3",
            "usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        let f = response_facts(Some(Api::Embeddings), e);
        assert_eq!(
            f.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((5, 0))
        );
        let c = br#"{"choices":[{"text":"hi"}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#;
        let f = response_facts(Some(Api::Completions), c);
        assert_eq!(f.usage.map(|u| u.completion_tokens), Some(1));
        // Passthrough: images carry input/output tokens; no usage is no usage.
        let i = br#"{"data":[],"usage":{"input_tokens":50,"output_tokens":4160}}"#;
        assert_eq!(
            response_facts(None, i).usage.map(|u| u.completion_tokens),
            Some(4160)
        );
        assert_eq!(response_facts(None, br#"{"data":[]}"#).usage, None);
        assert_eq!(response_facts(None, b"\x00binary").usage, None);
    }

    #[test]
    fn prompts_per_endpoint() {
        let b = br#"{"model":"m","input":"hi","instructions":"be brief"}"#;
        assert_eq!(
            prompt_text(Some(Api::Responses), b).as_deref(),
            Some(r#"{"instructions":"be brief","input":"hi"}"#)
        );
        let b = br#"{"model":"m","prompt":["a","b"]}"#;
        assert_eq!(
            prompt_text(Some(Api::Completions), b).as_deref(),
            Some(r#"["a","b"]"#)
        );
        assert_eq!(
            prompt_text(Some(Api::Embeddings), br#"{"input":"x"}"#).as_deref(),
            Some(r#""x""#)
        );
        assert_eq!(prompt_text(None, br#"{"input":"x"}"#), None);
        let r = br#"{"output":[{"type":"reasoning","content":[]},{"type":"message","content":[{"type":"output_text","text":"Hi"},{"type":"refusal","refusal":"no"}]}]}"#;
        assert_eq!(
            completion_text(Some(Api::Responses), r).as_deref(),
            Some("Hi")
        );
    }

    #[test]
    fn responses_stream_events() {
        let d = responses_event(r#"{"type":"response.output_text.delta","delta":"He"}"#);
        assert_eq!(d.text.as_deref(), Some("He"));
        assert!(!d.done);
        let c = responses_event(
            r#"{"type":"response.completed","response":{"model":"m-1","usage":{"input_tokens":3,"output_tokens":2}}}"#,
        );
        assert!(c.done);
        assert_eq!(c.model.as_deref(), Some("m-1"));
        assert_eq!(
            c.usage.map(|u| u.prompt_tokens + u.completion_tokens),
            Some(5)
        );
        assert_eq!(responses_event("not json"), ResponsesEvent::default());
    }
}
