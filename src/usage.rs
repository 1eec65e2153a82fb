//! Token usage: read from JSON responses and SSE streams without holding chunks back, ask streams for
//! usage, strip the extra usage chunk the client did not ask for, estimate when nothing is reported,
//! and the usage record the filter reports.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::error::GatewayError;
use crate::sse::SseParser;
use alloc::collections::BTreeMap;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

/// A JSON `usage` object (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`,
/// each optional); `None` when a field has the wrong type. Read by hand from a `Value` (see
/// `crate::read` for why there are no derived deserializers in the filter).
fn usage_of(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    let count = |k: &str| match o.get(k) {
        None => Some(0),
        Some(n) => n.as_u64(),
    };
    let cached_tokens = match o.get("prompt_tokens_details") {
        None | Some(Value::Null) => 0,
        Some(Value::Object(d)) => match d.get("cached_tokens") {
            None | Some(Value::Null) => 0,
            Some(n) => n.as_u64()?,
        },
        Some(_) => return None,
    };
    Some(Usage {
        prompt_tokens: count("prompt_tokens")?,
        completion_tokens: count("completion_tokens")?,
        cached_tokens,
    })
}

/// [`usage_of`] from the text of a `usage` value at the start of `b` (whatever follows it is
/// ignored), without building it: its fields are found in one validating pass and only their values
/// are parsed (numbers: nothing allocated). `None` also for a duplicate field (the caller then reads
/// the whole document with [`usage_of`]).
fn usage_of_text(b: &[u8]) -> Option<Usage> {
    if b.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let ([prompt, completion, details], _) = crate::json::prefix_top(
        b,
        [
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
        ],
    )
    .ok()?;
    let value = |b: &[u8], span: Option<(usize, usize)>| {
        span.map(|(s, e)| crate::json::parse(b.get(s..e).unwrap_or_default()))
    };
    let count = |span| match value(b, span) {
        None => Some(0),
        Some(v) => v.ok()?.as_u64(),
    };
    let cached_tokens = match details.and_then(|(s, e)| b.get(s..e)) {
        None | Some(b"null") => 0,
        Some(d) if d.first() == Some(&b'{') => {
            let ([cached], _) = crate::json::prefix_top(d, ["cached_tokens"]).ok()?;
            match value(d, cached) {
                None => 0,
                Some(v) => match v.ok()? {
                    Value::Null => 0,
                    n => n.as_u64()?,
                },
            }
        }
        Some(_) => return None,
    };
    Some(Usage {
        prompt_tokens: count(prompt)?,
        completion_tokens: count(completion)?,
        cached_tokens,
    })
}

/// One choice of a completion or chunk: the `content` of its `message` and `delta`, whether it has a
/// `finish_reason`.
struct Choice<'a> {
    message: Option<&'a Value>,
    delta: Option<&'a Value>,
    finished: bool,
}

/// A chat completion or stream chunk: `model`, `choices`, `usage`. `None` when a field has the wrong
/// type (such a document is not read at all).
struct Completion<'a> {
    model: Option<String>,
    choices: Vec<Choice<'a>>,
    usage: Option<Usage>,
}

/// `null` or absent: `None`.
fn present<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

/// `null`: `None`.
fn non_null(v: &Value) -> Option<&Value> {
    Some(v).filter(|v| !v.is_null())
}

/// The top-level `model`, `choices` and usage of a document's text, reading only those values (one
/// validating pass finds them; `model` and `choices` are parsed, `usage` read from its span).
/// Absent fields read as `null`. `None`: the text is to be read whole instead ([`Completion::read`]
/// decides): not an object, invalid, a duplicate field, a value a parse refuses, a `usage` of the
/// wrong type.
fn fields_of_text(b: &[u8]) -> Option<(Value, Value, Option<Usage>)> {
    if b.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let [model, choices, usage] =
        crate::json::validate_top(b, ["model", "choices", "usage"]).ok()?;
    let value = |span: Option<(usize, usize)>| match span {
        None => Some(Value::Null),
        Some((s, e)) => crate::json::parse(b.get(s..e)?).ok(),
    };
    let usage = match usage.and_then(|(s, e)| b.get(s..e)) {
        None | Some(b"null") => None,
        Some(u) => Some(usage_of_text(u)?),
    };
    Some((value(model)?, value(choices)?, usage))
}

