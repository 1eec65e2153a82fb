//! One request's exchange: authentication (static keys, VM cache, shared data, sidecar callout with
//! rate limit and breaker), selection and shaping (through [`crate::gateway`]), the fallback plan, the
//! response tap or translation, the usage record, metrics and access-log filter state.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{
    adopt_shared_limits, call_sidecar, health, log_at, record_health, resolve_call, share_limits,
    store_answer, utf8_header, Cx, Effect, Event, Flow, Purpose, Shared, MAX_DIGESTS,
    MAX_JSON_COPY,
};
use crate::api::{self, Api};
use crate::auth;
use crate::config::{Identity, Plan, SidecarPlan};
use crate::entry::{self, Endpoint};
use crate::error::GatewayError;
use crate::fallback;
use crate::gateway::{self, Ingress, Routed};
use crate::hostapi::{self, Buffer, Headers, Map, Read, Status};
use crate::metrics;
use crate::resolve::{self, Lookup};
use crate::usage::{self, StreamTap, UsageRecord};
use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;

/// The status the client received (`response.code`, an 8-byte little-endian integer), at log time.
fn client_status(host: &dyn Read) -> Option<u32> {
    let b = host.property(&["response", "code"]).ok().flatten()?;
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    u32::try_from(i64::from_le_bytes(a)).ok().filter(|s| *s > 0)
}

/// A request whose key is being resolved by the sidecar.
struct Pending {
    endpoint: Endpoint,
    headers_ended: bool,
    provider_header: Option<String>,
    hash: String,
    /// The complete body, if it arrived while the callout was in flight.
    body: Option<(Vec<u8>, usize)>,
    tags: Option<String>,
    content_length: Option<usize>,
    /// The request body is JSON (passthrough: its `model` may select the provider).
    json: bool,
    /// The request waited for a sidecar callout (a route decided later must resume it).
    waited: bool,
    /// Set while the key's budgets and rate limits are being learned (its first request on this VM).
    limits_for: Option<Rc<Identity>>,
}

enum State {
    /// Not a gateway request, or already answered locally.
    PassThrough,
    /// Waiting for the sidecar to resolve the key.
    Resolving(Box<Pending>),
    /// Authenticated request waiting for its body.
    AwaitingBody {
        identity: Rc<Identity>,
        provider_header: Option<String>,
        endpoint: Endpoint,
    },
    /// Attempt role: the attempt to shape, waiting for the replayed body.
    AwaitingAttempt(Box<AttemptSlot>),
    /// Sent upstream.
    Routed(Box<Routed>),
}

/// Attempt role: which attempt of which plan this request is.
struct AttemptSlot {
    attempt: fallback::Attempt,
    index: usize,
    /// Served by another provider than the one the request selected.
    fallback: bool,
    last: bool,
    org: String,
    /// The OpenAI-style API of the replayed request.
    api: Api,
}

/// One request's state machine ([`GatewayRoot::create_http_context`](super::GatewayRoot) makes it).
pub struct GatewayHttp {
    plan: Rc<Plan>,
    shared: Rc<Shared>,
    state: State,
    tags: BTreeMap<String, String>,
    /// What is known about the upstream exchange of a routed request, for its usage record.
    exchange: Option<Box<Exchange>>,
    /// The request is on the Anthropic ingress: local errors are Anthropic-shaped.
    anthropic: bool,
    /// Anthropic Messages request (`Some(count_tokens)`), else chat.
    messages: Option<bool>,
    /// Budget and rate-limit headers for the response (`crate::limits`).
    limit_headers: Vec<(&'static str, String)>,
}

/// A routed request's upstream exchange, observed as the response passes.
struct Exchange {
    /// The request's messages, when the key stores prompts.
    prompt: Option<String>,
    /// Main role: the caller. Attempt role: none (the main filter accounts for the request).
    identity: Option<Rc<Identity>>,
    /// Main role, fallback chain: name, type and key suffix of each provider that may serve.
    chain: Vec<(String, &'static str, Option<String>)>,
    /// Main role, fallback chain: the provider that answered and whether it was a fallback.
    served_by: Option<String>,
    fallback: bool,
    /// Attempt role: the attempt this request is.
    attempt: Option<Box<AttemptSlot>>,
    start_ms: u64,
    first_byte_ms: Option<u64>,
    status: u32,
    tap: Option<StreamTap>,
    json: Vec<u8>,
    /// The non-streamed body passed `MAX_JSON_COPY`: it was not copied for usage.
    json_overflow: bool,
    /// Passthrough response that is not JSON (audio, files): nothing to read, nothing copied.
    skip_copy: bool,
    /// Native provider stream being translated to OpenAI chunks.
    translator: Option<Box<dyn crate::translate::StreamTranslator>>,
    /// Native non-streamed (or error) response: held whole, then translated.
    translate_whole: bool,
    translated_usage: Option<usage::Usage>,
}

impl GatewayHttp {
    pub(super) fn new(plan: Rc<Plan>, shared: Rc<Shared>) -> Self {
        GatewayHttp {
            plan,
            shared,
            state: State::PassThrough,
            tags: BTreeMap::new(),
            exchange: None,
            anthropic: false,
            messages: None,
            limit_headers: Vec::new(),
        }
    }
}

impl Exchange {
    fn new(now: u64, identity: Option<Rc<Identity>>, attempt: Option<Box<AttemptSlot>>) -> Self {
        Exchange {
            prompt: None,
            identity,
            chain: Vec::new(),
            served_by: None,
            fallback: false,
            attempt,
            start_ms: now,
            first_byte_ms: None,
            status: 0,
            tap: None,
            json: Vec::new(),
            json_overflow: false,
            skip_copy: false,
            translator: None,
            translate_whole: false,
            translated_usage: None,
        }
    }
}

/// What to do with the request after authentication.
enum Next {
    Ready(Rc<Identity>, Box<Pending>),
    /// A callout was asked for; the request waits for its answer (`Event::CallResponse`).
    Waiting(Box<Pending>),
}

impl GatewayHttp {
    fn reject(&mut self, cx: &mut Cx, err: &GatewayError) -> Flow {
        self.state = State::PassThrough;
        let body = if self.anthropic {
            crate::translate::anthropic_ingress::gateway_error(err)
        } else {
            err.body().into_bytes()
        };
        cx.push(Effect::Reply {
            status: err.status(),
            headers: err.headers(),
            body,
        });
        Flow::Pause
    }

