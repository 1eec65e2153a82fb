#[allow(unused_imports)]
use crate::prelude::*;

use super::*;
use crate::translate::anthropic_ingress::{
    error_body, error_from_chat, from_chat, gateway_error, message_usage, to_chat, ChatToMessages,
    Composed, MessagesTap,
};

const OPENAI_TOOLS: &[u8] = include_bytes!("openai_tools.sse");

/// Anthropic SSE output as (event name, data JSON); the name must equal the data's `type`.
fn named_events(out: &[u8]) -> Vec<(String, Value)> {
    let mut p = SseParser::new();
    let mut evs = p.push(out);
    evs.extend(p.finish());
    evs.into_iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            let name = e.event.expect("every Messages event is named");
            assert_eq!(v["type"], name.as_str());
            (name, v)
        })
        .collect()
}

fn run_named(t: &mut dyn StreamTranslator, input: &[u8], cuts: &[usize]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(core::iter::once(&input.len())) {
        let o = t.push(&input[prev..c]);
        assert!(o.is_empty() || o.ends_with(b"\n\n"));
        out.extend(named_events(&o));
        prev = c;
    }
    let o = t.finish();
    assert!(o.is_empty() || o.ends_with(b"\n\n"));
    out.extend(named_events(&o));
    out
}

fn split_invariant(
    make: &dyn Fn() -> Box<dyn StreamTranslator>,
    input: &[u8],
) -> Vec<(String, Value)> {
    let whole = run_named(make().as_mut(), input, &[]);
    for i in 0..=input.len() {
        assert_eq!(
            run_named(make().as_mut(), input, &[i]),
            whole,
            "split at {i}"
        );
    }
    let mut rng = Rng(0x51_7CC1_B727_220A ^ input.len() as u64);
    for round in 0..200 {
        let k = 1 + rng.below(40);
        let mut cuts: Vec<usize> = (0..k).map(|_| rng.below(input.len() + 1)).collect();
        cuts.sort_unstable();
        assert_eq!(
            run_named(make().as_mut(), input, &cuts),
            whole,
            "round {round}"
        );
    }
    whole
}

/// What the Anthropic SDK's stream accumulator rebuilds; checks the event grammar on the way:
/// `message_start`, then blocks opened/closed in index order with deltas only for the open one,
/// then `message_delta`, `message_stop`.
#[derive(Debug, Default)]
struct Msg {
    id: String,
    blocks: Vec<Value>,
    stop_reason: Option<String>,
    usage: Option<Value>,
    error: Option<Value>,
    stopped: bool,
}

fn rebuild(evs: &[(String, Value)]) -> Msg {
    let mut m = Msg::default();
    let mut open: Option<usize> = None;
    let mut json = String::new();
    for (n, (name, v)) in evs.iter().enumerate() {
        assert!(!m.stopped, "nothing after message_stop");
        match name.as_str() {
            "message_start" => {
                assert_eq!(n, 0);
                m.id = v["message"]["id"].as_str().unwrap().to_string();
                assert!(m.id.starts_with("msg_"));
            }
            "content_block_start" => {
                assert!(open.is_none(), "one block at a time");
                let i = v["index"].as_u64().unwrap() as usize;
                assert_eq!(i, m.blocks.len(), "indexes count up");
                m.blocks.push(v["content_block"].clone());
                open = Some(i);
                json.clear();
            }
            "content_block_delta" => {
                let i = v["index"].as_u64().unwrap() as usize;
                assert_eq!(Some(i), open);
                let d = &v["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => {
                        let t = m.blocks[i]["text"].as_str().unwrap().to_string();
                        m.blocks[i]["text"] = json!(t + d["text"].as_str().unwrap());
                    }
                    "input_json_delta" => json.push_str(d["partial_json"].as_str().unwrap()),
                    other => panic!("delta {other}"),
                }
            }
            "content_block_stop" => {
                let i = v["index"].as_u64().unwrap() as usize;
                assert_eq!(Some(i), open);
                if m.blocks[i]["type"] == "tool_use" && !json.is_empty() {
                    m.blocks[i]["input"] = serde_json::from_str(&json).unwrap();
                }
                open = None;
            }
            "message_delta" => {
                assert!(open.is_none());
                m.stop_reason = v["delta"]["stop_reason"].as_str().map(str::to_string);
                m.usage = Some(v["usage"].clone());
            }
            "message_stop" => {
                assert!(m.stop_reason.is_some());
                m.stopped = true;
            }
            "error" => m.error = Some(v["error"].clone()),
            other => panic!("unexpected event {other}"),
        }
    }
    m
}

fn chat_stream() -> Box<dyn StreamTranslator> {
    Box::new(ChatToMessages::new("claude-gw"))
}

