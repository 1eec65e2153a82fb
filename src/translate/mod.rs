//! Translation between OpenAI chat completions and the providers' native APIs (Anthropic Messages,
//! Gemini `generateContent`). Pure functions and stream state machines over bytes: no host calls.
//!
//! Each provider module has the same four entry points:
//! - `request(openai_body, upstream_model, ..)` → [`NativeRequest`] (path suffix, body, extra headers);
//! - `response(native_body, model)` → OpenAI `chat.completion` JSON and its [`Usage`];
//! - a [`StreamTranslator`] turning the provider's SSE stream into OpenAI `chat.completion.chunk` SSE;
//! - `error(status, native_body)` → the OpenAI error JSON (the caller keeps the upstream status).

#[allow(unused_imports)]
use crate::prelude::*;

use crate::error::GatewayError;
use serde_json::{Map, Value};

/// A small `json!`: values convert with `Value::from` (no `Serialize` monomorphizations, which keeps
/// the wasm small). Non-trivial value expressions must be parenthesized.
macro_rules! j {
    (@obj [$($done:tt)*]) => { $crate::translate::obj(&mut [$($done)*]) };
    (@obj [$($done:tt)*] $k:literal : null $(, $($rest:tt)*)?) => {
        j!(@obj [$($done)* ($k, serde_json::Value::Null),] $($($rest)*)?)
    };
    (@obj [$($done:tt)*] $k:literal : {$($v:tt)*} $(, $($rest:tt)*)?) => {
        j!(@obj [$($done)* ($k, j!({$($v)*})),] $($($rest)*)?)
    };
    (@obj [$($done:tt)*] $k:literal : [$($v:tt)*] $(, $($rest:tt)*)?) => {
        j!(@obj [$($done)* ($k, j!([$($v)*])),] $($($rest)*)?)
    };
    (@obj [$($done:tt)*] $k:literal : $v:expr $(, $($rest:tt)*)?) => {
        j!(@obj [$($done)* ($k, serde_json::Value::from($v)),] $($($rest)*)?)
    };
    ({ $($t:tt)* }) => { j!(@obj [] $($t)*) };
    ([ $($v:tt),* $(,)? ]) => { serde_json::Value::Array(vec![$(j!($v)),*]) };
    (null) => { serde_json::Value::Null };
    ($e:expr) => { serde_json::Value::from($e) };
}

/// Builds a JSON object from key/value pairs (taken out of the slice: one function for every
/// object literal, no `Vec` per literal).
pub(crate) fn obj(pairs: &mut [(&str, Value)]) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        m.put(k, core::mem::take(v));
    }
    Value::Object(m)
}

/// `Map::insert` under a borrowed key: one function for every call site instead of the key's
/// allocation and the replaced value's drop inlined at each.
pub(crate) trait Put {
    fn put(&mut self, key: &str, value: Value);
}

impl Put for Map<String, Value> {
    #[inline(never)]
    fn put(&mut self, key: &str, value: Value) {
        self.insert(key.to_string(), value);
    }
}

pub mod anthropic;
pub mod anthropic_ingress;
pub mod gemini;

#[cfg(test)]
mod tests;

/// The upstream request in the provider's native format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeRequest {
    /// Appended to the provider's base path (see each module for the exact form).
    pub path_suffix: String,
    /// The JSON body to send.
    pub body: Vec<u8>,
    /// Extra request headers the provider needs (besides auth and `content-type: application/json`).
    pub headers: Vec<(&'static str, String)>,
}

/// Token usage of one completion, in OpenAI's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's cache (part of `prompt_tokens`).
    pub cached_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic; part of `prompt_tokens`).
    pub cache_creation_tokens: u64,
}

/// Stateful stream translator: provider SSE bytes in (any chunking), OpenAI `chat.completion.chunk`
/// SSE bytes out. Output is produced as input arrives (nothing is buffered beyond one SSE event).
pub trait StreamTranslator {
    /// Feeds the next bytes of the upstream body; returns the OpenAI SSE bytes they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<u8>;
    /// End of the upstream body: returns the last OpenAI SSE bytes (always ending in `data: [DONE]`).
    fn finish(&mut self) -> Vec<u8>;
    /// Usage seen so far (final once the stream is finished); `None` if the provider sent none.
    fn usage(&self) -> Option<Usage>;
    /// The provider reported an error inside the stream (or the stream ended early); the output
    /// then carries an OpenAI-style `data: {"error":{..}}` event.
    fn failed(&self) -> bool;
    /// An event larger than [`crate::sse::MAX_EVENT_BYTES`] was skipped (not translated).
    fn truncated(&self) -> bool {
        false
    }
    /// The output is the input unchanged (a usage tap): `push`/`finish` return nothing and the
    /// caller leaves the bytes as they are.
    fn passthrough(&self) -> bool {
        false
    }
}

