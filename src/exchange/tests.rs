//! The exchange machine's tests: whole requests through the adapter and the fake host (every
//! lifecycle, every error path, arbitrary bytes), and pure tests on the effects the machine returns.

#[allow(unused_imports)]
use crate::prelude::*;

use super::*;
use crate::adapter::{Http, Root};
use crate::config::hash_key as sha;
use crate::gateway;
use crate::hostapi::fake::Fake;
use crate::hostapi::Headers;

type Vm = Root<'static, Fake>;

const KEY: &str = "sk-test-key";
const CHAT: &str = "/openai/v1/chat/completions";

/// A VM with a static-key configuration, on a fresh fake host for this test thread.
fn vm() -> (&'static Fake, Vm) {
    let f: &'static Fake = Box::leak(Box::default());
    f.st().now_ms = 1_000;
    f.st().config = serde_json::json!({
        "maxBodyBytes": 4096,
        "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                       "url": "http://127.0.0.1:9/v1", "isHosted": true, "models": ["m1"]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    (f, root)
}

fn headers(pairs: &[(&str, &[u8])]) -> hostapi::Pairs {
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

fn req_headers(extra: &[(&str, &[u8])]) -> hostapi::Pairs {
    let auth = format!("Bearer {KEY}");
    let mut h = headers(&[
        (":method", b"POST"),
        (":path", CHAT.as_bytes()),
        (":authority", b"gw"),
        ("content-type", b"application/json"),
        ("authorization", auth.as_bytes()),
    ]);
    h.extend(headers(extra));
    h
}

fn get(h: &hostapi::Pairs, name: &str) -> Option<String> {
    Headers::from_pairs(h).text(name).map(|v| v.into_owned())
}

/// The error JSON of the single local reply, checked for the OpenAI shape.
fn reply(f: &Fake) -> (u32, serde_json::Value) {
    let st = f.st();
    assert_eq!(st.local_replies.len(), 1, "{:?}", st.local_replies);
    let (code, _, body) = &st.local_replies[0];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    (*code, v)
}

#[test]
fn chat_lifecycle_through_the_host() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[("x-odd", b"\xff\xfe")]);
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    let body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    f.st().request_body = body.to_vec();
    assert_eq!(http.on_http_request_body(body.len(), true), Flow::Continue);
    {
        let st = f.st();
        assert!(get(&st.request_headers, gateway::CLUSTER_HEADER).is_some());
        assert_eq!(
            get(&st.request_headers, ":path").as_deref(),
            Some("/v1/chat/completions")
        );
        assert!(st.local_replies.is_empty());
    }
    f.st().response_headers = headers(&[
        (":status", b"200"),
        ("content-type", b"application/json; x=\xff"),
    ]);
    assert_eq!(http.on_http_response_headers(2, false), Flow::Continue);
    let answer = br#"{"id":"x","model":"m1-up","choices":[{"index":0,"message":{"role":"assistant","content":"yo"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
    f.st().response_body = answer.to_vec();
    f.st().now_ms = 1_250;
    assert_eq!(
        http.on_http_response_body(answer.len(), true),
        Flow::Continue
    );
    assert_eq!(
        get(&f.st().response_headers, gateway::PROVIDER_RESPONSE_HEADER).as_deref(),
        Some("local")
    );
    http.on_log();
    assert_eq!(f.metric(&metrics::requests("local", "m1", 200)), Some(1));
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "input")), Some(7));
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "output")), Some(2));
}

