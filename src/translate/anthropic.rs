//! OpenAI chat completions ⇄ Anthropic Messages API (`POST {base}/messages`, `anthropic-version`).
//!
//! Request mapping (everything not listed is dropped: `n`, `logprobs`, `top_logprobs`,
//! `stream_options`, `presence_penalty`, `frequency_penalty`, `seed`, `logit_bias`, `store`,
//! `reasoning_effort`, `modalities`, `audio`, `prediction`, `service_tier`, ...):
//! - `system`/`developer` messages → `system` text blocks (in order);
//! - `user` text/images (data URLs → base64 source, other URLs → url source)/files (PDF data URLs →
//!   `document`); `cache_control` on text parts is kept;
//! - `assistant` text + `tool_calls` → `text` + `tool_use` blocks (arguments parsed to objects);
//! - `tool` messages → `tool_result` blocks in a user turn; consecutive same-role turns are merged
//!   (so parallel tool results land in one user turn, as Anthropic requires);
//! - `max_completion_tokens` / `max_tokens` → `max_tokens` (default [`DEFAULT_MAX_TOKENS`]);
//! - `temperature` (clamped to Anthropic's 0..1), `top_p`, `stop` → `stop_sequences`, `user` →
//!   `metadata.user_id`, `stream`;
//! - `tools` → `tools[].input_schema`; `tool_choice` auto/none/required/named → auto/none/any/tool;
//!   `parallel_tool_calls: false` → `disable_parallel_tool_use: true`;
//! - `response_format` `json_object`/`json_schema` without client tools: a forced tool named
//!   [`JSON_TOOL`] whose `input_schema` is the schema; its `tool_use` input comes back as the
//!   message's JSON text (finish reason `stop`). With client tools (or a non-object schema) the JSON
//!   instruction (and schema) is appended to the system prompt instead.

#[allow(unused_imports)]
use crate::prelude::*;

use super::Put;
use super::{
    bad_upstream, completion, content_parts, excerpt, kind_for_status, max_tokens, message,
    messages, number, openai_error, parse_request, parse_upstream, response_format, role_of, stop,
    text_only, tool_call, tool_calls, tool_choice, tools, u64_at, unix_now, ChunkWriter, Media,
    NativeRequest, Part, ResponseFormat, StreamTranslator, ToolChoice, Usage, DONE,
};
use crate::error::GatewayError;
use crate::sse::SseParser;
use serde_json::{Map, Value};

/// The `anthropic-version` header value.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Path suffix, joined to a base that ends in `/v1` (`https://api.anthropic.com/v1`).
pub const PATH: &str = "/messages";
/// `max_tokens` when the client sets none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Name of the tool used to carry `response_format` JSON.
pub const JSON_TOOL: &str = "gateway_json_response";

/// Builds the native request. Headers: `anthropic-version`; the caller adds `x-api-key`.
pub fn request(openai_body: &[u8], upstream_model: &str) -> Result<NativeRequest, GatewayError> {
    request_doc(&parse_request(openai_body)?, upstream_model)
}

