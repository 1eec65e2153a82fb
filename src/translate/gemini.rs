//! OpenAI chat completions ⇄ Gemini native `generateContent` / `streamGenerateContent?alt=sse`
//! (Gemini API and Vertex AI, which share the request and response shapes).
//!
//! Paths: [`request`] returns `/models/{model}:generateContent` or
//! `/models/{model}:streamGenerateContent?alt=sse`. The caller joins it to
//! - GEMINI: the base `https://generativelanguage.googleapis.com/v1beta` ([`GEMINI_BASE`]);
//!   auth header `x-goog-api-key: <key>`;
//! - VERTEXAIGEMINI: the regional `https://{loc}-aiplatform.googleapis.com/v1/projects/{p}/locations/{loc}`
//!   followed by [`vertex_prefix`] (`/publishers/google`); auth `Authorization: Bearer <token>`.
//!
//! Request mapping (everything else is dropped: `logprobs`, `logit_bias`, `stream_options`, `user`,
//! `store`, `reasoning_effort`, `parallel_tool_calls`, `metadata`, ...):
//! - `system`/`developer` → `systemInstruction.parts`; `user` → role `user`; `assistant` → role
//!   `model`; `tool` → `functionResponse` parts (name found from the earlier tool call with that id,
//!   `response` = the content when it is a JSON object, else `{"result": content}`); consecutive
//!   same-role contents are merged (parallel tool results → one turn);
//! - images/files: data URLs → `inlineData`, other URLs → `fileData.fileUri` (mime type guessed from
//!   the extension); `input_audio` → `inlineData` `audio/{format}`;
//! - `generationConfig`: `temperature`, `topP`, `maxOutputTokens`, `stopSequences`,
//!   `candidateCount` (`n`), `seed`, non-zero `presencePenalty`/`frequencyPenalty`,
//!   `responseMimeType: application/json` (+ `responseSchema`) for `response_format`;
//! - `tools` → one `functionDeclarations` tool (JSON schemas reduced to Gemini's OpenAPI subset, see
//!   [`schema`]); `tool_choice` → `toolConfig.functionCallingConfig` AUTO/NONE/ANY(+allowed names).
//!
//! Tool call ids: Gemini has none, so ids are generated (`call_{response}_{n}`, at most 40 characters,
//! which OpenAI requires of replayed ids — so a conversation started on Gemini can continue on an
//! OpenAI provider, through fallback too). Gemini's `thoughtSignature` on a function call (often over
//! 1,000 characters) is not put in the id: the id gets a short digest of it (`_s` + 8 hex digits) and
//! the signature is kept in a bounded per-worker store keyed by that id ([`signatures`]). When the
//! client replays the conversation, the signature goes back on that call from the store, or from
//! `extra_content.google.thought_signature` if the client carries Google's own field, or from a
//! legacy `_ts` id; if it was lost (another worker, evicted), Google's documented sentinel
//! `skip_thought_signature_validator` is sent instead, so Gemini 3 accepts the replay. Calls made by
//! other providers replayed to a `gemini-3*` model get the sentinel too.

#[allow(unused_imports)]
use crate::prelude::*;

use super::Put;
use super::{
    bad_upstream, completion, content_parts, excerpt, kind_for_status, max_tokens, message,
    messages, number, openai_error, parse_request, parse_upstream, response_format, role_of, stop,
    tool_call, tool_calls, tool_choice, tools, u64_at, unix_now, ChunkWriter, Media, NativeRequest,
    Part, ResponseFormat, StreamTranslator, ToolChoice, Usage, DONE,
};
use crate::error::GatewayError;
use crate::sse::SseParser;
use serde_json::{Map, Value};

/// Native base of the Gemini API (the provider default for compat mode ends in `/openai`).
pub const GEMINI_BASE: &str = "https://generativelanguage.googleapis.com/v1beta";

/// What the caller puts between a Vertex regional base (`.../v1/projects/P/locations/L`) and
/// [`NativeRequest::path_suffix`].
pub fn vertex_prefix() -> &'static str {
    "/publishers/google"
}

/// The path suffix for `model`.
pub fn path_suffix(upstream_model: &str, stream: bool) -> String {
    let m = ["publishers/google/models/", "google/", "models/"]
        .iter()
        .find_map(|p| upstream_model.strip_prefix(p))
        .unwrap_or(upstream_model);
    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    format!("/models/{}:{method}", crate::providers::encode_segment(m))
}