/// Budgets and rate limits through the host: the key's first request waits for one allowance
/// callout, gets the x-ratelimit-* headers; past the limit the next request is a 429 with them.
#[test]
fn limits_are_learned_then_enforced_with_headers() {
    let f: &'static Fake = Box::leak(Box::default());
    f.st().now_ms = 1_000;
    f.st().config = serde_json::json!({
        "sidecar": {"token": "t"},
        "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                       "url": "http://127.0.0.1:9/v1", "isHosted": true, "models": ["m1"]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    let body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    {
        let st = f.st();
        let (_, h, b) = st.calls.last().unwrap();
        assert!(h.contains(&(":path".into(), crate::limits::ALLOWANCE_PATH.into())));
        assert!(String::from_utf8_lossy(b).contains(r#""keyId":"k""#));
    }
    f.st().request_body = body.to_vec();
    assert_eq!(http.on_http_request_body(body.len(), true), Flow::Pause);
    let answer = serde_json::json!({"leaseSeconds": 30, "keys": [{"keyId": "k",
        "requestsPerMinute": 1, "requestsShare": 1, "budgets": []}]})
    .to_string();
    f.st().call_response_headers = headers(&[(":status", b"200")]);
    f.st().call_response_body = answer.clone().into_bytes();
    http.on_http_call_response(1, 1, answer.len(), 0);
    assert_eq!(f.st().resumed, 1);
    assert!(f.st().local_replies.is_empty());
    // Shared with the other workers, so that their first request of the key needs no callout.
    assert!(f.st().shared.contains_key(&crate::limits::shared_key("k")));
    f.st().response_headers = headers(&[(":status", b"200")]);
    http.on_http_response_headers(1, false);
    assert_eq!(
        get(&f.st().response_headers, "x-ratelimit-limit-requests").as_deref(),
        Some("1")
    );
    assert_eq!(
        get(&f.st().response_headers, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    http.on_log();
    // The second request of the minute: refused locally, no callout.
    let calls = f.st().calls.len();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    assert_eq!(f.st().calls.len(), calls);
    let (code, v) = reply(f);
    assert_eq!(code, 429);
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let st = f.st();
    let (_, h, _) = &st.local_replies[0];
    assert!(h.iter().any(|(k, v)| k == "retry-after" && v == b"60"));
    assert!(h.iter().any(|(k, _)| k == "x-ratelimit-reset-requests"));
    drop(st);
    assert_eq!(f.metric(metrics::RATE_LIMITED), Some(1));
}

#[test]
fn the_record_says_what_the_client_received() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    http.on_http_request_headers(5, false);
    let body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    f.st().request_body = body.to_vec();
    http.on_http_request_body(body.len(), true);
    f.st().response_headers = headers(&[(":status", b"200")]);
    http.on_http_response_headers(1, false);
    // The provider said 200, then Envoy answered 504 itself (e.g. the upstream timed out).
    f.st()
        .properties
        .insert("response.code".into(), 504i64.to_le_bytes().to_vec());
    http.on_log();
    assert_eq!(f.metric(&metrics::requests("local", "m1", 504)), Some(1));
    assert_eq!(f.metric(&metrics::requests("local", "m1", 200)), None);
}

#[test]
fn streamed_lifecycle_strips_the_usage_chunk_the_client_did_not_ask_for() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    let body = br#"{"model":"m1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    f.st().request_body = body.to_vec();
    assert_eq!(http.on_http_request_body(body.len(), true), Flow::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&f.st().request_body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    f.st().response_headers =
        headers(&[(":status", b"200"), ("content-type", b"text/event-stream")]);
    assert_eq!(http.on_http_response_headers(2, false), Flow::Continue);
    let chunks: [&[u8]; 3] = [
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\xff\"}}]}\n\ndata: {\"cho",
        b"ices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n",
        b"data: [DONE]\n\n",
    ];
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        f.st().response_body = c.to_vec();
        http.on_http_response_body(c.len(), i == chunks.len() - 1);
        out.extend(f.st().response_body.clone());
    }
    let out = String::from_utf8_lossy(&out);
    assert!(!out.contains("usage"), "{out}");
    assert!(out.contains("[DONE]"));
    http.on_log();
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "input")), Some(3));
}

#[test]
fn responses_stream_usage_comes_from_response_completed() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    f.st().request_headers.retain(|(k, _)| k != b":path");
    f.st()
        .request_headers
        .push((b":path".to_vec(), b"/openai/v1/responses".to_vec()));
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    let body = br#"{"model":"m1","stream":true,"input":"hi"}"#;
    f.st().request_body = body.to_vec();
    assert_eq!(http.on_http_request_body(body.len(), true), Flow::Continue);
    assert_eq!(
        get(&f.st().request_headers, ":path").as_deref(),
        Some("/v1/responses")
    );
    // No stream_options for the Responses API: the body goes as sent.
    assert_eq!(f.st().request_body, body.to_vec());
    f.st().response_headers =
        headers(&[(":status", b"200"), ("content-type", b"text/event-stream")]);
    http.on_http_response_headers(2, false);
    let stream = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"yo\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"m1-up\",\"usage\":{\"input_tokens\":12,\"output_tokens\":5}}}\n\n";
    f.st().response_body = stream.to_vec();
    http.on_http_response_body(stream.len(), true);
    assert_eq!(f.st().response_body, stream.to_vec());
    http.on_log();
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "input")), Some(12));
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "output")), Some(5));
}

#[test]
fn passthrough_is_off_by_default_and_streams_when_on() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    let path_to = |f: &Fake, p: &[u8]| {
        f.st().request_headers.retain(|(k, _)| k != b":path");
        f.st().request_headers.push((b":path".to_vec(), p.to_vec()));
    };
    f.st().request_headers = req_headers(&[]);
    path_to(f, b"/openai/v1/images/generations");
    http.on_http_request_headers(5, false);
    assert_eq!(reply(f).0, 404);

    let f: &'static Fake = Box::leak(Box::default());
    f.st().config = serde_json::json!({
        "openaiPassthrough": true,
        "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                       "url": "http://127.0.0.1:9/v1", "apiKey": "up-key", "models": ["m1"]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[
        ("x-provider-name", b"local"),
        ("content-type", b"multipart/form-data; boundary=x"),
    ]);
    path_to(f, b"/openai/v1/audio/transcriptions?x=1");
    // Routed at the headers: the multipart body is never held.
    assert_eq!(http.on_http_request_headers(5, false), Flow::Continue);
    {
        let st = f.st();
        assert!(st.local_replies.is_empty(), "{:?}", st.local_replies);
        assert_eq!(
            get(&st.request_headers, ":path").as_deref(),
            Some("/v1/audio/transcriptions?x=1")
        );
        assert_eq!(
            get(&st.request_headers, "authorization").as_deref(),
            Some("Bearer up-key")
        );
        assert_eq!(get(&st.request_headers, "x-provider-name"), None);
    }
    assert_eq!(http.on_http_request_body(10, false), Flow::Continue);
    f.st().response_headers =
        headers(&[(":status", b"200"), ("content-type", b"application/json")]);
    http.on_http_response_headers(2, false);
    let answer = br#"{"text":"hi","usage":{"type":"tokens","input_tokens":14,"output_tokens":3}}"#;
    f.st().response_body = answer.to_vec();
    http.on_http_response_body(answer.len(), true);
    http.on_log();
    assert_eq!(
        f.metric(&metrics::tokens("local", "audio", "input")),
        Some(14)
    );

    // A JSON body without a named provider: its model selects (and is rewritten).
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    path_to(f, b"/openai/v1/moderations");
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    let body = br#"{"model":"m1","input":"x"}"#;
    f.st().request_body = body.to_vec();
    assert_eq!(http.on_http_request_body(body.len(), true), Flow::Continue);
    assert_eq!(
        get(&f.st().request_headers, ":path").as_deref(),
        Some("/v1/moderations")
    );
}

