#[allow(unused_imports)]
use crate::prelude::*;

use super::*;
use crate::translate::gemini::{
    error, path_suffix, request, response_at, schema, vertex_prefix, GeminiStream,
};

fn stream(include_usage: bool) -> Box<dyn StreamTranslator> {
    Box::new(GeminiStream::new("gemini-gw", include_usage).with_created(1_700_000_000))
}

#[test]
fn paths() {
    assert_eq!(
        path_suffix("gemini-2.5-flash", false),
        "/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(
        path_suffix("models/gemini-2.5-flash", true),
        "/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert_eq!(
        path_suffix("google/gemini-2.0-flash-001", false),
        "/models/gemini-2.0-flash-001:generateContent"
    );
    assert_eq!(
        path_suffix("a b/c", false),
        "/models/a%20b%2Fc:generateContent"
    );
    assert_eq!(vertex_prefix(), "/publishers/google");
    let body = req(json!({"messages": [{"role": "user", "content": "x"}], "stream": true}));
    assert_eq!(
        request(&body, "gemini-2.5-pro", true).unwrap().path_suffix,
        "/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    );
    let r = request(&body, "gemini-2.5-pro", false).unwrap();
    assert_eq!(r.path_suffix, "/models/gemini-2.5-pro:generateContent");
    assert!(r.headers.is_empty());
    assert!(body_of(&r).get("stream").is_none());
}

#[test]
fn request_full_conversation_exact() {
    let body = req(json!({
        "model": "gemini-gw",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and London? See:"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                {"type": "image_url", "image_url": {"url": "gs://bucket/cat.png"}},
                {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "mp3"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_resp9_0_tsCiQB0e2Kb-_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                {"id": "call_resp9_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"London\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_resp9_0_tsCiQB0e2Kb-_abc", "content": "{\"temp\": 15}"},
            {"role": "tool", "tool_call_id": "call_resp9_1", "content": "rainy"},
            {"role": "assistant", "content": "Paris 15, London rainy."},
            {"role": "user", "content": "Thanks"}
        ],
        "temperature": 1.5, "top_p": 0.8, "max_tokens": 512, "stop": ["END", "STOP"], "n": 2, "seed": 42,
        "presence_penalty": 0.5, "frequency_penalty": 0, "user": "u1", "logprobs": false,
        "stream_options": {"include_usage": true}, "parallel_tool_calls": true,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": true, "schema": {
            "type": "object", "additionalProperties": false,
            "properties": {"city": {"type": "string"}, "temp": {"type": ["number", "null"]}},
            "required": ["city", "temp"]}}},
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather", "strict": true,
             "parameters": {"type": "object", "properties": {"location": {"type": "string", "format": "uri"}}, "required": ["location"], "additionalProperties": false}}},
            {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
    }));
    let r = request(&body, "gemini-2.5-flash", false).unwrap();
    let expected = json!({
        "contents": [
            {"role": "user", "parts": [
                {"text": "Weather in Paris and London? See:"},
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cat.png"}},
                {"inlineData": {"mimeType": "audio/mp3", "data": "UklGR"}}
            ]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}, "thoughtSignature": "CiQB0e2Kb+/abc=="},
                {"functionCall": {"name": "get_weather", "args": {"location": "London"}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 15}}},
                {"functionResponse": {"name": "get_weather", "response": {"result": "rainy"}}}
            ]},
            {"role": "model", "parts": [{"text": "Paris 15, London rainy."}]},
            {"role": "user", "parts": [{"text": "Thanks"}]}
        ],
        "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Use tools."}]},
        "generationConfig": {
            "temperature": 1.5, "topP": 0.8, "maxOutputTokens": 512, "stopSequences": ["END", "STOP"],
            "candidateCount": 2, "seed": 42, "presencePenalty": 0.5,
            "responseMimeType": "application/json",
            "responseSchema": {"type": "OBJECT",
                "properties": {"city": {"type": "STRING"}, "temp": {"type": "NUMBER", "nullable": true}},
                "required": ["city", "temp"]}
        },
        "tools": [{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather",
             "parameters": {"type": "OBJECT", "properties": {"location": {"type": "STRING"}}, "required": ["location"]}},
            {"name": "now"}
        ]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    });
    assert_eq!(body_of(&r), expected);
}