impl<'a> Completion<'a> {
    fn read(v: &'a Value) -> Option<Completion<'a>> {
        let o = v.as_object()?;
        let usage = match present(o, "usage") {
            None => None,
            Some(u) => Some(usage_of(u)?),
        };
        Self::of(present(o, "model"), present(o, "choices"), usage)
    }

    /// From the values of `model` and `choices` (`null` or absent: `None`) and the usage read.
    fn of(
        model: Option<&Value>,
        list: Option<&'a Value>,
        usage: Option<Usage>,
    ) -> Option<Completion<'a>> {
        let model = match model {
            None => None,
            Some(m) => Some(m.as_str()?.to_string()),
        };
        let content = |c: &'a Value, k: &str| -> Option<Option<&'a Value>> {
            match c.get(k) {
                None | Some(Value::Null) => Some(None),
                Some(Value::Object(m)) => Some(present(m, "content")),
                Some(_) => None,
            }
        };
        let mut choices = Vec::new();
        if let Some(list) = list {
            for c in list.as_array()? {
                let finished = match present(c.as_object()?, "finish_reason") {
                    None => false,
                    Some(Value::String(_)) => true,
                    Some(_) => return None,
                };
                choices.push(Choice {
                    message: content(c, "message")?,
                    delta: content(c, "delta")?,
                    finished,
                });
            }
        }
        Some(Completion {
            model,
            choices,
            usage,
        })
    }
}

/// Approximate characters of a message's content: a string's characters, or the size of
/// structured content as JSON.
fn content_chars(c: Option<&Value>) -> usize {
    match c {
        None => 0,
        Some(Value::String(s)) => s.chars().count(),
        Some(v) => crate::translate::json_bytes(v).len(),
    }
}

/// What a (non-streamed) JSON response tells about usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    pub completion_chars: usize,
}

/// Reads a whole JSON response. Usage lives at the end of OpenAI bodies: the `usage` object is found
/// from the tail and only it (and the `model` string near the head) is parsed. Only without usage is
/// the whole body parsed, for `completion_chars` (used only to estimate the missing usage).
pub fn from_json_response(body: &[u8]) -> ResponseFacts {
    if let Some(f) = usage_from_tail(body) {
        return f;
    }
    let Ok(v) = crate::translate::parse_json(body) else {
        return ResponseFacts::default();
    };
    match Completion::read(&v) {
        Some(c) => ResponseFacts {
            usage: c.usage,
            model: c.model,
            completion_chars: c.choices.iter().map(|ch| content_chars(ch.message)).sum(),
        },
        None => ResponseFacts::default(),
    }
}

fn usage_from_tail(body: &[u8]) -> Option<ResponseFacts> {
    const USAGE: &[u8] = b"\"usage\":";
    if body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .and_then(|i| body.get(i))
        != Some(&b'}')
    {
        return None;
    }
    let at = rfind(body, USAGE)?;
    let usage = usage_of_text(body.get(at + USAGE.len()..)?)?;
    const MODEL: &[u8] = b"\"model\":";
    let model = find(body, MODEL, 0).and_then(|m| {
        let mut v = m + MODEL.len();
        while body.get(v).is_some_and(u8::is_ascii_whitespace) {
            v += 1;
        }
        if body.get(v) != Some(&b'"') {
            return None;
        }
        let end = string_span(body, v)?.0;
        match crate::translate::parse_json(body.get(v..end)?) {
            Ok(Value::String(m)) => Some(m),
            _ => None,
        }
    });
    Some(ResponseFacts {
        usage: Some(usage),
        model,
        completion_chars: 0,
    })
}

/// Rough token estimate for text of `chars` characters (about four characters per token).
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Reads usage from an OpenAI SSE stream as it passes. With `strip`, the usage-only chunk
/// (`"choices":[]` with `usage`) is removed from what the client sees; every other byte is passed
/// on unchanged. Without `strip` nothing is held back at all.
#[derive(Debug, Default)]
pub struct StreamTap {
    strip: bool,
    parser: SseParser,
    /// Only with `strip`: the bytes of an event not yet complete.
    pending: Vec<u8>,
    pub usage: Option<Usage>,
    pub model: Option<String>,
    pub completion_chars: usize,
    pub done: bool,
    pub finished: bool,
    /// With `capture`: the streamed text, for prompt storage.
    pub capture: bool,
    pub text: String,
    /// Stripping was given up because an event passed the bound (see [`StreamTap::truncated`]).
    overflowed: bool,
    /// A Responses API stream (typed events, usage in `response.completed`, no `[DONE]`).
    pub responses: bool,
}