#[test]
fn passthrough_after_a_sidecar_lookup_resumes_the_request() {
    let f: &'static Fake = Box::leak(Box::default());
    f.st().config = serde_json::json!({
        "openaiPassthrough": true,
        "sidecar": {"token": "t"},
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    let mut http = root.create_http_context().unwrap();
    let auth = format!("Bearer {KEY}");
    f.st().request_headers = headers(&[
        (":method", b"GET"),
        (":path", b"/openai/v1/files?limit=2"),
        ("authorization", auth.as_bytes()),
    ]);
    assert_eq!(http.on_http_request_headers(3, true), Flow::Pause);
    assert_eq!(f.st().calls.len(), 1);
    f.st().call_response_headers = headers(&[(":status", b"200")]);
    let answer = br#"{"identity":{"keyId":"k1","orgId":"o1","configId":"c1","clusterId":null,
      "keySettings":{},"orgSettings":{"provider":"p"},
      "providers":[{"name":"p","kind":"OPENAI","base":{"tls":true,"authority":"api.openai.com","path":"/v1"},
        "models":[{"name":"m","upstream":"m"}],"isHosted":false,"apiKey":"sk-up-9999",
        "envoyCluster":"llm_gateway_dfp_https","fallback":[]}]},"ttlSeconds":7}"#;
    f.st().call_response_body = answer.to_vec();
    http.on_http_call_response(1, 1, answer.len(), 0);
    let st = f.st();
    assert!(st.local_replies.is_empty(), "{:?}", st.local_replies);
    assert_eq!(st.resumed, 1);
    assert_eq!(
        get(&st.request_headers, ":path").as_deref(),
        Some("/v1/files?limit=2")
    );
    assert_eq!(
        get(&st.request_headers, "authorization").as_deref(),
        Some("Bearer sk-up-9999")
    );
}

#[test]
fn unsupported_endpoint_is_a_clear_400() {
    let f: &'static Fake = Box::leak(Box::default());
    f.st().config = serde_json::json!({
        "providers": [{"name": "claude", "supportedProvider": "ANTHROPIC",
                       "apiKey": "a", "models": ["c1"]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    f.st().request_headers.retain(|(k, _)| k != b":path");
    f.st()
        .request_headers
        .push((b":path".to_vec(), b"/openai/v1/embeddings".to_vec()));
    http.on_http_request_headers(5, false);
    let body = br#"{"model":"c1","input":"x"}"#;
    f.st().request_body = body.to_vec();
    http.on_http_request_body(body.len(), true);
    let (code, v) = reply(f);
    assert_eq!(code, 400);
    assert_eq!(v["error"]["code"], "endpoint_not_supported");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'claude'") && msg.contains("/v1/embeddings"),
        "{msg}"
    );
}

#[test]
fn every_error_path_is_an_openai_error() {
    type Case = (
        Vec<(&'static str, &'static [u8])>,
        &'static [u8],
        u32,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            vec![("authorization", b"Bearer nope")],
            b"{}",
            401,
            "invalid_api_key",
        ),
        (
            vec![("authorization", b"Bearer \xff\xfe")],
            b"{}",
            401,
            "invalid_api_key",
        ),
        (
            vec![("x-provider-name", b"lo\xffcal")],
            b"{}",
            400,
            "invalid_header",
        ),
        (
            vec![("x-llm-gateway-tags", b"a=\xff")],
            b"{}",
            400,
            "invalid_header",
        ),
        (
            vec![("x-provider-name", b"other")],
            br#"{"model":"m1","messages":[]}"#,
            400,
            "unknown_provider",
        ),
        (vec![], b"not json", 400, "invalid_body"),
        (
            vec![],
            b"{\"model\":\"nope\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
            404,
            "model_not_found",
        ),
        (vec![], &[b'x'; 5000], 413, "request_too_large"),
    ];
    for (extra, body, status, code) in cases {
        let (f, root) = vm();
        let mut http = root.create_http_context().unwrap();
        let mut h = req_headers(&[]);
        for (k, v) in &extra {
            h.retain(|(n, _)| n.as_slice() != k.as_bytes());
            h.push((k.as_bytes().to_vec(), v.to_vec()));
        }
        f.st().request_headers = h;
        if http.on_http_request_headers(5, false) == Flow::Pause && f.st().local_replies.is_empty()
        {
            f.st().request_body = body.to_vec();
            http.on_http_request_body(body.len(), true);
        }
        let (got, v) = reply(f);
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{extra:?}"
        );
        assert!(v["error"]["message"].is_string());
        http.on_log();
    }
}

#[test]
fn missing_key_and_other_paths() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = headers(&[(":method", b"POST"), (":path", CHAT.as_bytes())]);
    http.on_http_request_headers(2, false);
    assert_eq!(reply(f).0, 401);
    // Not a gateway path: untouched, no reply, even with odd bytes.
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers =
        headers(&[(":method", b"GET"), (":path", b"/x\xff"), ("x-a", b"\xff")]);
    assert_eq!(http.on_http_request_headers(3, true), Flow::Continue);
    assert!(f.st().local_replies.is_empty());
    http.on_log();
}

