//! Translation tests: fixtures written from the providers' public API references (Anthropic
//! Messages, Gemini generateContent), exact request shapes, and stream re-chunking properties.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{anthropic, gemini, StreamTranslator, Usage};
use crate::sse::SseParser;
use serde_json::{json, Value};

mod anthropic_ingress_tests;
mod anthropic_tests;
mod gemini_tests;

const ANTHROPIC_TOOLS: &[u8] = include_bytes!("anthropic_tools.sse");
const ANTHROPIC_TEXT: &[u8] = include_bytes!("anthropic_text.sse");
const GEMINI_TEXT: &[u8] = include_bytes!("gemini_text.sse");
const GEMINI_TOOLS: &[u8] = include_bytes!("gemini_tools.sse");

/// The OpenAI SSE output, as parsed events: each `data:` payload as JSON, `[DONE]` as the string.
/// This is what the split tests compare: independent of how the output bytes are framed.
pub(super) fn events(out: &[u8]) -> Vec<Value> {
    let mut p = SseParser::new();
    let mut evs = p.push(out);
    evs.extend(p.finish());
    evs.into_iter()
        .map(|e| {
            assert!(e.event.is_none(), "OpenAI chunks carry no event name");
            if e.data == "[DONE]" {
                Value::String(e.data)
            } else {
                serde_json::from_str(&e.data).unwrap()
            }
        })
        .collect()
}

/// Feeds `input` cut at `cuts`; every push's output must be whole events on its own.
pub(super) fn run(t: &mut dyn StreamTranslator, input: &[u8], cuts: &[usize]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(core::iter::once(&input.len())) {
        let o = t.push(&input[prev..c]);
        assert!(
            o.is_empty() || o.ends_with(b"\n\n"),
            "push output must end on an event boundary"
        );
        out.extend(events(&o));
        prev = c;
    }
    let o = t.finish();
    assert!(o.is_empty() || o.ends_with(b"\n\n"));
    out.extend(events(&o));
    out
}

/// xorshift64*: deterministic, no crates.
pub(super) struct Rng(u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Property: the output events are identical whatever the input chunking — all 2-way splits, and
/// 300 random multi-way splits (1 to 40 cuts, including empty chunks). Returns the whole-stream events.
pub(super) fn assert_split_invariant(
    make: &dyn Fn() -> Box<dyn StreamTranslator>,
    input: &[u8],
) -> Vec<Value> {
    let whole = run(make().as_mut(), input, &[]);
    for i in 0..=input.len() {
        assert_eq!(run(make().as_mut(), input, &[i]), whole, "split at {i}");
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ input.len() as u64);
    for round in 0..300 {
        let k = 1 + rng.below(40);
        let mut cuts: Vec<usize> = (0..k).map(|_| rng.below(input.len() + 1)).collect();
        cuts.sort_unstable();
        assert_eq!(
            run(make().as_mut(), input, &cuts),
            whole,
            "round {round}, cuts {cuts:?}"
        );
    }
    // Byte by byte.
    let cuts: Vec<usize> = (1..input.len()).collect();
    assert_eq!(run(make().as_mut(), input, &cuts), whole, "byte by byte");
    whole
}

/// What an OpenAI client rebuilds from a stream (like the SDK's stream accumulator).
#[derive(Debug, Default, PartialEq)]
pub(super) struct Rebuilt {
    pub role: Option<String>,
    pub content: String,
    /// (id, name, arguments) in tool-call index order.
    pub tools: Vec<(String, String, String)>,
    pub finish: Option<String>,
    pub usage: Option<Value>,
    pub error: Option<Value>,
    pub done: bool,
}

/// Rebuilds choice `index` and checks the chunk invariants along the way.
pub(super) fn rebuild(evs: &[Value], index: u64) -> Rebuilt {
    let mut r = Rebuilt::default();
    let mut id: Option<String> = None;
    for (n, e) in evs.iter().enumerate() {
        assert!(!r.done, "nothing may follow [DONE]");
        if e == "[DONE]" {
            assert_eq!(n, evs.len() - 1);
            r.done = true;
            continue;
        }
        if let Some(err) = e.get("error") {
            r.error = Some(err.clone());
            continue;
        }
        assert_eq!(e["object"], "chat.completion.chunk");
        assert!(e["created"].is_u64());
        assert!(e["model"].is_string());
        let this_id = e["id"].as_str().unwrap().to_string();
        assert_eq!(
            id.get_or_insert(this_id.clone()),
            &this_id,
            "one id per stream"
        );
        let choices = e["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert!(r.usage.is_none(), "one usage chunk");
            r.usage = Some(e["usage"].clone());
            continue;
        }
        assert!(r.usage.is_none(), "the usage chunk is the last chunk");
        for c in choices.iter().filter(|c| c["index"] == index) {
            assert!(r.finish.is_none(), "no delta after finish_reason");
            let d = &c["delta"];
            if let Some(role) = d.get("role") {
                assert!(r.role.is_none(), "role once");
                r.role = Some(role.as_str().unwrap().into());
            }
            assert!(r.role.is_some(), "role comes first");
            if let Some(t) = d.get("content").and_then(Value::as_str) {
                r.content.push_str(t);
            }
            for tc in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = tc["index"].as_u64().unwrap() as usize;
                if i == r.tools.len() {
                    let id = tc["id"]
                        .as_str()
                        .expect("first chunk of a tool call has its id");
                    let name = tc["function"]["name"].as_str().expect("and its name");
                    assert_eq!(tc["type"], "function");
                    r.tools.push((id.into(), name.into(), String::new()));
                } else {
                    assert!(i < r.tools.len(), "tool indexes are dense");
                    assert!(tc.get("id").is_none() && tc["function"].get("name").is_none());
                }
                let a = tc["function"]["arguments"].as_str().unwrap_or("");
                r.tools[i].2.push_str(a);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                r.finish = Some(f.into());
            }
        }
    }
    r
}

