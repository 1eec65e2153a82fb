//! The request flow as plain Rust: entry → auth → selection → provider shaping. The proxy-wasm adapter
//! (`host.rs`) only moves headers and bytes in and out of these functions.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::api::{self, Api};
use crate::body;
use crate::config::{Identity, Model, ProviderKind, ResolvedProvider};
use crate::error::GatewayError;
use crate::providers::{self, Translation};
use crate::select::select;
use crate::translate::{json_string, obj};
use crate::usage;
use serde_json::Value;

/// Request header carrying the Envoy cluster chosen by the filter (read by the route's `cluster_header`).
/// Always removed from client requests first, so callers cannot pick clusters themselves.
pub const CLUSTER_HEADER: &str = "x-llm-gateway-cluster";
/// Response headers telling the client which provider and model served the request.
pub const PROVIDER_RESPONSE_HEADER: &str = "x-llm-gateway-provider";
pub const MODEL_RESPONSE_HEADER: &str = "x-llm-gateway-model";

/// Client headers that never go upstream: gateway credentials, routing hints and any provider
/// credential a client might try to smuggle through.
pub const STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "x-api-key",
    "authorization",
    "x-provider-name",
    "api-key",
    "x-goog-api-key",
    "anthropic-api-key",
    crate::usage::TAGS_HEADER,
    CLUSTER_HEADER,
    // Timeouts are the operator's (route and per-provider), not the client's.
    crate::plan::TOTAL_TIMEOUT_HEADER,
    crate::plan::PER_TRY_TIMEOUT_HEADER,
];

/// Everything the adapter must apply to send a chat request upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub provider: String,
    pub kind: ProviderKind,
    pub is_hosted: bool,
    /// The model name as the client (or the default) named it.
    pub model: String,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub auth: Option<(&'static str, String)>,
    /// Other request headers to set.
    pub extra_headers: Vec<(&'static str, String)>,
    /// The rewritten body, when it differs from what the client sent.
    pub body: Option<Vec<u8>>,
    pub stream: bool,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Streamed request whose usage chunk was asked for by the gateway, not the client: strip it.
    pub strip_usage_chunk: bool,
    /// Size of the request body as the client sent it (for estimates).
    pub request_bytes: usize,
    /// Native provider API: responses must be translated back.
    pub translation: Option<Translation>,
    /// Whether the client asked for the final usage chunk (translated streams).
    pub client_wants_usage: bool,
    /// The OpenAI-style API called; `None`: the passthrough (usage read from any `usage` shape).
    pub api: Option<Api>,
    /// The API the client speaks (what responses must look like to it).
    pub ingress: Ingress,
}

/// The API a client speaks on its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ingress {
    /// OpenAI chat completions.
    #[default]
    Chat,
    /// Anthropic Messages, passed natively to an ANTHROPIC provider (`count_tokens`: not accounted).
    MessagesNative { count_tokens: bool },
    /// Anthropic Messages, sent as chat completions; answers are translated back to Messages.
    MessagesViaChat,
}

/// Decides where a chat-completions request goes and how it must look.
pub fn route_chat(
    id: &Identity,
    provider_header: Option<&str>,
    raw_body: &[u8],
) -> Result<Routed, GatewayError> {
    route_request(id, provider_header, raw_body, Api::Chat)
}

/// Decides where a request of an OpenAI-style `api` goes and how it must look.
pub fn route_request(
    id: &Identity,
    provider_header: Option<&str>,
    raw_body: &[u8],
    api: Api,
) -> Result<Routed, GatewayError> {
    // One parse: into a whole document only when a chat request goes to a native provider (the
    // model is peeked at by a byte scan to know that first; should the guess be wrong, `route_api`
    // parses).
    let native = api == Api::Chat
        && id.providers.iter().any(|p| p.native)
        && select(id, provider_header, body::peek_model(raw_body)).is_ok_and(|s| s.provider.native);
    let (req, doc) = if native {
        let (req, doc) = body::inspect_doc(raw_body)?;
        (req, Some(doc))
    } else {
        (body::inspect(raw_body)?, None)
    };
    let sel = select(id, provider_header, req.model.as_deref())?;
    route_api(sel.provider, sel.model, &req, doc.as_ref(), raw_body, api)
}