#[test]
fn a_failing_host_never_panics() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[]);
    f.st().fail_with = Some(2);
    http.on_http_request_headers(5, false);
    http.on_http_request_body(10, true);
    http.on_http_response_headers(2, false);
    http.on_http_response_body(10, true);
    http.on_log();
}

/// The host refuses the rewritten body: a 500 local reply, and nothing decided after the body (its
/// `content-length`) is applied.
#[test]
fn a_refused_body_is_a_500_and_ends_the_batch() {
    let (f, root) = vm();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = req_headers(&[("content-length", b"80")]);
    assert_eq!(http.on_http_request_headers(5, false), Flow::Pause);
    let body = br#"{"model":"m1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    f.st().request_body = body.to_vec();
    f.st().fail_set_buffer = Some(2);
    assert_eq!(http.on_http_request_body(body.len(), true), Flow::Pause);
    let (code, v) = reply(f);
    assert_eq!(code, 500);
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(
        get(&f.st().request_headers, "content-length").as_deref(),
        Some("80")
    );
    assert_eq!(f.st().resumed, 0);
    http.on_log();
    assert_eq!(f.metric(&metrics::requests("local", "m1", 500)), None);
}

/// A VM with an OpenAI-compatible provider (`m1`) and an ANTHROPIC one (`c1`).
fn vm_anthropic() -> (&'static Fake, Vm) {
    let f: &'static Fake = Box::leak(Box::default());
    f.st().now_ms = 1_000;
    f.st().config = serde_json::json!({
        "maxBodyBytes": 8192,
        "providers": [
            {"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
             "url": "http://127.0.0.1:9/v1", "isHosted": true, "models": ["m1"]},
            {"name": "ant", "supportedProvider": "ANTHROPIC", "url": "http://127.0.0.1:8/v1",
             "apiKey": "sk-ant-up", "models": [{"name": "c1", "upstreamName": "claude-up"}]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    (f, root)
}

fn messages_request(f: &Fake, http: &mut Http<'static, Fake>, path: &str, body: &[u8]) -> Flow {
    f.st().request_headers = headers(&[
        (":method", b"POST"),
        (":path", path.as_bytes()),
        (":authority", b"gw"),
        ("content-type", b"application/json"),
        ("x-api-key", KEY.as_bytes()),
        ("anthropic-version", b"2023-06-01"),
        ("anthropic-beta", b"tools-2024-04-04"),
    ]);
    assert_eq!(http.on_http_request_headers(7, false), Flow::Pause);
    f.st().request_body = body.to_vec();
    http.on_http_request_body(body.len(), true)
}

#[test]
fn anthropic_messages_through_a_chat_provider() {
    let (f, root) = vm_anthropic();
    let mut http = root.create_http_context().unwrap();
    let body = br#"{"model":"m1","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        messages_request(f, &mut http, "/anthropic/v1/messages", body),
        Flow::Continue
    );
    {
        let st = f.st();
        assert_eq!(
            get(&st.request_headers, ":path").as_deref(),
            Some("/v1/chat/completions")
        );
        assert_eq!(get(&st.request_headers, "x-api-key"), None);
        assert_eq!(get(&st.request_headers, "anthropic-beta"), None);
        let sent: serde_json::Value = serde_json::from_slice(&st.request_body).unwrap();
        assert_eq!(sent["messages"][0]["role"], "user");
        assert_eq!(sent["max_tokens"], 64);
    }
    f.st().response_headers =
        headers(&[(":status", b"200"), ("content-type", b"application/json")]);
    assert_eq!(http.on_http_response_headers(2, false), Flow::Pause);
    let answer = br#"{"id":"c1","choices":[{"index":0,"message":{"role":"assistant","content":"yo"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
    f.st().response_body = answer.to_vec();
    assert_eq!(
        http.on_http_response_body(answer.len(), true),
        Flow::Continue
    );
    let out: serde_json::Value = serde_json::from_slice(&f.st().response_body).unwrap();
    assert_eq!(out["type"], "message");
    assert_eq!(out["content"][0]["text"], "yo");
    assert_eq!(out["stop_reason"], "end_turn");
    assert_eq!(out["usage"]["input_tokens"], 7);
    http.on_log();
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "input")), Some(7));
    assert_eq!(f.metric(&metrics::tokens("local", "m1", "output")), Some(2));
}

#[test]
fn anthropic_messages_native_passthrough_taps_stream_usage() {
    let (f, root) = vm_anthropic();
    let mut http = root.create_http_context().unwrap();
    let body = br#"{"model":"c1","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        messages_request(f, &mut http, "/anthropic/v1/messages", body),
        Flow::Continue
    );
    {
        let st = f.st();
        assert_eq!(
            get(&st.request_headers, ":path").as_deref(),
            Some("/v1/messages")
        );
        assert_eq!(
            get(&st.request_headers, "x-api-key").as_deref(),
            Some("sk-ant-up")
        );
        assert_eq!(get(&st.request_headers, "authorization"), None);
        assert_eq!(
            get(&st.request_headers, "anthropic-version").as_deref(),
            Some("2023-06-01")
        );
        assert_eq!(
            st.request_body,
            br#"{"model":"claude-up","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()
        );
    }
    f.st().response_headers =
        headers(&[(":status", b"200"), ("content-type", b"text/event-stream")]);
    assert_eq!(http.on_http_response_headers(2, false), Flow::Continue);
    let stream: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    for (i, part) in stream.chunks(17).enumerate() {
        f.st().response_body = part.to_vec();
        let last = (i + 1) * 17 >= stream.len();
        assert_eq!(http.on_http_response_body(part.len(), last), Flow::Continue);
        assert_eq!(f.st().response_body, part.to_vec(), "bytes pass untouched");
    }
    http.on_log();
    assert_eq!(f.metric(&metrics::tokens("ant", "c1", "input")), Some(11));
    assert_eq!(f.metric(&metrics::tokens("ant", "c1", "output")), Some(5));
}