    fn reply_json(&mut self, cx: &mut Cx, body: String) -> Flow {
        self.state = State::PassThrough;
        cx.push(Effect::Reply {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body: body.into_bytes(),
        });
        Flow::Pause
    }

    fn handle_headers(
        &mut self,
        cx: &mut Cx,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<Flow, GatewayError> {
        // All request headers came in the event (one host read); removals only for headers present.
        // Read as bytes: a header byte >= 0x80 is decoded lossily (or refused), never a panic.
        let get = |name: &str| headers.text(name);
        if let Some(slot) = self.plan.attempt_slot {
            let plan = get(fallback::ATTEMPTS_HEADER).map(|v| fallback::decode(&v));
            cx.remove_header(Map::RequestHeaders, fallback::ATTEMPTS_HEADER);
            cx.remove_header(Map::RequestHeaders, gateway::CLUSTER_HEADER);
            let plan = plan.ok_or(GatewayError::Internal {
                reason: "no attempt plan".into(),
            })??;
            let last = slot + 1 >= plan.attempts.len();
            let attempt = plan
                .attempts
                .get(slot)
                .cloned()
                .ok_or(GatewayError::Internal {
                    reason: format!("no attempt {slot} in the plan"),
                })?;
            if end_of_stream {
                return Err(GatewayError::InvalidBody {
                    reason: "the body is empty".into(),
                });
            }
            let fallback = plan.is_fallback(slot);
            let org = plan.org;
            // The replayed request keeps the client's path: it names the API.
            let api = entry::classify(
                get(":method").as_deref().unwrap_or_default(),
                get(":path").as_deref().unwrap_or_default(),
            )
            .and_then(Result::ok)
            .and_then(|e| e.api())
            .unwrap_or(Api::Chat);
            self.state = State::AwaitingAttempt(Box::new(AttemptSlot {
                attempt,
                index: slot,
                fallback,
                last,
                org,
                api,
            }));
            return Ok(Flow::Pause);
        }
        // Callers must never choose the upstream cluster themselves (nor smuggle an attempt plan).
        if get(gateway::CLUSTER_HEADER).is_some() {
            cx.remove_header(Map::RequestHeaders, gateway::CLUSTER_HEADER);
        }
        if get(fallback::ATTEMPTS_HEADER).is_some() {
            cx.remove_header(Map::RequestHeaders, fallback::ATTEMPTS_HEADER);
        }
        let path = get(":path");
        self.anthropic = entry::is_anthropic(path.as_deref().unwrap_or_default());
        let endpoint = match entry::classify_with(
            get(":method").as_deref().unwrap_or_default(),
            path.as_deref().unwrap_or_default(),
            self.plan.openai_passthrough,
        ) {
            None => return Ok(Flow::Continue),
            Some(r) => r?,
        };
        let key = auth::extract_key(get("x-api-key").as_deref(), get("authorization").as_deref());
        let provider_header = utf8_header(&headers, "x-provider-name")?;
        let tags = utf8_header(&headers, usage::TAGS_HEADER)?;
        let content_length = get("content-length").and_then(|v| v.trim().parse::<usize>().ok());
        for h in gateway::STRIPPED_REQUEST_HEADERS {
            if get(h).is_some() {
                cx.remove_header(Map::RequestHeaders, h);
            }
        }
        let hash = self.key_digest(key.as_deref())?;
        let pending = Pending {
            endpoint,
            headers_ended: end_of_stream,
            provider_header,
            hash,
            body: None,
            tags,
            content_length,
            json: get("content-type").is_some_and(|c| c.contains("json")),
            waited: false,
            limits_for: None,
        };
        match self.authenticate(cx, pending)? {
            Next::Ready(identity, p) => self.proceed(cx, identity, *p),
            Next::Waiting(mut p) => {
                p.waited = true;
                self.state = State::Resolving(p);
                Ok(Flow::Pause)
            }
        }
    }

    /// The key's SHA-256, computed once per VM for the keys it sees (a bounded map, cleared when full).
    fn key_digest(&self, key: Option<&str>) -> Result<String, GatewayError> {
        let Some(k) = key else {
            return auth::key_hash(&self.plan, None);
        };
        if let Some(h) = self.shared.digests.borrow().get(k) {
            return Ok(h.clone());
        }
        let h = auth::key_hash(&self.plan, Some(k))?;
        let mut d = self.shared.digests.borrow_mut();
        if d.len() >= MAX_DIGESTS {
            d.clear();
        }
        d.insert(k.to_string(), h.clone());
        Ok(h)
    }

    /// Static keys first, then the VM cache, the shared cache, and finally a sidecar callout.
    fn authenticate(&mut self, cx: &mut Cx, p: Pending) -> Result<Next, GatewayError> {
        if let Some(identity) = self.plan.identity_for_hash(&p.hash) {
            return Ok(Next::Ready(identity, Box::new(p)));
        }
        let Some(sidecar) = self.plan.sidecar.clone() else {
            return Err(GatewayError::InvalidApiKey);
        };
        let now = cx.now_ms();
        let cached = self.shared.cache.borrow().lookup(&p.hash, now);
        // Shared data only when the VM cache cannot answer alone (no host call on the hot path).
        let shared = match cached {
            Lookup::Fresh(_) | Lookup::Unknown => None,
            _ => cx
                .host
                .shared_get(&resolve::shared_key(&p.hash))
                .ok()
                .flatten(),
        };
        match resolve::decide(cached, shared.as_deref(), now, &sidecar.destinations) {
            resolve::Cached::Serve {
                identity,
                store,
                refresh,
            } => {
                if let Some((fresh_until, stale_until)) = store {
                    self.shared.cache.borrow_mut().store_known(
                        &p.hash,
                        identity.clone(),
                        now,
                        fresh_until,
                        stale_until,
                    );
                }
                if refresh {
                    self.shared.refresher.borrow_mut().request(&p.hash, now);
                }
                return Ok(Next::Ready(identity, Box::new(p)));
            }
            resolve::Cached::Unknown => return Err(GatewayError::InvalidApiKey),
            resolve::Cached::LookUp => {}
        }
        // A key in no cache: a sidecar lookup, within the per-VM rate and while the sidecar works.
        if !self.shared.lookups.borrow_mut().try_take(now) {
            return Err(GatewayError::KeyLookupRateLimited);
        }
        if !self.shared.breaker.borrow_mut().allow(now) {
            return Err(GatewayError::ControlPlaneUnavailable);
        }
        cx.push(resolve_call(&sidecar, &p.hash, Purpose::Resolve));
        Ok(Next::Waiting(Box::new(p)))
    }

    /// Continues an authenticated request (from the headers callback or after a callout).
    fn proceed(
        &mut self,
        cx: &mut Cx,
        identity: Rc<Identity>,
        p: Pending,
    ) -> Result<Flow, GatewayError> {
        if let Some((provider, reason)) = &identity.refused {
            return Err(GatewayError::DestinationForbidden {
                provider: provider.clone(),
                reason: reason.clone(),
            });
        }
        match p.endpoint {
            Endpoint::ListModels => Ok(self.reply_json(cx, gateway::list_models(&identity))),
            Endpoint::GetModel(name) => {
                let body = gateway::get_model(&identity, &name)?;
                Ok(self.reply_json(cx, body))
            }
            Endpoint::Passthrough(ref rest) => {
                let rest = rest.clone();
                self.passthrough(cx, identity, p, rest)
            }
            Endpoint::ChatCompletions
            | Endpoint::Responses
            | Endpoint::Embeddings
            | Endpoint::Completions
            | Endpoint::AnthropicMessages
            | Endpoint::AnthropicCountTokens => {
                self.messages = match p.endpoint {
                    Endpoint::AnthropicMessages => Some(false),
                    Endpoint::AnthropicCountTokens => Some(true),
                    _ => None,
                };
                self.tags = usage::parse_tags(p.tags.as_deref())?;
                if let Some(sidecar) = self.plan.sidecar.clone() {
                    if p.limits_for.is_none()
                        && self.shared.limits.borrow().needs_fetch(&identity.key_id)
                        && !adopt_shared_limits(cx, &self.shared, &identity)
                    {
                        return self.learn_limits(cx, &sidecar, identity, p);
                    }
                    self.admit(cx, &identity)?;
                }
                let limit = self.plan.max_body_bytes;
                if p.content_length.is_some_and(|n| n > limit) {
                    return Err(GatewayError::BodyTooLarge { limit });
                }
                if p.headers_ended {
                    return Err(GatewayError::InvalidBody {
                        reason: "the body is empty; send a JSON object".into(),
                    });
                }
                match p.body {
                    // The body completed while we waited for the sidecar: route now and resume.
                    Some((body, size)) => {
                        self.route(
                            cx,
                            identity,
                            p.provider_header.as_deref(),
                            &p.endpoint,
                            &body,
                            size,
                        )?;
                        cx.push(Effect::ResumeRequest);
                        Ok(Flow::Continue)
                    }
                    None => {
                        self.state = State::AwaitingBody {
                            identity,
                            provider_header: p.provider_header,
                            endpoint: p.endpoint,
                        };
                        Ok(Flow::Pause)
                    }
                }
            }
        }
    }

    fn handle_body(
        &mut self,
        cx: &mut Cx,
        body_size: usize,
        end_of_stream: bool,
    ) -> Result<Flow, GatewayError> {
        let limit = self.plan.max_body_bytes;
        match &mut self.state {
            State::AwaitingBody { .. } | State::Resolving(_) if body_size > limit => {
                Err(GatewayError::BodyTooLarge { limit })
            }
            State::AwaitingAttempt(_) if !end_of_stream => Ok(Flow::Pause),
            State::AwaitingAttempt(_) => {
                let State::AwaitingAttempt(slot) =
                    core::mem::replace(&mut self.state, State::PassThrough)
                else {
                    return Ok(Flow::Continue);
                };
                let body = read_body(cx.host, body_size)?;
                let routed = gateway::route_attempt(
                    &slot.attempt.provider,
                    &slot.attempt.model,
                    &body,
                    slot.api,
                )?;
                self.exchange = Some(Box::new(Exchange::new(cx.now_ms(), None, Some(slot))));
                self.send_upstream(cx, routed, body_size)?;
                Ok(Flow::Continue)
            }
            State::Resolving(p) => {
                if end_of_stream {
                    p.body = Some((read_body(cx.host, body_size)?, body_size));
                }
                Ok(Flow::Pause)
            }
            State::AwaitingBody {
                identity,
                provider_header,
                endpoint,
            } => {
                if !end_of_stream {
                    return Ok(Flow::Pause);
                }
                let (identity, provider_header, endpoint) =
                    (identity.clone(), provider_header.clone(), endpoint.clone());
                let body = read_body(cx.host, body_size)?;
                self.route(
                    cx,
                    identity,
                    provider_header.as_deref(),
                    &endpoint,
                    &body,
                    body_size,
                )?;
                Ok(Flow::Continue)
            }
            _ => Ok(Flow::Continue),
        }
    }

    /// The passthrough of another `/openai/v1/*` path. The provider comes from `X-Provider-Name` or
    /// the settings and the request goes on at once, its body streamed untouched (multipart
    /// included); only when neither names a provider and the body is JSON is the body awaited, for its
    /// `model`.
    fn passthrough(
        &mut self,
        cx: &mut Cx,
        identity: Rc<Identity>,
        p: Pending,
        rest: String,
    ) -> Result<Flow, GatewayError> {
        self.tags = usage::parse_tags(p.tags.as_deref())?;
        let named = p.provider_header.is_some()
            || identity.key_settings.provider.is_some()
            || identity.org_settings.provider.is_some();
        if !named && p.json && !p.headers_ended && p.body.is_none() {
            let limit = self.plan.max_body_bytes;
            if p.content_length.is_some_and(|n| n > limit) {
                return Err(GatewayError::BodyTooLarge { limit });
            }
            self.state = State::AwaitingBody {
                identity,
                provider_header: p.provider_header,
                endpoint: Endpoint::Passthrough(rest),
            };
            return Ok(Flow::Pause);
        }
        match p.body {
            Some((body, size)) => self.route(
                cx,
                identity,
                p.provider_header.as_deref(),
                &Endpoint::Passthrough(rest),
                &body,
                size,
            )?,
            None => {
                let routed = gateway::route_passthrough(
                    &identity,
                    p.provider_header.as_deref(),
                    &rest,
                    None,
                )?;
                self.exchange = Some(Box::new(Exchange::new(cx.now_ms(), Some(identity), None)));
                self.send_upstream(cx, routed, 0)?;
            }
        }
        if p.waited {
            cx.push(Effect::ResumeRequest);
        }
        Ok(Flow::Continue)
    }

    /// Applies the routing decision to the paused request.
    fn route(
        &mut self,
        cx: &mut Cx,
        identity: Rc<Identity>,
        provider_header: Option<&str>,
        endpoint: &Endpoint,
        body: &[u8],
        body_size: usize,
    ) -> Result<(), GatewayError> {
        let (routed, chat_body) = match (endpoint, self.messages) {
            (Endpoint::Passthrough(rest), _) => (
                gateway::route_passthrough(&identity, provider_header, rest, Some(body))?,
                None,
            ),
            (_, Some(count_tokens)) => {
                let version = cx
                    .host
                    .header(Map::RequestHeaders, "anthropic-version")
                    .ok()
                    .flatten()
                    .map(|v| hostapi::text(&v).into_owned());
                gateway::route_messages(
                    &identity,
                    provider_header,
                    body,
                    count_tokens,
                    version.as_deref(),
                )?
            }
            (e, None) => (
                gateway::route_request(
                    &identity,
                    provider_header,
                    body,
                    e.api().unwrap_or(Api::Chat),
                )?,
                None,
            ),
        };
        let prompt = if identity.store_prompts {
            match chat_body.as_deref() {
                Some(chat) => api::prompt_text(Some(Api::Chat), chat),
                None => api::prompt_text(routed.api, body),
            }
        } else {
            None
        };
        let mut chain = match (routed.ingress, routed.api) {
            (Ingress::MessagesNative { .. }, _) | (_, None) => Vec::new(),
            _ => fallback_chain(cx.host, &identity, &routed),
        };
        // Fallbacks without the API are skipped (a chain of one is no chain).
        if let Some(api) = routed.api {
            chain.retain(|a| api::supports(&a.provider, api));
        }
        if chain.len() < 2 {
            chain.clear();
        }
        if routed.ingress == Ingress::MessagesViaChat {
            // Anthropic client headers mean nothing to other providers.
            cx.remove_header(Map::RequestHeaders, "anthropic-beta");
            cx.remove_header(Map::RequestHeaders, "anthropic-version");
        }
        let mut exchange = Exchange::new(cx.now_ms(), Some(identity), None);
        exchange.prompt = prompt;
        exchange.chain = chain
            .iter()
            .map(|a| {
                (
                    a.provider.name.clone(),
                    a.provider.kind.as_str(),
                    a.provider.key_last4(),
                )
            })
            .collect();
        self.exchange = Some(Box::new(exchange));
        if chain.len() > 1 {
            // Envoy tries the attempts in order through the chain cluster; each attempt listener shapes
            // the replayed request for its provider (a Messages request replays as its chat form).
            if let Some(chat) = chat_body {
                cx.replace_request_body(body_size, chat);
            }
            let org = self
                .exchange
                .as_ref()
                .and_then(|e| e.identity.as_ref())
                .map(|i| i.org_id.clone());
            let plan = fallback::AttemptPlan {
                attempts: chain,
                org: org.unwrap_or_default(),
                primary: routed.provider.clone(),
            };
            cx.request_header(fallback::ATTEMPTS_HEADER, Some(fallback::encode(&plan)));
            let cluster = format!("{}_{}", fallback::CHAIN_CLUSTER, plan.attempts.len());
            cx.request_header(gateway::CLUSTER_HEADER, Some(cluster));
            // The attempt filters shape, translate and mark the usage chunk; this one accounts.
            let mut routed = routed;
            routed.translation = None;
            routed.strip_usage_chunk = false;
            self.state = State::Routed(Box::new(routed));
            return Ok(());
        }
        self.send_upstream(cx, routed, body_size)
    }

    /// Sends the request to the provider `routed` describes: host, path, auth, headers, body.
    fn send_upstream(
        &mut self,
        cx: &mut Cx,
        mut routed: Routed,
        body_size: usize,
    ) -> Result<(), GatewayError> {
        // Moved, not copied: the routed request keeps only what the response and the record need.
        let r = &mut routed;
        cx.request_header(":authority", Some(core::mem::take(&mut r.authority)));
        cx.request_header(":path", Some(core::mem::take(&mut r.path)));
        cx.request_header(
            gateway::CLUSTER_HEADER,
            Some(core::mem::take(&mut r.cluster)),
        );
        if let Some((name, value)) = r.auth.take() {
            cx.request_header(name, Some(value));
        }
        for (name, value) in core::mem::take(&mut r.extra_headers) {
            cx.request_header(name, Some(value));
        }
        if routed.translation.is_some() {
            cx.set_header(
                Map::RequestHeaders,
                "content-type",
                b"application/json".as_slice(),
            );
            // Native APIs answer in their own encoding choices; ask for plain bodies to translate.
            cx.remove_header(Map::RequestHeaders, "accept-encoding");
        }
        if let Some(new_body) = routed.body.take() {
            cx.replace_request_body(body_size, new_body);
        }
        self.state = State::Routed(Box::new(routed));
        Ok(())
    }

    /// The key's first request on this VM: ask the sidecar for its limits (one callout per key and VM;
    /// later renewals go out on the tick), then continue in `on_resolved`.
    fn learn_limits(
        &mut self,
        cx: &mut Cx,
        sidecar: &SidecarPlan,
        identity: Rc<Identity>,
        mut p: Pending,
    ) -> Result<Flow, GatewayError> {
        let now = cx.now_ms();
        if !self.shared.breaker.borrow_mut().allow(now) {
            // The sidecar is failing: no callout (and no wait); the failure policy decides.
            self.shared
                .limits
                .borrow_mut()
                .on_first_answer(&identity.key_id, None, b"", now);
            p.limits_for = Some(identity.clone());
            return self.proceed(cx, identity, p);
        }
        let holder = self.shared.id_prefix.borrow().clone();
        let body = self.shared.limits.borrow_mut().first_sight(
            &identity.key_id,
            &identity.org_id,
            &identity.config_id,
            &holder,
            now,
        );
        cx.push(call_sidecar(
            sidecar,
            Purpose::FirstLimits,
            crate::limits::ALLOWANCE_PATH,
            body,
            sidecar.timeout_ms,
        ));
        p.limits_for = Some(identity);
        self.state = State::Resolving(Box::new(p));
        Ok(Flow::Pause)
    }

    /// The request's callout was dispatched (the answer will come), or the host refused it.
    fn on_dispatched(
        &mut self,
        cx: &mut Cx,
        purpose: Purpose,
        result: Result<u32, Status>,
    ) -> Flow {
        let waiting = matches!(self.state, State::Resolving(_));
        let e = match result {
            Ok(_) if waiting => return Flow::Pause,
            Ok(_) => return Flow::Continue,
            Err(e) => e,
        };
        let State::Resolving(p) = core::mem::replace(&mut self.state, State::PassThrough) else {
            return Flow::Continue;
        };
        let now = cx.now_ms();
        self.shared.breaker.borrow_mut().failure(now);
        match (purpose, p.limits_for.clone()) {
            (Purpose::FirstLimits, Some(identity)) => {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot ask for budget allowances: {e:?}"),
                );
                self.shared
                    .limits
                    .borrow_mut()
                    .on_first_answer(&identity.key_id, None, b"", now);
                match self.proceed(cx, identity, *p) {
                    Ok(flow) => flow,
                    Err(e) => self.reject(cx, &e),
                }
            }
            _ => {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot call the sidecar: {e:?}"),
                );
                self.reject(cx, &GatewayError::ControlPlaneUnavailable)
            }
        }
    }