impl StreamTap {
    pub fn new(strip: bool) -> Self {
        StreamTap {
            strip,
            ..Default::default()
        }
    }

    /// Feeds a chunk; returns `Some(bytes)` to send instead of the chunk, or `None` to send it as is.
    pub fn push(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        if !self.strip {
            for ev in self.parser.push(chunk) {
                self.observe(&ev.data);
            }
            return None;
        }
        if self.pending.len().saturating_add(chunk.len()) > crate::sse::MAX_EVENT_BYTES {
            // An event larger than the bound: stop holding bytes back. What is pending and the rest
            // of the stream pass through untouched; the parser skips the oversized event itself.
            self.strip = false;
            self.overflowed = true;
            let mut out = core::mem::take(&mut self.pending);
            out.extend_from_slice(chunk);
            for ev in self.parser.push(&out) {
                self.observe(&ev.data);
            }
            return Some(out);
        }
        let mut pending = core::mem::take(&mut self.pending);
        pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(pending.len());
        let mut start = 0;
        while let Some(end) = event_end(&pending, start) {
            let raw = pending.get(start..end).unwrap_or_default();
            let mut keep = true;
            for ev in self.parser.push(raw) {
                if self.observe(&ev.data) {
                    keep = false;
                }
            }
            if keep {
                out.extend_from_slice(raw);
            }
            start = end;
        }
        pending.drain(..start);
        self.pending = pending;
        if out.len() == chunk.len() && out == chunk {
            return None;
        }
        Some(out)
    }

    /// Part of the stream could not be read (an event larger than the bound was passed through
    /// unread): the usage record is marked truncated, and estimated when no usage was seen.
    pub fn truncated(&self) -> bool {
        self.overflowed || self.parser.overflowed()
    }

    /// End of stream: whatever is still pending goes out as it is.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let rest = core::mem::take(&mut self.pending);
        for ev in self
            .parser
            .push(&rest)
            .into_iter()
            .chain(self.parser.finish())
        {
            self.observe(&ev.data);
        }
        (self.strip && !rest.is_empty()).then_some(rest)
    }

    /// Records what an event says; returns true for a usage-only chunk.
    fn observe(&mut self, data: &str) -> bool {
        if self.responses {
            let ev = crate::api::responses_event(data);
            if ev.model.is_some() {
                self.model = ev.model;
            }
            if let Some(t) = ev.text {
                self.completion_chars += t.chars().count();
                if self.capture && self.text.len() < MAX_STORED_TEXT {
                    self.text.push_str(&t);
                }
            }
            if ev.usage.is_some() {
                self.usage = ev.usage;
            }
            if ev.done {
                self.done = true;
                self.finished = true;
            }
            return false;
        }
        if data == "[DONE]" {
            self.done = true;
            return false;
        }
        // Most events carry neither usage nor anything else the record needs but the size of their
        // text: a byte scan, no JSON parse. Events mentioning "usage", the first event (model) and
        // captured streams are parsed.
        if self.model.is_some() && !self.capture && !contains(data.as_bytes(), b"\"usage\"") {
            if let Some((chars, finished)) = scan_chunk(data.as_bytes()) {
                self.completion_chars += chars;
                self.finished |= finished;
                return false;
            }
        }
        // Only `model`, `choices` and `usage` are built (the whole event only in odd cases).
        let (model, choices);
        let read = match fields_of_text(data.as_bytes()) {
            Some((m, list, usage)) => {
                (model, choices) = (m, list);
                Completion::of(non_null(&model), non_null(&choices), usage)
            }
            None => {
                let Ok(v) = crate::translate::parse_json(data.as_bytes()) else {
                    return false;
                };
                choices = v;
                Completion::read(&choices)
            }
        };
        let Some(c) = read else {
            return false;
        };
        if self.model.is_none() {
            self.model = c.model;
        }
        if self.capture && self.text.len() < MAX_STORED_TEXT {
            // The first choice's delta text.
            if let Some(Value::String(t)) = c.choices.first().and_then(|ch| ch.delta) {
                self.text.push_str(t);
            }
        }
        for ch in &c.choices {
            self.completion_chars += content_chars(ch.delta);
            if ch.finished {
                self.finished = true;
            }
        }
        match c.usage {
            Some(u) => {
                self.usage = Some(u);
                c.choices.is_empty()
            }
            None => false,
        }
    }
}

