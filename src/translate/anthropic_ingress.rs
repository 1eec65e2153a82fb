//! The Anthropic Messages ingress (`/anthropic/v1/messages`): Anthropic-SDK clients reaching any
//! provider. Pure functions and stream state machines over bytes: no host calls.
//!
//! - ANTHROPIC providers are reached natively: the client's body goes upstream with only `model`
//!   rewritten, and the answer comes back untouched; [`MessagesTap`] reads usage from a stream as it
//!   passes and [`message_usage`] from a whole message.
//! - Every other provider is reached through the chat-completions path: [`to_chat`] turns the
//!   Messages request into an OpenAI chat request (which the existing shaping then sends to
//!   OpenAI-style providers as is, or translates for Gemini), and the OpenAI answer comes back as a
//!   Messages answer: [`from_chat`] (whole), [`ChatToMessages`] (stream: `message_start`,
//!   `content_block_*`, `message_delta`, `message_stop`), [`error_from_chat`] (errors).
//! - Every error an Anthropic client sees on this ingress is Anthropic-shaped
//!   (`{"type":"error","error":{"type","message"}}`), which the Anthropic SDKs parse; see [`error_body`].

#[allow(unused_imports)]
use crate::prelude::*;

use super::Put;
use super::{
    excerpt, invalid, parse_json, parse_upstream, u64_at, unix_now, StreamTranslator, Usage,
};
use crate::error::GatewayError;
use crate::sse::SseParser;
use serde_json::{Map, Value};

/// The `anthropic-version` sent upstream when the client sent none.
pub const DEFAULT_VERSION: &str = super::anthropic::ANTHROPIC_VERSION;

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// Anthropic error `type` for an HTTP status.
pub fn error_type(status: u32) -> &'static str {
    match status {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 | 403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

fn error_value(kind: &str, message: &str) -> Value {
    j!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The Anthropic error body for a status and message.
pub fn error_body(status: u32, message: &str) -> Vec<u8> {
    super::json_bytes(&error_value(error_type(status), message))
}

/// A gateway error as an Anthropic error body (same status, message and headers as the OpenAI form).
pub fn gateway_error(e: &GatewayError) -> Vec<u8> {
    match e {
        GatewayError::UnknownEndpoint { path } => error_body(
            404,
            &format!(
                "Unknown endpoint {path}. The Anthropic ingress serves POST /anthropic/v1/messages and POST /anthropic/v1/messages/count_tokens."
            ),
        ),
        _ => error_body(e.status(), &e.message()),
    }
}

/// An OpenAI-shaped error body (from an OpenAI-style provider, or the Gemini translation) as an
/// Anthropic error body; anything unparseable becomes a message with an excerpt of it.
pub fn error_from_chat(status: u32, body: &[u8]) -> Vec<u8> {
    let v = parse_json(body).ok();
    let err = v.as_ref().and_then(|v| v.get("error"));
    let msg = err
        .and_then(|e| e.get("message").and_then(Value::as_str).or(e.as_str()))
        .map(str::to_string);
    let msg = msg.unwrap_or_else(|| {
        let text = excerpt(body);
        if text.is_empty() {
            format!("The provider returned HTTP {status}")
        } else {
            format!("The provider returned HTTP {status}: {text}")
        }
    });
    error_body(status, &msg)
}

// ---------------------------------------------------------------------------------------------
// Request: Messages → chat completions.
// ---------------------------------------------------------------------------------------------

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The text of a `system` (a string or an array of text blocks).
fn system_text(v: &Value) -> Result<String, GatewayError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for b in blocks {
                let t = str_of(b, "text").ok_or_else(|| invalid("system blocks must be text"))?;
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(t);
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(invalid(
            "'system' must be a string or an array of text blocks",
        )),
    }
}

/// An image or document `source` as a URL (`data:` for base64).
fn source_url(b: &Value, i: usize) -> Result<String, GatewayError> {
    let src = b
        .get("source")
        .ok_or_else(|| invalid(format!("messages[{i}]: a media block has no source")))?;
    match str_of(src, "type") {
        Some("base64") => {
            let mime = str_of(src, "media_type").unwrap_or("application/octet-stream");
            let data = str_of(src, "data").unwrap_or("");
            Ok(format!("data:{mime};base64,{data}"))
        }
        Some("url") => str_of(src, "url")
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("messages[{i}]: a url source has no url"))),
        _ => Err(invalid(format!(
            "messages[{i}]: only base64 and url media sources can be sent to this provider"
        ))),
    }
}