    /// Budgets and rate limits of the key (this VM's allowance; no callout).
    fn admit(&mut self, cx: &mut Cx, identity: &Identity) -> Result<(), GatewayError> {
        let admitted = self.shared.limits.borrow_mut().admit(
            &identity.key_id,
            &identity.org_id,
            &identity.config_id,
            cx.now_ms(),
        );
        let mut m = self.shared.metrics.borrow_mut();
        match admitted {
            Ok(a) => {
                if a.soft_over {
                    m.add(cx.out, metrics::BUDGET_SOFT_EXCEEDED, 1);
                }
                self.limit_headers = a.headers;
                Ok(())
            }
            Err(e) => {
                m.add(
                    cx.out,
                    match e {
                        GatewayError::BudgetExceeded { .. } => metrics::BUDGET_REFUSED,
                        _ => metrics::RATE_LIMITED,
                    },
                    1,
                );
                Err(e)
            }
        }
    }

    fn on_resolved(
        &mut self,
        cx: &mut Cx,
        status: Option<u32>,
        body: &[u8],
    ) -> Result<Flow, GatewayError> {
        let State::Resolving(p) = core::mem::replace(&mut self.state, State::PassThrough) else {
            return Ok(Flow::Continue);
        };
        if let Some(identity) = p.limits_for.clone() {
            // Counts for the breaker like a resolve: a failing sidecar stops costing first requests.
            match status {
                Some(s) if s < 500 => self.shared.breaker.borrow_mut().success(),
                _ => self.shared.breaker.borrow_mut().failure(cx.now_ms()),
            }
            self.shared.limits.borrow_mut().on_first_answer(
                &identity.key_id,
                status,
                body,
                cx.now_ms(),
            );
            share_limits(cx, &self.shared);
            return self.proceed(cx, identity, *p);
        }
        let Some(sidecar) = self.plan.sidecar.clone() else {
            return Err(GatewayError::InvalidApiKey);
        };
        let identity = store_answer(cx, &self.shared, &sidecar, &p.hash, status, body)?;
        self.proceed(cx, identity, *p)
    }
}

/// The attempts for a routed request: its provider and, if it names fallbacks, their chain (healthy
/// providers first). A single attempt means no fallback.
fn fallback_chain(host: &dyn Read, identity: &Identity, routed: &Routed) -> Vec<fallback::Attempt> {
    let Some(provider) = identity.provider(&routed.provider) else {
        return Vec::new();
    };
    let Some(model) = provider.model(&routed.model) else {
        return Vec::new();
    };
    if provider.fallback.is_empty() {
        return Vec::new();
    }
    let now = host.now_ms();
    fallback::chain(identity, provider, model, |name| {
        health(host, &identity.org_id, name).ejected(now)
    })
}

/// Filter state for Envoy's access log (`%FILTER_STATE(wasm.llm_gateway.provider:PLAIN)%`, ...).
fn set_filter_state(cx: &mut Cx, summary: &crate::access_log::Summary) {
    cx.push(Effect::SetProperties(crate::access_log::filter_state(
        summary,
    )));
}

fn read_body(host: &dyn Read, size: usize) -> Result<Vec<u8>, GatewayError> {
    host.buffer(Buffer::RequestBody, 0, size)
        .map_err(|e| GatewayError::Internal {
            reason: format!("cannot read body: {e:?}"),
        })
}

impl GatewayHttp {
    /// Handles one event of this request, pushing the effects into `out`; the answer is what Envoy
    /// should do with the request or response (meaningless for `CallResponse` and `Log`).
    pub fn handle(&mut self, host: &dyn Read, event: Event, out: &mut Vec<Effect>) -> Flow {
        let mut cx = Cx { host, out };
        let cx = &mut cx;
        match event {
            Event::RequestHeaders {
                headers,
                end_of_stream,
            } => match self.handle_headers(cx, headers, end_of_stream) {
                Ok(a) => a,
                Err(e) => self.reject(cx, &e),
            },
            Event::RequestBody {
                size,
                end_of_stream,
            } => match self.handle_body(cx, size, end_of_stream) {
                Ok(a) => a,
                Err(e) => self.reject(cx, &e),
            },
            Event::ResponseHeaders { .. } => self.on_response_headers(cx),
            Event::ResponseBody {
                size,
                end_of_stream,
            } => self.on_response_body(cx, size, end_of_stream),
            Event::CallResponse { status, body, .. } => match self.on_resolved(cx, status, &body) {
                Ok(a) => a,
                Err(e) => self.reject(cx, &e),
            },
            Event::Dispatched { purpose, result } => self.on_dispatched(cx, purpose, result),
            Event::BodyNotSet { status } => self.reject(
                cx,
                &GatewayError::Internal {
                    reason: format!("cannot set body: {status:?}"),
                },
            ),
            Event::Log => {
                self.on_log(cx);
                Flow::Continue
            }
        }
    }

