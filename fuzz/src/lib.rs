//! The fuzz targets, as plain functions over bytes: each `fuzz_targets/<name>.rs` (libFuzzer) and the
//! stable harness (`tests/stable.rs`) call the same function. Targets stay thin: they call the filter's
//! public pure functions the way the host adapter does, and check the few properties that must hold
//! for any input (chunking never changes a parse, pass-through never grows, streams end in `[DONE]`).
//! The only failure a target can report is a panic (or an abort: out-of-memory, stack overflow).

mod lifecycle;
pub use lifecycle::lifecycle;

use llm_gateway::{
    auth, body, config, destination, entry, fallback, gateway, hostapi, json, metrics, pbstruct,
    resolve, sse, translate, usage,
};

/// Splits `data` into a chunking seed (first byte) and the payload, and cuts the payload into
/// chunks whose sizes derive from the seed: the filter sees bodies in arbitrary pieces.
fn chunks(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let (seed, payload) = match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => (0, data),
    };
    let mut out = Vec::new();
    let mut rest = payload;
    let mut step = usize::from(seed % 17) + 1;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
        step = (step * 7 + usize::from(seed)) % 61 + 1;
    }
    (out, payload)
}

/// Splits `data` into `n` fields at NUL bytes (missing fields are empty).
fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = data.splitn(n, |&b| b == 0).collect();
    v.resize(n, &[]);
    v
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The request body: routing peek, in-place rewrites, stream-usage injection, prompt capture, and the
/// native request translators (Anthropic, Gemini).
pub fn body_inspect(data: &[u8]) {
    let req = body::inspect(data);
    if let Ok(r) = &req {
        if let Some(b) = body::with_model(data, r.model.as_deref(), "gw-model") {
            // The rewritten body must still be a parseable object carrying the new model.
            let again = body::inspect(&b).ok();
            assert_eq!(
                again.and_then(|r| r.model).as_deref(),
                Some("gw-model"),
                "with_model produced a body without the model"
            );
        }
        let _ = body::with_field(data, "stream", "true");
        let _ = body::with_object_member(data, "stream_options", "include_usage", "true");
        let (b, _) = usage::ensure_stream_usage(data);
        if let Some(b) = b {
            assert!(
                body::inspect(&b).is_ok(),
                "ensure_stream_usage broke the body"
            );
        }
    }
    let _ = usage::prompt_text(data);
    let _ = translate::include_usage(data);
    let _ = translate::anthropic::request(data, "claude-x");
    let _ = translate::gemini::request(data, "gemini-x", req.map(|r| r.stream).unwrap_or(false));
}

/// The SSE parser: any chunking gives exactly the events of the whole stream.
pub fn sse(data: &[u8]) {
    let (parts, payload) = chunks(data);
    let mut p = sse::SseParser::new();
    let mut split = Vec::new();
    for c in &parts {
        split.extend(p.push(c));
    }
    split.extend(p.finish());
    let mut w = sse::SseParser::new();
    let mut whole = w.push(payload);
    whole.extend(w.finish());
    assert_eq!(split, whole, "chunking changed the parsed events");
}

/// The usage tap on OpenAI-style streams, with and without stripping the usage-only chunk.
pub fn stream_tap(data: &[u8]) {
    let (parts, payload) = chunks(data);
    let mut plain = usage::StreamTap::new(false);
    plain.capture = true;
    for c in &parts {
        assert!(plain.push(c).is_none(), "a non-stripping tap changed bytes");
    }
    let _ = plain.finish();

    let mut strip = usage::StreamTap::new(true);
    let mut sent = 0usize;
    for c in &parts {
        sent += strip.push(c).map_or(c.len(), |o| o.len());
    }
    sent += strip.finish().map_or(0, |o| o.len());
    assert!(sent <= payload.len(), "stripping made the stream longer");
}

/// Whole (non-streamed) upstream JSON responses: usage and text extraction.
pub fn json_response(data: &[u8]) {
    let _ = usage::from_json_response(data);
    let _ = usage::completion_text(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = usage::clip(s, 64);
    }
}