pub(super) fn req(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

pub(super) fn body_of(r: &super::NativeRequest) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Every key anywhere in a JSON document (to prove OpenAI-only fields never reach the provider).
pub(super) fn all_keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                all_keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| all_keys(v, out)),
        _ => {}
    }
}

/// A request using every OpenAI-only field a client might send.
pub(super) fn kitchen_sink() -> Value {
    json!({
        "model": "gw-model",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 1, "logprobs": true, "top_logprobs": 2, "stream_options": {"include_usage": true},
        "logit_bias": {"50256": -100}, "store": true, "service_tier": "auto",
        "prediction": {"type": "content", "content": "x"}, "modalities": ["text"],
        "parallel_tool_calls": true, "function_call": "auto", "functions": [],
        "metadata": {"a": "b"}, "reasoning_effort": "low", "response_format": {"type": "text"},
        "max_tokens": 10, "seed": 7, "presence_penalty": 0, "frequency_penalty": 0
    })
}

pub(super) const OPENAI_ONLY: &[&str] = &[
    "n",
    "logprobs",
    "top_logprobs",
    "stream_options",
    "logit_bias",
    "store",
    "service_tier",
    "prediction",
    "modalities",
    "parallel_tool_calls",
    "function_call",
    "functions",
    "reasoning_effort",
    "response_format",
    "max_completion_tokens",
    "tool_calls",
    "tool_call_id",
    "image_url",
    "presence_penalty",
    "frequency_penalty",
];

#[test]
fn usage_default_is_zero() {
    assert_eq!(Usage::default().prompt_tokens, 0);
    assert!(!super::include_usage(b"{}"));
    assert!(super::include_usage(
        br#"{"stream_options":{"include_usage":true}}"#
    ));
    assert!(!super::include_usage(b"not json"));
}

#[test]
fn shared_input_errors_are_400() {
    for body in [
        &b""[..],
        b"[]",
        b"{",
        br#"{"model":"m"}"#,
        br#"{"messages":[]}"#,
        br#"{"messages":"hi"}"#,
        br#"{"messages":[{"content":"no role"}]}"#,
        br#"{"messages":[{"role":"user","content":5}]}"#,
        br#"{"messages":[{"role":"user","content":[{"type":"video","video":{}}]}]}"#,
        br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png,abc"}}]}]}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"9"}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"web_search"}]}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"sometimes"}"#,
        br#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
        br#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{bad"}}]}]}"#,
        br#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"[1]"}}]}]}"#,
        br#"{"messages":[{"role":"function","name":"f","content":"x"}]}"#,
        br#"{"messages":[{"role":"tool","content":"x"}]}"#,
        br#"{"messages":[{"role":"system","content":[{"type":"image_url","image_url":{"url":"http://x/a.png"}}]}]}"#,
        br#"{"messages":[{"role":"system","content":"only a system prompt"}]}"#,
    ] {
        let a = anthropic::request(body, "claude").unwrap_err();
        let g = gemini::request(body, "gemini", false).unwrap_err();
        let shown = String::from_utf8_lossy(body);
        assert_eq!(a.status(), 400, "anthropic: {shown}");
        assert_eq!(g.status(), 400, "gemini: {shown}");
        assert!(!a.message().is_empty() && !g.message().is_empty());
    }
}

#[test]
fn upstream_garbage_is_502_never_a_panic() {
    for body in [&b""[..], b"<html>", b"[1,2]", b"{\"content\":5}", b"null"] {
        assert_eq!(anthropic::response(body, "m").unwrap_err().status(), 502);
    }
    for body in [&b""[..], b"<html>", b"[1,2]", b"null"] {
        assert_eq!(gemini::response(body, "m").unwrap_err().status(), 502);
    }
    // Odd but valid JSON never panics either.
    for body in [
        &br#"{"content":[{"type":"tool_use"},{"type":"text","text":5},{}]}"#[..],
        br#"{"content":[],"usage":{"input_tokens":-1,"output_tokens":1e99}}"#,
    ] {
        anthropic::response(body, "m").unwrap();
    }
    for body in [
        &br#"{"candidates":[{"content":{"parts":[{"functionCall":5},{"text":1},7]}}]}"#[..],
        br#"{"candidates":5,"usageMetadata":[]}"#,
        br#"{}"#,
    ] {
        gemini::response(body, "m").unwrap();
    }
}

#[test]
fn streams_survive_junk_in_any_chunking() {
    let junk: &[&[u8]] = &[
        b"data: not json\n\n",
        b"event: content_block_delta\ndata: {\"index\":\"x\",\"delta\":5}\n\n",
        b"data: {\"type\":\"content_block_delta\",\"index\":99,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\"}}\n\n",
        b"data: {\"candidates\":[{\"index\":\"a\",\"content\":{\"parts\":[{\"functionCall\":{}}]}}]}\n\n",
        b"\xff\xfe\r\r\n:comment\n",
    ];
    for j in junk {
        for make in [
            &(|| Box::new(anthropic::AnthropicStream::new("m", true)) as Box<dyn StreamTranslator>)
                as &dyn Fn() -> Box<dyn StreamTranslator>,
            &|| Box::new(gemini::GeminiStream::new("m", true)),
        ] {
            let evs = run(make().as_mut(), j, &[]);
            assert_eq!(evs.last().unwrap(), "[DONE]");
        }
    }
}