#[test]
fn anthropic_ingress_errors_are_anthropic_shaped() {
    // A bad key.
    let (f, root) = vm_anthropic();
    let mut http = root.create_http_context().unwrap();
    f.st().request_headers = headers(&[
        (":method", b"POST"),
        (":path", b"/anthropic/v1/messages"),
        ("x-api-key", b"nope"),
    ]);
    http.on_http_request_headers(3, false);
    let (code, v) = reply(f);
    assert_eq!(code, 401);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    // count_tokens on a provider without it.
    let (f, root) = vm_anthropic();
    let mut http = root.create_http_context().unwrap();
    let body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    messages_request(f, &mut http, "/anthropic/v1/messages/count_tokens", body);
    let (code, v) = reply(f);
    assert_eq!(code, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("local"));
    // count_tokens natively: routed, and not a usage event.
    let (f, root) = vm_anthropic();
    let mut http = root.create_http_context().unwrap();
    let body = br#"{"model":"c1","messages":[{"role":"user","content":"hi"}]}"#;
    messages_request(f, &mut http, "/anthropic/v1/messages/count_tokens", body);
    assert_eq!(
        get(&f.st().request_headers, ":path").as_deref(),
        Some("/v1/messages/count_tokens")
    );
    // An upstream error from a chat provider.
    let (f, root) = vm_anthropic();
    let mut http = root.create_http_context().unwrap();
    let body = br#"{"model":"m1","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    messages_request(f, &mut http, "/anthropic/v1/messages", body);
    f.st().response_headers =
        headers(&[(":status", b"429"), ("content-type", b"application/json")]);
    http.on_http_response_headers(2, false);
    let err = br#"{"error":{"message":"slow","type":"rate_limit_error"}}"#;
    f.st().response_body = err.to_vec();
    http.on_http_response_body(err.len(), true);
    let v: serde_json::Value = serde_json::from_slice(&f.st().response_body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["type"], "error");
}

/// Arbitrary bytes through the Anthropic ingress, native and through chat, streamed or not: no
/// panic, and every local reply is an Anthropic error.
#[test]
fn anthropic_ingress_arbitrary_bytes() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pieces: [&[u8]; 9] = [
        b"\xff",
        br#"{"model":"c1","max_tokens":5,"messages":[{"role":"user","content":"x"}]"#,
        br#"{"model":"m1","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result"}]}]"#,
        b",\"stream\":true}",
        b"}",
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{}}}\n\n",
        b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":9}]},\"finish_reason\":\"x\"}]}\n\n",
        b"data: [DONE]\n\n",
        b"\r\n",
    ];
    for _ in 0..200 {
        let mut bytes = |n: u64| -> Vec<u8> {
            let mut v = Vec::new();
            for _ in 0..n {
                v.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            v
        };
        let (body, status, ctype, answer) = (bytes(3), bytes(1), bytes(1), bytes(4));
        let (f, root) = vm_anthropic();
        let mut http = root.create_http_context().unwrap();
        let path = [
            "/anthropic/v1/messages",
            "/anthropic/messages/count_tokens",
            "/anthropic/x",
        ][(next() % 3) as usize];
        f.st().request_headers = headers(&[
            (":method", b"POST"),
            (":path", path.as_bytes()),
            ("x-api-key", KEY.as_bytes()),
            ("anthropic-version", &status),
        ]);
        http.on_http_request_headers(4, false);
        f.st().request_body = body.clone();
        http.on_http_request_body(body.len(), true);
        let code: &[u8] = [b"200".as_slice(), b"400", b"500", &status][(next() % 4) as usize];
        let ct: &[u8] =
            [b"text/event-stream".as_slice(), b"application/json", &ctype][(next() % 3) as usize];
        f.st().response_headers = headers(&[(":status", code), ("content-type", ct)]);
        http.on_http_response_headers(2, false);
        for part in answer.chunks(1 + (next() % 40) as usize) {
            f.st().response_body = part.to_vec();
            http.on_http_response_body(part.len(), false);
        }
        http.on_http_response_body(0, true);
        http.on_log();
        for (code, _, body) in &f.st().local_replies {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert!(*code >= 400 && v["type"] == "error", "{v}");
            assert!(v["error"]["message"].is_string(), "{v}");
        }
    }
}