#[test]
fn request_defaults_and_no_openai_only_fields() {
    let r = request(&req(kitchen_sink()), "gemini-2.0-flash", false).unwrap();
    let b = body_of(&r);
    assert_eq!(
        b["contents"],
        json!([{"role": "user", "parts": [{"text": "hi"}]}])
    );
    assert_eq!(
        b["generationConfig"],
        json!({"maxOutputTokens": 10, "seed": 7})
    );
    let mut keys = Vec::new();
    all_keys(&b, &mut keys);
    for k in OPENAI_ONLY.iter().chain(
        [
            "model",
            "messages",
            "max_tokens",
            "stop",
            "user",
            "metadata",
            "temperature",
            "top_p",
            "stream",
            "content",
        ]
        .iter(),
    ) {
        assert!(!keys.iter().any(|x| x == k), "{k} leaked into {b}");
    }
    let r = request(
        &req(json!({"messages": [{"role": "user", "content": "x"}]})),
        "g",
        false,
    )
    .unwrap();
    assert_eq!(
        body_of(&r),
        json!({"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    );
}

#[test]
fn tool_choice_and_schema_mapping() {
    let tc = |choice: Value| {
        let v = json!({
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": choice,
        });
        body_of(&request(&req(v), "g", false).unwrap())["toolConfig"].clone()
    };
    assert_eq!(
        tc(json!("auto")),
        json!({"functionCallingConfig": {"mode": "AUTO"}})
    );
    assert_eq!(
        tc(json!("none")),
        json!({"functionCallingConfig": {"mode": "NONE"}})
    );
    assert_eq!(
        tc(json!("required")),
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );
    assert_eq!(tc(Value::Null), Value::Null);

    let s = schema(&json!({
        "$schema": "http://json-schema.org/draft-07/schema#", "title": "T", "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 1},
            "kind": {"const": "x"},
            "n": {"type": "integer", "enum": [1, 2], "format": "int32", "minimum": 0, "default": 1},
            "either": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {}}]},
            "when": {"type": "string", "format": "date-time"}
        },
        "additionalProperties": false, "required": ["tags"], "$defs": {}
    }));
    assert_eq!(
        s,
        json!({"type": "OBJECT", "required": ["tags"], "properties": {
            "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["a", "b"]}, "minItems": 1},
            "kind": {"enum": ["x"]},
            "n": {"type": "INTEGER", "format": "int32", "minimum": 0},
            "either": {"anyOf": [{"type": "STRING"}, {"type": "OBJECT"}]},
            "when": {"type": "STRING", "format": "date-time"}
        }})
    );
    // json_object without schema: only the mime type.
    let v = json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}});
    assert_eq!(
        body_of(&request(&req(v), "g", false).unwrap())["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );
}

#[test]
fn tool_result_needs_a_known_call() {
    let v = json!({"messages": [
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "call_nope", "content": "1"}
    ]});
    let e = request(&req(v), "g", false).unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.message().contains("call_nope"));
    let v = json!({"messages": [{"role": "user", "content": "x"}], "n": 0});
    assert_eq!(request(&req(v), "g", false).unwrap_err().status(), 400);
}

#[test]
fn response_text_with_usage() {
    let native = br#"{
      "candidates": [{"content": {"parts": [{"text": "I think...", "thought": true}, {"text": "Hello"}, {"text": " world"}], "role": "model"},
                      "finishReason": "STOP", "index": 0, "avgLogprobs": -0.1}],
      "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 7,
                        "cachedContentTokenCount": 4, "totalTokenCount": 22},
      "modelVersion": "gemini-2.5-flash", "responseId": "rX-9_a"
    }"#;
    let (out, usage) = response_at(native, "gemini-gw", 5).unwrap();
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 10,
            completion_tokens: 12,
            cached_tokens: 4,
            cache_creation_tokens: 0
        }
    );
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        out,
        json!({
            "id": "chatcmpl-rX9a", "object": "chat.completion", "created": 5, "model": "gemini-gw",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world", "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22,
                      "prompt_tokens_details": {"cached_tokens": 4}}
        })
    );
}