/// Builds the native request. No extra headers; the caller adds auth.
pub fn request(
    openai_body: &[u8],
    upstream_model: &str,
    stream: bool,
) -> Result<NativeRequest, GatewayError> {
    request_doc(&parse_request(openai_body)?, upstream_model, stream)
}

/// [`request`] from the request already parsed by `body::inspect_doc` (no second parse).
pub fn request_doc(
    req: &serde_json::Map<String, Value>,
    upstream_model: &str,
    stream: bool,
) -> Result<NativeRequest, GatewayError> {
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // tool_call_id → function name, from the assistant messages seen so far.
    let mut names: Vec<(String, String)> = Vec::new();

    for (i, m) in messages(req)?.iter().enumerate() {
        match role_of(m, i)? {
            "system" | "developer" => {
                let text = super::text_only(m.get("content"), "system")?;
                if !text.is_empty() {
                    system.push(j!({"text": text}));
                }
            }
            "user" => {
                let mut parts = Vec::new();
                for p in content_parts(m.get("content"))? {
                    if let Some(p) = part(p) {
                        parts.push(p);
                    }
                }
                push(&mut contents, "user", parts);
            }
            "assistant" => {
                let mut parts = Vec::new();
                for p in content_parts(m.get("content"))? {
                    match p {
                        Part::Text { text: "", .. } => {}
                        Part::Text { text, .. } => parts.push(j!({"text": text})),
                        _ => {
                            return Err(super::invalid_at(
                                i,
                                ": assistant content may only contain text",
                            ))
                        }
                    }
                }
                let carried = carried_signatures(m);
                for (id, name, args) in tool_calls(m, i)? {
                    let mut p = j!({"functionCall": {"name": name, "args": args}});
                    let sig = replay_signature(id, &carried, upstream_model);
                    if let (Some(sig), Some(o)) = (sig, p.as_object_mut()) {
                        o.put("thoughtSignature", j!(sig));
                    }
                    parts.push(p);
                    names.push((id.to_string(), name.to_string()));
                }
                push(&mut contents, "model", parts);
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| super::invalid_at(i, ".tool_call_id is required"))?;
                let name = names
                    .iter()
                    .rev()
                    .find(|(k, _)| k == id)
                    .map(|(_, n)| n.clone())
                    .ok_or_else(|| {
                        super::invalid(format!(
                            "messages[{i}]: tool_call_id '{id}' matches no earlier assistant tool call"
                        ))
                    })?;
                let text = super::text_only(m.get("content"), "tool message")?;
                let response = match super::parse_json(text.as_bytes()) {
                    Ok(v @ Value::Object(_)) => v,
                    Ok(v) => j!({ "result": v }),
                    Err(_) => j!({ "result": text }),
                };
                let p = j!({"functionResponse": {"name": name, "response": response}});
                push(&mut contents, "user", vec![p]);
            }
            other => return Err(super::bad_role(i, other)),
        }
    }
    if contents.is_empty() {
        return Err(super::invalid(
            "there must be at least one user or assistant message with content",
        ));
    }

    let mut body = Map::new();
    let contents: Vec<Value> = contents
        .into_iter()
        .map(|(role, parts)| j!({"role": role, "parts": parts}))
        .collect();
    body.put("contents", Value::Array(contents));
    if !system.is_empty() {
        body.put("systemInstruction", j!({ "parts": system }));
    }

    let mut gc = Map::new();
    if let Some(t) = number(req, "temperature")? {
        gc.put("temperature", j!(t));
    }
    if let Some(p) = number(req, "top_p")? {
        gc.put("topP", j!(p));
    }
    if let Some(n) = max_tokens(req)? {
        gc.put("maxOutputTokens", j!(n));
    }
    let stops = stop(req)?;
    if !stops.is_empty() {
        gc.put("stopSequences", j!(stops));
    }
    match req.get("n") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_u64() {
            Some(1) => {}
            Some(n) if n > 1 => {
                gc.put("candidateCount", j!(n));
            }
            _ => return Err(super::invalid("'n' must be a positive integer")),
        },
    }
    if let Some(s) = req.get("seed").and_then(Value::as_i64) {
        gc.put("seed", j!(s));
    }
    for (from, to) in [
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(p) = number(req, from)?.filter(|p| *p != 0.0) {
            gc.put(to, j!(p));
        }
    }
    match response_format(req)? {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject | ResponseFormat::JsonSchema { schema: None } => {
            gc.put("responseMimeType", j!("application/json"));
        }
        ResponseFormat::JsonSchema { schema: Some(s) } => {
            gc.put("responseMimeType", j!("application/json"));
            gc.put("responseSchema", schema(s));
        }
    }
    if !gc.is_empty() {
        body.put("generationConfig", Value::Object(gc));
    }

    let defs = tools(req)?;
    if !defs.is_empty() {
        let decls: Vec<Value> = defs
            .iter()
            .map(|d| {
                let mut f = Map::new();
                f.put("name", j!(d.name));
                if let Some(desc) = d.description {
                    f.put("description", j!(desc));
                }
                if let Some(p) = d.parameters.map(schema).filter(has_properties) {
                    f.put("parameters", p);
                }
                Value::Object(f)
            })
            .collect();
        body.put("tools", j!([{ "functionDeclarations": decls }]));
        let config = match tool_choice(req)? {
            None => None,
            Some(ToolChoice::Auto) => Some(j!({"mode": "AUTO"})),
            Some(ToolChoice::None) => Some(j!({"mode": "NONE"})),
            Some(ToolChoice::Required) => Some(j!({"mode": "ANY"})),
            Some(ToolChoice::Named(n)) => Some(j!({"mode": "ANY", "allowedFunctionNames": [n]})),
        };
        if let Some(c) = config {
            body.put("toolConfig", j!({ "functionCallingConfig": c }));
        }
    }

    Ok(NativeRequest {
        path_suffix: path_suffix(upstream_model, stream),
        body: super::json_bytes(&Value::Object(body)),
        headers: Vec::new(),
    })
}