/// Seconds since the Unix epoch (WASI clock in the filter); 0 if the clock is unavailable.
pub fn unix_now() -> u64 {
    crate::sys::unix_now()
}

// ---------------------------------------------------------------------------------------------
// Reading the OpenAI request.
// ---------------------------------------------------------------------------------------------

#[cold]
#[inline(never)]
pub(crate) fn invalid(reason: impl Into<String>) -> GatewayError {
    GatewayError::InvalidBody {
        reason: reason.into(),
    }
}

/// The error event a translated stream ends with when the provider's stream stops before finishing:
/// message, type, code.
pub(crate) const STREAM_INCOMPLETE: (&str, &str, &str) = (
    "The provider's stream ended before the response was complete.",
    "server_error",
    "upstream_stream_incomplete",
);

/// `messages[i]<what>`: one formatting site for every per-message error.
#[cold]
#[inline(never)]
pub(crate) fn invalid_at(i: usize, what: &str) -> GatewayError {
    invalid(format!("messages[{i}]{what}"))
}

#[cold]
#[inline(never)]
pub(crate) fn bad_role(i: usize, role: &str) -> GatewayError {
    invalid(format!(
        "messages[{i}]: role '{role}' is not supported (use system, developer, user, assistant or tool)"
    ))
}

/// A value's JSON text ([`crate::json::write`]: straight into bytes, about half the instructions of
/// `Value::to_string`, which goes through `Display`) as a `String`.
pub(crate) fn json_string(v: &Value) -> String {
    String::from_utf8(json_bytes(v)).unwrap_or_default()
}

/// A value's JSON text ([`crate::json::write`]) in a new buffer.
pub(crate) fn json_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    crate::json::write(&mut out, v);
    out
}

/// Parses JSON into a `Value` (the filter's own reader, `crate::json`).
pub(crate) fn parse_json(b: &[u8]) -> Result<Value, crate::json::Error> {
    crate::json::parse(b)
}

pub(crate) fn bad_upstream(reason: impl Into<String>) -> GatewayError {
    GatewayError::BadUpstreamResponse {
        reason: reason.into(),
    }
}

/// Parses the OpenAI body as a JSON object.
#[inline(never)]
pub(crate) fn parse_request(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match parse_json(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("the body must be a JSON object")),
        Err(e) => Err(invalid(format!("not valid JSON ({e})"))),
    }
}

/// The `messages` array (required, non-empty).
#[inline(never)]
pub(crate) fn messages(req: &Map<String, Value>) -> Result<&Vec<Value>, GatewayError> {
    match req.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => Ok(a),
        Some(Value::Array(_)) => Err(invalid("'messages' must not be empty")),
        Some(_) => Err(invalid("'messages' must be an array")),
        None => Err(invalid("'messages' is required")),
    }
}

#[inline(never)]
pub(crate) fn role_of(m: &Value, i: usize) -> Result<&str, GatewayError> {
    m.get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_at(i, ".role is missing or not a string"))
}

/// Where an image or file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Media<'a> {
    /// `data:<mime>;base64,<data>`.
    Base64 { mime: &'a str, data: &'a str },
    /// Any other URL (http(s), gs://, provider file URIs).
    Url(&'a str),
}

/// One part of an OpenAI message's content.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Part<'a> {
    Text {
        text: &'a str,
        cache_control: Option<&'a Value>,
    },
    Image(Media<'a>),
    /// `{"type":"file","file":{"file_data":"data:..."}}` (e.g. a PDF).
    File(Media<'a>),
    /// `{"type":"input_audio","input_audio":{"data","format"}}`.
    Audio {
        data: &'a str,
        format: &'a str,
    },
}

/// Splits a `data:` URL; anything else is a plain URL.
#[inline(never)]
pub(crate) fn media(url: &str) -> Result<Media<'_>, GatewayError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Ok(Media::Url(url));
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| invalid("a data: URL has no ',' separator"))?;
    let mime = meta
        .strip_suffix(";base64")
        .ok_or_else(|| invalid("only base64 data: URLs are supported"))?;
    if mime.is_empty() {
        return Err(invalid("a data: URL has no media type"));
    }
    Ok(Media::Base64 { mime, data })
}

/// The parts of a message's `content` (a string, an array of parts, or null).
#[inline(never)]
pub(crate) fn content_parts(content: Option<&Value>) -> Result<Vec<Part<'_>>, GatewayError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![Part::Text {
            text: s,
            cache_control: None,
        }]),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                out.push(part(p)?);
            }
            Ok(out)
        }
        Some(_) => Err(invalid(
            "message content must be a string or an array of parts",
        )),
    }
}

