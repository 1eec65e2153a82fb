//! The request body: read the few top-level fields routing needs, and rewrite `model` in place,
//! byte for byte leaving every other field exactly as the client sent it.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::error::GatewayError;

/// What the gateway reads from a chat-completions body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options`, read in the same parse (shaping and translation use it; no second parse).
    pub stream_options: StreamOptions,
}

/// What the body says about `stream_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamOptions {
    /// Absent or `null`.
    #[default]
    Absent,
    /// An object, with its `include_usage` if that is a boolean.
    Object { include_usage: Option<bool> },
    /// Something else: left exactly as sent.
    Other,
}

impl StreamOptions {
    pub fn include_usage(self) -> bool {
        matches!(
            self,
            StreamOptions::Object {
                include_usage: Some(true)
            }
        )
    }
}

fn invalid(what: &str) -> GatewayError {
    GatewayError::InvalidBody {
        reason: format!("not valid JSON for a chat completion ({what})"),
    }
}

/// Refuses an empty body and one that is not a JSON object (by its first byte).
fn object_shaped(body: &[u8]) -> Result<(), GatewayError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(GatewayError::InvalidBody {
            reason: "the body is empty; send a JSON object".into(),
        });
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(GatewayError::InvalidBody {
            reason: "the body must be a JSON object".into(),
        });
    }
    Ok(())
}

/// Validates the body in one pass that builds nothing and notes where the top-level `model`,
/// `stream` and `stream_options` are, then parses only those values; reads them as
/// [`inspect_doc`] does (the same requests are refused, with the same errors). No derived
/// deserializer: see `crate::read` for why.
pub fn inspect(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    object_shaped(body)?;
    let [model, stream, stream_options] = crate::json::validate_top(body, ROUTING_FIELDS)
        .map_err(|e| invalid(&e.to_string()))?
        .map(|span| {
            span.map(|(start, end)| {
                crate::translate::parse_json(body.get(start..end).unwrap_or_default())
                    .map_err(|e| invalid(&e.to_string()))
            })
            .transpose()
        });
    routing_fields(model?.as_ref(), stream?.as_ref(), stream_options?.as_ref())
}

/// The top-level fields [`inspect`] reads.
const ROUTING_FIELDS: [&str; 3] = ["model", "stream", "stream_options"];

/// The whole request as a JSON object: what native translation reads.
pub type Doc = serde_json::Map<String, serde_json::Value>;

/// Like [`inspect`], for requests that may be translated to a native API: the body is parsed once
/// into a [`Doc`], and the routing fields are read from it (translation then reuses the same `Doc`,
/// no second parse). The same requests are refused, with the same errors.
pub fn inspect_doc(body: &[u8]) -> Result<(ChatRequest, Doc), GatewayError> {
    use serde_json::Value;
    object_shaped(body)?;
    let doc = match crate::translate::parse_json(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(GatewayError::InvalidBody {
                reason: "the body must be a JSON object".into(),
            })
        }
        Err(e) => return Err(invalid(&e.to_string())),
    };
    let request = routing_fields(
        doc.get("model"),
        doc.get("stream"),
        doc.get("stream_options"),
    )?;
    Ok((request, doc))
}

/// A request's `model`, `stream` and `stream_options`.
fn routing_fields(
    model: Option<&serde_json::Value>,
    stream: Option<&serde_json::Value>,
    stream_options: Option<&serde_json::Value>,
) -> Result<ChatRequest, GatewayError> {
    use serde_json::Value;
    let model = match model {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()).filter(|m| !m.is_empty()),
        Some(_) => return Err(invalid("invalid type for `model`, expected a string")),
    };
    let stream = match stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("invalid type for `stream`, expected a boolean")),
    };
    let stream_options = match stream_options {
        None | Some(Value::Null) => StreamOptions::Absent,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => StreamOptions::Object {
                include_usage: None,
            },
            Some(Value::Bool(b)) => StreamOptions::Object {
                include_usage: Some(*b),
            },
            Some(_) => StreamOptions::Other,
        },
        Some(_) => StreamOptions::Other,
    };
    Ok(ChatRequest {
        model,
        stream,
        stream_options,
    })
}