fn has_properties(s: &Value) -> bool {
    s.get("properties")
        .and_then(Value::as_object)
        .is_some_and(|p| !p.is_empty())
}

fn push(contents: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    match contents.last_mut() {
        Some((r, p)) if *r == role => p.extend(parts),
        _ => contents.push((role, parts)),
    }
}

fn part(p: Part<'_>) -> Option<Value> {
    let media = |m: Media<'_>| match m {
        Media::Base64 { mime, data } => j!({"inlineData": {"mimeType": mime, "data": data}}),
        Media::Url(url) => j!({"fileData": {"mimeType": guess_mime(url), "fileUri": url}}),
    };
    match p {
        Part::Text { text: "", .. } => None,
        Part::Text { text, .. } => Some(j!({ "text": text })),
        Part::Image(m) | Part::File(m) => Some(media(m)),
        Part::Audio { data, format } => Some(j!({
            "inlineData": {"mimeType": format!("audio/{format}"), "data": data}
        })),
    }
}

fn guess_mime(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext {
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "txt" => "text/plain",
        _ => "image/jpeg",
    }
}

/// Reduces an OpenAI (JSON Schema) schema to the OpenAPI subset Gemini accepts: upper-case `type`
/// (a `["x","null"]` type becomes `x` + `nullable`), `properties`, `items`, `anyOf` (from
/// `anyOf`/`oneOf`), `required`, `description`, string `enum` (and `const`), `nullable`, supported
/// `format`s, numeric/length/item bounds, `pattern`, `propertyOrdering`. Everything else
/// (`additionalProperties`, `$schema`, `$ref`/`$defs`, `strict`, `default`, `title`, ...) is dropped.
pub fn schema(v: &Value) -> Value {
    let Value::Object(m) = v else {
        return v.clone();
    };
    let mut out = Map::new();
    for (k, val) in m {
        match k.as_str() {
            "type" => match val {
                Value::String(s) => {
                    out.put("type", j!(s.to_ascii_uppercase()));
                }
                Value::Array(list) => {
                    let mut nullable = false;
                    for t in list.iter().filter_map(Value::as_str) {
                        if t == "null" {
                            nullable = true;
                        } else if !out.contains_key("type") {
                            out.put("type", j!(t.to_ascii_uppercase()));
                        }
                    }
                    if nullable {
                        out.put("nullable", Value::Bool(true));
                    }
                }
                _ => {}
            },
            "properties" => {
                if let Value::Object(props) = val {
                    let mut p = Map::new();
                    for (k, v) in props {
                        p.insert(k.clone(), schema(v));
                    }
                    if !p.is_empty() {
                        out.put("properties", Value::Object(p));
                    }
                }
            }
            "items" => {
                out.put("items", schema(val));
            }
            "anyOf" | "oneOf" => {
                if let Value::Array(list) = val {
                    out.put("anyOf", Value::Array(list.iter().map(schema).collect()));
                }
            }
            "enum" => {
                if let Value::Array(list) = val {
                    if list.iter().all(Value::is_string) {
                        out.put("enum", val.clone());
                    }
                }
            }
            "const" if val.is_string() => {
                out.put("enum", j!([(val.clone())]));
            }
            "format" => {
                if let Some(f) = val.as_str() {
                    if matches!(
                        f,
                        "enum" | "date-time" | "int32" | "int64" | "float" | "double"
                    ) {
                        out.put("format", val.clone());
                    }
                }
            }
            "description" | "required" | "nullable" | "minItems" | "maxItems" | "minimum"
            | "maximum" | "minLength" | "maxLength" | "pattern" | "propertyOrdering"
            | "minProperties" | "maxProperties" => {
                out.insert(k.clone(), val.clone());
            }
            _ => {}
        }
    }
    Value::Object(out)
}