/// A `tool_result` block's content as text.
fn tool_result_text(b: &Value) -> String {
    let text = match b.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            // The texts joined by newlines (by hand: `join` is instantiated once, for `String`s).
            let mut text = String::new();
            for (i, t) in parts.iter().filter_map(|p| str_of(p, "text")).enumerate() {
                if i > 0 {
                    text.push('\n');
                }
                text.push_str(t);
            }
            text
        }
        _ => String::new(),
    };
    if b.get("is_error").and_then(Value::as_bool) == Some(true) && !text.starts_with("Error") {
        format!("Error: {text}")
    } else {
        text
    }
}

/// Content blocks of a message (a string is one text block).
fn blocks(m: &Value, i: usize) -> Result<Vec<Value>, GatewayError> {
    match m.get("content") {
        Some(Value::String(s)) => Ok(vec![j!({"type": "text", "text": (s.as_str())})]),
        Some(Value::Array(a)) => Ok(a.clone()),
        _ => Err(invalid(format!(
            "messages[{i}].content must be a string or an array of content blocks"
        ))),
    }
}

fn user_turn(out: &mut Vec<Value>, m: &Value, i: usize) -> Result<(), GatewayError> {
    let mut parts = Vec::new();
    for b in blocks(m, i)? {
        match str_of(&b, "type").unwrap_or("") {
            "text" => parts.push(j!({"type": "text", "text": (str_of(&b, "text").unwrap_or(""))})),
            "image" => {
                parts.push(j!({"type": "image_url", "image_url": {"url": (source_url(&b, i)?)}}))
            }
            "document" => {
                parts.push(j!({"type": "file", "file": {"file_data": (source_url(&b, i)?)}}))
            }
            "tool_result" => out.push(j!({
                "role": "tool",
                "tool_call_id": (str_of(&b, "tool_use_id").unwrap_or("")),
                "content": (tool_result_text(&b)),
            })),
            other => {
                return Err(invalid(format!(
                    "messages[{i}]: content block type '{other}' cannot be sent to this provider"
                )))
            }
        }
    }
    if !parts.is_empty() {
        out.push(j!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn assistant_turn(out: &mut Vec<Value>, m: &Value, i: usize) -> Result<(), GatewayError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks(m, i)? {
        match str_of(&b, "type").unwrap_or("") {
            "text" => text.push_str(str_of(&b, "text").unwrap_or("")),
            "tool_use" => {
                let input = b
                    .get("input")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Map::new()));
                calls.push(j!({
                    "id": (str_of(&b, "id").unwrap_or("")),
                    "type": "function",
                    "function": {"name": (str_of(&b, "name").unwrap_or("")), "arguments": (super::json_string(&input))},
                }));
            }
            // Reasoning of another provider cannot be replayed elsewhere.
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(invalid(format!(
                    "messages[{i}]: content block type '{other}' cannot be sent to this provider"
                )))
            }
        }
    }
    let mut msg = j!({"role": "assistant", "content": (if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::from(text) })});
    if !calls.is_empty() {
        if let Some(o) = msg.as_object_mut() {
            o.put("tool_calls", Value::Array(calls));
        }
    }
    out.push(msg);
    Ok(())
}