#[test]
fn response_parallel_function_calls_round_trip_their_signature() {
    let native = br#"{
      "candidates": [{"content": {"role": "model", "parts": [
          {"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}, "thoughtSignature": "CiQB0e2Kb+/abc=="},
          {"functionCall": {"name": "get_time", "args": {}}}
        ]}, "finishReason": "STOP", "index": 0}],
      "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 20, "totalTokenCount": 70},
      "responseId": "resp9"
    }"#;
    let (out, _) = response_at(native, "g", 0).unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    let msg = &out["choices"][0]["message"];
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    assert!(msg["content"].is_null());
    assert_eq!(
        msg["tool_calls"],
        json!([
            {"id": signed_id(), "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
            {"id": "call_resp9_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        ])
    );
    // The client sends the assistant message back: the signature returns on its call only.
    let next = json!({"messages": [
        {"role": "user", "content": "x"},
        msg,
        {"role": "tool", "tool_call_id": signed_id(), "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_resp9_1", "content": "[1,2]"}
    ]});
    let b = body_of(&request(&req(next), "g", false).unwrap());
    assert_eq!(
        b["contents"][1]["parts"][0]["thoughtSignature"],
        "CiQB0e2Kb+/abc=="
    );
    assert!(b["contents"][1]["parts"][1]
        .get("thoughtSignature")
        .is_none());
    assert_eq!(
        b["contents"][2]["parts"][1]["functionResponse"],
        json!({"name": "get_time", "response": {"result": [1, 2]}})
    );
    // Ids from other providers never decode to a signature.
    let other = json!({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "call_abc_tsX", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "toolu_01_ts", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]});
    let b = body_of(&request(&req(other), "g", false).unwrap());
    assert!(b["contents"][0]["parts"][0]
        .get("thoughtSignature")
        .is_none());
    assert!(b["contents"][0]["parts"][1]
        .get("thoughtSignature")
        .is_none());
}

#[test]
fn finish_reasons_and_blocked_prompts() {
    for (fr, want) in [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
    ] {
        let native =
            json!({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": fr}]});
        let (out, _) = response_at(&req(native), "g", 0).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], want, "{fr}");
    }
    let native = json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}});
    let (out, usage) = response_at(&req(native), "g", 0).unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
    assert!(out["choices"][0]["message"]["content"].is_null());
    assert_eq!(usage.prompt_tokens, 3);
    // n > 1: one choice per candidate.
    let native = json!({"candidates": [
        {"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0},
        {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1}]});
    let (out, _) = response_at(&req(native), "g", 0).unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["choices"][1]["message"]["content"], "b");
    assert_eq!(out["choices"][1]["finish_reason"], "length");
}

#[test]
fn stream_text_survives_any_chunking() {
    let evs = assert_split_invariant(&|| stream(true), GEMINI_TEXT);
    let r = rebuild(&evs, 0);
    assert_eq!(r.content, "The quick brown fox — é 🦊 jumps.");
    assert_eq!(r.finish.as_deref(), Some("stop"));
    assert_eq!(
        r.usage,
        Some(
            json!({"prompt_tokens": 8, "completion_tokens": 22, "total_tokens": 30,
                    "prompt_tokens_details": {"cached_tokens": 4}})
        )
    );
    assert!(r.done && r.error.is_none());
    assert_eq!(evs[0]["id"], "chatcmpl-Xq3aaJfN9K7");
    // LF framing gives the same events as Gemini's CRLF framing.
    let lf = String::from_utf8(GEMINI_TEXT.to_vec())
        .unwrap()
        .replace("\r\n", "\n");
    assert_eq!(run(stream(true).as_mut(), lf.as_bytes(), &[]), evs);
    // Without include_usage: no usage chunk, usage still available to the gateway.
    let mut t = GeminiStream::new("g", false);
    let out = [t.push(GEMINI_TEXT), t.finish()].concat();
    assert!(rebuild(&events(&out), 0).usage.is_none());
    assert_eq!(t.usage().unwrap().prompt_tokens, 8);
}

#[test]
fn stream_parallel_tool_calls_survive_any_chunking() {
    let evs = assert_split_invariant(&|| stream(false), GEMINI_TOOLS);
    let r = rebuild(&evs, 0);
    assert_eq!(r.content, "Let me check.");
    assert_eq!(
        r.tools,
        vec![
            (
                signed_id(),
                "get_weather".into(),
                "{\"location\":\"Paris\"}".into()
            ),
            (
                "call_resp9_1".into(),
                "get_weather".into(),
                "{\"location\":\"London\",\"unit\":\"celsius\"}".into()
            ),
        ]
    );
    assert_eq!(r.finish.as_deref(), Some("tool_calls"));
    assert!(r.done);
}

