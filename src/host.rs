//! The proxy-wasm adapter: the only code that knows Envoy's callbacks. Each callback goes to
//! [`crate::adapter`] over the real host ([`Wasm`], the filter's own ABI layer), which turns it into an
//! event for the exchange machine and applies the effects the machine returns; no decision here.

use crate::abi::Wasm;
use crate::adapter;
use crate::exchange::Flow;
use crate::hostapi::{Host, Level};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

static HOST: Wasm = Wasm;

/// `log` records go to Envoy through the host (the SDK's logger unwraps the host's answer).
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record) {
        let level = match r.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug | log::Level::Trace => return,
        };
        HOST.log(level, &r.args().to_string());
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

proxy_wasm::main! {{
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    // A panic (there should be none: clippy denies the usual sources) is logged before the VM aborts.
    std::panic::set_hook(Box::new(|info| HOST.log(Level::Error, &format!("llm-gateway panicked: {info}"))));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root(adapter::Root::new(&HOST)))
    });
}}

fn action(f: Flow) -> Action {
    match f {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

struct Root(adapter::Root<'static, Wasm>);

impl Context for Root {
    crate::sdk_unused::context_methods!();

    fn on_done(&mut self) -> bool {
        self.0.on_done()
    }

    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        self.0.on_http_call_response(token, headers, body, trailers)
    }
}

impl RootContext for Root {
    crate::sdk_unused::root_context_methods!();

    fn on_configure(&mut self, size: usize) -> bool {
        self.0.on_configure(size)
    }

    fn on_tick(&mut self) {
        self.0.on_tick()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let http = self.0.create_http_context()?;
        Some(Box::new(Http(http)))
    }
}

struct Http(adapter::Http<'static, Wasm>);

impl Context for Http {
    crate::sdk_unused::context_methods!();

    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        self.0.on_http_call_response(token, headers, body, trailers)
    }
}

impl HttpContext for Http {
    crate::sdk_unused::http_context_methods!();

    fn on_http_request_headers(&mut self, n: usize, end_of_stream: bool) -> Action {
        action(self.0.on_http_request_headers(n, end_of_stream))
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_http_request_body(size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, n: usize, end_of_stream: bool) -> Action {
        action(self.0.on_http_response_headers(n, end_of_stream))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_http_response_body(size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.0.on_log()
    }
}
