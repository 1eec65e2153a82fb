//! The whole request lifecycle of the filter (`exchange`) over an in-memory host whose header maps,
//! bodies and upstream answers come from the fuzzer: what the proxy-wasm host hands the filter is as
//! hostile as what clients and providers send. Thin on purpose: the host is the filter's own test
//! double (`hostapi::fake`, enabled by the `fake-host` feature) under the filter's own effect adapter
//! (`adapter::Root`); this only feeds it and calls the callbacks in Envoy's order.

use llm_gateway::adapter::Root;
use llm_gateway::exchange::Flow;
use llm_gateway::hostapi::fake::{Fake, State};
use llm_gateway::hostapi::Pairs;

thread_local! {
    static HOST: &'static Fake = Box::leak(Box::default());
}

pub const KEY: &str = "sk-fuzz-key";

/// The static configuration every run uses: one provider of each translation kind.
fn config(key_sha256: &str) -> Vec<u8> {
    format!(
        r#"{{"maxBodyBytes":65536,
        "providers":[
          {{"name":"oai","supportedProvider":"OPENAI_COMPATIBLE","url":"http://10.0.0.1:8000/v1","isHosted":true,"models":["m"]}},
          {{"name":"ant","supportedProvider":"ANTHROPIC","url":"https://api.anthropic.com/v1","apiKey":"sk-ant","models":["claude"]}},
          {{"name":"gem","supportedProvider":"GEMINI","api":"native","url":"https://generativelanguage.googleapis.com/v1beta","apiKey":"g","models":["gemini"]}}],
        "keys":[{{"id":"k","sha256":"{key_sha256}","config":"default"}}]}}"#
    )
    .into_bytes()
}

/// `name: value` lines (any bytes) into header pairs.
fn header_lines(b: &[u8]) -> Pairs {
    b.split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let at = l.iter().position(|&c| c == b':').unwrap_or(l.len());
            let (k, v) = l.split_at(at);
            let v = v.strip_prefix(b":").unwrap_or(v);
            let v = v.strip_prefix(b" ").unwrap_or(v);
            (k.to_ascii_lowercase(), v.to_vec())
        })
        .collect()
}

fn pair(k: &str, v: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (k.as_bytes().to_vec(), v.to_vec())
}

/// Every local reply the filter sends with an error status must be OpenAI-shaped JSON.
fn check_replies(s: &State) {
    for (code, _headers, body) in &s.local_replies {
        if *code >= 400 {
            let v: serde_json::Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("local reply {code} is not JSON ({e})"));
            let err = v.get("error").expect("local reply without `error`");
            assert!(err.get("message").is_some_and(|m| m.is_string()));
        }
    }
}

/// Input: fields separated by NUL: request header lines, request body, response header lines,
/// response body (cut into chunks), a flags byte (model choice, stream, key present).
pub fn lifecycle(data: &[u8]) {
    let f = crate::fields(data, 5);
    let get = |i: usize| f.get(i).copied().unwrap_or_default();
    let flags = get(4).first().copied().unwrap_or(0);
    let host = HOST.with(|h| *h);
    let key_hash = llm_gateway::config::hash_key(KEY);
    {
        let mut s = host.0.borrow_mut();
        *s = State {
            config: config(&key_hash),
            now_ms: 1_000,
            ..State::default()
        };
    }
    let mut root = Root::new(host);
    if !root.on_configure(0) {
        panic!("the fuzz configuration must compile");
    }
    let Some(mut http) = root.create_http_context() else {
        return;
    };

    // Request: the fuzzer's header lines first (they win lookups), then a plausible request.
    let mut req = header_lines(get(0));
    req.push(pair(":method", b"POST"));
    req.push(pair(":path", b"/openai/v1/chat/completions"));
    req.push(pair(":authority", b"gw"));
    req.push(pair("content-type", b"application/json"));
    if flags & 1 == 0 {
        req.push(pair("authorization", format!("Bearer {KEY}").as_bytes()));
    }
    let body = if get(1).is_empty() {
        let model = ["m", "claude", "gemini"][usize::from(flags >> 1) % 3];
        let stream = flags & 8 != 0;
        format!(r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"x"}}]}}"#)
            .into_bytes()
    } else {
        get(1).to_vec()
    };
    {
        let mut s = host.0.borrow_mut();
        s.request_headers = req;
        s.request_body = body.clone();
    }
    let flow = http.on_http_request_headers(5, false);
    if flow == Flow::Pause || flow == Flow::Continue {
        let _ = http.on_http_request_body(body.len(), true);
    }

    // Response: the fuzzer's header lines, then the body in chunks.
    let mut resp = header_lines(get(2));
    resp.push(pair(":status", b"200"));
    host.0.borrow_mut().response_headers = resp;
    let _ = http.on_http_response_headers(2, false);
    let (parts, _) = crate::chunks(get(3));
    let n = parts.len();
    for (i, c) in parts.iter().enumerate() {
        host.0.borrow_mut().response_body = c.to_vec();
        let _ = http.on_http_response_body(c.len(), i + 1 == n);
    }
    if n == 0 {
        host.0.borrow_mut().response_body.clear();
        let _ = http.on_http_response_body(0, true);
    }
    host.0.borrow_mut().now_ms = 2_000;
    http.on_log();
    root.on_tick();
    check_replies(&host.0.borrow());
}
