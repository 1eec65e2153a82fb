//! The thin proxy-wasm adapter: the only code that talks to Envoy. It reads headers and bodies,
//! calls the pure core, and applies the decisions. Host results are always handled, never unwrapped.

use crate::auth;
use crate::config::{self, Identity, Plan, ProcessEnv};
use crate::entry::{self, Endpoint};
use crate::error::GatewayError;
use crate::gateway::{self, Routed};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(GatewayRoot { plan: None }) });
}}

struct GatewayRoot {
    plan: Option<Rc<Plan>>,
}

impl Context for GatewayRoot {}

impl RootContext for GatewayRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                log::error!("llm-gateway: cannot read plugin configuration: {e:?}");
                return false;
            }
        };
        let plan = config::parse(&bytes).and_then(|raw| config::compile(&raw, &ProcessEnv));
        match plan {
            Ok(plan) => {
                log::info!(
                    "llm-gateway: configured with {} gateway key(s)",
                    plan.keys.len()
                );
                self.plan = Some(Rc::new(plan));
                true
            }
            Err(e) => {
                log::error!("llm-gateway: refusing to start: {e}");
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plan = self.plan.clone()?;
        Some(Box::new(GatewayHttp {
            plan,
            state: State::PassThrough,
        }))
    }
}

enum State {
    /// Not a gateway request, or already answered locally.
    PassThrough,
    /// Authenticated chat request waiting for its body.
    AwaitingBody {
        identity: Rc<Identity>,
        provider_header: Option<String>,
    },
    /// Sent upstream.
    Routed(Box<Routed>),
}

struct GatewayHttp {
    plan: Rc<Plan>,
    state: State,
}

fn header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

fn set_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
        log::warn!("llm-gateway: cannot set request header {name}: {e:?}");
    }
}

impl GatewayHttp {
    fn reject(&mut self, err: &GatewayError) -> Action {
        self.state = State::PassThrough;
        let headers = err.headers();
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = err.body();
        if let Err(e) = hostcalls::send_http_response(err.status(), pairs, Some(body.as_bytes())) {
            log::error!("llm-gateway: cannot send local reply: {e:?}");
        }
        Action::Pause
    }

    fn reply_json(&mut self, body: &str) -> Action {
        self.state = State::PassThrough;
        let headers = vec![("content-type", "application/json")];
        if let Err(e) = hostcalls::send_http_response(200, headers, Some(body.as_bytes())) {
            log::error!("llm-gateway: cannot send local reply: {e:?}");
        }
        Action::Pause
    }

    fn handle_headers(&mut self, end_of_stream: bool) -> Result<Action, GatewayError> {
        // Callers must never choose the upstream cluster themselves.
        set_header(gateway::CLUSTER_HEADER, None);
        let method = header(":method").unwrap_or_default();
        let path = header(":path").unwrap_or_default();
        let endpoint = match entry::classify(&method, &path) {
            None => return Ok(Action::Continue),
            Some(r) => r?,
        };
        let key = auth::extract_key(
            header("x-api-key").as_deref(),
            header("authorization").as_deref(),
        );
        let identity = auth::authenticate(&self.plan, key.as_deref())?;
        let provider_header = header("x-provider-name");
        for h in gateway::STRIPPED_REQUEST_HEADERS {
            set_header(h, None);
        }
        match endpoint {
            Endpoint::ListModels => Ok(self.reply_json(&gateway::list_models(&identity))),
            Endpoint::GetModel(name) => {
                let body = gateway::get_model(&identity, &name)?;
                Ok(self.reply_json(&body))
            }
            Endpoint::ChatCompletions => {
                let limit = self.plan.max_body_bytes;
                let declared =
                    header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
                if declared.is_some_and(|n| n > limit) {
                    return Err(GatewayError::BodyTooLarge { limit });
                }
                if end_of_stream {
                    return Err(GatewayError::InvalidBody {
                        reason: "the body is empty; send a JSON object".into(),
                    });
                }
                self.state = State::AwaitingBody {
                    identity,
                    provider_header,
                };
                Ok(Action::Pause)
            }
        }
    }

    fn handle_body(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
    ) -> Result<Action, GatewayError> {
        let State::AwaitingBody {
            identity,
            provider_header,
        } = &self.state
        else {
            return Ok(Action::Continue);
        };
        let limit = self.plan.max_body_bytes;
        if body_size > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        if !end_of_stream {
            return Ok(Action::Pause);
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .map_err(|e| GatewayError::Internal {
                reason: format!("cannot read body: {e:?}"),
            })?
            .unwrap_or_default();
        let mut routed = gateway::route_chat(identity, provider_header.as_deref(), &body)?;
        set_header(":authority", Some(&routed.authority));
        set_header(":path", Some(&routed.path));
        set_header(gateway::CLUSTER_HEADER, Some(&routed.cluster));
        if let Some((name, value)) = &routed.auth {
            set_header(name, Some(value));
        }
        if let Some(new_body) = routed.body.take() {
            hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &new_body).map_err(
                |e| GatewayError::Internal {
                    reason: format!("cannot set body: {e:?}"),
                },
            )?;
            set_header("content-length", Some(&new_body.len().to_string()));
        }
        self.state = State::Routed(Box::new(routed));
        Ok(Action::Continue)
    }
}

impl Context for GatewayHttp {}

impl HttpContext for GatewayHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.handle_headers(end_of_stream) {
            Ok(a) => a,
            Err(e) => self.reject(&e),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.handle_body(body_size, end_of_stream) {
            Ok(a) => a,
            Err(e) => self.reject(&e),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let State::Routed(r) = &self.state {
            for (name, value) in [
                (gateway::PROVIDER_RESPONSE_HEADER, r.provider.as_str()),
                (gateway::MODEL_RESPONSE_HEADER, r.model.as_str()),
            ] {
                if let Err(e) =
                    hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value))
                {
                    log::warn!("llm-gateway: cannot set response header {name}: {e:?}");
                }
            }
        }
        Action::Continue
    }
}