fn chat_tools(tools: &Value) -> Result<Vec<Value>, GatewayError> {
    let Value::Array(list) = tools else {
        return Err(invalid("'tools' must be an array"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let kind = str_of(t, "type").unwrap_or("custom");
        let name = str_of(t, "name").filter(|n| !n.is_empty());
        match (kind, name, t.get("input_schema")) {
            ("custom", Some(name), Some(schema)) => {
                let mut f = j!({"name": name, "parameters": (schema.clone())});
                if let (Some(d), Some(o)) = (str_of(t, "description"), f.as_object_mut()) {
                    o.put("description", Value::from(d));
                }
                out.push(j!({"type": "function", "function": f}));
            }
            _ => {
                return Err(invalid(format!(
                    "tools[{i}]: only client tools (name, input_schema) can be sent to this provider; '{kind}' is an Anthropic server tool"
                )))
            }
        }
    }
    Ok(out)
}

/// `tool_choice` and whether parallel tool use is disabled.
fn chat_tool_choice(tc: &Value) -> Result<(Option<Value>, bool), GatewayError> {
    let parallel_off = tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true);
    let choice = match str_of(tc, "type") {
        Some("auto") => Value::from("auto"),
        Some("any") => Value::from("required"),
        Some("none") => Value::from("none"),
        Some("tool") => {
            let name = str_of(tc, "name").ok_or_else(|| invalid("tool_choice.name is required"))?;
            j!({"type": "function", "function": {"name": name}})
        }
        _ => return Err(invalid("tool_choice.type must be auto, any, tool or none")),
    };
    Ok((Some(choice), parallel_off))
}

/// Translates a Messages request into a chat-completions request (same `model`; a stream asks for
/// the usage chunk, which becomes `message_delta.usage`).
pub fn to_chat(body: &[u8]) -> Result<Vec<u8>, GatewayError> {
    let req = match parse_json(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(invalid("the body must be a JSON object")),
        Err(e) => return Err(invalid(format!("not valid JSON ({e})"))),
    };
    let mut out = Map::new();
    if let Some(m) = req.get("model").filter(|m| m.is_string()) {
        out.put("model", m.clone());
    }
    let mut messages = Vec::new();
    if let Some(s) = req.get("system") {
        let text = system_text(s)?;
        if !text.is_empty() {
            messages.push(j!({"role": "system", "content": text}));
        }
    }
    let list = match req.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(invalid("'messages' must not be empty")),
        _ => return Err(invalid("'messages' is required and must be an array")),
    };
    for (i, m) in list.iter().enumerate() {
        match str_of(m, "role") {
            Some("user") => user_turn(&mut messages, m, i)?,
            Some("assistant") => assistant_turn(&mut messages, m, i)?,
            _ => {
                return Err(invalid(format!(
                    "messages[{i}].role must be 'user' or 'assistant'"
                )))
            }
        }
    }
    out.put("messages", Value::Array(messages));
    match req.get("max_tokens") {
        Some(v) if v.as_u64().is_some_and(|n| n > 0) => {
            out.put("max_tokens", v.clone());
        }
        None | Some(Value::Null) => {}
        Some(_) => return Err(invalid("'max_tokens' must be a positive integer")),
    }
    for key in ["temperature", "top_p"] {
        match req.get(key) {
            Some(v) if v.is_number() => {
                out.put(key, v.clone());
            }
            None | Some(Value::Null) => {}
            Some(_) => return Err(invalid(format!("'{key}' must be a number"))),
        }
    }
    if let Some(Value::Array(stops)) = req.get("stop_sequences") {
        if !stops.is_empty() {
            out.put("stop", Value::Array(stops.clone()));
        }
    }
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        let tools = chat_tools(tools)?;
        if !tools.is_empty() {
            out.put("tools", Value::Array(tools));
            if let Some(tc) = req.get("tool_choice").filter(|t| !t.is_null()) {
                let (choice, parallel_off) = chat_tool_choice(tc)?;
                if let Some(c) = choice {
                    out.put("tool_choice", c);
                }
                if parallel_off {
                    out.put("parallel_tool_calls", Value::Bool(false));
                }
            }
        }
    }
    if let Some(user) = req
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .filter(|u| u.is_string())
    {
        out.put("user", user.clone());
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.put("stream", Value::Bool(true));
        out.put("stream_options", j!({"include_usage": true}));
    }
    Ok(super::json_bytes(&Value::Object(out)))
}

// ---------------------------------------------------------------------------------------------
// Response: chat completion → Message.
// ---------------------------------------------------------------------------------------------

