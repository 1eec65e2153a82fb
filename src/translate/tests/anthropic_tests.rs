#[allow(unused_imports)]
use crate::prelude::*;

use super::*;
use crate::translate::anthropic::{error, request, response_at, AnthropicStream, JSON_TOOL};

fn stream(include_usage: bool) -> Box<dyn StreamTranslator> {
    Box::new(AnthropicStream::new("claude-gw", include_usage).with_created(1_700_000_000))
}

#[test]
fn request_full_conversation_exact() {
    let body = req(json!({
        "model": "claude-gw",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather and time in SF and Paris? Also look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}}
            ]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_A", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"SF\"}"}},
                {"id": "toolu_B", "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "toolu_A", "content": "15C"},
            {"role": "tool", "tool_call_id": "toolu_B", "content": [{"type": "text", "text": "10:00"}]},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": null},
            {"role": "user", "content": ""},
        ],
        "temperature": 1.6, "top_p": 0.9, "stop": "END", "max_completion_tokens": 300, "max_tokens": 99,
        "user": "u-42", "stream": true, "stream_options": {"include_usage": true},
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ],
        "tool_choice": "required", "parallel_tool_calls": false, "n": 1, "logprobs": false
    }));
    let r = request(&body, "claude-sonnet-4-5").unwrap();
    assert_eq!(r.path_suffix, "/messages");
    assert_eq!(
        r.headers,
        vec![("anthropic-version", "2023-06-01".to_string())]
    );
    let expected = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "system": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather and time in SF and Paris? Also look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"location": "SF"}},
                {"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_A", "content": "15C"},
                {"type": "tool_result", "tool_use_id": "toolu_B", "content": "10:00"},
                {"type": "text", "text": "Thanks"}
            ]}
        ],
        "temperature": 1.0,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": true,
        "metadata": {"user_id": "u-42"},
        "tools": [
            {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
    });
    assert_eq!(body_of(&r), expected);
}

#[test]
fn request_defaults_and_no_openai_only_fields() {
    let r = request(&req(kitchen_sink()), "claude-3-5-haiku").unwrap();
    let b = body_of(&r);
    assert_eq!(b["max_tokens"], 10);
    assert_eq!(b["model"], "claude-3-5-haiku");
    assert_eq!(
        b["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    );
    assert!(b.get("stream").is_none() && b.get("tools").is_none() && b.get("system").is_none());
    let mut keys = Vec::new();
    all_keys(&b, &mut keys);
    for k in OPENAI_ONLY.iter().chain(["seed", "user", "stop"].iter()) {
        assert!(!keys.iter().any(|x| x == k), "{k} leaked into {b}");
    }
    // Default max_tokens when the client gives none.
    let r = request(
        &req(json!({"messages": [{"role": "user", "content": "x"}]})),
        "c",
    )
    .unwrap();
    assert_eq!(body_of(&r)["max_tokens"], 4096);
}

#[test]
fn tool_choice_mapping() {
    let base = |choice: Value, parallel: Option<bool>| {
        let mut v = json!({
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}],
            "tool_choice": choice,
        });
        if let Some(p) = parallel {
            v["parallel_tool_calls"] = json!(p);
        }
        body_of(&request(&req(v), "c").unwrap())["tool_choice"].clone()
    };
    assert_eq!(base(json!("auto"), None), json!({"type": "auto"}));
    assert_eq!(base(json!("none"), Some(false)), json!({"type": "none"}));
    assert_eq!(base(json!("required"), None), json!({"type": "any"}));
    assert_eq!(
        base(
            json!({"type": "function", "function": {"name": "f"}}),
            Some(false)
        ),
        json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})
    );
    assert_eq!(base(Value::Null, None), Value::Null);
    assert_eq!(
        base(Value::Null, Some(false)),
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    // No tools: no tool_choice at all.
    let v = json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "none"});
    assert!(body_of(&request(&req(v), "c").unwrap())
        .get("tool_choice")
        .is_none());
}