/// Parses the body and shapes it for one fallback attempt (one parse, whatever the provider).
pub fn route_attempt(
    provider: &ResolvedProvider,
    model: &Model,
    raw_body: &[u8],
    api: Api,
) -> Result<Routed, GatewayError> {
    if provider.native && api == Api::Chat {
        let (req, doc) = body::inspect_doc(raw_body)?;
        route_api(provider, model, &req, Some(&doc), raw_body, api)
    } else {
        route_api(
            provider,
            model,
            &body::inspect(raw_body)?,
            None,
            raw_body,
            api,
        )
    }
}

/// Shapes the request for one provider and model (the first attempt, or a fallback attempt).
pub fn route_to(
    provider: &ResolvedProvider,
    model: &Model,
    req: &body::ChatRequest,
    doc: Option<&body::Doc>,
    raw_body: &[u8],
) -> Result<Routed, GatewayError> {
    route_api(provider, model, req, doc, raw_body, Api::Chat)
}

/// [`route_to`] for any OpenAI-style API: chat may be translated to a native API; the other APIs
/// need the provider's own OpenAI-style endpoint (a clear 400 otherwise).
pub fn route_api(
    provider: &ResolvedProvider,
    model: &Model,
    req: &body::ChatRequest,
    doc: Option<&body::Doc>,
    raw_body: &[u8],
    api: Api,
) -> Result<Routed, GatewayError> {
    let mut target = if api != Api::Chat {
        providers::api_target(provider, model, api)?
    } else if provider.native {
        let parsed;
        let doc = match doc {
            Some(d) => d,
            None => {
                parsed = body::inspect_doc(raw_body)?.1;
                &parsed
            }
        };
        providers::native_target(provider, model, doc, req.stream)?
    } else {
        providers::chat_target(provider, model)?
    };
    let mut new_body = match (target.native_body.take(), &target.body_model) {
        (Some(native), _) => Some(native),
        (None, Some(m)) => body::with_model(raw_body, req.model.as_deref(), m),
        (None, None) => None,
    };
    let mut strip_usage_chunk = false;
    let translated = target.translation.is_some();
    if req.stream
        && !translated
        && api.stream_usage_option()
        && providers::supports_stream_usage(provider.kind)
    {
        let current = new_body.as_deref().unwrap_or(raw_body);
        let (with_usage, client_asked) =
            usage::ensure_stream_usage_for(current, req.stream_options);
        strip_usage_chunk = !client_asked;
        if with_usage.is_some() {
            new_body = with_usage;
        }
    }
    Ok(Routed {
        provider: provider.name.clone(),
        kind: provider.kind,
        is_hosted: provider.is_hosted,
        model: model.name.clone(),
        cluster: provider.envoy_cluster.clone(),
        authority: provider.base.authority.clone(),
        path: target.path,
        auth: target.auth,
        extra_headers: {
            let mut h = target.extra_headers;
            if let Some(t) = &provider.timeouts {
                h.extend(t.headers());
            }
            h
        },
        body: new_body,
        stream: req.stream,
        upstream_model: target.body_model.unwrap_or_else(|| model.upstream.clone()),
        strip_usage_chunk,
        request_bytes: raw_body.len(),
        translation: target.translation,
        client_wants_usage: translated && req.stream_options.include_usage(),
        ingress: Ingress::Chat,
        api: Some(api),
    })
}