    fn on_response_body(&mut self, cx: &mut Cx, body_size: usize, end_of_stream: bool) -> Flow {
        let (State::Routed(r), Some(ex)) = (&self.state, self.exchange.as_mut()) else {
            return Flow::Continue;
        };
        // Time to first token is a streams' metric: no clock read for other responses.
        if r.stream && ex.first_byte_ms.is_none() && body_size > 0 {
            ex.first_byte_ms = Some(cx.now_ms());
        }
        if ex.translate_whole {
            if !end_of_stream {
                return Flow::Pause;
            }
            let body = cx
                .host
                .buffer(Buffer::ResponseBody, 0, body_size)
                .unwrap_or_default();
            let (out, u, status) = match r.translation {
                Some(t) => gateway::translate_response(t, ex.status, &body, &r.model),
                None => (body, None, ex.status),
            };
            let (out, u, status) = match r.ingress {
                Ingress::MessagesViaChat => gateway::messages_response(status, &out, &r.model),
                _ => (out, u, status),
            };
            ex.translated_usage = u;
            if status != ex.status {
                ex.status = status;
                cx.set_header(
                    Map::ResponseHeaders,
                    ":status",
                    status.to_string().into_bytes(),
                );
            }
            cx.replace_response_chunk(body_size, out);
            return Flow::Continue;
        }
        let chunk = match cx.host.buffer(Buffer::ResponseBody, 0, body_size) {
            Ok(b) => b,
            Err(_) => return Flow::Continue,
        };
        if let Some(tr) = ex.translator.as_mut() {
            if tr.passthrough() {
                tr.push(&chunk);
                if end_of_stream {
                    tr.finish();
                }
                return Flow::Continue;
            }
            let mut out = tr.push(&chunk);
            if end_of_stream {
                out.extend(tr.finish());
            }
            cx.replace_response_chunk(body_size, out);
            return Flow::Continue;
        }
        match ex.tap.as_mut() {
            Some(tap) => {
                let mut replaced = tap.push(&chunk);
                if end_of_stream {
                    if let Some(rest) = tap.finish() {
                        let mut all = replaced.unwrap_or_else(|| chunk.clone());
                        all.extend_from_slice(&rest);
                        replaced = Some(all);
                    }
                }
                if let Some(out) = replaced {
                    cx.replace_response_chunk(body_size, out);
                }
            }
            None if ex.skip_copy => {}
            None if !ex.json_overflow && ex.json.len() + chunk.len() <= MAX_JSON_COPY => {
                ex.json.extend_from_slice(&chunk)
            }
            None => {
                // Past the bound: stop copying and free the copy; the usage is estimated.
                ex.json_overflow = true;
                ex.json = Vec::new();
            }
        }
        Flow::Continue
    }

