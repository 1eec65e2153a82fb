//! The OpenAI-style APIs the gateway routes besides chat: Responses, embeddings and legacy
//! completions, plus the opt-in passthrough of the other `/openai/v1/*` paths. Which provider type has
//! which API, and how each endpoint reports usage (its own `usage` shape, and the Responses stream's
//! `response.completed` event). Pure: the exchange asks, this module answers.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::error::GatewayError;
use crate::plan::{ProviderKind, ResolvedProvider};
use crate::usage::{ResponseFacts, Usage};
use serde_json::{Map, Value};

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

// The documents below are read by hand from a `Value` (see `crate::read` for why the filter has no
// derived deserializers): a field of the wrong type makes the whole document unreadable, as the
// derives did; `null` is an absent field.

/// A field under its name or its alias (both at once: unreadable); `null` reads as absent.
fn field<'a>(o: &'a Map<String, Value>, name: &str, alias: &str) -> Result<Option<&'a Value>, ()> {
    match (o.get(name), o.get(alias)) {
        (Some(_), Some(_)) => Err(()),
        (a, b) => Ok(a.or(b).filter(|v| !v.is_null())),
    }
}

fn count(v: Option<&Value>) -> Result<Option<u64>, ()> {
    v.map(|n| n.as_u64().ok_or(())).transpose()
}

/// Every usage shape an OpenAI-style endpoint reports: chat/completions/embeddings
/// (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`) and Responses,
/// images and audio (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`).
/// `Ok(None)`: no token count at all.
fn any_usage(v: &Value) -> Result<Option<Usage>, ()> {
    let o = v.as_object().ok_or(())?;
    let prompt = count(field(o, "prompt_tokens", "input_tokens")?)?;
    let completion = count(field(o, "completion_tokens", "output_tokens")?)?;
    let cached = match field(o, "prompt_tokens_details", "input_tokens_details")? {
        None => None,
        Some(d) => count(
            d.as_object()
                .ok_or(())?
                .get("cached_tokens")
                .filter(|v| !v.is_null()),
        )?,
    };
    if prompt.is_none() && completion.is_none() {
        return Ok(None);
    }
    Ok(Some(Usage {
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: completion.unwrap_or(0),
        cached_tokens: cached.unwrap_or(0),
    }))
}

/// `model` and usage of a response object's `model` and `usage` values.
fn model_and_usage(
    model: Option<&Value>,
    usage: Option<&Value>,
) -> Result<(Option<String>, Option<Usage>), ()> {
    let model = match model.filter(|v| !v.is_null()) {
        None => None,
        Some(m) => Some(m.as_str().ok_or(())?.to_string()),
    };
    let usage = match usage.filter(|v| !v.is_null()) {
        None => None,
        Some(u) => any_usage(u)?,
    };
    Ok((model, usage))
}

/// A response object (Responses API, or any JSON body with a top-level `usage`): its `model` and
/// usage.
fn any_response(v: &Value) -> Result<(Option<String>, Option<Usage>), ()> {
    let o = v.as_object().ok_or(())?;
    model_and_usage(o.get("model"), o.get("usage"))
}

/// A whole response body's `model` and usage: the body is validated in one pass that builds nothing
/// (embeddings answers are mostly long arrays of numbers) and only those two values are parsed.
fn response_model_and_usage(body: &[u8]) -> Result<(Option<String>, Option<Usage>), ()> {
    let spans = crate::json::validate_top(body, ["model", "usage"]).map_err(|_| ())?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(());
    }
    let [model, usage] = spans.map(|span| {
        span.and_then(|(start, end)| crate::translate::parse_json(body.get(start..end)?).ok())
    });
    model_and_usage(model.as_ref(), usage.as_ref())
}

/// Usage and model from a whole (non-streamed) JSON response of `api`; `None` api: passthrough.
pub fn response_facts(api: Option<Api>, body: &[u8]) -> ResponseFacts {
    match api {
        Some(Api::Chat | Api::Completions) => crate::usage::from_json_response(body),
        _ => match response_model_and_usage(body) {
            Ok((model, usage)) => ResponseFacts {
                usage,
                model,
                completion_chars: 0,
            },
            Err(_) => ResponseFacts::default(),
        },
    }
}