fn str_at(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
}

fn part(p: &Value) -> Result<Part<'_>, GatewayError> {
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => Ok(Part::Text {
            text: str_at(p.get("text")).ok_or_else(|| invalid("a text part has no 'text'"))?,
            cache_control: p.get("cache_control"),
        }),
        "image_url" => {
            let v = p.get("image_url");
            let url = str_at(v)
                .or_else(|| str_at(v.and_then(|i| i.get("url"))))
                .ok_or_else(|| invalid("an image_url part has no url"))?;
            Ok(Part::Image(media(url)?))
        }
        "file" => {
            let f = p.get("file");
            if let Some(d) = str_at(f.and_then(|f| f.get("file_data"))) {
                return Ok(Part::File(media(d)?));
            }
            Err(invalid(
                "file parts need 'file_data' (a data: URL); uploaded file ids are not supported for this provider",
            ))
        }
        "input_audio" => {
            let a = p.get("input_audio");
            Ok(Part::Audio {
                data: str_at(a.and_then(|a| a.get("data")))
                    .ok_or_else(|| invalid("an input_audio part has no data"))?,
                format: str_at(a.and_then(|a| a.get("format"))).unwrap_or("wav"),
            })
        }
        other => Err(invalid(format!("unsupported content part type '{other}'"))),
    }
}

/// The text of a content that may only hold text (system and tool messages), parts joined by "\n".
#[inline(never)]
pub(crate) fn text_only(content: Option<&Value>, what: &str) -> Result<String, GatewayError> {
    let mut out = String::new();
    for (n, p) in content_parts(content)?.into_iter().enumerate() {
        match p {
            Part::Text { text, .. } => {
                if n > 0 {
                    out.push('\n');
                }
                out.push_str(text);
            }
            _ => return Err(invalid(format!("{what} content may only contain text"))),
        }
    }
    Ok(out)
}

/// `max_completion_tokens`, else `max_tokens`.
#[inline(never)]
pub(crate) fn max_tokens(req: &Map<String, Value>) -> Result<Option<u64>, GatewayError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match req.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(invalid(format!("'{key}' must be a positive integer"))),
                }
            }
        }
    }
    Ok(None)
}

/// A number field, if present.
#[inline(never)]
pub(crate) fn number(req: &Map<String, Value>, key: &str) -> Result<Option<f64>, GatewayError> {
    match req.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(format!("'{key}' must be a number"))),
    }
}

/// `stop`: a string or an array of strings.
#[inline(never)]
pub(crate) fn stop(req: &Map<String, Value>) -> Result<Vec<String>, GatewayError> {
    match req.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for s in a {
                out.push(
                    s.as_str()
                        .ok_or_else(|| invalid("'stop' must hold strings"))?
                        .to_string(),
                );
            }
            Ok(out)
        }
        Some(_) => Err(invalid("'stop' must be a string or an array of strings")),
    }
}

/// A function tool the client declared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolDef<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub parameters: Option<&'a Value>,
}

#[inline(never)]
pub(crate) fn tools(req: &Map<String, Value>) -> Result<Vec<ToolDef<'_>>, GatewayError> {
    let list = match req.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("'tools' must be an array")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
        if kind != "function" {
            return Err(invalid(format!(
                "tools[{i}]: only 'function' tools are supported for this provider"
            )));
        }
        let f = t
            .get("function")
            .ok_or_else(|| invalid(format!("tools[{i}].function is required")))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid(format!("tools[{i}].function.name is required")))?;
        out.push(ToolDef {
            name,
            description: f.get("description").and_then(Value::as_str),
            parameters: f.get("parameters").filter(|p| !p.is_null()),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

#[inline(never)]
pub(crate) fn tool_choice(req: &Map<String, Value>) -> Result<Option<ToolChoice>, GatewayError> {
    match req.get("tool_choice") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(invalid(format!("unsupported tool_choice '{other}'"))),
        },
        Some(v) => v
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|n| Some(ToolChoice::Named(n.to_string())))
            .ok_or_else(|| invalid("tool_choice must be auto, none, required or {\"type\":\"function\",\"function\":{\"name\":..}}")),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ResponseFormat<'a> {
    Text,
    JsonObject,
    JsonSchema { schema: Option<&'a Value> },
}

#[inline(never)]
pub(crate) fn response_format(
    req: &Map<String, Value>,
) -> Result<ResponseFormat<'_>, GatewayError> {
    let Some(rf) = req.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(ResponseFormat::Text);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => Ok(ResponseFormat::JsonSchema {
            schema: rf.get("json_schema").and_then(|s| s.get("schema")),
        }),
        _ => Err(invalid(
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

/// An assistant message's `tool_calls`: (id, name, arguments as a JSON object).
#[inline(never)]
pub(crate) fn tool_calls(m: &Value, i: usize) -> Result<Vec<(&str, &str, Value)>, GatewayError> {
    let list = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid_at(i, ".tool_calls must be an array")),
    };
    let mut out = Vec::with_capacity(list.len());
    for tc in list {
        let id = tc.get("id").and_then(Value::as_str).unwrap_or("");
        let f = tc.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_at(i, ".tool_calls[].function.name is required"))?;
        let args = match f.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
            Some(Value::String(s)) => parse_json(s.as_bytes()).map_err(|e| {
                invalid(format!(
                    "messages[{i}].tool_calls[].function.arguments is not valid JSON ({e})"
                ))
            })?,
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                return Err(invalid_at(
                    i,
                    ".tool_calls[].function.arguments must be a JSON string",
                ))
            }
        };
        if !args.is_object() {
            return Err(invalid_at(
                i,
                ".tool_calls[].function.arguments must encode a JSON object",
            ));
        }
        out.push((id, name, args));
    }
    Ok(out)
}