/// Google's documented value for a function call whose real signature is not available.
pub const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// A short tool call id (≤ 40 characters); a thought signature is remembered under it.
fn make_id(base: &str, n: u64, sig: Option<&str>) -> String {
    let mut id = format!("call_{base}_{n}");
    if let Some(s) = sig.filter(|s| !s.is_empty()) {
        id.push_str(&format!("_s{:08x}", signatures::digest(s)));
        signatures::remember(&id, s);
    }
    id
}

/// Whether `id` is one of ours that was made for a call carrying a signature.
fn signed_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("call_") else {
        return false;
    };
    let Some((_, tail)) = rest.rsplit_once("_s") else {
        return false;
    };
    tail.len() == 8 && tail.chars().all(|c| c.is_ascii_hexdigit())
}

/// `extra_content.google.thought_signature` of an assistant message's tool calls, by id (the field
/// Google's own OpenAI-compatible API uses; some clients round-trip it).
fn carried_signatures(m: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for tc in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let id = tc.get("id").and_then(Value::as_str);
        let sig = tc
            .get("extra_content")
            .and_then(|e| e.get("google"))
            .and_then(|g| g.get("thought_signature"))
            .and_then(Value::as_str);
        if let (Some(id), Some(sig)) = (id, sig.filter(|s| !s.is_empty())) {
            out.push((id.to_string(), sig.to_string()));
        }
    }
    out
}

/// The signature to send back on a replayed call with this id (see the module docs).
fn replay_signature(
    id: &str,
    carried: &[(String, String)],
    upstream_model: &str,
) -> Option<String> {
    if let Some(s) = signatures::recall(id) {
        return Some(s);
    }
    if let Some((_, s)) = carried.iter().find(|(k, _)| k == id) {
        return Some(s.clone());
    }
    if let Some(s) = signature_of(id) {
        return Some(s);
    }
    if signed_id(id) {
        return Some(SKIP_SIGNATURE.to_string());
    }
    let ours = id.starts_with("call_");
    let gemini3 = upstream_model
        .rsplit('/')
        .next()
        .is_some_and(|m| m.starts_with("gemini-3"));
    (!ours && gemini3).then(|| SKIP_SIGNATURE.to_string())
}

/// The thought signature in a legacy id (`_ts` + URL-safe base64, made by earlier versions), back
/// in standard base64.
fn signature_of(id: &str) -> Option<String> {
    let rest = id.strip_prefix("call_")?;
    let (head, sig) = rest.split_once("_ts")?;
    let (base, n) = head.split_once('_')?;
    let ours = base.chars().all(|c| c.is_ascii_alphanumeric())
        && !n.is_empty()
        && n.chars().all(|c| c.is_ascii_digit());
    if !ours || sig.is_empty() {
        return None;
    }
    let mut s: String = sig
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    Some(s)
}

/// A string safe to use inside ids (alphanumerics of the response id).
fn id_base(v: &Value) -> String {
    let s: String = v
        .get("responseId")
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    if s.is_empty() {
        "gemini".to_string()
    } else {
        s
    }
}