/// The request's prompt as JSON text, for prompt storage: chat `messages`, Responses `input` (with
/// `instructions`), embeddings `input`, completions `prompt`; nothing for the passthrough. The
/// fields' text as the client wrote it (byte spans of the validated body).
pub fn prompt_text(api: Option<Api>, body: &[u8]) -> Option<String> {
    let api = api?;
    if api == Api::Chat {
        return crate::usage::prompt_text(body);
    }
    let spans = crate::json::validate_top(body, ["prompt", "instructions", "input"]).ok()?;
    let raw = |k: usize| {
        let (start, end) = spans.get(k).copied().flatten()?;
        core::str::from_utf8(body.get(start..end)?)
            .ok()
            .filter(|t| *t != "null")
    };
    let (prompt, instructions, input) = (raw(0), raw(1), raw(2));
    let text = match api {
        Api::Completions => prompt?.to_string(),
        Api::Responses => match (instructions, input) {
            (Some(i), Some(x)) => format!("{{\"instructions\":{i},\"input\":{x}}}"),
            (None, Some(x)) => x.to_string(),
            (Some(i), None) => i.to_string(),
            (None, None) => return None,
        },
        _ => input?.to_string(),
    };
    Some(crate::usage::clip(&text, crate::usage::MAX_STORED_TEXT))
}

/// The text of a Responses API response: its `output_text` parts.
fn output_text(v: &Value) -> Option<String> {
    fn items<'a>(v: &'a Value, key: &str) -> Option<&'a [Value]> {
        match v.as_object()?.get(key) {
            None => Some(&[]),
            Some(Value::Array(a)) => Some(a),
            Some(_) => None,
        }
    }
    let mut text = String::new();
    for item in items(v, "output")? {
        for part in items(item, "content")? {
            let p = part.as_object()?;
            let kind = match p.get("type") {
                None => "",
                Some(k) => k.as_str()?,
            };
            let t = match p.get("text").filter(|t| !t.is_null()) {
                None => None,
                Some(t) => Some(t.as_str()?),
            };
            if let (Some(t), "output_text") = (t, kind) {
                text.push_str(t);
            }
        }
    }
    Some(text)
}

/// The answer's text of a whole response, for prompt storage (Responses: its `output_text` parts).
pub fn completion_text(api: Option<Api>, body: &[u8]) -> Option<String> {
    match api? {
        Api::Chat | Api::Completions => crate::usage::completion_text(body),
        Api::Embeddings => None,
        Api::Responses => output_text(&crate::translate::parse_json(body).ok()?),
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

/// `type`, `delta` and `response` of a Responses stream event.
type EventFields = (
    Option<String>,
    Option<String>,
    Option<(Option<String>, Option<Usage>)>,
);

fn event_fields(v: &Value) -> Result<EventFields, ()> {
    let o = v.as_object().ok_or(())?;
    let text = |k: &str| -> Result<Option<String>, ()> {
        match o.get(k).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(t) => Ok(Some(t.as_str().ok_or(())?.to_string())),
        }
    };
    let response = match o.get("response").filter(|v| !v.is_null()) {
        None => None,
        Some(r) => Some(any_response(r)?),
    };
    Ok((text("type")?, text("delta")?, response))
}

/// Reads one Responses API stream event (`data:` JSON).
pub fn responses_event(data: &str) -> ResponsesEvent {
    let Ok((kind, delta, response)) = crate::translate::parse_json(data.as_bytes())
        .map_err(|_| ())
        .and_then(|v| event_fields(&v))
    else {
        return ResponsesEvent::default();
    };
    let mut out = ResponsesEvent::default();
    match kind.as_deref().unwrap_or_default() {
        "response.output_text.delta" => out.text = delta,
        "response.completed" | "response.incomplete" | "response.failed" => {
            out.done = true;
            if let Some((model, usage)) = response {
                out.usage = usage;
                out.model = model;
            }
        }
        "response.created" => out.model = response.and_then(|(model, _)| model),
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
        // Unreadable documents tell nothing (as the derive did): wrong types, duplicates, non-objects.
        for bad in [
            &br#"{"model":5,"usage":{"prompt_tokens":1}}"#[..],
            br#"{"usage":{"prompt_tokens":1,"input_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":-1}}"#,
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":1}}"#,
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            br#"{"usage":{"prompt_tokens":1}"#,
        ] {
            assert_eq!(response_facts(None, bad), ResponseFacts::default());
        }
        let nested = br#"{"data":[{"usage":{"prompt_tokens":9}}],"usage":{"input_tokens":1}}"#;
        assert_eq!(
            response_facts(None, nested).usage.map(|u| u.prompt_tokens),
            Some(1)
        );
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