/// `stream_options.include_usage`.
pub fn include_usage(openai_body: &[u8]) -> bool {
    parse_json(openai_body)
        .ok()
        .and_then(|v| v.get("stream_options")?.get("include_usage")?.as_bool())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Writing OpenAI responses.
// ---------------------------------------------------------------------------------------------

#[inline(never)]
pub(crate) fn usage_json(u: &Usage) -> Value {
    j!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens.saturating_add(u.completion_tokens),
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// A full `chat.completion` object.
#[inline(never)]
pub(crate) fn completion(
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    usage: &Usage,
) -> Vec<u8> {
    json_bytes(&j!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(usage),
    }))
}

/// The assistant message of a choice.
#[inline(never)]
pub(crate) fn message(text: Option<String>, tool_calls: Vec<Value>) -> Value {
    let mut m = j!({"role": "assistant", "content": text, "refusal": null});
    if !tool_calls.is_empty() {
        if let Some(o) = m.as_object_mut() {
            o.put("tool_calls", Value::Array(tool_calls));
        }
    }
    m
}

/// One OpenAI tool call (non-streamed form).
#[inline(never)]
pub(crate) fn tool_call(id: &str, name: &str, arguments: String) -> Value {
    j!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// Writes `chat.completion.chunk` events for one stream.
#[derive(Debug, Clone)]
pub(crate) struct ChunkWriter {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ChunkWriter {
    fn event(out: &mut Vec<u8>, v: &Value) {
        out.extend_from_slice(b"data: ");
        crate::json::write(out, v);
        out.extend_from_slice(b"\n\n");
    }

    /// A chunk with one choice.
    pub fn delta(&self, out: &mut Vec<u8>, index: u64, delta: Value, finish: Option<&str>) {
        let v = j!({
            "id": self.id.as_str(),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model.as_str(),
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        Self::event(out, &v);
    }

    /// The final usage chunk (`choices: []`).
    pub fn usage(&self, out: &mut Vec<u8>, u: &Usage) {
        let v = j!({
            "id": self.id.as_str(),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model.as_str(),
            "choices": [],
            "usage": usage_json(u),
        });
        Self::event(out, &v);
    }

    /// An in-stream error, in the shape the OpenAI SDKs raise on (`data: {"error":{..}}`).
    pub fn error(out: &mut Vec<u8>, message: &str, kind: &str, code: &str) {
        Self::event(out, &error_value(message, kind, code));
    }
}

fn error_value(message: &str, kind: &str, code: &str) -> Value {
    j!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// The OpenAI error body.
pub(crate) fn openai_error(message: &str, kind: &str, code: &str) -> Vec<u8> {
    json_bytes(&error_value(message, kind, code))
}

/// OpenAI error `type` for an HTTP status.
pub(crate) fn kind_for_status(status: u32) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// A short, printable excerpt of an unparseable upstream body.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let t = s.trim();
    let mut out: String = t.chars().take(500).collect();
    if t.chars().count() > 500 {
        out.push('…');
    }
    out
}

/// Parses an upstream JSON response body.
pub(crate) fn parse_upstream(native: &[u8]) -> Result<Value, GatewayError> {
    parse_json(native)
        .map_err(|e| bad_upstream(format!("the provider's response is not valid JSON ({e})")))
}

pub(crate) fn u64_at(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}