/// An OpenAI tool call from a `functionCall` part.
fn call_from(p: &Value, base: &str, n: u64) -> Option<(String, String, String)> {
    let fc = p.get("functionCall")?;
    let name = fc
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let args = fc
        .get("args")
        .map_or_else(|| "{}".to_string(), super::json_string);
    let sig = p.get("thoughtSignature").and_then(Value::as_str);
    let id = match fc
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(given) if sig.is_none() => given.to_string(),
        _ => make_id(base, n, sig),
    };
    Some((id, name, args))
}

fn text_of(p: &Value) -> Option<&str> {
    if p.get("thought").and_then(Value::as_bool) == Some(true) {
        return None; // thought summaries are not part of the answer
    }
    p.get("text").and_then(Value::as_str)
}

fn finish_reason(reason: &str, tool_calls: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        // Every reason in the API references (Gemini API and Vertex AI) that means the answer was
        // blocked or cut by a safety/policy system.
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION"
        | "MODEL_ARMOR"
        | "LANGUAGE" => "content_filter",
        _ if tool_calls => "tool_calls",
        _ => "stop",
    }
}

fn usage_from(u: &Value) -> Usage {
    Usage {
        prompt_tokens: u64_at(u, "promptTokenCount")
            .saturating_add(u64_at(u, "toolUsePromptTokenCount")),
        completion_tokens: u64_at(u, "candidatesTokenCount")
            .saturating_add(u64_at(u, "thoughtsTokenCount")),
        cached_tokens: u64_at(u, "cachedContentTokenCount"),
        cache_creation_tokens: 0,
    }
}

fn blocked(v: &Value) -> bool {
    v.get("promptFeedback")
        .and_then(|f| f.get("blockReason"))
        .is_some()
}

/// Translates a non-streamed `generateContent` response into a `chat.completion`.
pub fn response(native: &[u8], model: &str) -> Result<(Vec<u8>, Usage), GatewayError> {
    response_at(native, model, unix_now())
}

/// [`response`] with an explicit `created` timestamp.
pub fn response_at(
    native: &[u8],
    model: &str,
    created: u64,
) -> Result<(Vec<u8>, Usage), GatewayError> {
    let v = parse_upstream(native)?;
    if let Some(e) = v.get("error") {
        let msg = e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(bad_upstream(format!(
            "the provider reported an error: {msg}"
        )));
    }
    if !v.is_object() {
        return Err(bad_upstream(
            "the generateContent response is not a JSON object",
        ));
    }
    let base = id_base(&v);
    let mut choices = Vec::new();
    let mut n = 0u64;
    let empty = Vec::new();
    let candidates = v
        .get("candidates")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (pos, c) in candidates.iter().enumerate() {
        let mut text = String::new();
        let mut has_text = false;
        let mut calls = Vec::new();
        let parts = c
            .get("content")
            .and_then(|c| c.get("parts"))
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        for p in parts {
            if let Some(t) = text_of(p) {
                has_text = true;
                text.push_str(t);
            } else if let Some((id, name, args)) = call_from(p, &base, n) {
                n += 1;
                calls.push(tool_call(&id, &name, args));
            }
        }
        let reason = c
            .get("finishReason")
            .and_then(Value::as_str)
            .unwrap_or("STOP");
        let finish = finish_reason(reason, !calls.is_empty());
        choices.push(j!({
            "index": c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64),
            "message": message(has_text.then_some(text), calls),
            "logprobs": null,
            "finish_reason": finish,
        }));
    }
    if choices.is_empty() {
        let finish = if blocked(&v) {
            "content_filter"
        } else {
            "stop"
        };
        choices.push(j!({
            "index": 0,
            "message": message(None, Vec::new()),
            "logprobs": null,
            "finish_reason": finish,
        }));
    }
    let usage = v.get("usageMetadata").map(usage_from).unwrap_or_default();
    let id = format!("chatcmpl-{base}");
    Ok((completion(&id, created, model, choices, &usage), usage))
}

/// OpenAI error `type` for a Google RPC status.
fn error_kind(status_name: &str, status: u32) -> &'static str {
    match status_name {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => "invalid_request_error",
        "UNAUTHENTICATED" => "authentication_error",
        "PERMISSION_DENIED" => "permission_error",
        "NOT_FOUND" => "not_found_error",
        "RESOURCE_EXHAUSTED" => "rate_limit_error",
        "INTERNAL" | "UNAVAILABLE" | "DEADLINE_EXCEEDED" | "UNKNOWN" => "server_error",
        _ => kind_for_status(status),
    }
}