/// Anthropic `stop_reason` for an OpenAI `finish_reason`.
pub fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic `usage` (input tokens exclude cached ones, as Anthropic counts them).
fn usage_value(u: &Usage) -> Value {
    j!({
        "input_tokens": (u.prompt_tokens.saturating_sub(u.cached_tokens)),
        "output_tokens": (u.completion_tokens),
        "cache_read_input_tokens": (u.cached_tokens),
        "cache_creation_input_tokens": 0,
    })
}

fn chat_usage(u: &Value) -> Usage {
    Usage {
        prompt_tokens: u64_at(u, "prompt_tokens"),
        completion_tokens: u64_at(u, "completion_tokens"),
        cached_tokens: u
            .get("prompt_tokens_details")
            .map(|d| u64_at(d, "cached_tokens"))
            .unwrap_or(0),
        cache_creation_tokens: 0,
    }
}

/// Tool arguments (a JSON string) as the `input` object; empty or invalid arguments are `{}`.
fn tool_input(args: Option<&Value>) -> Value {
    match args {
        Some(Value::String(s)) => match parse_json(s.as_bytes()) {
            Ok(v @ Value::Object(_)) => v,
            _ => Value::Object(Map::new()),
        },
        Some(v @ Value::Object(_)) => v.clone(),
        _ => Value::Object(Map::new()),
    }
}

/// `msg_…` from a completion id.
fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else if id.is_empty() {
        format!("msg_gw{:x}", unix_now())
    } else {
        format!("msg_{id}")
    }
}

/// Translates a `chat.completion` into a Messages response naming `model`; returns it and usage.
pub fn from_chat(body: &[u8], model: &str) -> Result<(Vec<u8>, Usage), GatewayError> {
    let v = parse_upstream(body)?;
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| super::bad_upstream("the provider's completion has no choices"))?;
    let msg = choice.get("message");
    let mut content = Vec::new();
    if let Some(t) = msg
        .and_then(|m| str_of(m, "content"))
        .filter(|t| !t.is_empty())
    {
        content.push(j!({"type": "text", "text": t}));
    }
    if let Some(Value::Array(calls)) = msg.and_then(|m| m.get("tool_calls")) {
        for c in calls {
            let f = c.get("function");
            content.push(j!({
                "type": "tool_use",
                "id": (str_of(c, "id").unwrap_or("")),
                "name": (f.and_then(|f| str_of(f, "name")).unwrap_or("")),
                "input": (tool_input(f.and_then(|f| f.get("arguments")))),
            }));
        }
    }
    let usage = v.get("usage").map(chat_usage).unwrap_or_default();
    let finish = str_of(choice, "finish_reason").unwrap_or("stop");
    let out = j!({
        "id": (message_id(str_of(&v, "id").unwrap_or(""))),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": (stop_reason(finish)),
        "stop_sequence": null,
        "usage": (usage_value(&usage)),
    });
    Ok((super::json_bytes(&out), usage))
}

// ---------------------------------------------------------------------------------------------
// Native Anthropic answers: usage only.
// ---------------------------------------------------------------------------------------------

/// Usage from an Anthropic `usage` object over `prev` (absent fields keep their value), in OpenAI
/// terms: prompt tokens include cache reads and writes.
fn merge_anthropic_usage(prev: Usage, u: &Value) -> Usage {
    let get = |k: &str, old: u64| u.get(k).and_then(Value::as_u64).unwrap_or(old);
    let input = get(
        "input_tokens",
        prev.prompt_tokens.saturating_sub(
            prev.cached_tokens
                .saturating_add(prev.cache_creation_tokens),
        ),
    );
    let cached = get("cache_read_input_tokens", prev.cached_tokens);
    let created = get("cache_creation_input_tokens", prev.cache_creation_tokens);
    Usage {
        prompt_tokens: input.saturating_add(cached).saturating_add(created),
        completion_tokens: get("output_tokens", prev.completion_tokens),
        cached_tokens: cached,
        cache_creation_tokens: created,
    }
}