/// Arbitrary bytes in every header and body, through the whole lifecycle (a small deterministic
/// property test: no panic, and every local reply is an OpenAI error).
#[test]
fn arbitrary_bytes_everywhere() {
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, pieces: &[&[u8]]) -> Vec<u8> {
            let mut v = Vec::new();
            for _ in 0..(self.next() % 6) {
                let r = self.next();
                if r.is_multiple_of(3) {
                    v.push((r >> 8) as u8);
                } else {
                    v.extend_from_slice(pieces[(r >> 16) as usize % pieces.len()]);
                }
            }
            v
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pieces: [&[u8]; 8] = [
        b"\xff",
        b"\x80\x00",
        br#"{"model":"m1","messages":[{"role":"user","content":"x"}]"#,
        b"}",
        b"\"stream\":true",
        b"data: ",
        b"\n\n",
        b"\xc3",
    ];
    for _ in 0..300 {
        let (f, root) = vm();
        let mut http = root.create_http_context().unwrap();
        let (a, b, c, d) = (
            rng.bytes(&pieces),
            rng.bytes(&pieces),
            rng.bytes(&pieces),
            rng.bytes(&pieces),
        );
        let mut h = req_headers(&[("x-llm-gateway-tags", &a), ("x-odd", &b)]);
        if rng.next().is_multiple_of(2) {
            h.push((b"x-provider-name".to_vec(), c.clone()));
        }
        f.st().request_headers = h;
        http.on_http_request_headers(6, false);
        let mut body = br#"{"model":"m1","messages":[{"role":"user","content":"x"}]"#.to_vec();
        body.extend(&d);
        if rng.next().is_multiple_of(2) {
            body = d.clone();
        }
        f.st().request_body = body.clone();
        http.on_http_request_body(body.len(), true);
        f.st().response_headers = headers(&[(":status", &a), ("content-type", &c)]);
        http.on_http_response_headers(2, false);
        for part in [&b, &d, &a] {
            f.st().response_body = part.to_vec();
            http.on_http_response_body(part.len(), false);
        }
        http.on_http_response_body(0, true);
        http.on_log();
        for (code, _, body) in &f.st().local_replies {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert!(*code >= 400 && v["error"]["code"].is_string(), "{v}");
        }
    }
}

// ---- Pure tests: events in, effects out, no host at all (only a read-only view of bytes). ----

/// What the machine may read, as plain data; it has no way to change anything.
#[derive(Default)]
struct View {
    now_ms: u64,
    config: Vec<u8>,
    request_body: Vec<u8>,
    response_headers: hostapi::Pairs,
    response_body: Vec<u8>,
}

impl Read for View {
    fn headers(&self, map: Map) -> Result<Headers, hostapi::Status> {
        match map {
            Map::ResponseHeaders => Ok(Headers::from_pairs(&self.response_headers)),
            _ => Ok(Headers::default()),
        }
    }
    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, hostapi::Status> {
        Ok(self.headers(map)?.get(name).map(<[u8]>::to_vec))
    }
    fn buffer(
        &self,
        b: hostapi::Buffer,
        start: usize,
        max: usize,
    ) -> Result<Vec<u8>, hostapi::Status> {
        let buf = match b {
            hostapi::Buffer::RequestBody => &self.request_body,
            hostapi::Buffer::ResponseBody => &self.response_body,
            hostapi::Buffer::PluginConfiguration => &self.config,
            hostapi::Buffer::CallResponseBody => return Ok(Vec::new()),
        };
        let end = start.saturating_add(max).min(buf.len());
        Ok(buf.get(start.min(end)..end).unwrap_or_default().to_vec())
    }
    fn shared_get(&self, _key: &str) -> Result<Option<Vec<u8>>, hostapi::Status> {
        Ok(None)
    }
    fn property(&self, _path: &[&str]) -> Result<Option<Vec<u8>>, hostapi::Status> {
        Ok(None)
    }
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
}

/// A configured root machine over `view` (whose `config` is `config`).
fn machine(view: &mut View, config: serde_json::Value) -> GatewayRoot {
    view.now_ms = 1_000;
    view.config = config.to_string().into_bytes();
    let mut root = GatewayRoot::default();
    let mut out = Vec::new();
    assert!(root.handle(view, RootEvent::Configure, &mut out));
    root
}