    fn on_log(&mut self, cx: &mut Cx) {
        let (State::Routed(r), Some(ex)) = (&self.state, self.exchange.take()) else {
            return;
        };
        if let Some(slot) = &ex.attempt {
            // Attempt role: only the provider's health; the main filter accounts for the request.
            let ok = ex.status != 0
                && !fallback::fails_over(ex.status, slot.attempt.provider.fallback_on429);
            record_health(cx, &slot.org, &slot.attempt.provider.name, ok);
            return;
        }
        let Some(id) = ex.identity.clone() else {
            return;
        };
        if r.ingress == (Ingress::MessagesNative { count_tokens: true }) {
            // Token counting is free and generates nothing: not a usage event.
            return;
        }
        // Which provider served: the chain's answer, else the one selected.
        let provider = ex.served_by.clone().unwrap_or_else(|| r.provider.clone());
        let (provider_type, key_last4) = match ex.chain.iter().find(|(n, _, _)| *n == provider) {
            Some((_, kind, last4)) => (kind.to_string(), last4.clone()),
            None => (
                r.kind.as_str().to_string(),
                id.provider(&provider).and_then(|p| p.key_last4()),
            ),
        };
        let end = cx.now_ms();
        let translated = ex
            .translator
            .as_ref()
            .map(|t| (t.usage().map(gateway::from_translated), !t.failed()));
        let overflowed = ex.json_overflow
            || ex.tap.as_ref().is_some_and(StreamTap::truncated)
            || ex.translator.as_ref().is_some_and(|t| t.truncated());
        let (facts, done) = match &ex.tap {
            Some(t) => (
                usage::ResponseFacts {
                    usage: t.usage,
                    model: t.model.clone(),
                    completion_chars: t.completion_chars,
                },
                t.done,
            ),
            None => match (translated, ex.translate_whole) {
                (Some((u, ok)), _) => (
                    usage::ResponseFacts {
                        usage: u,
                        model: None,
                        completion_chars: 0,
                    },
                    ok,
                ),
                (None, true) => (
                    usage::ResponseFacts {
                        usage: ex.translated_usage,
                        model: None,
                        completion_chars: 0,
                    },
                    true,
                ),
                (None, false) if r.ingress != Ingress::Chat => (
                    usage::ResponseFacts {
                        usage: crate::translate::anthropic_ingress::message_usage(&ex.json)
                            .map(gateway::from_translated),
                        model: None,
                        completion_chars: 0,
                    },
                    true,
                ),
                (None, false) => (api::response_facts(r.api, &ex.json), true),
            },
        };
        // What the client received: Envoy's `response.code` (an Envoy-generated 5xx after the
        // provider's headers, a translated status), else the provider's status; no answer is a 502.
        let status = client_status(cx.host)
            .or((ex.status != 0).then_some(ex.status))
            .unwrap_or(502);
        let ok = (200..300).contains(&status);
        let (u, estimated) = match facts.usage {
            Some(u) => (u, false),
            // The passthrough records only what the provider reports.
            None if ok && r.api.is_some() => (
                usage::Usage {
                    prompt_tokens: usage::estimate_tokens(r.request_bytes),
                    completion_tokens: usage::estimate_tokens(facts.completion_chars),
                    cached_tokens: 0,
                },
                true,
            ),
            None => (usage::Usage::default(), false),
        };
        let latency = end.saturating_sub(ex.start_ms);
        let ttft = if r.stream {
            ex.first_byte_ms.map(|t| t.saturating_sub(ex.start_ms))
        } else {
            None
        };
        let model_used = facts
            .model
            .clone()
            .unwrap_or_else(|| r.upstream_model.clone());
        let cost = self
            .plan
            .price(&id, &provider, &r.upstream_model, &r.model)
            .map(|p| p.cost_nano_usd(u.prompt_tokens, u.completion_tokens, u.cached_tokens));
        if self.plan.filter_state {
            set_filter_state(
                cx,
                &crate::access_log::Summary {
                    provider: &provider,
                    model: &model_used,
                    model_requested: &r.model,
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    cost_nano_usd: cost,
                    fallback: ex.fallback,
                    key_id: &id.key_id,
                    config_id: &id.config_id,
                },
            );
        }
        {
            let mut all = self.shared.metrics.borrow_mut();
            let (m, numbers) = all.model(cx.out, &provider, &r.model);
            let requests = m.request(numbers, cx.out, &provider, &r.model, status);
            let out = &mut *cx.out;
            out.push(Effect::Increment {
                local: requests,
                by: 1,
            });
            if ex.fallback {
                out.push(Effect::Increment {
                    local: m.fallbacks,
                    by: 1,
                });
            }
            out.push(Effect::Increment {
                local: m.tokens_in,
                by: u.prompt_tokens,
            });
            out.push(Effect::Increment {
                local: m.tokens_out,
                by: u.completion_tokens,
            });
            out.push(Effect::Record {
                local: m.duration,
                value: latency,
            });
            if let Some(cost) = cost {
                out.push(Effect::Increment {
                    local: m.cost,
                    by: cost,
                });
            }
            if let Some(t) = ttft {
                out.push(Effect::Record {
                    local: m.ttft,
                    value: t,
                });
            }
        }
        if self.plan.sidecar.is_none() {
            return;
        }
        self.shared.limits.borrow_mut().record(
            &id.key_id,
            cost.unwrap_or(0),
            u.prompt_tokens.saturating_add(u.completion_tokens),
            end,
        );
        let record_id = {
            let mut n = self.shared.next_id.borrow_mut();
            *n += 1;
            format!("{}-{}", self.shared.id_prefix.borrow(), *n)
        };
        let mut record = UsageRecord {
            id: record_id,
            time: ex.start_ms,
            org_id: id.org_id.clone(),
            cluster_id: id.usage_cluster(&provider),
            api_key_id: id.key_id.clone(),
            config_id: id.config_id.clone(),
            provider,
            provider_type,
            provider_key_last4: key_last4,
            model_requested: r.model.clone(),
            model_used,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
            estimated,
            status,
            latency_ms: latency,
            ttft_ms: ttft,
            stream: r.stream,
            fallback: ex.fallback,
            // The stream ended early, or part of the response passed a buffer bound unread.
            truncated: (r.stream && ok && !done) || overflowed,
            tags: core::mem::take(&mut self.tags),
            prompt: None,
            completion: None,
        };
        if id.store_prompts {
            record.prompt = ex.prompt.clone();
            record.completion = match &ex.tap {
                Some(t) => Some(t.text.clone()),
                None => api::completion_text(r.api, &ex.json),
            }
            .map(|t| usage::clip(&t, usage::MAX_STORED_TEXT));
        }
        let newly_dropped = self.shared.reporter.borrow_mut().push(&record);
        if newly_dropped > 0 {
            self.shared
                .metrics
                .borrow_mut()
                .add(cx.out, metrics::USAGE_DROPPED, newly_dropped);
        }
        self.shared.sync_buffered(cx.out);
    }