/// `needle` occurs in `hay`.
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle, 0).is_some()
}

/// First position of `needle` in `hay` at or after `from`.
/// (Anchored on the needle's second byte: the first is a quote, frequent in JSON.)
pub(crate) fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let Some(&anchor) = rest.first() else {
        return hay
            .get(from..)?
            .iter()
            .position(|&b| b == first)
            .map(|p| p + from);
    };
    let mut i = from + 1;
    loop {
        let at = i + crate::sse::find2(hay.get(i..)?, anchor, anchor)?;
        let start = at - 1;
        if hay.get(start) == Some(&first) && hay.get(at..).is_some_and(|h| h.starts_with(rest)) {
            return Some(start);
        }
        i = at + 1;
    }
}

/// Last position of `needle` (at least two bytes) in `hay`, anchored on its second byte.
pub(crate) fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let &anchor = rest.first()?;
    let mut end = hay.len();
    loop {
        let at = hay.get(..end)?.iter().rposition(|&b| b == anchor)?;
        let start = at.checked_sub(1)?;
        if hay.get(start) == Some(&first) && hay.get(at..).is_some_and(|h| h.starts_with(rest)) {
            return Some(start);
        }
        end = at;
    }
}

/// Index past the JSON string starting at `i` (an opening quote), and its characters (decoded).
fn string_span(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let mut j = i + 1;
    let mut chars = 0;
    loop {
        match *b.get(j)? {
            b'"' => return Some((j + 1, chars)),
            // An escape is one character; a `\u` low surrogate completes the one before it.
            b'\\' if b.get(j + 1) == Some(&b'u') => {
                let low = b.get(j + 2..j + 4).is_some_and(|h| {
                    h.first().is_some_and(|c| c.eq_ignore_ascii_case(&b'd'))
                        && h.get(1)
                            .is_some_and(|c| matches!(c.to_ascii_lowercase(), b'c'..=b'f'))
                });
                j += 6;
                chars += usize::from(!low);
            }
            b'\\' => {
                j += 2;
                chars += 1;
            }
            c => {
                j += 1;
                if c & 0xC0 != 0x80 {
                    chars += 1;
                }
            }
        }
    }
}

/// A chunk event without usage, read by a byte scan: the characters of its `"content"` string (as
/// [`content_chars`] counts them) and whether it has a non-null `finish_reason`. `None` when the
/// shape is not the plain one (several or non-string contents, odd values): the caller parses it.
fn scan_chunk(d: &[u8]) -> Option<(usize, bool)> {
    let skip_ws = |mut i: usize| {
        while matches!(d.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    };
    let (first, last) = (
        skip_ws(0),
        d.iter().rposition(|b| !b.is_ascii_whitespace())?,
    );
    if d.get(first) != Some(&b'{') || d.get(last) != Some(&b'}') {
        return None;
    }
    const CONTENT: &[u8] = b"\"content\":";
    let chars = match find(d, CONTENT, 0) {
        None => 0,
        Some(at) => {
            let v = skip_ws(at + CONTENT.len());
            let chars = match d.get(v)? {
                b'"' => string_span(d, v)?.1,
                b'n' if d.get(v..v + 4) == Some(b"null") => 0,
                _ => return None,
            };
            if find(d, CONTENT, at + 1).is_some() {
                return None;
            }
            chars
        }
    };
    const FINISH: &[u8] = b"\"finish_reason\":";
    let finished = match find(d, FINISH, 0) {
        None => false,
        Some(at) => match d.get(skip_ws(at + FINISH.len()))? {
            b'"' => true,
            b'n' => false,
            _ => return None,
        },
    };
    Some((chars, finished))
}

/// End (exclusive) of the first complete SSE event at or after `from`: a line break followed by an
/// empty line (`\n\n`, `\r\n\r\n`, `\r\r`).
fn event_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    let mut line_empty = true;
    loop {
        // Jump to the next line break (one scan), instead of stepping byte by byte.
        let p = crate::sse::find2(b.get(i..)?, b'\n', b'\r')?;
        if p > 0 {
            line_empty = false;
        }
        let at = i + p;
        let cr = b.get(at) == Some(&b'\r');
        if cr && b.get(at + 1).is_none() {
            return None; // a lone \r at the end may still be followed by \n
        }
        let next = if cr && b.get(at + 1) == Some(&b'\n') {
            at + 2
        } else {
            at + 1
        };
        if line_empty && at > from {
            return Some(next);
        }
        line_empty = true;
        i = next;
    }
}