/// Native responses (Anthropic, Gemini) translated back to OpenAI's shape, errors included.
pub fn translate_response(data: &[u8]) {
    let (status, t, payload) = match data {
        [a, b, rest @ ..] => {
            let statuses = [200u32, 201, 400, 401, 404, 429, 500, 503, 529, 99, 0, 999];
            let s = statuses
                .get(usize::from(*a) % statuses.len())
                .copied()
                .unwrap_or(200);
            (s, *b, rest)
        }
        _ => (200, 0, data),
    };
    let tr = if t % 2 == 0 {
        llm_gateway::providers::Translation::Anthropic
    } else {
        llm_gateway::providers::Translation::Gemini
    };
    let (out, _usage, st) = gateway::translate_response(tr, status, payload, "m");
    if !(200..300).contains(&st) {
        // Every error a client sees is OpenAI-shaped JSON.
        let v: serde_json::Value =
            serde_json::from_slice(&out).unwrap_or_else(|e| panic!("error body not JSON: {e}"));
        assert!(v.get("error").is_some(), "error body without `error`");
    }
}

/// Native streams (Anthropic, Gemini) translated to OpenAI chunks, in arbitrary pieces.
pub fn translate_stream(data: &[u8]) {
    let (t, rest) = match data.split_first() {
        Some((t, rest)) => (*t, rest),
        None => (0, data),
    };
    let (parts, _) = chunks(rest);
    let tr = if t % 2 == 0 {
        llm_gateway::providers::Translation::Anthropic
    } else {
        llm_gateway::providers::Translation::Gemini
    };
    let mut s = gateway::stream_translator(tr, "m", t & 2 != 0);
    let mut out = Vec::new();
    for c in &parts {
        out.extend(s.push(c));
    }
    out.extend(s.finish());
    // Whatever the provider sent, the client's stream is terminated properly, exactly once.
    assert!(
        out.ends_with(b"data: [DONE]\n\n"),
        "a translated stream must end with [DONE]"
    );
    let dones = out.windows(12).filter(|w| w == b"data: [DONE]").count();
    assert_eq!(dones, 1, "[DONE] sent more than once");
    let _ = s.usage();
    let _ = s.failed();
}

struct NoSecrets;

impl config::SecretSource for NoSecrets {
    fn env(&self, name: &str) -> Option<String> {
        (name.len() < 8).then(|| format!("secret-{name}"))
    }
}

/// The filter configuration: JSON text or a binary protobuf Struct, then compiled into a plan.
pub fn config(data: &[u8]) {
    if let Ok(raw) = config::parse(data) {
        let _ = config::compile(&raw, &NoSecrets);
    }
}

/// The protobuf `Struct` decoder alone (what Envoy hands over for native YAML configuration).
pub fn pbstruct(data: &[u8]) {
    if let Ok(v) = pbstruct::struct_to_json(data) {
        // Whatever decodes must serialize back to JSON.
        assert!(serde_json::to_vec(&v).is_ok());
    }
}

/// Header values and other small host-provided strings: method and path (entry matching), the key
/// headers, the tags header, the attempt-plan header, the sidecar's answer, shared-data records.
pub fn headers(data: &[u8]) {
    let f = fields(data, 7);
    let get = |i: usize| f.get(i).copied().unwrap_or_default();
    let method = lossy(get(0));
    let path = lossy(get(1));
    let _ = entry::classify(&method, &path);
    let (x_api_key, authorization) = (lossy(get(2)), lossy(get(3)));
    if let Some(k) = auth::extract_key(Some(&x_api_key), Some(&authorization)) {
        assert!(!k.is_empty(), "an empty key was extracted");
        let _ = auth::key_hash(&config::Plan::default(), Some(&k));
    }
    let _ = auth::extract_key(None, Some(&authorization));
    let tags = lossy(get(4));
    if let Ok(t) = usage::parse_tags(Some(&tags)) {
        assert!(t.len() <= 20);
    }
    let _ = fallback::decode(&lossy(get(5)));
    let _ = fallback::Health::decode(get(5));
    let _ = resolve::decode_shared(get(6));
    let _ = resolve::parse_answer(Some(200), get(6));
    let _ = metrics::label(&path);
}

/// The SSRF destination policy: an operator allow-list and a provider URL (both operator- or
/// tenant-written). A refused URL must stay refused whatever the allow-list says, for the classes the
/// policy never allows.
pub fn destination(data: &[u8]) {
    let f = fields(data, 3);
    let get = |i: usize| f.get(i).copied().unwrap_or_default();
    let spec = lossy(get(0));
    let url = lossy(get(1));
    let hosted = get(2).first().is_some_and(|b| b & 1 == 1);
    let _ = destination::parse_url(&url);
    let _ = destination::parse_host(&url);
    let default = destination::Policy::default();
    let by_default = default.check_url(&url, hosted);
    if let Ok(policy) = destination::Policy::parse(&spec) {
        let listed = policy.check_url(&url, hosted);
        // An allow-list only ever widens the default policy.
        if by_default.is_ok() {
            assert!(
                listed.is_ok(),
                "allow-list '{spec}' refused '{url}' the default allows"
            );
        }
    }
}