#[test]
fn request_translates_to_chat_exactly() {
    let body = json!({
        "model": "claude-gw",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Use tools."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris? Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "15C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "boom"}, {"type": "image"}, {"type": "text", "text": "twice"}], "is_error": true},
                {"type": "text", "text": "Thanks"}
            ]},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "Again"}
        ],
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"],
        "stream": true, "metadata": {"user_id": "u-1"},
        "tools": [
            {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
            {"name": "get_time", "input_schema": {"type": "object"}}
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "thinking": {"type": "enabled", "budget_tokens": 1024}
    });
    let out: Value =
        serde_json::from_slice(&to_chat(body.to_string().as_bytes()).unwrap()).unwrap();
    assert_eq!(
        out,
        json!({
            "model": "claude-gw",
            "messages": [
                {"role": "system", "content": "Be terse.\nUse tools."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather in Paris? Look:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}
                ]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                    {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "15C"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom\ntwice"},
                {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": [{"type": "text", "text": "Again"}]}
            ],
            "max_tokens": 256, "temperature": 0.5, "top_p": 0.9, "stop": ["END"],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
            ],
            "tool_choice": "required", "parallel_tool_calls": false,
            "user": "u-1", "stream": true, "stream_options": {"include_usage": true}
        })
    );
    // tool_choice forms.
    for (tc, want) in [
        (json!({"type": "auto"}), json!("auto")),
        (json!({"type": "none"}), json!("none")),
        (
            json!({"type": "tool", "name": "get_time"}),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ),
    ] {
        let b = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                       "tools": [{"name": "get_time", "input_schema": {"type": "object"}}], "tool_choice": tc});
        let v: Value = serde_json::from_slice(&to_chat(b.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(v["tool_choice"], want);
        assert!(v.get("parallel_tool_calls").is_none());
    }
}

#[test]
fn request_rejects_what_chat_cannot_carry() {
    for body in [
        json!([1]),
        json!({"model": "m", "max_tokens": 1}),
        json!({"model": "m", "max_tokens": 1, "messages": []}),
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
        json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": 5}]}),
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "server_tool_use"}]}]}),
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
               "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
               "tools": [{"name": "t", "input_schema": {}}], "tool_choice": {"type": "bogus"}}),
    ] {
        let e = to_chat(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.status(), 400, "{body}");
    }
    assert_eq!(to_chat(b"{not json").unwrap_err().status(), 400);
}

#[test]
fn response_text_and_tools_with_usage() {
    let chat = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me check.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "prompt_tokens_details": {"cached_tokens": 30}}
    });
    let (out, u) = from_chat(chat.to_string().as_bytes(), "claude-gw").unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        json!({
            "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "claude-gw",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 70, "output_tokens": 20, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0}
        })
    );
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (100, 20, 30)
    );
    for (finish, stop) in [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
    ] {
        let c =
            json!({"id": "x", "choices": [{"finish_reason": finish, "message": {"content": "a"}}]});
        let (out, _) = from_chat(c.to_string().as_bytes(), "m").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stop_reason"], stop);
    }
    assert_eq!(from_chat(b"<html>", "m").unwrap_err().status(), 502);
    assert_eq!(
        from_chat(b"{\"choices\":[]}", "m").unwrap_err().status(),
        502
    );
}

#[test]
fn errors_are_anthropic_shaped() {
    let v: Value = serde_json::from_slice(&error_from_chat(
        429,
        br#"{"error":{"message":"slow down","type":"rate_limit_error","code":null}}"#,
    ))
    .unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
    );
    let v: Value =
        serde_json::from_slice(&error_from_chat(502, b"<html>bad gateway</html>")).unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bad gateway"));
    let v: Value =
        serde_json::from_slice(&gateway_error(&crate::error::GatewayError::InvalidApiKey)).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let v: Value = serde_json::from_slice(&gateway_error(
        &crate::error::GatewayError::UnknownEndpoint {
            path: "/anthropic/v1/x".into(),
        },
    ))
    .unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/anthropic/v1/messages"));
    let v: Value = serde_json::from_slice(&error_body(413, "big")).unwrap();
    assert_eq!(v["error"]["type"], "request_too_large");
}

#[test]
fn chat_stream_becomes_messages_events_whatever_the_chunking() {
    let evs = split_invariant(&chat_stream, OPENAI_TOOLS);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let m = rebuild(&evs);
    assert_eq!(m.id, "msg_chatcmpl-9xyz");
    assert_eq!(
        m.blocks,
        vec![
            json!({"type": "text", "text": "Checking the weather — ☀️ é"}),
            json!({"type": "tool_use", "id": "call_A1", "name": "get_weather", "input": {"location": "Paris"}}),
            json!({"type": "tool_use", "id": "call_B2", "name": "get_time", "input": {}}),
        ]
    );
    assert_eq!(m.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(
        m.usage,
        Some(
            json!({"input_tokens": 100, "output_tokens": 31, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0})
        )
    );
    let mut t = ChatToMessages::new("m");
    t.push(OPENAI_TOOLS);
    t.finish();
    let u = t.usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (120, 31, 20)
    );
    assert!(!t.failed());
    // CRLF framing gives the same events.
    let crlf: Vec<u8> = String::from_utf8_lossy(OPENAI_TOOLS)
        .replace('\n', "\r\n")
        .into_bytes();
    assert_eq!(run_named(chat_stream().as_mut(), &crlf, &[]), evs);
}