/// For a streamed request: makes sure the provider is asked for usage. Returns the new body (if it
/// had to change) and whether the client itself asked for the usage chunk.
pub fn ensure_stream_usage(body: &[u8]) -> (Option<Vec<u8>>, bool) {
    match crate::body::inspect(body) {
        Ok(req) => ensure_stream_usage_for(body, req.stream_options),
        Err(_) => (None, true),
    }
}

/// [`ensure_stream_usage`] with the `stream_options` already read by `body::inspect`.
pub fn ensure_stream_usage_for(
    body: &[u8],
    opts: crate::body::StreamOptions,
) -> (Option<Vec<u8>>, bool) {
    use crate::body::StreamOptions as O;
    match opts {
        O::Other => (None, true),
        O::Object {
            include_usage: Some(true),
        } => (None, true),
        O::Object { .. } => {
            let b =
                crate::body::with_object_member(body, "stream_options", "include_usage", "true");
            (b, false)
        }
        O::Absent => {
            let b = crate::body::with_field(body, "stream_options", r#"{"include_usage":true}"#);
            (b, false)
        }
    }
}

/// Request tags from the `X-LLM-Gateway-Tags` header: comma-separated `key=value` pairs.
pub const TAGS_HEADER: &str = "x-llm-gateway-tags";
const MAX_TAGS: usize = 20;

pub fn parse_tags(header: Option<&str>) -> Result<BTreeMap<String, String>, GatewayError> {
    let mut tags = BTreeMap::new();
    let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return Ok(tags);
    };
    let bad = |reason: String| GatewayError::InvalidTags { reason };
    for pair in h.split(',') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("'{}' is not key=value", pair.trim())))?;
        let (k, v) = (k.trim(), v.trim());
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(bad(format!(
                "tag key '{k}' must be 1-64 of A-Z a-z 0-9 _ - . /"
            )));
        }
        if v.is_empty() || v.len() > 256 || v.chars().any(|c| c.is_control() || c == '=') {
            return Err(bad(format!(
                "tag '{k}' needs a value of 1-256 printable characters"
            )));
        }
        if tags.insert(k.to_string(), v.to_string()).is_some() {
            return Err(bad(format!("tag '{k}' is given twice")));
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(bad(format!("at most {MAX_TAGS} tags per request")));
    }
    Ok(tags)
}

/// One usage record, as the sidecar ingests it (`POST /internal/v1/usage`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    pub id: String,
    pub time: u64,
    pub org_id: String,
    pub cluster_id: Option<String>,
    pub api_key_id: String,
    pub config_id: String,
    pub provider: String,
    pub provider_type: String,
    pub provider_key_last4: Option<String>,
    pub model_requested: String,
    pub model_used: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub estimated: bool,
    pub status: u32,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub stream: bool,
    pub fallback: bool,
    pub truncated: bool,
    pub tags: BTreeMap<String, String>,
    /// Only when the key's `storePrompts` is on: the request's `messages` and the answer's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
}

/// Stored prompt and completion texts are cut at this many bytes.
pub const MAX_STORED_TEXT: usize = 32 * 1024;

/// `s` cut to at most `max` bytes on a character boundary.
pub fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_string()
}

/// The request's `messages`, as JSON text, for prompt storage.
pub fn prompt_text(body: &[u8]) -> Option<String> {
    // The raw span of the top-level `messages` (the body was validated when it was routed).
    let (start, end) = crate::body::top_level_span(body, "messages")?;
    let text = core::str::from_utf8(body.get(start..end)?).ok()?;
    Some(clip(text, MAX_STORED_TEXT))
}