#[test]
fn response_format_uses_a_forced_tool_or_the_system_prompt() {
    let schema =
        json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
    let v = json!({
        "messages": [{"role": "user", "content": "count"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": true}},
    });
    let b = body_of(&request(&req(v), "c").unwrap());
    assert_eq!(
        b["tools"],
        json!([{"name": JSON_TOOL, "description": b["tools"][0]["description"], "input_schema": schema}])
    );
    assert_eq!(b["tool_choice"], json!({"type": "tool", "name": JSON_TOOL}));
    assert!(b.get("system").is_none());

    let v = json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}});
    let b = body_of(&request(&req(v), "c").unwrap());
    assert_eq!(b["tools"][0]["input_schema"]["type"], "object");

    // With the client's own tools: an instruction in the system prompt instead.
    let v = json!({
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    });
    let b = body_of(&request(&req(v), "c").unwrap());
    assert_eq!(b["tools"].as_array().unwrap().len(), 1);
    assert_eq!(b["system"][0]["text"], "S");
    let instr = b["system"][1]["text"].as_str().unwrap();
    assert!(
        instr.contains("JSON") && instr.contains("\"required\":[\"n\"]"),
        "{instr}"
    );

    // The forced tool's input comes back as the message text, finish_reason stop.
    let native = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "c",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": JSON_TOOL, "input": {"n": 3}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7}
    });
    let (out, _) = response_at(&req(native), "gw", 1).unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["choices"][0]["message"]["content"], "{\"n\":3}");
    assert!(out["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(out["choices"][0]["finish_reason"], "stop");
}

#[test]
fn request_rejects_what_anthropic_cannot_take() {
    let audio = json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}]});
    assert_eq!(request(&req(audio), "c").unwrap_err().status(), 400);
    let no_id = json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]});
    assert_eq!(request(&req(no_id), "c").unwrap_err().status(), 400);
}

#[test]
fn response_text_with_cache_usage() {
    // Shape from the Messages API reference.
    let native = br#"{
      "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
      "model": "claude-sonnet-4-5-20250929",
      "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                  {"type": "text", "text": "Hi! My name is Claude."},
                  {"type": "text", "text": " Nice to meet you."}],
      "stop_reason": "end_turn", "stop_sequence": null,
      "usage": {"input_tokens": 2095, "output_tokens": 503,
                "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000}
    }"#;
    let (out, usage) = response_at(native, "claude-gw", 1_700_000_000).unwrap();
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 3195,
            completion_tokens: 503,
            cached_tokens: 1000,
            cache_creation_tokens: 100
        }
    );
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        out,
        json!({
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "object": "chat.completion",
            "created": 1_700_000_000u64,
            "model": "claude-gw",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hi! My name is Claude. Nice to meet you.", "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 3195, "completion_tokens": 503, "total_tokens": 3698,
                      "prompt_tokens_details": {"cached_tokens": 1000}}
        })
    );
}

#[test]
fn response_parallel_tool_calls() {
    let native = br#"{
      "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
      "content": [
        {"type": "text", "text": "I'll check both."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA", "unit": "celsius"}},
        {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}}
      ],
      "stop_reason": "tool_use", "stop_sequence": null,
      "usage": {"input_tokens": 100, "output_tokens": 50}
    }"#;
    let (out, usage) = response_at(native, "gw", 2).unwrap();
    assert_eq!(usage.prompt_tokens, 100);
    let out: Value = serde_json::from_slice(&out).unwrap();
    let choice = &out["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "I'll check both.");
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([
            {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}"}},
            {"id": "toolu_01B", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        ])
    );
    // Arguments are JSON strings that parse back to the input.
    let args: Value = serde_json::from_str(
        choice["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args["unit"], "celsius");
}

#[test]
fn stop_reasons() {
    for (sr, tools, want) in [
        ("end_turn", false, "stop"),
        ("stop_sequence", false, "stop"),
        ("max_tokens", false, "length"),
        ("tool_use", true, "tool_calls"),
        ("refusal", false, "content_filter"),
        ("pause_turn", false, "stop"),
    ] {
        let content = if tools {
            json!([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])
        } else {
            json!([{"type": "text", "text": "x"}])
        };
        let native = json!({"id": "m", "content": content, "stop_reason": sr, "usage": {}});
        let (out, _) = response_at(&req(native), "gw", 0).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], want, "{sr}");
    }
}

#[test]
fn stream_tools_translate_and_survive_any_chunking() {
    for input in [ANTHROPIC_TOOLS.to_vec(), crlf(ANTHROPIC_TOOLS)] {
        let evs = assert_split_invariant(&|| stream(true), &input);
        let r = rebuild(&evs, 0);
        assert_eq!(r.role.as_deref(), Some("assistant"));
        assert_eq!(
            r.content,
            "Okay, let me check the weather in both cities — ☀️ é"
        );
        assert_eq!(
            r.tools,
            vec![
                (
                    "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
                    "get_weather".into(),
                    "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}".into()
                ),
                (
                    "toolu_02Bq9Xw".into(),
                    "get_time".into(),
                    "{\"city\": \"Paris\"}".into()
                ),
            ]
        );
        assert_eq!(r.finish.as_deref(), Some("tool_calls"));
        assert_eq!(
            r.usage,
            Some(
                json!({"prompt_tokens": 592, "completion_tokens": 89, "total_tokens": 681,
                        "prompt_tokens_details": {"cached_tokens": 100}})
            )
        );
        assert!(r.done && r.error.is_none());
        assert_eq!(evs[0]["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(evs[0]["model"], "claude-gw");
        assert_eq!(evs[0]["created"], 1_700_000_000u64);
        // Tool-call argument deltas arrive incrementally (one chunk per input_json_delta).
        let arg_chunks = evs
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .is_some_and(|a| !a.is_empty())
            })
            .count();
        assert_eq!(arg_chunks, 4);
    }
}