#[test]
fn stream_multiple_candidates() {
    let input = b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"A\"}]},\"index\":0},{\"content\":{\"parts\":[{\"text\":\"B\"}]},\"index\":1}]}\n\ndata: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]},\"finishReason\":\"STOP\",\"index\":0},{\"content\":{\"parts\":[{\"text\":\"b\"}]},\"finishReason\":\"MAX_TOKENS\",\"index\":1}]}\n\n";
    let evs = assert_split_invariant(&|| stream(false), input);
    let (a, b) = (rebuild(&evs, 0), rebuild(&evs, 1));
    assert_eq!(
        (a.content.as_str(), a.finish.as_deref()),
        ("Aa", Some("stop"))
    );
    assert_eq!(
        (b.content.as_str(), b.finish.as_deref()),
        ("Bb", Some("length"))
    );
}

#[test]
fn stream_errors_and_truncation() {
    let input = b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]},\"index\":0}]}\r\n\r\ndata: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\r\n\r\n";
    let evs = assert_split_invariant(&|| stream(true), input);
    let r = rebuild(&evs, 0);
    assert_eq!(r.content, "Hi");
    assert_eq!(
        r.error,
        Some(
            json!({"message": "The model is overloaded.", "type": "server_error", "param": null, "code": "unavailable"})
        )
    );
    assert!(r.usage.is_none() && r.done);

    let cut = &GEMINI_TEXT[..GEMINI_TEXT.len() / 2];
    let evs = assert_split_invariant(&|| stream(true), cut);
    let r = rebuild(&evs, 0);
    assert_eq!(r.error.unwrap()["code"], "upstream_stream_incomplete");
    let mut t = GeminiStream::new("g", true);
    let _ = t.push(cut);
    let _ = t.finish();
    assert!(t.failed());

    let blocked = b"data: {\"promptFeedback\":{\"blockReason\":\"PROHIBITED_CONTENT\"},\"usageMetadata\":{\"promptTokenCount\":5}}\n\n";
    let r = rebuild(&run(stream(true).as_mut(), blocked, &[]), 0);
    assert_eq!(r.finish.as_deref(), Some("content_filter"));
    assert!(r.error.is_none());
}

#[test]
fn errors_keep_status_and_map_type() {
    for (status, st, ot) in [
        (400, "INVALID_ARGUMENT", "invalid_request_error"),
        (400, "FAILED_PRECONDITION", "invalid_request_error"),
        (401, "UNAUTHENTICATED", "authentication_error"),
        (403, "PERMISSION_DENIED", "permission_error"),
        (404, "NOT_FOUND", "not_found_error"),
        (429, "RESOURCE_EXHAUSTED", "rate_limit_error"),
        (500, "INTERNAL", "server_error"),
        (503, "UNAVAILABLE", "server_error"),
    ] {
        let body = json!({"error": {"code": status, "message": format!("m-{st}"), "status": st, "details": []}});
        let out: Value = serde_json::from_slice(&error(status, &req(body))).unwrap();
        assert_eq!(
            out,
            json!({"error": {"message": format!("m-{st}"), "type": ot, "param": null, "code": st.to_ascii_lowercase()}})
        );
    }
    // The array form some Google endpoints use.
    let out: Value = serde_json::from_slice(&error(
        400,
        br#"[{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT"}}]"#,
    ))
    .unwrap();
    assert_eq!(out["error"]["message"], "API key not valid");
    let out: Value = serde_json::from_slice(&error(500, b"oops")).unwrap();
    assert_eq!(out["error"]["message"], "Gemini returned HTTP 500: oops");
    assert_eq!(out["error"]["code"], "upstream_error");
}

/// The id the translator gives the recorded call carrying signature `CiQB0e2Kb+/abc==`.
fn signed_id() -> String {
    format!(
        "call_resp9_0_s{:08x}",
        super::super::gemini::signatures::digest("CiQB0e2Kb+/abc==")
    )
}