fn static_config() -> serde_json::Value {
    serde_json::json!({
        "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                       "url": "http://127.0.0.1:9/v1", "apiKey": "sk-up-cred", "models": ["m1"]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
}

fn request_headers(http: &mut GatewayHttp, view: &View, h: hostapi::Pairs) -> (Flow, Vec<Effect>) {
    let mut out = Vec::new();
    let flow = http.handle(
        view,
        Event::RequestHeaders {
            headers: Headers::from_pairs(&h),
            end_of_stream: false,
        },
        &mut out,
    );
    (flow, out)
}

fn event(http: &mut GatewayHttp, view: &View, e: Event) -> (Flow, Vec<Effect>) {
    let mut out = Vec::new();
    let flow = http.handle(view, e, &mut out);
    (flow, out)
}

/// The request headers the machine set (name → value) and removed, in order.
fn header_effects(out: &[Effect]) -> (Vec<(String, String)>, Vec<String>) {
    let mut set = Vec::new();
    let mut removed = Vec::new();
    for e in out {
        match e {
            Effect::SetHeader {
                map: Map::RequestHeaders,
                name,
                value,
            } => set.push((name.to_string(), hostapi::text(value).into_owned())),
            Effect::RemoveHeader {
                map: Map::RequestHeaders,
                name,
            } => removed.push(name.to_string()),
            _ => {}
        }
    }
    (set, removed)
}

#[test]
fn effects_stay_small() {
    // Every effect is as large as the largest variant: keep the common ones cheap to move.
    assert!(
        core::mem::size_of::<Effect>() <= 56,
        "{}",
        core::mem::size_of::<Effect>()
    );
}

#[test]
fn pure_unauthenticated_request_is_one_401_reply_and_a_pause() {
    let mut view = View::default();
    let root = machine(&mut view, static_config());
    let mut http = root.create_http_context().unwrap();
    let (flow, out) = request_headers(
        &mut http,
        &view,
        headers(&[(":method", b"POST"), (":path", CHAT.as_bytes())]),
    );
    assert_eq!(flow, Flow::Pause);
    let [Effect::Reply {
        status,
        headers,
        body,
    }] = out.as_slice()
    else {
        panic!("one local reply expected: {out:?}");
    };
    assert_eq!(*status, 401);
    assert!(headers.contains(&("content-type", "application/json".to_string())));
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(v["error"]["message"].is_string());
    // Answered: later callbacks of the request do nothing.
    let (flow, out) = event(
        &mut http,
        &view,
        Event::RequestBody {
            size: 0,
            end_of_stream: true,
        },
    );
    assert_eq!((flow, out.len()), (Flow::Continue, 0));
}

#[test]
fn pure_authenticated_chat_sets_the_upstream_headers_and_never_forwards_the_key() {
    let mut view = View::default();
    let root = machine(&mut view, static_config());
    let mut http = root.create_http_context().unwrap();
    let (flow, out) = request_headers(&mut http, &view, req_headers(&[]));
    assert_eq!(flow, Flow::Pause, "waits for the body");
    let (_, removed) = header_effects(&out);
    assert!(removed.contains(&"authorization".to_string()), "{out:?}");
    view.request_body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let (flow, out) = event(
        &mut http,
        &view,
        Event::RequestBody {
            size: view.request_body.len(),
            end_of_stream: true,
        },
    );
    assert_eq!(flow, Flow::Continue);
    let (set, _) = header_effects(&out);
    let value = |n: &str| set.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(value(":authority"), Some("127.0.0.1:9"));
    assert_eq!(value(":path"), Some("/v1/chat/completions"));
    assert_eq!(value(gateway::CLUSTER_HEADER), Some("llm_gateway_dfp_http"));
    assert_eq!(value("authorization"), Some("Bearer sk-up-cred"));
    // The gateway key goes nowhere: no header, body or reply carries it.
    let all = format!("{out:?}");
    assert!(!all.contains(KEY), "{all}");
    assert!(!out.iter().any(|e| matches!(e, Effect::Reply { .. })));
}

#[test]
fn pure_sidecar_lookup_is_a_call_and_a_failed_dispatch_is_a_503() {
    let mut view = View::default();
    let root = machine(
        &mut view,
        serde_json::json!({"sidecar": {"token": "t0k"}, "providers": []}),
    );
    let mut http = root.create_http_context().unwrap();
    let (flow, out) = request_headers(&mut http, &view, req_headers(&[]));
    assert_eq!(flow, Flow::Pause);
    let calls: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            Effect::Call(c) => Some((&c.purpose, &c.headers, &c.body)),
            _ => None,
        })
        .collect();
    let [(purpose, h, body)] = calls.as_slice() else {
        panic!("one callout expected: {out:?}");
    };
    assert_eq!(**purpose, Purpose::Resolve);
    assert!(h.contains(&(":path", resolve::RESOLVE_PATH.to_string())));
    assert!(h.contains(&(resolve::TOKEN_HEADER, "t0k".to_string())));
    assert!(String::from_utf8_lossy(body).contains(&sha(KEY)));
    // The host could not dispatch it: the machine answers 503 itself.
    let (flow, out) = event(
        &mut http,
        &view,
        Event::Dispatched {
            purpose: Purpose::Resolve,
            result: Err(1),
        },
    );
    assert_eq!(flow, Flow::Pause);
    let [Effect::Reply { status, body, .. }] = out.as_slice() else {
        panic!("one local reply expected: {out:?}");
    };
    assert_eq!(*status, 503);
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["error"]["code"], "control_plane_unavailable");
}

#[test]
fn pure_a_refused_body_is_a_500() {
    let mut view = View::default();
    let root = machine(&mut view, static_config());
    let mut http = root.create_http_context().unwrap();
    request_headers(&mut http, &view, req_headers(&[]));
    let (flow, out) = event(&mut http, &view, Event::BodyNotSet { status: 2 });
    assert_eq!(flow, Flow::Pause);
    assert!(
        matches!(out.as_slice(), [Effect::Reply { status: 500, .. }]),
        "{out:?}"
    );
}

/// One whole chat request through the machine; the effects of its log event.
fn chat_log_effects(root: &GatewayRoot, view: &mut View) -> Vec<Effect> {
    let mut http = root.create_http_context().unwrap();
    request_headers(&mut http, view, req_headers(&[]));
    view.request_body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let size = view.request_body.len();
    let (flow, _) = event(
        &mut http,
        view,
        Event::RequestBody {
            size,
            end_of_stream: true,
        },
    );
    assert_eq!(flow, Flow::Continue);
    view.response_headers = headers(&[(":status", b"200"), ("content-type", b"application/json")]);
    event(
        &mut http,
        view,
        Event::ResponseHeaders {
            end_of_stream: false,
        },
    );
    view.response_body = br#"{"id":"x","model":"m1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#.to_vec();
    let size = view.response_body.len();
    view.now_ms += 40;
    event(
        &mut http,
        view,
        Event::ResponseBody {
            size,
            end_of_stream: true,
        },
    );
    event(&mut http, view, Event::Log).1
}