/// Usage of a whole Anthropic message (`None` if it has none or is not a message).
pub fn message_usage(body: &[u8]) -> Option<Usage> {
    let v = parse_json(body).ok()?;
    let u = v.get("usage")?;
    Some(merge_anthropic_usage(Usage::default(), u))
}

/// Reads usage from a native Anthropic stream as it passes; the bytes are not changed
/// ([`StreamTranslator::passthrough`]). Holds at most one SSE event.
#[derive(Debug, Default)]
pub struct MessagesTap {
    parser: SseParser,
    usage: Option<Usage>,
    done: bool,
    failed: bool,
}

impl MessagesTap {
    pub fn new() -> Self {
        Self::default()
    }

    fn handle(&mut self, data: &str) {
        let Ok(v) = parse_json(data.as_bytes()) else {
            return;
        };
        let u = match str_of(&v, "type") {
            Some("message_start") => v.get("message").and_then(|m| m.get("usage")),
            Some("message_delta") => v.get("usage"),
            Some("message_stop") => {
                self.done = true;
                None
            }
            Some("error") => {
                self.failed = true;
                None
            }
            _ => None,
        };
        if let Some(u) = u {
            self.usage = Some(merge_anthropic_usage(self.usage.unwrap_or_default(), u));
        }
    }
}

impl StreamTranslator for MessagesTap {
    fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        for e in self.parser.push(bytes) {
            self.handle(&e.data);
        }
        Vec::new()
    }
    fn finish(&mut self) -> Vec<u8> {
        for e in self.parser.finish() {
            self.handle(&e.data);
        }
        Vec::new()
    }
    fn usage(&self) -> Option<Usage> {
        self.usage
    }
    fn failed(&self) -> bool {
        self.failed || !self.done
    }
    fn truncated(&self) -> bool {
        self.parser.overflowed()
    }
    fn passthrough(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Streams: chat.completion.chunk SSE → Messages events.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    /// A tool call with this OpenAI index.
    Tool(u64),
}

/// OpenAI `chat.completion.chunk` SSE → Anthropic Messages SSE events. Holds at most one SSE event
/// and a few counters; text and tool arguments pass through as they arrive.
#[derive(Debug)]
pub struct ChatToMessages {
    parser: SseParser,
    model: String,
    started: bool,
    open: Open,
    /// Index of the next content block.
    next_block: u64,
    finish: Option<String>,
    usage: Option<Usage>,
    done: bool,
    failed: bool,
}

fn event(out: &mut Vec<u8>, name: &str, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    crate::json::write(out, v);
    out.extend_from_slice(b"\n\n");
}

impl ChatToMessages {
    pub fn new(model: &str) -> Self {
        ChatToMessages {
            parser: SseParser::new(),
            model: model.to_string(),
            started: false,
            open: Open::None,
            next_block: 0,
            finish: None,
            usage: None,
            done: false,
            failed: false,
        }
    }