/// The proxy-wasm header-map serialization the host hands over (count, sizes, NUL-terminated names and
/// values), and lookups on it: any bytes decode to some pairs, never a panic.
pub fn header_pairs(data: &[u8]) {
    let pairs = hostapi::decode_pairs(data);
    let names: Option<Vec<String>> = pairs
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).ok())
        .collect();
    if let Some(names) = names {
        let map: Vec<(&str, &[u8])> = names
            .iter()
            .zip(&pairs)
            .map(|(k, (_, v))| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(hostapi::decode_pairs(&hostapi::encode_pairs(&map)), pairs);
    }
    let h = hostapi::Headers::from_pairs(&pairs);
    assert!(h
        .iter()
        .eq(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))));
    for name in [
        ":path",
        ":method",
        "x-api-key",
        "authorization",
        usage::TAGS_HEADER,
    ] {
        let _ = h.text(name);
        let _ = h.utf8(name);
    }
    if let Some(tags) = h.text(usage::TAGS_HEADER) {
        let _ = usage::parse_tags(Some(&tags));
    }
}

/// The filter's own JSON parser (`llm_gateway::json`) against `serde_json`, differentially:
/// `parse` accepts exactly what `serde_json::from_slice::<Value>` accepts, with an equal value (numbers
/// as `serde_json` makes them, and the same text when re-serialized) or the same error message;
/// `validate` accepts what `serde_json` accepts when it skips a value (`IgnoredAny`), except deeper
/// nesting than the limit (refused: `serde_json` does not limit a skipped value); the spans
/// `validate_top` and `prefix_top` find hold the value `serde_json` gives those fields.
pub fn json(data: &[u8]) {
    use serde_json::Value;
    let ours = json::parse(data);
    let theirs = serde_json::from_slice::<Value>(data);
    match (&ours, &theirs) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "json::parse and serde_json disagree on the value");
            assert_eq!(a.to_string(), b.to_string(), "values serialize differently");
            let mut written = Vec::new();
            json::write(&mut written, a);
            let expected = serde_json::to_vec(b).unwrap_or_default();
            assert_eq!(
                written, expected,
                "json::write and serde_json::to_vec disagree"
            );
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "error messages differ"),
        _ => panic!("json::parse gave {ours:?}, serde_json {theirs:?}"),
    }
    let skipped = serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
    match json::validate(data) {
        Ok(()) => assert!(skipped, "json::validate accepted what serde_json refuses"),
        Err(e) => assert!(
            !skipped || e.to_string().starts_with("recursion limit exceeded"),
            "json::validate refused what serde_json accepts: {e}"
        ),
    }
    const KEYS: [&str; 4] = ["model", "stream", "usage", "a"];
    let text = |b: &[u8], span: Option<(usize, usize)>| {
        span.map(|(s, e)| json::parse(b.get(s..e).unwrap_or_default()))
    };
    if let (Ok(spans), Ok(Value::Object(doc))) = (json::validate_top(data, KEYS), &theirs) {
        for (key, span) in KEYS.iter().zip(spans) {
            assert_eq!(
                text(data, span).map(|v| v.ok()),
                doc.get(*key).map(|v| Some(v.clone())),
                "the span of `{key}`"
            );
        }
    }
    if let Ok((spans, end)) = json::prefix_top(data, KEYS) {
        let head = data.get(..end).unwrap_or_default();
        assert_eq!(
            json::validate_top(head, KEYS),
            Ok(spans),
            "prefix_top's end"
        );
        if let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(head) {
            for (key, span) in KEYS.iter().zip(spans) {
                assert_eq!(
                    text(head, span).map(|v| v.ok()),
                    doc.get(*key).map(|v| Some(v.clone())),
                    "the prefix span of `{key}`"
                );
            }
        }
    }
}

/// A fuzz target: bytes in, a panic on failure.
pub type Target = fn(&[u8]);

/// Every target by name (the stable harness iterates over these).
pub const TARGETS: &[(&str, Target)] = &[
    ("body_inspect", body_inspect),
    ("sse", sse),
    ("stream_tap", stream_tap),
    ("json_response", json_response),
    ("translate_response", translate_response),
    ("translate_stream", translate_stream),
    ("config", config),
    ("pbstruct", pbstruct),
    ("headers", headers),
    ("destination", destination),
    ("header_pairs", header_pairs),
    ("lifecycle", lifecycle),
    ("json", json),
];