/// [`request`] from the request already parsed by `body::inspect_doc` (no second parse).
pub fn request_doc(
    req: &serde_json::Map<String, Value>,
    upstream_model: &str,
) -> Result<NativeRequest, GatewayError> {
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();

    for (i, m) in messages(req)?.iter().enumerate() {
        match role_of(m, i)? {
            "system" | "developer" => system.extend(text_only_blocks(m, i, "system")?),
            "user" => {
                let mut blocks = Vec::new();
                for p in content_parts(m.get("content"))? {
                    if let Some(b) = user_block(p, i)? {
                        blocks.push(b);
                    }
                }
                push_turn(&mut turns, "user", blocks);
            }
            "assistant" => {
                let mut blocks = text_only_blocks(m, i, "assistant")?;
                for (id, name, args) in tool_calls(m, i)? {
                    if id.is_empty() {
                        return Err(super::invalid_at(i, ".tool_calls[].id is required"));
                    }
                    blocks.push(j!({"type": "tool_use", "id": id, "name": name, "input": args}));
                }
                push_turn(&mut turns, "assistant", blocks);
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| super::invalid_at(i, ".tool_call_id is required"))?;
                let text = text_only(m.get("content"), "tool message")?;
                let block = j!({"type": "tool_result", "tool_use_id": id, "content": text});
                push_turn(&mut turns, "user", vec![block]);
            }
            other => return Err(super::bad_role(i, other)),
        }
    }
    if turns.is_empty() {
        return Err(super::invalid(
            "there must be at least one user or assistant message with content",
        ));
    }

    let mut body = Map::new();
    body.put("model", j!(upstream_model));
    body.put(
        "max_tokens",
        j!(max_tokens(req)?.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    let msgs: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| j!({"role": role, "content": content}))
        .collect();
    body.put("messages", Value::Array(msgs));
    if let Some(t) = number(req, "temperature")? {
        body.put("temperature", j!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = number(req, "top_p")? {
        body.put("top_p", j!(p));
    }
    let stops = stop(req)?;
    if !stops.is_empty() {
        body.put("stop_sequences", j!(stops));
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        body.put("stream", Value::Bool(true));
    }
    if let Some(user) = req.get("user").and_then(Value::as_str) {
        body.put("metadata", j!({"user_id": user}));
    }

    let defs = tools(req)?;
    let choice = tool_choice(req)?;
    let no_parallel = req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false);
    let mut tool_list: Vec<Value> = defs
        .iter()
        .map(|d| {
            let mut t = j!({
                "name": d.name,
                "input_schema": d.parameters.cloned().unwrap_or_else(|| j!({"type": "object", "properties": {}})),
            });
            if let (Some(desc), Some(o)) = (d.description, t.as_object_mut()) {
                o.put("description", j!(desc));
            }
            t
        })
        .collect();
    let mut choice_json = if defs.is_empty() {
        None
    } else {
        match choice {
            None if no_parallel => Some(j!({"type": "auto"})),
            None => None,
            Some(ToolChoice::Auto) => Some(j!({"type": "auto"})),
            Some(ToolChoice::None) => Some(j!({"type": "none"})),
            Some(ToolChoice::Required) => Some(j!({"type": "any"})),
            Some(ToolChoice::Named(n)) => Some(j!({"type": "tool", "name": n})),
        }
    };

    match response_format(req)? {
        ResponseFormat::Text => {}
        rf => {
            let schema = match &rf {
                ResponseFormat::JsonSchema { schema: Some(s) } => Some(*s),
                _ => None,
            };
            let object_schema =
                schema.is_none_or(|s| s.get("type").and_then(Value::as_str) == Some("object"));
            if defs.is_empty() && object_schema {
                let input_schema = schema
                    .cloned()
                    .unwrap_or_else(|| j!({"type": "object", "additionalProperties": true}));
                tool_list.push(j!({
                    "name": JSON_TOOL,
                    "description": "Give the final answer: its input is the JSON the user asked for.",
                    "input_schema": input_schema,
                }));
                choice_json = Some(j!({"type": "tool", "name": JSON_TOOL}));
            } else {
                let text = match schema {
                    Some(s) => format!("Respond only with JSON that matches this JSON schema, without code fences or any other text: {s}"),
                    None => "Respond only with a valid JSON object, without code fences or any other text.".to_string(),
                };
                system.push(j!({"type": "text", "text": text}));
            }
        }
    }
    if let Some(Value::Object(o)) = choice_json.as_mut() {
        if no_parallel && o.get("type").and_then(Value::as_str) != Some("none") {
            o.put("disable_parallel_tool_use", Value::Bool(true));
        }
    }
    if !tool_list.is_empty() {
        body.put("tools", Value::Array(tool_list));
    }
    if let Some(c) = choice_json {
        body.put("tool_choice", c);
    }
    if !system.is_empty() {
        body.put("system", Value::Array(system));
    }

    Ok(NativeRequest {
        path_suffix: PATH.to_string(),
        body: super::json_bytes(&Value::Object(body)),
        headers: vec![("anthropic-version", ANTHROPIC_VERSION.to_string())],
    })
}

/// The text blocks of a message whose content may only be text (system and assistant turns).
fn text_only_blocks(m: &Value, i: usize, role: &str) -> Result<Vec<Value>, GatewayError> {
    let mut blocks = Vec::new();
    for p in content_parts(m.get("content"))? {
        match p {
            Part::Text { text: "", .. } => {}
            Part::Text {
                text,
                cache_control,
            } => blocks.push(text_block(text, cache_control)),
            _ => {
                let what = format!(": {role} content may only contain text");
                return Err(super::invalid_at(i, &what));
            }
        }
    }
    Ok(blocks)
}

fn text_block(text: &str, cache_control: Option<&Value>) -> Value {
    let mut b = j!({"type": "text", "text": text});
    if let (Some(cc), Some(o)) = (cache_control, b.as_object_mut()) {
        o.put("cache_control", cc.clone());
    }
    b
}

fn user_block(p: Part<'_>, i: usize) -> Result<Option<Value>, GatewayError> {
    let source = |m: Media<'_>| match m {
        Media::Base64 { mime, data } => {
            j!({"type": "base64", "media_type": mime, "data": data})
        }
        Media::Url(url) => j!({"type": "url", "url": url}),
    };
    Ok(match p {
        Part::Text { text: "", .. } => None,
        Part::Text {
            text,
            cache_control,
        } => Some(text_block(text, cache_control)),
        Part::Image(m) => Some(j!({"type": "image", "source": source(m)})),
        Part::File(m) => Some(j!({"type": "document", "source": source(m)})),
        Part::Audio { .. } => {
            return Err(super::invalid_at(
                i,
                ": audio input is not supported by Anthropic models",
            ))
        }
    })
}

fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((r, b)) if *r == role => b.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

fn finish_reason(stop_reason: &str, real_tool_calls: bool) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" if real_tool_calls => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Usage from an Anthropic `usage` object, over `prev` (fields absent keep their value).
fn merge_usage(prev: Usage, u: &Value) -> Usage {
    let get = |k: &str, old: u64| u.get(k).and_then(Value::as_u64).unwrap_or(old);
    let input = get(
        "input_tokens",
        prev.prompt_tokens
            .saturating_sub(prev.cached_tokens + prev.cache_creation_tokens),
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

/// Translates a non-streamed Messages response into a `chat.completion`.
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
    if v.get("type").and_then(Value::as_str) == Some("error") {
        let msg = v
            .get("error")
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(bad_upstream(format!(
            "the provider reported an error: {msg}"
        )));
    }
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_upstream("the Messages response has no 'content' array"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut has_text = false;
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                has_text = true;
                text.push_str(block.get("text").and_then(Value::as_str).unwrap_or(""));
            }
            Some("tool_use") => {
                let name = block.get("name").and_then(Value::as_str).unwrap_or("");
                let input = block.get("input").cloned().unwrap_or_else(|| j!({}));
                if name == JSON_TOOL {
                    has_text = true;
                    text.push_str(&super::json_string(&input));
                } else {
                    let id = block.get("id").and_then(Value::as_str).unwrap_or("");
                    calls.push(tool_call(id, name, super::json_string(&input)));
                }
            }
            _ => {} // thinking, redacted_thinking, server tools: not part of the OpenAI message
        }
    }
    let stop_reason = v
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    let finish = finish_reason(stop_reason, !calls.is_empty());
    let usage = v
        .get("usage")
        .map(|u| merge_usage(Usage::default(), u))
        .unwrap_or_default();
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("chatcmpl-anthropic");
    let choice = j!({
        "index": 0,
        "message": message(has_text.then_some(text), calls),
        "logprobs": null,
        "finish_reason": finish,
    });
    Ok((completion(id, created, model, vec![choice], &usage), usage))
}