/// Decides where an Anthropic Messages request goes. An ANTHROPIC provider without a fallback chain
/// is reached natively (`model` rewritten, nothing else); every other request becomes a chat request
/// (returned second: the body a fallback chain replays) shaped like chat for the chosen provider.
/// `count_tokens` exists only natively.
pub fn route_messages(
    id: &Identity,
    provider_header: Option<&str>,
    raw_body: &[u8],
    count_tokens: bool,
    anthropic_version: Option<&str>,
) -> Result<(Routed, Option<Vec<u8>>), GatewayError> {
    use crate::translate::anthropic_ingress as ai;
    let req = body::inspect(raw_body)?;
    let sel = select(id, provider_header, req.model.as_deref())?;
    let (provider, model) = (sel.provider, sel.model);
    if provider.kind == ProviderKind::Anthropic && (count_tokens || provider.fallback.is_empty()) {
        let path = if count_tokens {
            "/messages/count_tokens"
        } else {
            "/messages"
        };
        let mut extra_headers = vec![(
            "anthropic-version",
            anthropic_version.unwrap_or(ai::DEFAULT_VERSION).to_string(),
        )];
        if let Some(t) = &provider.timeouts {
            extra_headers.extend(t.headers());
        }
        let routed = Routed {
            provider: provider.name.clone(),
            kind: provider.kind,
            is_hosted: provider.is_hosted,
            model: model.name.clone(),
            cluster: provider.envoy_cluster.clone(),
            authority: provider.base.authority.clone(),
            path: provider.base.join(path),
            auth: Some(("x-api-key", providers::required_key(provider)?.to_string())),
            extra_headers,
            body: body::with_model(raw_body, req.model.as_deref(), &model.upstream),
            stream: req.stream && !count_tokens,
            upstream_model: model.upstream.clone(),
            strip_usage_chunk: false,
            request_bytes: raw_body.len(),
            translation: None,
            client_wants_usage: false,
            ingress: Ingress::MessagesNative { count_tokens },
            api: Some(Api::Chat),
        };
        return Ok((routed, None));
    }
    if count_tokens {
        return Err(GatewayError::CountTokensUnsupported {
            provider: provider.name.clone(),
            kind: provider.kind.as_str(),
        });
    }
    let chat = ai::to_chat(raw_body)?;
    let chat_req = body::inspect(&chat)?;
    let mut routed = route_to(provider, model, &chat_req, None, &chat)?;
    if routed.body.is_none() {
        routed.body = Some(chat.clone());
    }
    routed.request_bytes = raw_body.len();
    routed.ingress = Ingress::MessagesViaChat;
    Ok((routed, Some(chat)))
}

/// Passthrough of another `/openai/v1/*` path (`rest`, query included) to the selected provider:
/// upstream path and auth rewritten; the body goes as sent, except `model` rewritten to the upstream
/// name when a JSON body named one (`json_body`).
pub fn route_passthrough(
    id: &Identity,
    provider_header: Option<&str>,
    rest: &str,
    json_body: Option<&[u8]>,
) -> Result<Routed, GatewayError> {
    let req = match json_body {
        Some(b) => body::inspect(b).unwrap_or_default(),
        None => body::ChatRequest::default(),
    };
    let sel = select(id, provider_header, req.model.as_deref())?;
    let (provider, model) = (sel.provider, sel.model);
    if !api::passthrough_allowed(provider) {
        return Err(GatewayError::EndpointNotSupported {
            provider: provider.name.clone(),
            kind: provider.kind.as_str(),
            endpoint: format!("/v1{}", rest.split('?').next().unwrap_or_default()),
            detail: " in native API mode or without an OpenAI-style API".into(),
        });
    }
    let auth = match provider.kind {
        ProviderKind::Azure => Some(("api-key", providers::required_key(provider)?.to_string())),
        ProviderKind::OpenAiCompatible => provider
            .api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .and_then(providers::bearer),
        _ => providers::bearer(providers::required_key(provider)?),
    };
    let body = match (json_body, req.model.as_deref()) {
        (Some(b), Some(m)) => body::with_model(b, Some(m), &model.upstream),
        _ => None,
    };
    Ok(Routed {
        provider: provider.name.clone(),
        kind: provider.kind,
        is_hosted: provider.is_hosted,
        // Metrics and records name the model the body named, else the API (`audio`, `files`, ...).
        model: req.model.clone().unwrap_or_else(|| passthrough_label(rest)),
        cluster: provider.envoy_cluster.clone(),
        authority: provider.base.authority.clone(),
        path: api::passthrough_path(provider, rest),
        auth,
        extra_headers: provider
            .timeouts
            .as_ref()
            .map(|t| t.headers())
            .unwrap_or_default(),
        body,
        stream: req.stream,
        upstream_model: if req.model.is_some() {
            model.upstream.clone()
        } else {
            String::new()
        },
        strip_usage_chunk: false,
        request_bytes: json_body.map_or(0, <[u8]>::len),
        translation: None,
        client_wants_usage: false,
        api: None,
        ingress: Ingress::Chat,
    })
}