fn error_parts(v: &Value) -> Option<(&str, &str)> {
    let e = match v {
        Value::Array(a) => a.first()?.get("error")?,
        _ => v.get("error")?,
    };
    let msg = e.get("message").and_then(Value::as_str)?;
    let status = e.get("status").and_then(Value::as_str).unwrap_or("");
    Some((msg, status))
}

/// Translates a Google error body (`{"error":{"code","message","status"}}`, or a one-element array
/// of it) into the OpenAI error JSON. The caller keeps `status`.
pub fn error(status: u32, body: &[u8]) -> Vec<u8> {
    let v = super::parse_json(body).ok();
    match v.as_ref().and_then(error_parts) {
        Some((msg, st)) => {
            let code = if st.is_empty() {
                "upstream_error".to_string()
            } else {
                st.to_ascii_lowercase()
            };
            openai_error(msg, error_kind(st, status), &code)
        }
        None => {
            let text = excerpt(body);
            let m = if text.is_empty() {
                format!("Gemini returned HTTP {status}")
            } else {
                format!("Gemini returned HTTP {status}: {text}")
            };
            openai_error(&m, kind_for_status(status), "upstream_error")
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Candidate {
    index: u64,
    tools: u64,
    finished: bool,
}

/// Gemini `streamGenerateContent?alt=sse` → OpenAI `chat.completion.chunk` SSE. Gemini sends whole
/// function calls in one event, so each tool call is one chunk carrying id, name and arguments.
#[derive(Debug)]
pub struct GeminiStream {
    parser: SseParser,
    w: ChunkWriter,
    base: Option<String>,
    include_usage: bool,
    usage: Option<Usage>,
    cands: Vec<Candidate>,
    /// Tool calls numbered across candidates, for unique ids.
    calls: u64,
    done: bool,
    failed: bool,
}

impl GeminiStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        GeminiStream {
            parser: SseParser::new(),
            w: ChunkWriter {
                id: "chatcmpl-gemini".into(),
                created: unix_now(),
                model: model.to_string(),
            },
            base: None,
            include_usage,
            usage: None,
            cands: Vec::new(),
            calls: 0,
            done: false,
            failed: false,
        }
    }

    /// Fixes the `created` timestamp of every chunk.
    pub fn with_created(mut self, created: u64) -> Self {
        self.w.created = created;
        self
    }

    /// The state of candidate `index`, announcing it (role chunk) the first time.
    fn cand(&mut self, out: &mut Vec<u8>, index: u64) -> usize {
        if let Some(pos) = self.cands.iter().position(|c| c.index == index) {
            return pos;
        }
        self.w
            .delta(out, index, j!({"role": "assistant", "content": ""}), None);
        self.cands.push(Candidate {
            index,
            ..Candidate::default()
        });
        self.cands.len() - 1
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if !self.failed && self.include_usage {
            self.w.usage(out, &self.usage.unwrap_or_default());
        }
        out.extend_from_slice(DONE);
        self.done = true;
    }

    fn fail(&mut self, out: &mut Vec<u8>, message: &str, kind: &str, code: &str) {
        ChunkWriter::error(out, message, kind, code);
        self.failed = true;
        self.end(out);
    }

    fn handle(&mut self, out: &mut Vec<u8>, data: &str) {
        if self.done {
            return;
        }
        let Ok(v) = super::parse_json(data.as_bytes()) else {
            return;
        };
        if let Some((msg, st)) = error_parts(&v) {
            let code = if st.is_empty() {
                "upstream_error".to_string()
            } else {
                st.to_ascii_lowercase()
            };
            let msg = msg.to_string();
            self.fail(out, &msg, error_kind(st, 500), &code);
            return;
        }
        let base = match &self.base {
            Some(b) => b.clone(),
            None => {
                let b = id_base(&v);
                self.w.id = format!("chatcmpl-{b}");
                self.base = Some(b.clone());
                b
            }
        };
        if let Some(u) = v.get("usageMetadata") {
            self.usage = Some(usage_from(u));
        }
        let empty = Vec::new();
        let candidates = v
            .get("candidates")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        for (pos, c) in candidates.iter().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let slot = self.cand(out, index);
            let parts = c
                .get("content")
                .and_then(|c| c.get("parts"))
                .and_then(Value::as_array)
                .unwrap_or(&empty);
            for p in parts {
                if let Some(t) = text_of(p) {
                    if !t.is_empty() {
                        self.w.delta(out, index, j!({"content": t}), None);
                    }
                } else if let Some((id, name, args)) = call_from(p, &base, self.calls) {
                    self.calls += 1;
                    let Some(cand) = self.cands.get_mut(slot) else {
                        continue;
                    };
                    let n = cand.tools;
                    cand.tools += 1;
                    let tc = j!([{"index": n, "id": id, "type": "function",
                                     "function": {"name": name, "arguments": args}}]);
                    self.w.delta(out, index, j!({"tool_calls": tc}), None);
                }
            }
            if let Some(reason) = c.get("finishReason").and_then(Value::as_str) {
                if let Some(cand) = self.cands.get_mut(slot) {
                    if !cand.finished {
                        cand.finished = true;
                        let f = finish_reason(reason, cand.tools > 0);
                        self.w.delta(out, index, j!({}), Some(f));
                    }
                }
            }
        }
        if candidates.is_empty() && blocked(&v) {
            let slot = self.cand(out, 0);
            if let Some(cand) = self.cands.get_mut(slot) {
                if !cand.finished {
                    cand.finished = true;
                    self.w.delta(out, 0, j!({}), Some("content_filter"));
                }
            }
        }
    }
}

