//! The floor: the least any wasm filter that routes on the request body can cost. It holds the request
//! headers until the body has ended (as the gateway must, to read `model`), then makes the header
//! changes the gateway makes for the benchmark's provider (authority, path, cluster, provider key,
//! gateway key removed) and lets the request go. No parsing, no decisions, no response work.
//! Configuration (a JSON string): `{"fast": "<host:port>", "stream": "<host:port>"}`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(FloorRoot { targets: Rc::new(Targets::default()) })
    });
}}

#[derive(Default)]
struct Targets {
    fast: String,
    stream: String,
}

struct FloorRoot {
    targets: Rc<Targets>,
}

impl Context for FloorRoot {}

/// The value of `"key": "..."` in a flat JSON object (enough for this fixed configuration).
fn field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\"");
    json.split_once(&pat)
        .and_then(|(_, rest)| rest.split('"').nth(1))
        .unwrap_or_default()
        .to_string()
}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let cfg = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let cfg = String::from_utf8_lossy(&cfg);
        self.targets = Rc::new(Targets {
            fast: field(&cfg, "fast"),
            stream: field(&cfg, "stream"),
        });
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorHttp {
            targets: self.targets.clone(),
            stream: false,
        }))
    }
}

struct FloorHttp {
    targets: Rc<Targets>,
    stream: bool,
}

impl Context for FloorHttp {}

fn set(name: &str, value: &[u8]) {
    let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value));
}

impl HttpContext for FloorHttp {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            return Action::Continue;
        }
        self.stream = matches!(
            hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-bench-stream"),
            Ok(Some(_))
        );
        Action::Pause
    }

    fn on_http_request_body(&mut self, _size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let (authority, cluster) = if self.stream {
            (&self.targets.stream, "bench_stream")
        } else {
            (&self.targets.fast, "bench_fast")
        };
        set(":authority", authority.as_bytes());
        set(":path", b"/v1/chat/completions");
        set("x-llm-gateway-cluster", cluster.as_bytes());
        set("authorization", b"Bearer sk-bench-provider-key");
        let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, "x-api-key", None);
        Action::Continue
    }
}