/// The first segment of a passthrough path (`/audio/transcriptions?x` → `audio`).
fn passthrough_label(rest: &str) -> String {
    rest.split(['/', '?'])
        .find(|s| !s.is_empty())
        .unwrap_or("passthrough")
        .to_string()
}

/// Translates a whole native response body back to OpenAI's shape: a chat completion for 2xx, the
/// OpenAI error shape otherwise. Returns the new body, usage, and the status to send.
pub fn translate_response(
    t: Translation,
    status: u32,
    body: &[u8],
    model: &str,
) -> (Vec<u8>, Option<crate::usage::Usage>, u32) {
    use crate::translate::{anthropic, gemini};
    if !(200..300).contains(&status) {
        let out = match t {
            Translation::Anthropic => anthropic::error(status, body),
            Translation::Gemini => gemini::error(status, body),
        };
        return (out, None, status);
    }
    let done = match t {
        Translation::Anthropic => anthropic::response(body, model),
        Translation::Gemini => gemini::response(body, model),
    };
    match done {
        Ok((out, u)) => (out, Some(from_translated(u)), status),
        Err(e) => (e.body().into_bytes(), None, e.status()),
    }
}

/// A stream translator for a native provider stream.
pub fn stream_translator(
    t: Translation,
    model: &str,
    include_usage: bool,
) -> Box<dyn crate::translate::StreamTranslator> {
    use crate::translate::{anthropic::AnthropicStream, gemini::GeminiStream};
    match t {
        Translation::Anthropic => Box::new(AnthropicStream::new(model, include_usage)),
        Translation::Gemini => Box::new(GeminiStream::new(model, include_usage)),
    }
}

/// An OpenAI chat answer (whole) as an Anthropic Messages answer: the message for 2xx, the
/// Anthropic error shape otherwise. Returns the body, usage and status.
pub fn messages_response(
    status: u32,
    body: &[u8],
    model: &str,
) -> (Vec<u8>, Option<crate::usage::Usage>, u32) {
    use crate::translate::anthropic_ingress as ai;
    if !(200..300).contains(&status) {
        return (ai::error_from_chat(status, body), None, status);
    }
    match ai::from_chat(body, model) {
        Ok((out, u)) => (out, Some(from_translated(u)), status),
        Err(e) => (ai::gateway_error(&e), None, e.status()),
    }
}

/// The stream translator of a Messages request served through chat: the provider's native
/// translation first (if any), then chat chunks → Messages events.
pub fn messages_stream(
    t: Option<Translation>,
    model: &str,
) -> Box<dyn crate::translate::StreamTranslator> {
    use crate::translate::anthropic_ingress::{ChatToMessages, Composed};
    match t {
        Some(t) => Box::new(Composed {
            inner: stream_translator(t, model, true),
            outer: ChatToMessages::new(model),
        }),
        None => Box::new(ChatToMessages::new(model)),
    }
}

pub fn from_translated(u: crate::translate::Usage) -> crate::usage::Usage {
    crate::usage::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u.cached_tokens,
    }
}

/// Models the caller may use, as OpenAI's `GET /v1/models` list (each name once, `owned_by` the
/// provider that would serve it: hosted first, see `select`).
pub fn list_models(id: &Identity) -> String {
    let mut seen: Vec<&str> = Vec::new();
    let mut data = Vec::new();
    for p in &id.providers {
        for m in &p.models {
            if !seen.contains(&m.name.as_str()) {
                seen.push(&m.name);
                let owner = crate::select::owner(id, &m.name).map_or(p.name.as_str(), |o| &o.name);
                data.push(model_object(&m.name, owner));
            }
        }
    }
    json_string(&obj(&mut [
        ("object", Value::from("list")),
        ("data", Value::Array(data)),
    ]))
}

/// One model as OpenAI's `GET /v1/models/{model}`.
pub fn get_model(id: &Identity, name: &str) -> Result<String, GatewayError> {
    crate::select::owner(id, name)
        .map(|p| json_string(&model_object(name, &p.name)))
        .ok_or_else(|| GatewayError::ModelNotAllowed {
            model: name.to_string(),
            provider: None,
        })
}