#[test]
fn gemini_stream_composes_into_messages_events() {
    let make = || -> Box<dyn StreamTranslator> {
        Box::new(Composed {
            inner: Box::new(gemini::GeminiStream::new("claude-gw", true)),
            outer: ChatToMessages::new("claude-gw"),
        })
    };
    let evs = split_invariant(&make, GEMINI_TOOLS);
    let m = rebuild(&evs);
    assert!(m.stopped && m.error.is_none());
    assert_eq!(
        m.blocks[0],
        json!({"type": "text", "text": "Let me check."})
    );
    let tools: Vec<&Value> = m
        .blocks
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .collect();
    assert_eq!(tools.len(), 2);
    assert_eq!(tools[0]["input"], json!({"location": "Paris"}));
    assert_eq!(m.stop_reason.as_deref(), Some("tool_use"));
    assert!(m.usage.unwrap()["output_tokens"].as_u64().unwrap() > 0);
    let text = split_invariant(&make, GEMINI_TEXT);
    assert!(rebuild(&text).stopped);
}

#[test]
fn incomplete_or_failing_streams_end_in_an_error_event() {
    // Cut before finish_reason: an incomplete stream.
    let cut = OPENAI_TOOLS.len() / 2;
    let mut t = ChatToMessages::new("m");
    let mut out = t.push(&OPENAI_TOOLS[..cut]);
    out.extend(t.finish());
    let m = rebuild(&named_events(&out));
    assert!(!m.stopped);
    assert_eq!(m.error.unwrap()["type"], "api_error");
    assert!(t.failed());
    // An in-stream OpenAI error.
    let mut t = ChatToMessages::new("m");
    let mut out =
        t.push(b"data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n");
    out.extend(t.finish());
    let evs = named_events(&out);
    assert_eq!(evs.last().unwrap().1["error"]["message"], "overloaded");
    assert!(t.failed());
    // Finished but no [DONE] (some servers): still a complete message.
    let no_done = &OPENAI_TOOLS[..OPENAI_TOOLS.len() - "data: [DONE]\n\n".len()];
    assert!(rebuild(&run_named(chat_stream().as_mut(), no_done, &[])).stopped);
}

#[test]
fn native_tap_reads_usage_and_passes_bytes() {
    for cut in [0, 1, 100, ANTHROPIC_TOOLS.len() / 2, ANTHROPIC_TOOLS.len()] {
        let mut t = MessagesTap::new();
        assert!(t.passthrough());
        assert!(t.push(&ANTHROPIC_TOOLS[..cut]).is_empty());
        t.push(&ANTHROPIC_TOOLS[cut..]);
        t.finish();
        let u = t.usage().unwrap();
        // 472 input + 100 cache reads + 20 cache writes.
        assert_eq!(u.prompt_tokens, 592);
        assert_eq!(u.cached_tokens, 100);
        assert!(u.completion_tokens > 2);
        assert!(!t.failed());
    }
    let mut t = MessagesTap::new();
    t.push(&ANTHROPIC_TOOLS[..200]);
    t.finish();
    assert!(t.failed(), "no message_stop: incomplete");
    let u = message_usage(br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":3,"cache_read_input_tokens":5}}"#).unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (15, 3, 5)
    );
    assert_eq!(message_usage(b"nope"), None);
}

#[test]
fn arbitrary_input_never_panics() {
    let mut rng = Rng(0xDEAD_BEEF_1234_5678);
    let seeds: [&[u8]; 3] = [
        OPENAI_TOOLS,
        b"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\"}]}]}",
        b"{\"choices\":[{\"message\":{\"tool_calls\":[{}]}}]}",
    ];
    for round in 0..2000 {
        let seed = seeds[round % seeds.len()];
        let mut b = seed.to_vec();
        for _ in 0..1 + rng.below(8) {
            if b.is_empty() {
                break;
            }
            let i = rng.below(b.len());
            b[i] = rng.next() as u8;
        }
        let _ = to_chat(&b);
        let _ = from_chat(&b, "m");
        let _ = error_from_chat(500, &b);
        let _ = message_usage(&b);
        let mut t = ChatToMessages::new("m");
        let _ = t.push(&b);
        let _ = t.finish();
        let mut tap = MessagesTap::new();
        tap.push(&b);
        tap.finish();
    }
}