    fn start(&mut self, out: &mut Vec<u8>, id: &str) {
        if self.started {
            return;
        }
        self.started = true;
        let msg = j!({
            "id": (message_id(id)),
            "type": "message",
            "role": "assistant",
            "model": (self.model.as_str()),
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        event(
            out,
            "message_start",
            &j!({"type": "message_start", "message": msg}),
        );
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if self.open != Open::None {
            let index = self.next_block.saturating_sub(1);
            event(
                out,
                "content_block_stop",
                &j!({"type": "content_block_stop", "index": index}),
            );
            self.open = Open::None;
        }
    }

    fn open_block(&mut self, out: &mut Vec<u8>, kind: Open, block: Value) -> u64 {
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = kind;
        event(
            out,
            "content_block_start",
            &j!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn delta(out: &mut Vec<u8>, index: u64, delta: Value) {
        event(
            out,
            "content_block_delta",
            &j!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn fail(&mut self, out: &mut Vec<u8>, kind: &str, message: &str) {
        if self.failed || self.done {
            return;
        }
        self.failed = true;
        event(out, "error", &error_value(kind, message));
    }

    /// Closes the message: the last block, `message_delta` (stop reason, usage), `message_stop`.
    fn end(&mut self, out: &mut Vec<u8>) {
        if self.done || self.failed {
            return;
        }
        let Some(finish) = self.finish.take() else {
            let (m, _, _) = super::STREAM_INCOMPLETE;
            self.fail(out, "api_error", m);
            return;
        };
        self.start(out, "");
        self.close(out);
        let u = self.usage.unwrap_or_default();
        let mut usage = usage_value(&u);
        if self.usage.is_none() {
            usage = j!({"output_tokens": 0});
        }
        event(
            out,
            "message_delta",
            &j!({
                "type": "message_delta",
                "delta": {"stop_reason": (stop_reason(&finish)), "stop_sequence": null},
                "usage": usage,
            }),
        );
        event(out, "message_stop", &j!({"type": "message_stop"}));
        self.done = true;
    }

    fn handle(&mut self, out: &mut Vec<u8>, data: &str) {
        if self.done || self.failed {
            return;
        }
        if data.trim() == "[DONE]" {
            self.end(out);
            return;
        }
        let Ok(v) = parse_json(data.as_bytes()) else {
            return;
        };
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("The provider reported an error in the stream.");
            self.fail(out, "api_error", msg);
            return;
        }
        self.start(out, str_of(&v, "id").unwrap_or(""));
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(chat_usage(u));
        }
        let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            if let Some(text) = str_of(delta, "content").filter(|t| !t.is_empty()) {
                let index = if self.open == Open::Text {
                    self.next_block.saturating_sub(1)
                } else {
                    self.open_block(out, Open::Text, j!({"type": "text", "text": ""}))
                };
                Self::delta(out, index, j!({"type": "text_delta", "text": text}));
            }
            if let Some(Value::Array(calls)) = delta.get("tool_calls") {
                for (n, c) in calls.iter().enumerate() {
                    let k = c.get("index").and_then(Value::as_u64).unwrap_or(n as u64);
                    let f = c.get("function");
                    let index = if self.open == Open::Tool(k) && str_of(c, "id").is_none() {
                        self.next_block.saturating_sub(1)
                    } else {
                        let id = str_of(c, "id")
                            .map(str::to_string)
                            .unwrap_or_else(|| format!("toolu_gw_{k}"));
                        let name = f.and_then(|f| str_of(f, "name")).unwrap_or("");
                        self.open_block(
                            out,
                            Open::Tool(k),
                            j!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                        )
                    };
                    if let Some(args) = f
                        .and_then(|f| str_of(f, "arguments"))
                        .filter(|a| !a.is_empty())
                    {
                        Self::delta(
                            out,
                            index,
                            j!({"type": "input_json_delta", "partial_json": args}),
                        );
                    }
                }
            }
        }
        if let Some(f) = str_of(choice, "finish_reason") {
            self.finish = Some(f.to_string());
        }
    }
}

impl StreamTranslator for ChatToMessages {
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
        // A stream without `[DONE]` that did finish (some OpenAI-compatible servers) still ends well.
        self.end(&mut out);
        out
    }
    fn usage(&self) -> Option<Usage> {
        self.usage
    }
    fn failed(&self) -> bool {
        self.failed
    }
    fn truncated(&self) -> bool {
        self.parser.overflowed()
    }
}

/// A native translation (e.g. Gemini → OpenAI chunks) followed by [`ChatToMessages`].
pub struct Composed {
    pub inner: Box<dyn StreamTranslator>,
    pub outer: ChatToMessages,
}

impl StreamTranslator for Composed {
    fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mid = self.inner.push(bytes);
        self.outer.push(&mid)
    }
    fn finish(&mut self) -> Vec<u8> {
        let mid = self.inner.finish();
        let mut out = self.outer.push(&mid);
        out.extend(self.outer.finish());
        out
    }
    fn usage(&self) -> Option<Usage> {
        self.inner.usage().or(self.outer.usage())
    }
    fn failed(&self) -> bool {
        self.inner.failed() || self.outer.failed()
    }
    fn truncated(&self) -> bool {
        self.inner.truncated() || self.outer.truncated()
    }
}