/// The top-level `model` by a byte scan, before any parse: `Some` only for a plain string (no
/// escapes). A hint to pick how to parse; the parse decides.
pub fn peek_model(body: &[u8]) -> Option<&str> {
    let (start, end) = find_top_level(body, "model")?;
    let inner = body.get(start + 1..end.checked_sub(1)?)?;
    if body.get(start) != Some(&b'"') || inner.contains(&b'\\') {
        return None;
    }
    core::str::from_utf8(inner).ok()
}

/// Returns the body with the top-level `model` set to `model`, or `None` if it already is.
pub fn with_model(body: &[u8], current: Option<&str>, model: &str) -> Option<Vec<u8>> {
    if current == Some(model) {
        return None;
    }
    let encoded = serde_json::to_string(model).ok()?;
    with_field(body, "model", &encoded)
}

/// Returns the body with top-level `key` set to `raw_value` (JSON text), replacing the old value in
/// place or inserting the field first; every other byte stays as it was.
pub fn with_field(body: &[u8], key: &str, raw_value: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + key.len() + raw_value.len() + 4);
    match find_top_level(body, key) {
        Some((start, end)) => {
            out.extend_from_slice(body.get(..start)?);
            out.extend_from_slice(raw_value.as_bytes());
            out.extend_from_slice(body.get(end..)?);
        }
        None => {
            let open = body.iter().position(|&b| b == b'{')?;
            let rest = body.get(open + 1..)?;
            let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
            out.extend_from_slice(body.get(..=open)?);
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(raw_value.as_bytes());
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
        }
    }
    Some(out)
}

/// Sets `member` to `raw_value` inside the top-level object `key` (replacing an existing member).
pub fn with_object_member(
    body: &[u8],
    key: &str,
    member: &str,
    raw_value: &str,
) -> Option<Vec<u8>> {
    let (start, end) = find_top_level(body, key)?;
    let object = body.get(start..end)?;
    if object.first() != Some(&b'{') {
        return None;
    }
    let new_object = with_field(object, member, raw_value)?;
    let mut out = Vec::with_capacity(body.len() + new_object.len());
    out.extend_from_slice(body.get(..start)?);
    out.extend_from_slice(&new_object);
    out.extend_from_slice(body.get(end..)?);
    Some(out)
}

/// Byte span of the value of top-level `key` (see [`find_top_level`]).
pub fn top_level_span(body: &[u8], key: &str) -> Option<(usize, usize)> {
    find_top_level(body, key)
}

/// Byte span of the value of top-level key `key` in a JSON object that is already known to be valid.
fn find_top_level(body: &[u8], key: &str) -> Option<(usize, usize)> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(body, i);
        match body.get(i)? {
            b'}' => return None,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(body, i)?;
        let raw_key = body.get(i..key_end)?;
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(body, i + 1);
        let value_end = skip_value(body, value_start)?;
        if key_matches(raw_key, key) {
            return Some((value_start, value_end));
        }
        i = value_end;
    }
}