/// The text of the first choice of a completion (`message`) or a chunk (`delta`).
pub fn completion_text(json: &[u8]) -> Option<String> {
    let v = crate::translate::parse_json(json).ok()?;
    let c = Completion::read(&v)?;
    let first = c.choices.into_iter().next()?;
    match first.message.or(first.delta)? {
        Value::String(t) => Some(t.clone()),
        _ => None,
    }
}

/// The batch body for the sidecar.
pub fn batch_body(records: &[UsageRecord]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Batch<'a> {
        records: &'a [UsageRecord],
    }
    serde_json::to_vec(&Batch { records }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(usage: bool) -> Vec<u8> {
        let mut s = String::new();
        s.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m-up\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
        s.push_str("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello wörld\"},\"finish_reason\":null}]}\n\n");
        s.push_str("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n");
        if usage {
            s.push_str("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\n");
        }
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    #[test]
    fn event_fields_read_as_the_parsed_event() {
        let facts = |c: Completion| {
            let choices: Vec<_> = c
                .choices
                .iter()
                .map(|ch| (ch.message.cloned(), ch.delta.cloned(), ch.finished))
                .collect();
            (c.model, choices, c.usage)
        };
        let mut read_fast = 0;
        for doc in [
            r#"{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hé"},"finish_reason":null}]}"#,
            r#"{"model":null,"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            r#" {"choices":[{"delta":{"content":[{"type":"text"}]},"finish_reason":"stop"}],"usage":null} "#,
            r#"{"choices":null,"model":"m\u00e9"}"#,
            r#"{"model":1,"choices":[]}"#,
            r#"{"model":"m","choices":{}}"#,
            r#"{"model":"m","choices":[{"delta":1}]}"#,
            r#"{"model":"m","choices":[{"finish_reason":1}]}"#,
            r#"{"model":"m","usage":{"prompt_tokens":"1"}}"#,
            r#"{"model":"m","usage":[]}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2},"choices":[]}"#,
            r#"[]"#,
            r#"{"model":"m""#,
        ] {
            let whole = serde_json::from_str::<Value>(doc).ok();
            let by_value = whole.as_ref().and_then(Completion::read).map(facts);
            let Some((model, list, usage)) = fields_of_text(doc.as_bytes()) else {
                continue;
            };
            read_fast += 1;
            let by_text = Completion::of(non_null(&model), non_null(&list), usage).map(facts);
            assert_eq!(by_text, by_value, "{doc}");
        }
        assert_eq!(read_fast, 8);
        // A value only a parse refuses, in a field not read: the event is still read.
        let (model, ..) = fields_of_text(br#"{"model":"m","created":1e999}"#).unwrap();
        assert_eq!(model, "m");
    }

    #[test]
    fn usage_text_reads_as_the_parsed_value() {
        for doc in [
            r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}"#,
            r#" {"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":7,"x":[1]}} ,"y":1}"#,
            r#"{"prompt_tokens_details":null,"completion_tokens":0}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":null}}"#,
            r#"{}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":1.5}"#,
            r#"{"prompt_tokens":null}"#,
            r#"{"prompt_tokens":"3"}"#,
            r#"{"prompt_tokens":1e400}"#,
            r#"{"prompt_tokens_details":[]}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":"1"}}"#,
            r#"[1]"#,
            r#"null"#,
            r#"{"prompt_tokens":1"#,
        ] {
            let by_value = serde_json::Deserializer::from_str(doc)
                .into_iter::<Value>()
                .next()
                .and_then(Result::ok)
                .and_then(|v| usage_of(&v));
            assert_eq!(usage_of_text(doc.as_bytes()), by_value, "{doc}");
        }
        // A duplicate field: not read from the text (the whole document is then parsed).
        assert_eq!(
            usage_of_text(br#"{"prompt_tokens":1,"prompt_tokens":2}"#),
            None
        );
        let body = br#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#;
        assert_eq!(from_json_response(body).usage.unwrap().prompt_tokens, 2);
    }

    #[test]
    fn a_huge_event_passes_through_and_marks_the_tap_truncated() {
        for strip in [false, true] {
            let mut input = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
            input.extend(core::iter::repeat_n(b'a', 3 * crate::sse::MAX_EVENT_BYTES));
            input.extend_from_slice(b"\"}}]}\n\n");
            input.extend_from_slice(&stream(true));
            let mut tap = StreamTap::new(strip);
            let mut out = Vec::new();
            for c in input.chunks(64 * 1024) {
                match tap.push(c) {
                    Some(b) => out.extend(b),
                    None => out.extend_from_slice(c),
                }
                assert!(tap.pending.len() <= crate::sse::MAX_EVENT_BYTES);
            }
            if let Some(rest) = tap.finish() {
                out.extend(rest);
            }
            // Past the bound nothing is stripped any more: the client gets every byte.
            assert_eq!(out, input, "strip={strip}");
            assert!(tap.truncated());
            assert_eq!(tap.usage.map(|u| u.prompt_tokens), Some(11));
            assert!(tap.done);
        }
    }

    fn run(tap: &mut StreamTap, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(core::iter::once(&input.len())) {
            let piece = &input[last..c];
            match tap.push(piece) {
                Some(b) => out.extend(b),
                None => out.extend_from_slice(piece),
            }
            last = c;
        }
        if let Some(b) = tap.finish() {
            out.extend(b);
        }
        out
    }

    #[test]
    fn reads_usage_without_touching_the_stream() {
        let input = stream(true);
        let mut tap = StreamTap::new(false);
        assert_eq!(run(&mut tap, &input, &[7, 100, 101]), input);
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 3,
                cached_tokens: 2
            })
        );
        assert!(tap.done && tap.finished);
        assert_eq!(tap.completion_chars, 11);
        assert_eq!(tap.model.as_deref(), Some("m-up"));
    }

    #[test]
    fn strips_only_the_usage_chunk_at_any_split() {
        let input = stream(true);
        let expected = stream(false);
        for a in 0..input.len() {
            for b in [a, (a + 13).min(input.len()), (a + 97).min(input.len())] {
                let mut tap = StreamTap::new(true);
                let out = run(&mut tap, &input, &[a, b]);
                assert_eq!(out, expected, "cuts {a},{b}");
                assert_eq!(tap.usage.map(|u| u.prompt_tokens), Some(11));
                assert!(tap.done);
            }
        }
    }

    #[test]
    fn strip_passes_streams_without_usage_unchanged() {
        let input = stream(false);
        let mut tap = StreamTap::new(true);
        assert_eq!(run(&mut tap, &input, &[5, 50]), input);
        assert_eq!(tap.usage, None);
        let mut tap = StreamTap::new(true);
        let cut = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"cho";
        assert_eq!(run(&mut tap, cut, &[]), cut.to_vec());
        assert!(!tap.done);
    }

    #[test]
    fn crlf_events() {
        let input = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let mut tap = StreamTap::new(true);
        assert_eq!(
            run(&mut tap, input, &[60, 61]),
            b"data: [DONE]\r\n\r\n".to_vec()
        );
        assert_eq!(tap.usage.map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn find_bytes() {
        assert_eq!(find(b"\"usage\":1", b"\"usage\"", 0), Some(0));
        assert_eq!(find(b"x\"use\"usage\"", b"\"usage\"", 0), Some(5));
        assert_eq!(find(b"\"usage\"", b"\"usage\"", 1), None);
        assert_eq!(find(b"ab", b"\"usage\"", 9), None);
        assert_eq!(find(b"abc", b"c", 1), Some(2));
        assert!(!contains(b"\"usag", b"\"usage\""));
        assert_eq!(rfind(b"\"usage\":{\"usage\":1}", b"\"usage\":"), Some(9));
        assert_eq!(rfind(b"usage\":", b"\"usage\":"), None);
        assert_eq!(rfind(b"", b"\"u"), None);
    }

    #[test]
    fn the_chunk_scan_agrees_with_the_parse() {
        let chunks: [&str; 8] = [
            r#"{"choices":[{"index":0,"delta":{"content":"\ud83d\uDE00!\n"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"h\u00e9llo \"x\" ü"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content": null},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":[{"type":"text"}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[]}}]}"#,
        ];
        for c in chunks {
            let v: Value = serde_json::from_str(c).unwrap();
            let parsed = Completion::read(&v).unwrap();
            let chars: usize = parsed
                .choices
                .iter()
                .map(|ch| content_chars(ch.delta))
                .sum();
            let finished = parsed.choices.iter().any(|ch| ch.finished);
            if let Some(scanned) = scan_chunk(c.as_bytes()) {
                assert_eq!(scanned, (chars, finished), "{c}");
            }
        }
        assert_eq!(scan_chunk(chunks[0].as_bytes()), Some((3, false)));
        assert!(scan_chunk(chunks[5].as_bytes()).is_none());
        assert!(scan_chunk(chunks[6].as_bytes()).is_none());
        assert!(scan_chunk(b"not json").is_none());
    }

    #[test]
    fn json_response_usage() {
        let body = br#"{"id":"x","model":"gpt-4o-2024","choices":[{"index":0,"message":{"role":"assistant","content":"abcdefgh"}}],
                        "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
        let f = from_json_response(body);
        assert_eq!(
            f.usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_tokens: 0
            })
        );
        assert_eq!(f.model.as_deref(), Some("gpt-4o-2024"));
        // With usage, the text size is not needed (nor computed); without, it is.
        assert_eq!(f.completion_chars, 0);
        let no_usage = br#"{"model":"m","choices":[{"message":{"content":"abcdefgh"}}]}"#;
        let f = from_json_response(no_usage);
        assert_eq!((f.usage, f.completion_chars), (None, 8));
        let escaped = br#"{"model":"a\"b","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}} "#;
        let f = from_json_response(escaped);
        assert_eq!(f.model.as_deref(), Some("a\"b"));
        assert_eq!(f.usage.map(|u| u.cached_tokens), Some(1));
        assert_eq!(from_json_response(b"not json"), ResponseFacts::default());
        assert_eq!(estimate_tokens(9), 3);
    }

    #[test]
    fn asks_streams_for_usage() {
        let (b, asked) = ensure_stream_usage(br#"{"model":"m","stream":true,"messages":[]}"#);
        assert!(!asked);
        assert_eq!(
            String::from_utf8(b.unwrap()).unwrap(),
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
        );
        let (b, asked) =
            ensure_stream_usage(br#"{"stream_options":{"include_usage":true},"messages":[]}"#);
        assert!(asked && b.is_none());
        let (b, asked) = ensure_stream_usage(
            br#"{"stream_options":{"continuous_usage_stats":true},"messages":[]}"#,
        );
        assert!(!asked);
        assert_eq!(
            String::from_utf8(b.unwrap()).unwrap(),
            r#"{"stream_options":{"include_usage":true,"continuous_usage_stats":true},"messages":[]}"#
        );
    }

    #[test]
    fn tags() {
        let t = parse_tags(Some("team=search, env = prod")).unwrap();
        assert_eq!(t.get("team").map(String::as_str), Some("search"));
        assert_eq!(t.get("env").map(String::as_str), Some("prod"));
        assert!(parse_tags(None).unwrap().is_empty());
        for bad in ["team", "=x", "a b=c", "k=", "k=v,k=w", "k=v=w"] {
            assert_eq!(parse_tags(Some(bad)).unwrap_err().status(), 400, "{bad}");
        }
        let many: Vec<String> = (0..21).map(|i| format!("k{i}=v")).collect();
        assert!(parse_tags(Some(&many.join(","))).is_err());
    }

    #[test]
    fn prompt_and_completion_texts() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"secret plan"}]}"#;
        assert_eq!(
            prompt_text(body).unwrap(),
            r#"[{"role":"user","content":"secret plan"}]"#
        );
        assert_eq!(
            completion_text(br#"{"choices":[{"message":{"content":"hi"}}]}"#).as_deref(),
            Some("hi")
        );
        let mut tap = StreamTap::new(false);
        tap.capture = true;
        run(&mut tap, &stream(true), &[10]);
        assert_eq!(tap.text, "Hello wörld");
        assert_eq!(clip("héllo", 2), "h");
    }

    #[test]
    fn batch_shape() {
        let r = UsageRecord {
            id: "1".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&batch_body(&[r])).unwrap();
        assert_eq!(v["records"][0]["id"], "1");
        assert!(v["records"][0]["ttftMs"].is_null());
        assert!(
            v["records"][0].get("prompt").is_none(),
            "no prompt field unless stored"
        );
        assert_eq!(v["records"][0]["promptTokens"], 0);
    }
}