    fn on_response_headers(&mut self, cx: &mut Cx) -> Flow {
        let (State::Routed(r), Some(ex)) = (&self.state, self.exchange.as_mut()) else {
            return Flow::Continue;
        };
        // Provider headers are bytes: anything non-UTF-8 is decoded lossily, never a panic.
        let headers = cx.host.headers(Map::ResponseHeaders).unwrap_or_default();
        // Borrowed unless a value is not UTF-8 (only what is kept is copied).
        let get = |name: &str| headers.text(name);
        // Static values are borrowed, the limit headers moved: only the route's names are copied.
        let mut set = |name: &'static str, value: Option<Cow<'static, [u8]>>| match value {
            Some(v) => cx.set_header(Map::ResponseHeaders, name, v),
            None => cx.remove_header(Map::ResponseHeaders, name),
        };
        ex.status = get(":status")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let sse = get("content-type").is_some_and(|c| c.contains("text/event-stream"));
        let ok = (200..300).contains(&ex.status);
        let chained = !ex.chain.is_empty() && ex.attempt.is_none();
        // Main role after a fallback chain: the attempt filter says who answered and how.
        let mut strip = r.strip_usage_chunk;
        if chained {
            ex.served_by = get(gateway::PROVIDER_RESPONSE_HEADER).map(|v| v.into_owned());
            ex.fallback = get(fallback::FALLBACK_RESPONSE_HEADER).is_some();
            strip = get(fallback::USAGE_INJECTED_HEADER).is_some();
            set(fallback::USAGE_INJECTED_HEADER, None);
        }
        match (r.translation, &ex.attempt) {
            _ if matches!(r.ingress, Ingress::MessagesNative { .. }) => {
                if ok && sse {
                    ex.translator = Some(Box::new(
                        crate::translate::anthropic_ingress::MessagesTap::new(),
                    ));
                }
            }
            _ if r.ingress == Ingress::MessagesViaChat => {
                set("content-length", None);
                if ok && r.stream && (sse || r.translation.is_some()) {
                    ex.translator = Some(gateway::messages_stream(r.translation, &r.model));
                    set("content-type", lit("text/event-stream"));
                } else {
                    ex.translate_whole = true;
                    set("content-type", lit("application/json"));
                }
            }
            (Some(t), _) => {
                set("content-length", None);
                if ok && r.stream {
                    ex.translator = Some(gateway::stream_translator(
                        t,
                        &r.model,
                        r.client_wants_usage,
                    ));
                    set("content-type", lit("text/event-stream"));
                } else {
                    ex.translate_whole = true;
                    set("content-type", lit("application/json"));
                }
            }
            // Attempt role: the main filter reads usage and strips the chunk it did not ask for.
            (None, Some(_)) => {
                if r.strip_usage_chunk {
                    set(fallback::USAGE_INJECTED_HEADER, lit("1"));
                }
            }
            (None, None) if sse => {
                let mut tap = StreamTap::new(strip);
                tap.capture = ex.identity.as_ref().is_some_and(|i| i.store_prompts);
                tap.responses = r.api == Some(Api::Responses);
                ex.tap = Some(tap);
                if strip {
                    set("content-length", None);
                }
            }
            (None, None) => {
                // Passthrough: only JSON bodies can carry usage.
                ex.skip_copy =
                    r.api.is_none() && !get("content-type").is_some_and(|c| c.contains("json"));
            }
        }
        if let Some(slot) = &ex.attempt {
            set(
                fallback::ATTEMPT_RESPONSE_HEADER,
                Some(slot.index.to_string().into_bytes().into()),
            );
            if slot.fallback {
                set(fallback::FALLBACK_RESPONSE_HEADER, lit("true"));
            }
            // A 429 of a provider configured to fall back on it: let Envoy try the next one.
            if ex.status == 429 && slot.attempt.provider.fallback_on429 && !slot.last {
                set(":status", lit("503"));
            }
        }
        if ex.attempt.is_none() {
            // Read once: a response's headers arrive once.
            for (name, value) in core::mem::take(&mut self.limit_headers) {
                set(name, Some(value.into_bytes().into()));
            }
        }
        if !chained {
            set(
                gateway::PROVIDER_RESPONSE_HEADER,
                Some(r.provider.as_bytes().to_vec().into()),
            );
            set(
                gateway::MODEL_RESPONSE_HEADER,
                Some(r.model.as_bytes().to_vec().into()),
            );
        }
        if ex.translate_whole {
            // The whole native body is translated first; status and headers may still change.
            Flow::Pause
        } else {
            Flow::Continue
        }
    }
}

/// A static header value, borrowed (no copy per request).
fn lit(value: &'static str) -> Option<Cow<'static, [u8]>> {
    Some(Cow::Borrowed(value.as_bytes()))
}