impl StreamTranslator for GeminiStream {
    fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in self.parser.push(bytes) {
            self.handle(&mut out, &e.data);
        }
        out
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in self.parser.finish() {
            self.handle(&mut out, &e.data);
        }
        if !self.done {
            if self.cands.iter().any(|c| c.finished) {
                for c in self.cands.iter_mut().filter(|c| !c.finished) {
                    c.finished = true;
                    self.w.delta(&mut out, c.index, j!({}), Some("stop"));
                }
                self.end(&mut out);
            } else {
                let (message, kind, code) = super::STREAM_INCOMPLETE;
                self.fail(&mut out, message, kind, code);
            }
        }
        out
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn truncated(&self) -> bool {
        self.parser.overflowed()
    }

    fn failed(&self) -> bool {
        self.failed
    }
}

/// Thought signatures of the calls this worker has answered, by tool call id. Bounded (entries and
/// bytes, oldest dropped first): a replay that misses gets [`SKIP_SIGNATURE`].
pub mod signatures {
    use crate::prelude::*;
    use alloc::collections::VecDeque;
    use core::cell::RefCell;

    /// Most signatures kept per worker.
    pub const MAX_ENTRIES: usize = 4096;
    /// Most signature bytes kept per worker.
    pub const MAX_BYTES: usize = 8 * 1024 * 1024;
    /// Longest signature kept (longer ones are not remembered).
    pub const MAX_SIGNATURE: usize = 64 * 1024;

    struct Store {
        entries: VecDeque<(String, String)>,
        bytes: usize,
    }

    crate::sys::vm_local! {
        static STORE: RefCell<Store> = RefCell::new(Store { entries: VecDeque::new(), bytes: 0 });
    }

    /// FNV-1a, 32 bits: only makes ids of different signatures differ.
    pub fn digest(s: &str) -> u32 {
        s.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
    }

    pub fn remember(id: &str, sig: &str) {
        if sig.len() > MAX_SIGNATURE {
            return;
        }
        STORE.with(|s| {
            let mut s = s.borrow_mut();
            if s.entries.iter().any(|(k, _)| k == id) {
                return;
            }
            s.bytes = s.bytes.saturating_add(id.len() + sig.len());
            s.entries.push_back((id.to_string(), sig.to_string()));
            while s.entries.len() > MAX_ENTRIES || s.bytes > MAX_BYTES {
                match s.entries.pop_front() {
                    Some((k, v)) => s.bytes = s.bytes.saturating_sub(k.len() + v.len()),
                    None => break,
                }
            }
        });
    }

    pub fn recall(id: &str) -> Option<String> {
        STORE.with(|s| {
            s.borrow()
                .entries
                .iter()
                .rev()
                .find(|(k, _)| k == id)
                .map(|(_, v)| v.clone())
        })
    }

    /// Forgets everything (tests; a worker restart does the same).
    pub fn clear() {
        STORE.with(|s| {
            let mut s = s.borrow_mut();
            s.entries.clear();
            s.bytes = 0;
        });
    }

    /// (entries, bytes) held now.
    pub fn held() -> (usize, usize) {
        STORE.with(|s| {
            let s = s.borrow();
            (s.entries.len(), s.bytes)
        })
    }
}