fn model_object(name: &str, owner: &str) -> Value {
    obj(&mut [
        ("id", Value::from(name)),
        ("object", Value::from("model")),
        ("created", Value::from(0)),
        ("owned_by", Value::from(owner)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, hash_key, parse, ProcessEnv};

    fn identity() -> alloc::rc::Rc<Identity> {
        let json = r#"{
          "providers":[
            {"name":"oa","supportedProvider":"OPENAI","apiKey":"sk-oa","models":["gpt-4o","gpt-4o-mini"]},
            {"name":"az","supportedProvider":"AZURE","url":"https://r.openai.azure.com","apiKey":"az",
             "apiVersion":"2024-02-01","models":[{"name":"gpt-4o","upstreamName":"dep1"}]},
            {"name":"local","supportedProvider":"OPENAI_COMPATIBLE","url":"http://127.0.0.1:9/v1","isHosted":true,
             "models":[{"name":"small","upstreamName":"qwen2.5:0.5b"}]}],
          "keys":[{"id":"k","sha256":"H","config":"default"}]}"#
            .replace("\"H\"", &format!("\"{}\"", hash_key("k")));
        let plan = compile(&parse(json.as_bytes()).unwrap(), &ProcessEnv).unwrap();
        plan.identity_for_hash(&hash_key("k")).unwrap()
    }

    #[test]
    fn routes_to_openai_without_rewriting_body() {
        let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
        let r = route_chat(&identity(), None, body).unwrap();
        assert_eq!(r.provider, "oa");
        assert_eq!(r.authority, "api.openai.com");
        assert_eq!(r.cluster, "llm_gateway_dfp_https");
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.auth, Some(("authorization", "Bearer sk-oa".into())));
        assert_eq!(r.body, None);
        assert!(!r.stream);
    }

    #[test]
    fn routes_hosted_and_rewrites_model() {
        let body = br#"{"model":"small","messages":[],"stream":true}"#;
        let r = route_chat(&identity(), None, body).unwrap();
        assert_eq!(r.provider, "local");
        assert_eq!(r.cluster, "llm_gateway_dfp_http");
        assert_eq!(r.authority, "127.0.0.1:9");
        assert_eq!(r.auth, None);
        assert!(r.stream);
        assert!(r.strip_usage_chunk);
        assert_eq!(r.upstream_model, "qwen2.5:0.5b");
        assert_eq!(
            String::from_utf8(r.body.unwrap()).unwrap(),
            r#"{"stream_options":{"include_usage":true},"model":"qwen2.5:0.5b","messages":[],"stream":true}"#
        );
    }

    #[test]
    fn routes_azure_by_header() {
        let r = route_chat(
            &identity(),
            Some("az"),
            br#"{"model":"gpt-4o","messages":[]}"#,
        )
        .unwrap();
        assert_eq!(
            r.path,
            "/openai/deployments/dep1/chat/completions?api-version=2024-02-01"
        );
        assert_eq!(r.auth, Some(("api-key", "az".into())));
        assert_eq!(r.body, None);
    }

    #[test]
    fn no_model_gets_default_inserted() {
        let r = route_chat(&identity(), None, br#"{"messages":[]}"#).unwrap();
        assert_eq!(r.model, "gpt-4o");
        assert_eq!(
            r.body.unwrap(),
            br#"{"model":"gpt-4o","messages":[]}"#.to_vec()
        );
    }

    #[test]
    fn lists_models_once_each() {
        let v: serde_json::Value = serde_json::from_str(&list_models(&identity())).unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["gpt-4o", "gpt-4o-mini", "small"]);
        assert!(get_model(&identity(), "small")
            .unwrap()
            .contains("\"owned_by\":\"local\""));
        assert_eq!(get_model(&identity(), "nope").unwrap_err().status(), 404);
    }

    #[test]
    fn stripped_headers_cover_credentials() {
        for h in [
            "x-api-key",
            "authorization",
            "x-provider-name",
            CLUSTER_HEADER,
        ] {
            assert!(STRIPPED_REQUEST_HEADERS.contains(&h));
        }
    }
}