#[test]
fn pure_usage_at_log_is_metric_effects_defined_once() {
    let mut view = View::default();
    let root = machine(&mut view, static_config());
    let out = chat_log_effects(&root, &mut view);
    let local = |name: &str| {
        out.iter()
            .find_map(|e| match e {
                Effect::DefineMetric { local, name: n, .. } if n == name => Some(*local),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name} not defined: {out:?}"))
    };
    let (requests, tokens_in, tokens_out, duration) = (
        local(&metrics::requests("local", "m1", 200)),
        local(&metrics::tokens("local", "m1", "input")),
        local(&metrics::tokens("local", "m1", "output")),
        local(&metrics::duration("local", "m1")),
    );
    let expect = [
        Effect::Increment {
            local: requests,
            by: 1,
        },
        Effect::Increment {
            local: tokens_in,
            by: 7,
        },
        Effect::Increment {
            local: tokens_out,
            by: 2,
        },
        Effect::Record {
            local: duration,
            value: 40,
        },
    ];
    for e in &expect {
        assert!(out.contains(e), "{e:?} missing from {out:?}");
    }
    assert!(out
        .iter()
        .any(|e| matches!(e, Effect::SetProperties(p) if p.contains(&(crate::access_log::PROVIDER, "local".into())))));
    // The next request reuses the numbers: no metric is defined (no name formatted) again.
    let again = chat_log_effects(&root, &mut view);
    assert!(
        !again
            .iter()
            .any(|e| matches!(e, Effect::DefineMetric { .. })),
        "{again:?}"
    );
    for e in &expect[..3] {
        assert!(again.contains(e), "{e:?} missing from {again:?}");
    }
}

#[test]
fn pure_filter_state_off_sets_no_properties_but_keeps_the_metrics() {
    let mut view = View::default();
    let mut config = static_config();
    config["filterState"] = serde_json::json!(false);
    let root = machine(&mut view, config);
    let out = chat_log_effects(&root, &mut view);
    assert!(
        !out.iter().any(|e| matches!(e, Effect::SetProperties(_))),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::Increment { by: 7, .. })),
        "{out:?}"
    );
}

#[test]
fn pure_root_usage_batch_is_a_call_and_a_refused_dispatch_requeues_it() {
    let mut view = View::default();
    let mut root = machine(
        &mut view,
        serde_json::json!({
            "sidecar": {"token": "t"},
            "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                           "url": "http://127.0.0.1:9/v1", "isHosted": true, "models": ["m1"]}],
            "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
        }),
    );
    // A key's first request asks for its limits; the host cannot dispatch the callout: the request
    // goes on under the failure policy.
    let mut http = root.create_http_context().unwrap();
    let (_, out) = request_headers(&mut http, &view, req_headers(&[]));
    assert!(out
        .iter()
        .any(|e| matches!(e, Effect::Call(c) if c.purpose == Purpose::FirstLimits)));
    let (flow, out) = event(
        &mut http,
        &view,
        Event::Dispatched {
            purpose: Purpose::FirstLimits,
            result: Err(1),
        },
    );
    assert_eq!(flow, Flow::Pause, "{out:?}");
    view.request_body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let size = view.request_body.len();
    let (flow, out) = event(
        &mut http,
        &view,
        Event::RequestBody {
            size,
            end_of_stream: true,
        },
    );
    assert_eq!(flow, Flow::Continue, "{out:?}");
    view.response_headers = headers(&[(":status", b"200")]);
    event(
        &mut http,
        &view,
        Event::ResponseHeaders {
            end_of_stream: true,
        },
    );
    // The record is buffered: this VM's part of the gauge goes up by one.
    let out = event(&mut http, &view, Event::Log).1;
    let gauge = out
        .iter()
        .find_map(|e| match e {
            Effect::DefineMetric { local, name, .. } if name == metrics::USAGE_BUFFERED => {
                Some(*local)
            }
            _ => None,
        })
        .unwrap();
    assert!(out.contains(&Effect::GaugeAdd {
        local: gauge,
        delta: 1
    }));
    // The tick sends the batch; the host refuses the callout: the record goes back to the queue (none
    // dropped, the gauge unchanged) and the next tick sends it again.
    let usage_calls = |out: &[Effect]| {
        out.iter()
            .filter(|e| matches!(e, Effect::Call(c) if c.purpose == Purpose::Usage))
            .count()
    };
    let mut out = Vec::new();
    root.handle(&view, RootEvent::Tick, &mut out);
    assert_eq!(usage_calls(&out), 1, "{out:?}");
    let mut out = Vec::new();
    root.handle(
        &view,
        RootEvent::Dispatched {
            purpose: Purpose::Usage,
            result: Err(1),
        },
        &mut out,
    );
    let dropped = out
        .iter()
        .find_map(|e| match e {
            Effect::DefineMetric { local, name, .. } if name == metrics::USAGE_DROPPED => {
                Some(*local)
            }
            _ => None,
        })
        .unwrap();
    assert!(out.contains(&Effect::Increment {
        local: dropped,
        by: 0
    }));
    assert!(!out.iter().any(|e| matches!(e, Effect::GaugeAdd { .. })));
    let mut out = Vec::new();
    root.handle(&view, RootEvent::Tick, &mut out);
    assert_eq!(usage_calls(&out), 1, "{out:?}");
}