fn key_matches(raw: &[u8], key: &str) -> bool {
    let inner = raw.get(1..raw.len().saturating_sub(1)).unwrap_or_default();
    if !inner.contains(&b'\\') {
        return inner == key.as_bytes();
    }
    matches!(crate::translate::parse_json(raw), Ok(serde_json::Value::String(k)) if k == key)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `i` at an opening quote; returns the index just past the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// `i` at the first byte of a value; returns the index just past it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_model_is_only_a_hint_for_plain_strings() {
        assert_eq!(peek_model(br#"{"stream":true,"model":"m-1"}"#), Some("m-1"));
        assert_eq!(peek_model(br#"{"model":"a\u0062"}"#), None);
        assert_eq!(peek_model(br#"{"model":5}"#), None);
        assert_eq!(peek_model(br#"{"messages":[{"model":"x"}]}"#), None);
        assert_eq!(peek_model(b"{\"model\":\"\xff\"}"), None);
        assert_eq!(peek_model(b"{\"model\":\""), None);
    }

    #[test]
    fn inspect_doc_reads_what_inspect_reads() {
        let bodies: [&[u8]; 11] = [
            br#"{"mod\u0065l":7}"#,
            br#"{"model":"m"} x"#,
            br#"{"model":"m","messages":[]}"#,
            br#"{"model":"","stream":true,"stream_options":{"include_usage":true}}"#,
            br#"{"stream":null,"stream_options":{"include_usage":"yes"}}"#,
            br#"{"model":"m","stream_options":[1]}"#,
            br#"{"model":5}"#,
            br#"{"stream":"no"}"#,
            b"[1]",
            b"  ",
            b"{\"model\":",
        ];
        for b in bodies {
            match (inspect(b), inspect_doc(b)) {
                (Ok(a), Ok((d, _))) => assert_eq!(a, d),
                (Err(a), Err(d)) => {
                    assert_eq!((a.status(), a.message()), (d.status(), d.message()))
                }
                (a, d) => panic!("{a:?} vs {d:?}"),
            }
        }
    }

    #[test]
    fn inspects_fields() {
        let r = inspect(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            ChatRequest {
                model: Some("gpt-4o".into()),
                stream: true,
                stream_options: StreamOptions::Absent,
            }
        );
        let r = inspect(br#" {"messages":[]} "#).unwrap();
        assert_eq!(
            r,
            ChatRequest {
                model: None,
                stream: false,
                stream_options: StreamOptions::Absent,
            }
        );
        let so = |b: &[u8]| inspect(b).unwrap().stream_options;
        assert_eq!(
            so(br#"{"stream_options":{"include_usage":true}}"#),
            StreamOptions::Object {
                include_usage: Some(true)
            }
        );
        assert!(so(br#"{"stream_options":{"include_usage":true}}"#).include_usage());
        assert_eq!(
            so(br#"{"stream_options":{}}"#),
            StreamOptions::Object {
                include_usage: None
            }
        );
        assert_eq!(so(br#"{"stream_options":null}"#), StreamOptions::Absent);
        assert_eq!(so(br#"{"stream_options":5}"#), StreamOptions::Other);
        assert_eq!(
            so(br#"{"stream_options":{"include_usage":"y"}}"#),
            StreamOptions::Other
        );
        assert_eq!(inspect(b"").unwrap_err().status(), 400);
        assert_eq!(inspect(b"[1]").unwrap_err().status(), 400);
        assert_eq!(inspect(b"{\"model\":").unwrap_err().status(), 400);
        assert_eq!(inspect(br#"{"model":5}"#).unwrap_err().status(), 400);
        assert_eq!(
            inspect(br#"{"model":"a","model":"b"}"#)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            inspect(br#"{"model":"a\u00e9"}"#).unwrap().model.as_deref(),
            Some("aé")
        );
    }

    #[test]
    fn rewrites_only_the_model() {
        let body = br#"{ "messages": [{"content":"say \"model\": {x}"}], "model" : "gpt-4o", "temperature": 1.50e0 }"#;
        let out = with_model(body, Some("gpt-4o"), "llama3").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{ "messages": [{"content":"say \"model\": {x}"}], "model" : "llama3", "temperature": 1.50e0 }"#
        );
        assert!(with_model(body, Some("gpt-4o"), "gpt-4o").is_none());
    }

    #[test]
    fn inserts_model_when_absent() {
        let out = with_model(br#"{"messages":[]}"#, None, "m\"x").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"m\"x","messages":[]}"#
        );
        let out = with_model(b"{ }", None, "m").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"model":"m" }"#);
    }

    #[test]
    fn handles_escaped_keys_and_nested_models() {
        let body = br#"{"metadata":{"model":"inner"},"mod\u0065l":"outer","n":[1,{"model":2}]}"#;
        let out = with_model(body, Some("outer"), "new").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"metadata":{"model":"inner"},"mod\u0065l":"new","n":[1,{"model":2}]}"#
        );
    }

    #[test]
    fn never_panics_on_garbage() {
        for junk in [
            &b"{"[..],
            b"{\"",
            b"{\"a\"",
            b"{\"a\":",
            b"{\"a\":[",
            b"}",
            b"{\"a\":\"\\",
        ] {
            let _ = find_top_level(junk, "model");
            let _ = with_model(junk, None, "x");
        }
    }
}