/// OpenAI error `type` for an Anthropic error `type`.
fn error_kind(anthropic_type: &str, status: u32) -> &'static str {
    match anthropic_type {
        "invalid_request_error" | "request_too_large" => "invalid_request_error",
        "authentication_error" => "authentication_error",
        "permission_error" | "billing_error" => "permission_error",
        "not_found_error" => "not_found_error",
        "rate_limit_error" => "rate_limit_error",
        "api_error" | "overloaded_error" | "timeout_error" => "server_error",
        _ => kind_for_status(status),
    }
}

/// Translates an Anthropic error body (`{"type":"error","error":{"type","message"}}`) into the
/// OpenAI error JSON. The caller keeps `status` (including Anthropic's 529 "overloaded").
pub fn error(status: u32, body: &[u8]) -> Vec<u8> {
    let v = super::parse_json(body).ok();
    let err = v.as_ref().and_then(|v| v.get("error"));
    let kind = err.and_then(|e| e.get("type")).and_then(Value::as_str);
    let msg = err.and_then(|e| e.get("message")).and_then(Value::as_str);
    match (kind, msg) {
        (Some(k), Some(m)) => openai_error(m, error_kind(k, status), k),
        _ => {
            let text = excerpt(body);
            let m = if text.is_empty() {
                format!("Anthropic returned HTTP {status}")
            } else {
                format!("Anthropic returned HTTP {status}: {text}")
            };
            openai_error(&m, kind_for_status(status), "upstream_error")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// An OpenAI tool call with this index.
    Tool(u64),
    /// The [`JSON_TOOL`] call: its input streams as content.
    Json,
    Other,
}

/// Anthropic SSE → OpenAI `chat.completion.chunk` SSE.
#[derive(Debug)]
pub struct AnthropicStream {
    parser: SseParser,
    w: ChunkWriter,
    include_usage: bool,
    usage: Option<Usage>,
    started: bool,
    /// Anthropic content block index → what it is.
    blocks: Vec<(u64, Block)>,
    tools: u64,
    /// OpenAI tool-call indexes whose arguments have started (a tool use with no input must still
    /// end with `"{}"`, as in the non-streamed answer and in OpenAI's own streams).
    args_sent: Vec<u64>,
    finish_sent: bool,
    done: bool,
    failed: bool,
}

impl AnthropicStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        AnthropicStream {
            parser: SseParser::new(),
            w: ChunkWriter {
                id: "chatcmpl-anthropic".into(),
                created: unix_now(),
                model: model.to_string(),
            },
            include_usage,
            usage: None,
            started: false,
            blocks: Vec::new(),
            tools: 0,
            args_sent: Vec::new(),
            finish_sent: false,
            done: false,
            failed: false,
        }
    }

    /// Fixes the `created` timestamp of every chunk (tests, or a caller-provided clock).
    pub fn with_created(mut self, created: u64) -> Self {
        self.w.created = created;
        self
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            self.w
                .delta(out, 0, j!({"role": "assistant", "content": ""}), None);
        }
    }

    fn block(&self, index: u64) -> Block {
        self.blocks
            .iter()
            .find(|(i, _)| *i == index)
            .map_or(Block::Other, |(_, b)| *b)
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

    fn handle(&mut self, out: &mut Vec<u8>, event: Option<&str>, data: &str) {
        if self.done {
            return;
        }
        let Ok(v) = super::parse_json(data.as_bytes()) else {
            return; // not JSON: nothing Anthropic documents; skip it
        };
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .or(event)
            .unwrap_or("");
        let index = u64_at(&v, "index");
        match kind {
            "message_start" => {
                if let Some(m) = v.get("message") {
                    if let Some(id) = m.get("id").and_then(Value::as_str) {
                        self.w.id = id.to_string();
                    }
                    if let Some(u) = m.get("usage") {
                        self.usage = Some(merge_usage(self.usage.unwrap_or_default(), u));
                    }
                }
                self.start(out);
            }
            "content_block_start" => {
                self.start(out);
                let cb = v.get("content_block");
                let ty = cb.and_then(|c| c.get("type")).and_then(Value::as_str);
                let block = match ty {
                    Some("text") => Block::Text,
                    Some("tool_use") => {
                        let name = cb
                            .and_then(|c| c.get("name"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if name == JSON_TOOL {
                            Block::Json
                        } else {
                            let id = cb
                                .and_then(|c| c.get("id"))
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            let n = self.tools;
                            self.tools += 1;
                            let tc = j!([{"index": n, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]);
                            self.w.delta(out, 0, j!({"tool_calls": tc}), None);
                            Block::Tool(n)
                        }
                    }
                    _ => Block::Other,
                };
                self.blocks.retain(|(i, _)| *i != index);
                self.blocks.push((index, block));
                if block == Block::Text {
                    let t = cb
                        .and_then(|c| c.get("text"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if !t.is_empty() {
                        self.w.delta(out, 0, j!({"content": t}), None);
                    }
                }
            }
            "content_block_delta" => {
                self.start(out);
                let d = v.get("delta");
                let dt = d.and_then(|d| d.get("type")).and_then(Value::as_str);
                let field = |k: &str| {
                    d.and_then(|d| d.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                };
                match (dt, self.block(index)) {
                    (Some("text_delta"), _) => {
                        let t = field("text");
                        if !t.is_empty() {
                            self.w.delta(out, 0, j!({"content": t}), None);
                        }
                    }
                    (Some("input_json_delta"), Block::Tool(n)) => {
                        let p = field("partial_json");
                        if !p.is_empty() {
                            if !self.args_sent.contains(&n) {
                                self.args_sent.push(n);
                            }
                            let tc = j!([{"index": n, "function": {"arguments": p}}]);
                            self.w.delta(out, 0, j!({"tool_calls": tc}), None);
                        }
                    }
                    (Some("input_json_delta"), Block::Json) => {
                        let p = field("partial_json");
                        if !p.is_empty() {
                            self.w.delta(out, 0, j!({"content": p}), None);
                        }
                    }
                    _ => {} // thinking_delta, signature_delta, citations_delta
                }
            }
            "message_delta" => {
                self.start(out);
                if let Some(u) = v.get("usage") {
                    self.usage = Some(merge_usage(self.usage.unwrap_or_default(), u));
                }
                let sr = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str);
                if let (Some(sr), false) = (sr, self.finish_sent) {
                    self.finish_sent = true;
                    let f = finish_reason(sr, self.tools > 0);
                    self.w.delta(out, 0, j!({}), Some(f));
                }
            }
            "message_stop" => {
                self.start(out);
                if !self.finish_sent {
                    self.finish_sent = true;
                    self.w.delta(out, 0, j!({}), Some("stop"));
                }
                self.end(out);
            }
            "error" => {
                let e = v.get("error");
                let et = e
                    .and_then(|e| e.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                let m = e
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("The provider reported an error during the stream.");
                self.fail(out, m, error_kind(et, 500), et);
            }
            "content_block_stop" => {
                if let Block::Tool(n) = self.block(index) {
                    if !self.args_sent.contains(&n) {
                        self.args_sent.push(n);
                        let tc = j!([{"index": n, "function": {"arguments": "{}"}}]);
                        self.w.delta(out, 0, j!({"tool_calls": tc}), None);
                    }
                }
            }
            _ => {} // ping, unknown future events
        }
    }
}

impl StreamTranslator for AnthropicStream {
    fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in self.parser.push(bytes) {
            self.handle(&mut out, e.event.as_deref(), &e.data);
        }
        out
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in self.parser.finish() {
            self.handle(&mut out, e.event.as_deref(), &e.data);
        }
        if !self.done {
            if self.finish_sent {
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