fn crlf(s: &[u8]) -> Vec<u8> {
    String::from_utf8(s.to_vec())
        .unwrap()
        .replace('\n', "\r\n")
        .into_bytes()
}

#[test]
fn stream_text_ignores_thinking_and_usage_only_when_asked() {
    let evs = assert_split_invariant(&|| stream(false), ANTHROPIC_TEXT);
    let r = rebuild(&evs, 0);
    assert_eq!(r.content, "Hello! Grüße 👋\nHow can I help?");
    assert!(r.tools.is_empty());
    assert_eq!(r.finish.as_deref(), Some("stop"));
    assert_eq!(
        r.usage, None,
        "no usage chunk without stream_options.include_usage"
    );
    assert!(r.done);

    let mut t = AnthropicStream::new("m", true);
    let _ = t.push(ANTHROPIC_TEXT);
    let _ = t.finish();
    assert_eq!(
        t.usage(),
        Some(Usage {
            prompt_tokens: 25,
            completion_tokens: 15,
            cached_tokens: 0,
            cache_creation_tokens: 0
        })
    );
    assert!(!t.failed());
}

#[test]
fn stream_error_event_becomes_an_openai_error() {
    let input = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let evs = assert_split_invariant(&|| stream(true), input);
    let r = rebuild(&evs, 0);
    assert_eq!(r.content, "Hi");
    assert_eq!(
        r.error,
        Some(
            json!({"message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded_error"})
        )
    );
    assert_eq!(r.usage, None, "no usage chunk after an error");
    assert!(r.done);
    let mut t = AnthropicStream::new("m", true);
    let _ = t.push(input);
    assert!(t.failed());
}

#[test]
fn truncated_stream_is_reported() {
    let cut = &ANTHROPIC_TOOLS[..ANTHROPIC_TOOLS.len() / 2];
    let evs = assert_split_invariant(&|| stream(true), cut);
    let r = rebuild(&evs, 0);
    assert_eq!(r.error.unwrap()["code"], "upstream_stream_incomplete");
    assert!(r.finish.is_none() && r.done);
    // Empty body.
    let evs = run(stream(false).as_mut(), b"", &[]);
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0]["error"]["type"], "server_error");
}

#[test]
fn errors_keep_status_and_map_type() {
    let cases = [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, "permission_error", "permission_error"),
        (404, "not_found_error", "not_found_error"),
        (413, "request_too_large", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "server_error"),
        (529, "overloaded_error", "server_error"),
    ];
    for (status, at, ot) in cases {
        let body = json!({"type": "error", "error": {"type": at, "message": format!("m-{status}")}, "request_id": "req_1"});
        let out: Value = serde_json::from_slice(&error(status, &req(body))).unwrap();
        assert_eq!(
            out,
            json!({"error": {"message": format!("m-{status}"), "type": ot, "param": null, "code": at}})
        );
    }
    let out: Value = serde_json::from_slice(&error(502, b"<html>Bad gateway</html>")).unwrap();
    assert_eq!(out["error"]["type"], "server_error");
    assert!(out["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bad gateway"));
    let out: Value = serde_json::from_slice(&error(404, b"")).unwrap();
    assert_eq!(out["error"]["message"], "Anthropic returned HTTP 404");
}

#[test]
fn stream_tool_use_without_input_ends_with_empty_object_arguments() {
    // Recorded shape: a tool with no parameters streams `input: {}` then one empty partial_json.
    let input = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_e\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_empty\",\"name\":\"get_time\",\"input\":{}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_args\",\"name\":\"get_weather\",\"input\":{}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \\\"Oslo\\\"}\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":12}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let evs = assert_split_invariant(&|| stream(false), input);
    let r = rebuild(&evs, 0);
    assert_eq!(
        r.tools,
        vec![
            ("toolu_empty".into(), "get_time".into(), "{}".into()),
            (
                "toolu_args".into(),
                "get_weather".into(),
                "{\"city\": \"Oslo\"}".into()
            ),
        ]
    );
    assert_eq!(r.finish.as_deref(), Some("tool_calls"));
}
