//! Instruction-count microbenchmark of whole exchanges through the fake host (issue 10).
//!
//! Run by `bench/callgrind.sh` under `valgrind --tool=callgrind --toggle-collect='*measured_*'`: only
//! the `measured_*` functions are counted, so the figures are instructions per request of the
//! filter's own code (plus the in-memory fake host), repeatable whatever the load of the machine.
//! The script drops this file into bases that have the effect adapter (`src/adapter.rs`) and
//! `bench/bench_exchange_v1.rs` (the same workload over the API before it: `exchange::install` and the
//! machine called directly) into older ones. The tests are `#[ignore]`d: `cargo test` does not run them.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::adapter::{Http, Root};
use crate::hostapi::fake::Fake;

type GatewayRoot = Root<'static, Fake>;
type GatewayHttp = Http<'static, Fake>;
use crate::hostapi::Pairs;

const KEY: &str = "sk-bench-key";
/// Requests per measured run (instructions are divided by this).
const N: usize = 200;

fn sha(k: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(k.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn vm() -> (&'static Fake, GatewayRoot) {
    let f: &'static Fake = Box::leak(Box::default());
    f.st().now_ms = 1_000;
    f.st().config = serde_json::json!({
        "maxBodyBytes": 1048576,
        "providers": [
            {"name": "local", "supportedProvider": "OPENAI_COMPATIBLE", "url": "http://127.0.0.1:9/v1",
             "isHosted": true, "apiKey": "sk-up", "models": ["bench-model",
                 {"name": "gpt-4o", "upstreamName": "bench-model"}]},
            {"name": "claude", "supportedProvider": "ANTHROPIC", "url": "http://127.0.0.1:10/v1",
             "apiKey": "sk-ant", "models": [{"name": "claude", "upstreamName": "claude-sonnet-4-5"}]}],
        "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
    })
    .to_string()
    .into_bytes();
    let mut root = Root::new(f);
    assert!(root.on_configure(0));
    (f, root)
}

fn pairs(p: &[(&str, &str)]) -> Pairs {
    p.iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// The bench's ~710-byte chat request (system + user message, temperature, max_tokens, user).
fn request_body(model: &str, stream: bool) -> Vec<u8> {
    let system = "You are a helpful assistant that answers briefly and precisely. ".repeat(3);
    let user = "Summarize the following text in one sentence: the quick brown fox jumps over \
                the lazy dog while the cat watches from the window and the bird sings. "
        .repeat(3);
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}],"temperature":0.2,"max_tokens":256,"user":"bench-user"{}}}"#,
        if stream { r#","stream":true"# } else { "" }
    )
    .into_bytes()
}

const CHAT_ANSWER: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The fox jumps over the dog while a cat watches and a bird sings."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":120,"completion_tokens":16,"total_tokens":136,"prompt_tokens_details":{"cached_tokens":0}},"system_fingerprint":"fp_bench"}"#;

const ANTHROPIC_ANSWER: &[u8] = br#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"The fox jumps over the dog while a cat watches and a bird sings."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":120,"output_tokens":16,"cache_read_input_tokens":0}}"#;

/// An OpenAI SSE stream: 12 content chunks, the usage chunk (asked for by the gateway), `[DONE]`,
/// delivered in 4 body callbacks.
fn sse_chunks() -> Vec<Vec<u8>> {
    let mut s = String::new();
    for i in 0..12 {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n");
    s.push_str("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":13,\"total_tokens\":133}}\n\n");
    s.push_str("data: [DONE]\n\n");
    let b = s.into_bytes();
    let q = b.len() / 4;
    vec![
        b[..q].to_vec(),
        b[q..2 * q].to_vec(),
        b[2 * q..3 * q].to_vec(),
        b[3 * q..].to_vec(),
    ]
}

/// One whole exchange: request headers, body, response headers, response body chunks, log.
fn exchange(f: &Fake, http: &mut GatewayHttp, body: &[u8], sse: bool, response: &[Vec<u8>]) {
    f.st().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/openai/v1/chat/completions"),
        (":authority", "gw"),
        ("content-type", "application/json"),
        ("content-length", "710"),
        ("x-api-key", KEY),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
    ]);
    http.on_http_request_headers(8, false);
    f.st().request_body = body.to_vec();
    http.on_http_request_body(body.len(), true);
    assert!(
        f.st().local_replies.is_empty(),
        "{:?}",
        f.st().local_replies
    );
    f.st().response_headers = pairs(&[
        (":status", "200"),
        (
            "content-type",
            if sse {
                "text/event-stream"
            } else {
                "application/json"
            },
        ),
        ("content-length", "400"),
        ("date", "Tue, 01 Dec 2026 01:00:00 GMT"),
    ]);
    http.on_http_response_headers(4, false);
    for (i, c) in response.iter().enumerate() {
        f.st().response_body = c.clone();
        http.on_http_response_body(c.len(), i + 1 == response.len());
    }
    http.on_log();
    let mut st = f.st();
    st.logs.clear();
    st.now_ms += 1;
}

fn run(body: Vec<u8>, sse: bool, response: Vec<Vec<u8>>, measured: fn(&dyn Fn())) {
    let (f, root) = vm();
    let one = || {
        let mut http = root.create_http_context().unwrap();
        exchange(f, &mut http, &body, sse, &response);
    };
    // Warm-up (VM caches: key digest, metric ids) outside the measured function.
    one();
    one();
    measured(&one);
}

#[inline(never)]
fn measured_chat(one: &dyn Fn()) {
    // Distinct bodies, so the linker does not fold the three into one symbol.
    for _ in 0..N {
        one();
        core::hint::black_box(1u8);
    }
}

#[inline(never)]
fn measured_sse(one: &dyn Fn()) {
    // Distinct bodies, so the linker does not fold the three into one symbol.
    for _ in 0..N {
        one();
        core::hint::black_box(2u8);
    }
}

#[inline(never)]
fn measured_native(one: &dyn Fn()) {
    // Distinct bodies, so the linker does not fold the three into one symbol.
    for _ in 0..N {
        one();
        core::hint::black_box(3u8);
    }
}

#[test]
#[ignore]
fn bench_chat() {
    // Body rewrite (gpt-4o → bench-model) + JSON usage.
    run(
        request_body("gpt-4o", false),
        false,
        vec![CHAT_ANSWER.to_vec()],
        measured_chat,
    );
}

#[test]
#[ignore]
fn bench_sse() {
    run(
        request_body("bench-model", true),
        true,
        sse_chunks(),
        measured_sse,
    );
}

#[test]
#[ignore]
fn bench_native() {
    run(
        request_body("claude", false),
        false,
        vec![ANTHROPIC_ANSWER.to_vec()],
        measured_native,
    );
}