#[test]
fn long_thought_signatures_stay_out_of_ids_and_come_back_on_replay() {
    let sig: String = "Q2lRQjBlMktiKy9hYmM9PQ".repeat(70); // ~1,500 characters
    let native = format!(
        r#"{{"candidates":[{{"content":{{"role":"model","parts":[
          {{"functionCall":{{"name":"get_weather","args":{{"location":"Paris"}}}},"thoughtSignature":"{sig}"}}]}},
          "finishReason":"STOP","index":0}}],"responseId":"AbCdEfGhIjKlMnOpQrStUvWx0123"}}"#
    );
    let (out, _) = response_at(native.as_bytes(), "g", 0).unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    let msg = out["choices"][0]["message"].clone();
    let id = msg["tool_calls"][0]["id"].as_str().unwrap().to_string();
    assert!(
        id.len() <= 40,
        "OpenAI refuses replayed ids over 40 characters: {id}"
    );
    assert!(id.starts_with("call_"));
    let next = json!({"messages": [
        {"role": "user", "content": "x"}, msg,
        {"role": "tool", "tool_call_id": id, "content": "sunny"}]});
    let b = body_of(&request(&req(next.clone()), "gemini-3-pro", false).unwrap());
    assert_eq!(
        b["contents"][1]["parts"][0]["thoughtSignature"],
        sig.as_str()
    );
    // Lost (another worker, evicted): Google's documented sentinel, so the replay is accepted.
    super::super::gemini::signatures::clear();
    let b = body_of(&request(&req(next), "gemini-2.5-pro", false).unwrap());
    assert_eq!(
        b["contents"][1]["parts"][0]["thoughtSignature"],
        super::super::gemini::SKIP_SIGNATURE
    );
    // Google's own field, when the client round-trips it, is used as it is.
    let carried = json!({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "call_x_0", "type": "function", "function": {"name": "f", "arguments": "{}"},
         "extra_content": {"google": {"thought_signature": "c2ln"}}}]},
        {"role": "tool", "tool_call_id": "call_x_0", "content": "ok"}]});
    let b = body_of(&request(&req(carried), "gemini-2.5-pro", false).unwrap());
    assert_eq!(b["contents"][0]["parts"][0]["thoughtSignature"], "c2ln");
    // Calls of other providers: the sentinel only for Gemini 3 models, which require a signature.
    let foreign = json!({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "toolu_01", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "ok"}]});
    let b = body_of(&request(&req(foreign.clone()), "gemini-3-flash", false).unwrap());
    assert_eq!(
        b["contents"][0]["parts"][0]["thoughtSignature"],
        super::super::gemini::SKIP_SIGNATURE
    );
    let b = body_of(&request(&req(foreign), "gemini-2.5-flash", false).unwrap());
    assert!(b["contents"][0]["parts"][0]
        .get("thoughtSignature")
        .is_none());
}

#[test]
fn signature_store_is_bounded() {
    use super::super::gemini::signatures;
    signatures::clear();
    let big = "x".repeat(60 * 1024);
    for i in 0..400 {
        signatures::remember(&format!("call_b_{i}_s00000000"), &big);
    }
    let (n, bytes) = signatures::held();
    assert!(bytes <= signatures::MAX_BYTES && n < 400, "{n} {bytes}");
    assert!(signatures::recall("call_b_399_s00000000").is_some());
    assert!(signatures::recall("call_b_0_s00000000").is_none());
    signatures::remember(
        "call_huge_s00000000",
        &"y".repeat(signatures::MAX_SIGNATURE + 1),
    );
    assert!(signatures::recall("call_huge_s00000000").is_none());
    for i in 0..(signatures::MAX_ENTRIES + 10) {
        signatures::remember(&format!("call_c_{i}"), "s");
    }
    assert!(signatures::held().0 <= signatures::MAX_ENTRIES);
    signatures::clear();
}

#[test]
fn blocking_finish_reasons_are_content_filter() {
    for fr in [
        "MODEL_ARMOR",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_SAFETY",
        "IMAGE_RECITATION",
        "PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
    ] {
        let native = format!(
            r#"{{"candidates":[{{"content":{{"role":"model","parts":[{{"text":"x"}}]}},"finishReason":"{fr}","index":0}}]}}"#
        );
        let (out, _) = response_at(native.as_bytes(), "g", 0).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter", "{fr}");
        let sse = format!(
            "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"x\"}}]}},\"finishReason\":\"{fr}\",\"index\":0}}]}}\n\n"
        );
        let r = rebuild(&run(stream(false).as_mut(), sse.as_bytes(), &[]), 0);
        assert_eq!(r.finish.as_deref(), Some("content_filter"), "{fr}");
    }
}
