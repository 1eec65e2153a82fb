//! One request's exchange with the gateway, and the worker VM's root: every decision the filter makes
//! between Envoy's callbacks. Plain Rust over the [`Host`] trait (no proxy-wasm types), so the whole
//! lifecycle — auth, resolve callout, selection, shaping, fallback plan, response tap/translation,
//! usage record and metrics — runs in `cargo test` against [`hostapi::fake::Fake`]. `host.rs` only
//! forwards Envoy's callbacks here and maps [`Flow`] to proxy-wasm actions.

use crate::api::{self, Api};
use crate::auth;
use crate::config::{self, Identity, Plan, ProcessEnv, SidecarPlan};
use crate::entry::{self, Endpoint};
use crate::error::GatewayError;
use crate::fallback;
use crate::gateway::{self, Ingress, Routed};
use crate::hostapi::{self, Buffer, Headers, Host, Map, MetricKind};
use crate::metrics;
use crate::report::{self, Reporter};
use crate::resolve::{self, Breaker, IdentityCache, Lookup, Refresher, Resolved, TokenBucket};
use crate::usage::{self, StreamTap, UsageRecord};
use hashbrown::HashMap;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

thread_local! {
    /// The host of this VM (a wasm VM is single-threaded; each test thread installs its own double).
    static HOST: Cell<Option<&'static dyn Host>> = const { Cell::new(None) };
}

/// Installs the host every call of this VM (or test thread) goes through.
pub fn install(host: &'static dyn Host) {
    HOST.with(|h| h.set(Some(host)));
}

/// A host that does nothing, until one is installed.
struct NoHost;

/// Status answered by [`NoHost`].
const NO_HOST: hostapi::Status = 2;

impl Host for NoHost {
    fn headers(&self, _: Map) -> Result<hostapi::Pairs, hostapi::Status> {
        Err(NO_HOST)
    }
    fn header(&self, _: Map, _: &str) -> Result<Option<Vec<u8>>, hostapi::Status> {
        Err(NO_HOST)
    }
    fn set_header(&self, _: Map, _: &str, _: &[u8]) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn remove_header(&self, _: Map, _: &str) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn buffer(&self, _: Buffer, _: usize, _: usize) -> Result<Vec<u8>, hostapi::Status> {
        Err(NO_HOST)
    }
    fn set_buffer(&self, _: Buffer, _: usize, _: usize, _: &[u8]) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn send_response(&self, _: u32, _: &[(&str, &[u8])], _: &[u8]) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn call(&self, _: &str, _: &[(&str, &str)], _: &[u8], _: u64) -> Result<u32, hostapi::Status> {
        Err(NO_HOST)
    }
    fn resume_request(&self) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn shared_get(&self, _: &str) -> Result<Option<Vec<u8>>, hostapi::Status> {
        Err(NO_HOST)
    }
    fn shared_set(&self, _: &str, _: Option<&[u8]>) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn define_metric(&self, _: MetricKind, _: &str) -> Result<u32, hostapi::Status> {
        Err(NO_HOST)
    }
    fn increment_metric(&self, _: u32, _: u64) {}
    fn add_gauge(&self, _: u32, _: i64) {}
    fn record_metric(&self, _: u32, _: u64) {}
    fn property(&self, _: &[&str]) -> Result<Option<Vec<u8>>, hostapi::Status> {
        Err(NO_HOST)
    }
    fn set_property(&self, _: &[&str], _: &[u8]) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn now_ms(&self) -> u64 {
        0
    }
    fn set_tick_ms(&self, _: u32) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn done(&self) -> Result<(), hostapi::Status> {
        Err(NO_HOST)
    }
    fn log(&self, _: hostapi::Level, _: &str) {}
}

fn host() -> &'static dyn Host {
    HOST.with(Cell::get).unwrap_or(&NoHost)
}

/// What Envoy should do with the request or response after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// Largest non-streamed response body copied for usage extraction (the response itself is never held).
const MAX_JSON_COPY: usize = 4 * 1024 * 1024;

/// State one worker VM shares between its root context and its requests.
struct Shared {
    cache: RefCell<IdentityCache>,
    /// Sidecar lookups of keys in no cache (key spraying guard).
    lookups: RefCell<TokenBucket>,
    /// Circuit breaker on the sidecar's resolve endpoint.
    breaker: RefCell<Breaker>,
    /// Stale identities the root context refreshes in the background.
    refresher: RefCell<Refresher>,
    reporter: RefCell<Reporter>,
    metrics: RefCell<Metrics>,
    /// Prefix making record ids unique across VMs and restarts.
    id_prefix: RefCell<String>,
    next_id: RefCell<u64>,
    /// This VM's part of the records-buffered gauge, as last reported.
    buffered_reported: RefCell<usize>,
    /// Key → SHA-256 digest, for the keys this VM has seen (at most `MAX_DIGESTS`).
    digests: RefCell<HashMap<String, String>>,
    /// Budgets and rate limits (this VM's allowances).
    limits: RefCell<crate::limits::Limits>,
}

/// Keys whose digest a VM remembers.
const MAX_DIGESTS: usize = 1024;

impl Shared {
    /// Brings this VM's part of `llmgw.usage.records_buffered` up to date (the preStop hook waits for
    /// the gauge to reach zero before Envoy gets SIGTERM).
    fn sync_buffered(&self) {
        let now = self.reporter.borrow().buffered();
        let before = self.buffered_reported.replace(now);
        let delta = i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(0);
        self.metrics
            .borrow_mut()
            .gauge_add(metrics::USAGE_BUFFERED, delta);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            cache: RefCell::default(),
            lookups: RefCell::new(TokenBucket::new(20, 50)),
            breaker: RefCell::new(Breaker::new(3, 10_000, 2_000)),
            refresher: RefCell::new(Refresher::new(REFRESH_QUEUE, 2_000)),
            reporter: RefCell::default(),
            metrics: RefCell::default(),
            id_prefix: RefCell::default(),
            next_id: RefCell::default(),
            buffered_reported: RefCell::default(),
            digests: RefCell::default(),
            limits: RefCell::default(),
        }
    }
}

/// Stale keys waiting for a background refresh, and refreshes sent per tick.
const REFRESH_QUEUE: usize = 1024;
const REFRESHES_PER_TICK: usize = 64;

/// What a callout of the root context was for.
enum RootCallout {
    Usage,
    Limits,
    Refresh(String),
}

/// Metric ids by name, defined on first use; per-request metrics by (provider, model), so a request
/// formats no name and hashes two short strings.
#[derive(Default)]
struct Metrics {
    ids: HashMap<String, u32>,
    models: HashMap<String, HashMap<String, ModelMetrics>>,
}

/// The ids of one (provider, model)'s metrics (`requests` per status code, defined on first use).
struct ModelMetrics {
    requests: Vec<(u32, Option<u32>)>,
    tokens_in: Option<u32>,
    tokens_out: Option<u32>,
    duration: Option<u32>,
    cost: Option<u32>,
    ttft: Option<u32>,
    fallbacks: Option<u32>,
}

/// Status codes whose request-counter id one (provider, model) remembers.
const MAX_STATUS_IDS: usize = 32;

fn define(kind: MetricKind, name: &str) -> Option<u32> {
    match host().define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(e) => {
            log::warn!("llm-gateway: cannot define metric {name}: {e:?}");
            None
        }
    }
}

impl ModelMetrics {
    fn new(provider: &str, model: &str) -> Self {
        use MetricKind::{Counter, Histogram};
        ModelMetrics {
            requests: Vec::new(),
            tokens_in: define(Counter, &metrics::tokens(provider, model, "input")),
            tokens_out: define(Counter, &metrics::tokens(provider, model, "output")),
            duration: define(Histogram, &metrics::duration(provider, model)),
            cost: define(Counter, &metrics::cost(provider, model)),
            ttft: define(Histogram, &metrics::ttft(provider, model)),
            fallbacks: define(Counter, &metrics::fallbacks(provider)),
        }
    }

    fn request(&mut self, provider: &str, model: &str, status: u32) -> Option<u32> {
        if let Some((_, id)) = self.requests.iter().find(|(s, _)| *s == status) {
            return *id;
        }
        let id = define(
            MetricKind::Counter,
            &metrics::requests(provider, model, status),
        );
        if self.requests.len() < MAX_STATUS_IDS {
            self.requests.push((status, id));
        }
        id
    }
}

fn inc(id: Option<u32>, n: u64) {
    if let Some(id) = id {
        host().increment_metric(id, n);
    }
}

fn rec(id: Option<u32>, v: u64) {
    if let Some(id) = id {
        host().record_metric(id, v);
    }
}

impl Metrics {
    /// The metrics of one (provider, model), defined the first time it is seen.
    fn model(&mut self, provider: &str, model: &str) -> &mut ModelMetrics {
        let by_model = self.models.entry_ref(provider).or_default();
        by_model
            .entry_ref(model)
            .or_insert_with(|| ModelMetrics::new(provider, model))
    }

    fn id(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        match host().define_metric(kind, name) {
            Ok(id) => {
                self.ids.insert(name.to_string(), id);
                Some(id)
            }
            Err(e) => {
                log::warn!("llm-gateway: cannot define metric {name}: {e:?}");
                None
            }
        }
    }

    fn add(&mut self, name: &str, n: u64) {
        if let Some(id) = self.id(MetricKind::Counter, name) {
            host().increment_metric(id, n);
        }
    }

    /// Adds `delta` to a gauge shared by every VM (each VM adds its own part).
    fn gauge_add(&mut self, name: &str, delta: i64) {
        if delta == 0 {
            return;
        }
        if let Some(id) = self.id(MetricKind::Gauge, name) {
            host().add_gauge(id, delta);
        }
    }
}

pub struct GatewayRoot {
    plan: Option<Rc<Plan>>,
    shared: Rc<Shared>,
    callouts: HashMap<u32, RootCallout>,
    /// Set when Envoy asked the VM to finish (`on_done`): when it asked.
    done_at: Option<u64>,
}

impl Default for GatewayRoot {
    fn default() -> Self {
        GatewayRoot {
            plan: None,
            shared: Rc::new(Shared::default()),
            callouts: HashMap::new(),
            done_at: None,
        }
    }
}

impl GatewayRoot {
    /// Sends the next batch of usage records to the sidecar, if there is one and none is in flight.
    fn flush_usage(&mut self) {
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let mut reporter = self.shared.reporter.borrow_mut();
        let Some(body) = reporter.take_batch() else {
            return;
        };
        match call_sidecar(&sidecar, report::USAGE_PATH, &body, 5000) {
            Ok(token) => {
                self.callouts.insert(token, RootCallout::Usage);
            }
            Err(e) => {
                log::warn!("llm-gateway: cannot send usage records: {e:?}");
                let dropped = reporter.nack();
                drop(reporter);
                self.shared
                    .metrics
                    .borrow_mut()
                    .add(metrics::USAGE_DROPPED, dropped);
                self.shared.sync_buffered();
            }
        }
    }

    /// Background refreshes of stale identities (one in flight per key), unless the breaker is open.
    fn refresh_stale(&mut self) {
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let now = now_ms();
        let due = self
            .shared
            .refresher
            .borrow_mut()
            .take(REFRESHES_PER_TICK, now);
        for hash in due {
            if !self.shared.breaker.borrow_mut().allow(now) {
                self.shared.refresher.borrow_mut().finished(&hash);
                continue;
            }
            match dispatch_resolve(&sidecar, &hash) {
                Ok(token) => {
                    self.callouts.insert(token, RootCallout::Refresh(hash));
                }
                Err(e) => {
                    log::warn!("llm-gateway: cannot refresh a key: {e:?}");
                    self.shared.breaker.borrow_mut().failure(now);
                    self.shared.refresher.borrow_mut().finished(&hash);
                }
            }
        }
    }

    /// Renews this VM's budget allowances and rate-limit shares (one callout for all active keys).
    fn renew_limits(&mut self) {
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let now = now_ms();
        let holder = self.shared.id_prefix.borrow().clone();
        let Some(body) = self.shared.limits.borrow_mut().renewal(&holder, now) else {
            return;
        };
        match call_sidecar(
            &sidecar,
            crate::limits::ALLOWANCE_PATH,
            &body,
            sidecar.timeout_ms,
        ) {
            Ok(token) => {
                self.callouts.insert(token, RootCallout::Limits);
            }
            Err(e) => {
                log::warn!("llm-gateway: cannot renew budget allowances: {e:?}");
                self.shared.limits.borrow_mut().renewal_failed(now);
            }
        }
    }

    /// A background refresh answered.
    fn on_refreshed(&mut self, hash: &str, status: Option<u32>, body: &[u8]) {
        self.shared.refresher.borrow_mut().finished(hash);
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let _ = store_answer(&self.shared, &sidecar, hash, status, body);
    }

    /// Shutting down: finish once every record is handed over (or the grace period is over).
    fn maybe_finish(&mut self) {
        let Some(at) = self.done_at else { return };
        let reporter = self.shared.reporter.borrow();
        if !report::may_finish(&reporter, at, now_ms()) {
            return;
        }
        let left = reporter.buffered();
        drop(reporter);
        if left > 0 {
            log::warn!("llm-gateway: shutting down with {left} usage record(s) not delivered");
            self.shared
                .metrics
                .borrow_mut()
                .add(metrics::USAGE_DROPPED, left as u64);
        } else {
            log::info!("llm-gateway: usage records flushed; VM done");
        }
        self.done_at = None;
        self.shared.reporter.replace(Reporter::default());
        self.shared.sync_buffered();
        if let Err(e) = host().done() {
            log::warn!("llm-gateway: cannot signal done: {e:?}");
        }
    }
}

/// Applies a resolve answer to the VM cache, the shared cache and the breaker. Returns the identity
/// (or the error for the caller) like [`resolve::parse_answer`].
fn store_answer(
    shared: &Shared,
    sidecar: &SidecarPlan,
    hash: &str,
    status: Option<u32>,
    body: &[u8],
) -> Result<Rc<Identity>, GatewayError> {
    let now = now_ms();
    match resolve::parse_answer(status, body) {
        Ok(Resolved::Known {
            mut identity,
            ttl_ms,
        }) => {
            shared.breaker.borrow_mut().success();
            let fresh_until = now.saturating_add(ttl_ms);
            let stale_until = fresh_until.saturating_add(sidecar.stale_ms);
            identity.refused = resolve::refused_destination(&identity, &sidecar.destinations);
            let identity: Rc<Identity> = Rc::from(identity);
            shared.cache.borrow_mut().store_known(
                hash,
                identity.clone(),
                now,
                fresh_until,
                stale_until,
            );
            let record = resolve::encode_shared(fresh_until, stale_until, body);
            if let Err(e) = host().shared_set(&resolve::shared_key(hash), Some(&record)) {
                log::warn!("llm-gateway: cannot share resolved key: {e:?}");
            }
            Ok(identity)
        }
        Ok(Resolved::Unknown) => {
            shared.breaker.borrow_mut().success();
            shared.cache.borrow_mut().store_unknown(
                hash,
                now,
                now.saturating_add(sidecar.negative_ttl_ms),
            );
            // A revoked key must stop working everywhere, not only in this VM. Unknown keys that were
            // never known write nothing to shared data (spraying must not grow it).
            let key = resolve::shared_key(hash);
            if let Ok(Some(bytes)) = host().shared_get(&key) {
                if !bytes.is_empty() {
                    let _ = host().shared_set(&key, Some(b""));
                }
            }
            Err(GatewayError::InvalidApiKey)
        }
        Err(e) => {
            shared.breaker.borrow_mut().failure(now);
            Err(e)
        }
    }
}

impl GatewayRoot {
    /// Envoy is done with this VM (shutdown, drain, configuration replaced): hand the queued usage
    /// records over first. Returning false keeps the VM until `proxy_done` (see `maybe_finish`).
    pub fn on_done(&mut self) -> bool {
        let buffered = self.shared.reporter.borrow().buffered();
        let has_sidecar = self.plan.as_ref().is_some_and(|p| p.sidecar.is_some());
        log::info!("llm-gateway: VM done requested ({buffered} usage record(s) buffered)");
        if !has_sidecar || buffered == 0 {
            return true;
        }
        self.done_at = Some(now_ms());
        self.flush_usage();
        false
    }

    pub fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body: usize,
        _trailers: usize,
    ) {
        let status = call_status();
        match self.callouts.remove(&token) {
            Some(RootCallout::Refresh(hash)) => {
                let body = host()
                    .buffer(Buffer::CallResponseBody, 0, body)
                    .unwrap_or_default();
                self.on_refreshed(&hash, status, &body);
                return;
            }
            Some(RootCallout::Limits) => {
                let body = host()
                    .buffer(Buffer::CallResponseBody, 0, body)
                    .unwrap_or_default();
                if !self
                    .shared
                    .limits
                    .borrow_mut()
                    .on_answer(status, &body, now_ms())
                {
                    log::warn!("llm-gateway: budget allowances not renewed (status {status:?})");
                }
                share_limits(&self.shared);
                return;
            }
            Some(RootCallout::Usage) => {}
            None => return,
        }
        let mut reporter = self.shared.reporter.borrow_mut();
        let (sent, dropped) = if status == Some(200) {
            (reporter.ack(), 0)
        } else {
            log::warn!(
                "llm-gateway: sidecar did not take usage records (status {status:?}); will retry"
            );
            (0, reporter.nack())
        };
        drop(reporter);
        let mut m = self.shared.metrics.borrow_mut();
        m.add(metrics::USAGE_SENT, sent);
        m.add(metrics::USAGE_DROPPED, dropped);
        drop(m);
        self.shared.sync_buffered();
        // Drain a backlog without waiting for the next tick.
        if status == Some(200) {
            self.flush_usage();
        }
        self.maybe_finish();
    }
}

impl GatewayRoot {
    pub fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match host().buffer(Buffer::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b,
            Err(e) => {
                log::error!("llm-gateway: cannot read plugin configuration: {e:?}");
                return false;
            }
        };
        let plan = config::parse(&bytes).and_then(|raw| config::compile(&raw, &ProcessEnv));
        match plan {
            Ok(plan) => {
                log::info!(
                    "llm-gateway: configured with {} static key(s), sidecar {}",
                    plan.keys.len(),
                    if plan.sidecar.is_some() {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
                if plan.sidecar.is_some() {
                    if let Err(e) = host().set_tick_ms(1000) {
                        log::warn!("llm-gateway: cannot start the usage timer: {e:?}");
                    }
                }
                if let Some(sc) = &plan.sidecar {
                    self.shared
                        .lookups
                        .replace(TokenBucket::new(sc.lookups_per_second, sc.lookup_burst));
                    self.shared.breaker.replace(Breaker::new(
                        sc.breaker_failures,
                        sc.breaker_cooldown_ms,
                        sc.timeout_ms,
                    ));
                    self.shared
                        .refresher
                        .replace(Refresher::new(REFRESH_QUEUE, sc.timeout_ms));
                    self.shared
                        .reporter
                        .borrow_mut()
                        .set_max_bytes(sc.usage_buffer_bytes);
                    self.shared
                        .limits
                        .replace(crate::limits::Limits::new(sc.limits_fail_open));
                }
                self.plan = Some(Rc::new(plan));
                self.shared.cache.replace(IdentityCache::default());
                let seed = std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish();
                self.shared
                    .id_prefix
                    .replace(format!("{:x}-{seed:016x}", now_ms()));
                true
            }
            Err(e) => {
                log::error!("llm-gateway: refusing to start: {e}");
                false
            }
        }
    }

    pub fn on_tick(&mut self) {
        self.flush_usage();
        self.refresh_stale();
        self.renew_limits();
        self.maybe_finish();
    }

    pub fn create_http_context(&self) -> Option<GatewayHttp> {
        let plan = self.plan.clone()?;
        Some(GatewayHttp {
            plan,
            shared: self.shared.clone(),
            state: State::PassThrough,
            tags: BTreeMap::new(),
            exchange: None,
            anthropic: false,
            messages: None,
            limit_headers: Vec::new(),
        })
    }
}

/// The status the client received (`response.code`, an 8-byte little-endian integer), at log time.
fn client_status() -> Option<u32> {
    let b = host().property(&["response", "code"]).ok().flatten()?;
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    u32::try_from(i64::from_le_bytes(a)).ok().filter(|s| *s > 0)
}

/// A header that must be text (a provider name, tags): present but not UTF-8 is a clear 400.
fn utf8_header(headers: &Headers, name: &str) -> Result<Option<String>, GatewayError> {
    headers
        .utf8(name)
        .map(|v| v.map(str::to_string))
        .map_err(|_| GatewayError::InvalidHeader {
            name: name.to_string(),
        })
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

impl Exchange {
    fn new(identity: Option<Rc<Identity>>, attempt: Option<Box<AttemptSlot>>) -> Self {
        Exchange {
            prompt: None,
            identity,
            chain: Vec::new(),
            served_by: None,
            fallback: false,
            attempt,
            start_ms: now_ms(),
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

fn set_header(name: &str, value: Option<&str>) {
    set_map_header(Map::RequestHeaders, name, value);
}

fn set_map_header(map: Map, name: &str, value: Option<&str>) {
    let r = match value {
        Some(v) => host().set_header(map, name, v.as_bytes()),
        None => host().remove_header(map, name),
    };
    if let Err(e) = r {
        log::warn!("llm-gateway: cannot set header {name}: {e:?}");
    }
}

fn now_ms() -> u64 {
    host().now_ms()
}

/// What to do with the request after authentication.
enum Next {
    Ready(Rc<Identity>, Box<Pending>),
    /// A callout was dispatched; the request waits for `on_http_call_response`.
    Waiting(Box<Pending>),
}

impl GatewayHttp {
    fn reject(&mut self, err: &GatewayError) -> Flow {
        self.state = State::PassThrough;
        let headers = err.headers();
        let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        let body = if self.anthropic {
            crate::translate::anthropic_ingress::gateway_error(err)
        } else {
            err.body().into_bytes()
        };
        if let Err(e) = host().send_response(err.status(), &pairs, &body) {
            log::error!("llm-gateway: cannot send local reply: {e:?}");
        }
        Flow::Pause
    }

    fn reply_json(&mut self, body: &str) -> Flow {
        self.state = State::PassThrough;
        let headers: [(&str, &[u8]); 1] = [("content-type", b"application/json")];
        if let Err(e) = host().send_response(200, &headers, body.as_bytes()) {
            log::error!("llm-gateway: cannot send local reply: {e:?}");
        }
        Flow::Pause
    }

    fn handle_headers(&mut self, end_of_stream: bool) -> Result<Flow, GatewayError> {
        // One host call for all request headers; removals only for headers that are present.
        // Read as bytes: a header byte >= 0x80 is decoded lossily (or refused), never a panic.
        let headers = Headers(host().headers(Map::RequestHeaders).unwrap_or_default());
        let get = |name: &str| headers.text(name);
        if let Some(slot) = self.plan.attempt_slot {
            let plan = get(fallback::ATTEMPTS_HEADER).map(|v| fallback::decode(&v));
            set_header(fallback::ATTEMPTS_HEADER, None);
            set_header(gateway::CLUSTER_HEADER, None);
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
            set_header(gateway::CLUSTER_HEADER, None);
        }
        if get(fallback::ATTEMPTS_HEADER).is_some() {
            set_header(fallback::ATTEMPTS_HEADER, None);
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
                set_header(h, None);
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
        match self.authenticate(pending)? {
            Next::Ready(identity, p) => self.proceed(identity, *p),
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
    fn authenticate(&mut self, p: Pending) -> Result<Next, GatewayError> {
        if let Some(identity) = self.plan.identity_for_hash(&p.hash) {
            return Ok(Next::Ready(identity, Box::new(p)));
        }
        let Some(sidecar) = self.plan.sidecar.clone() else {
            return Err(GatewayError::InvalidApiKey);
        };
        let now = now_ms();
        let cached = self.shared.cache.borrow().lookup(&p.hash, now);
        // Shared data only when the VM cache cannot answer alone (no host call on the hot path).
        let shared = match cached {
            Lookup::Fresh(_) | Lookup::Unknown => None,
            _ => host()
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
        match dispatch_resolve(&sidecar, &p.hash) {
            Ok(_) => Ok(Next::Waiting(Box::new(p))),
            Err(e) => {
                log::warn!("llm-gateway: cannot call the sidecar: {e:?}");
                self.shared.breaker.borrow_mut().failure(now);
                Err(GatewayError::ControlPlaneUnavailable)
            }
        }
    }

    /// Continues an authenticated request (from the headers callback or after a callout).
    fn proceed(&mut self, identity: Rc<Identity>, p: Pending) -> Result<Flow, GatewayError> {
        if let Some((provider, reason)) = &identity.refused {
            return Err(GatewayError::DestinationForbidden {
                provider: provider.clone(),
                reason: reason.clone(),
            });
        }
        match p.endpoint {
            Endpoint::ListModels => Ok(self.reply_json(&gateway::list_models(&identity))),
            Endpoint::GetModel(name) => {
                let body = gateway::get_model(&identity, &name)?;
                Ok(self.reply_json(&body))
            }
            Endpoint::Passthrough(ref rest) => {
                let rest = rest.clone();
                self.passthrough(identity, p, rest)
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
                        && !adopt_shared_limits(&self.shared, &identity)
                    {
                        return self.learn_limits(&sidecar, identity, p);
                    }
                    self.admit(&identity)?;
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
                            identity,
                            p.provider_header.as_deref(),
                            &p.endpoint,
                            &body,
                            size,
                        )?;
                        if let Err(e) = host().resume_request() {
                            log::error!("llm-gateway: cannot resume request: {e:?}");
                        }
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

    fn handle_body(&mut self, body_size: usize, end_of_stream: bool) -> Result<Flow, GatewayError> {
        let limit = self.plan.max_body_bytes;
        match &mut self.state {
            State::AwaitingBody { .. } | State::Resolving(_) if body_size > limit => {
                Err(GatewayError::BodyTooLarge { limit })
            }
            State::AwaitingAttempt(_) if !end_of_stream => Ok(Flow::Pause),
            State::AwaitingAttempt(_) => {
                let State::AwaitingAttempt(slot) =
                    std::mem::replace(&mut self.state, State::PassThrough)
                else {
                    return Ok(Flow::Continue);
                };
                let body = read_body(body_size)?;
                let routed = gateway::route_attempt(
                    &slot.attempt.provider,
                    &slot.attempt.model,
                    &body,
                    slot.api,
                )?;
                self.exchange = Some(Box::new(Exchange::new(None, Some(slot))));
                self.apply(routed, body_size)?;
                Ok(Flow::Continue)
            }
            State::Resolving(p) => {
                if end_of_stream {
                    p.body = Some((read_body(body_size)?, body_size));
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
                let body = read_body(body_size)?;
                self.route(
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
                self.exchange = Some(Box::new(Exchange::new(Some(identity), None)));
                self.apply(routed, 0)?;
            }
        }
        if p.waited {
            if let Err(e) = host().resume_request() {
                log::error!("llm-gateway: cannot resume request: {e:?}");
            }
        }
        Ok(Flow::Continue)
    }

    /// Applies the routing decision to the paused request.
    fn route(
        &mut self,
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
                let version = host()
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
            _ => fallback_chain(&identity, &routed),
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
            set_header("anthropic-beta", None);
            set_header("anthropic-version", None);
        }
        let mut exchange = Exchange::new(Some(identity), None);
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
            if let Some(chat) = &chat_body {
                host()
                    .set_buffer(Buffer::RequestBody, 0, body_size, chat)
                    .map_err(|e| GatewayError::Internal {
                        reason: format!("cannot set body: {e:?}"),
                    })?;
                set_header("content-length", Some(&chat.len().to_string()));
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
            set_header(fallback::ATTEMPTS_HEADER, Some(&fallback::encode(&plan)));
            let cluster = format!("{}_{}", fallback::CHAIN_CLUSTER, plan.attempts.len());
            set_header(gateway::CLUSTER_HEADER, Some(&cluster));
            // The attempt filters shape, translate and mark the usage chunk; this one accounts.
            let mut routed = routed;
            routed.translation = None;
            routed.strip_usage_chunk = false;
            self.state = State::Routed(Box::new(routed));
            return Ok(());
        }
        self.apply(routed, body_size)
    }

    /// Sends the request to the provider `routed` describes: host, path, auth, headers, body.
    fn apply(&mut self, mut routed: Routed, body_size: usize) -> Result<(), GatewayError> {
        set_header(":authority", Some(&routed.authority));
        set_header(":path", Some(&routed.path));
        set_header(gateway::CLUSTER_HEADER, Some(&routed.cluster));
        if let Some((name, value)) = &routed.auth {
            set_header(name, Some(value));
        }
        for (name, value) in &routed.extra_headers {
            set_header(name, Some(value));
        }
        if routed.translation.is_some() {
            set_header("content-type", Some("application/json"));
            // Native APIs answer in their own encoding choices; ask for plain bodies to translate.
            set_header("accept-encoding", None);
        }
        if let Some(new_body) = routed.body.take() {
            host()
                .set_buffer(Buffer::RequestBody, 0, body_size, &new_body)
                .map_err(|e| GatewayError::Internal {
                    reason: format!("cannot set body: {e:?}"),
                })?;
            set_header("content-length", Some(&new_body.len().to_string()));
        }
        self.state = State::Routed(Box::new(routed));
        Ok(())
    }

    /// The key's first request on this VM: ask the sidecar for its limits (one callout per key and VM;
    /// later renewals go out on the tick), then continue in `on_resolved`.
    fn learn_limits(
        &mut self,
        sidecar: &SidecarPlan,
        identity: Rc<Identity>,
        mut p: Pending,
    ) -> Result<Flow, GatewayError> {
        let now = now_ms();
        if !self.shared.breaker.borrow_mut().allow(now) {
            // The sidecar is failing: no callout (and no wait); the failure policy decides.
            self.shared
                .limits
                .borrow_mut()
                .on_first_answer(&identity.key_id, None, b"", now);
            p.limits_for = Some(identity.clone());
            return self.proceed(identity, p);
        }
        let holder = self.shared.id_prefix.borrow().clone();
        let body = self.shared.limits.borrow_mut().first_sight(
            &identity.key_id,
            &identity.org_id,
            &identity.config_id,
            &holder,
            now,
        );
        match call_sidecar(
            sidecar,
            crate::limits::ALLOWANCE_PATH,
            &body,
            sidecar.timeout_ms,
        ) {
            Ok(_) => {
                p.limits_for = Some(identity);
                self.state = State::Resolving(Box::new(p));
                Ok(Flow::Pause)
            }
            Err(e) => {
                log::warn!("llm-gateway: cannot ask for budget allowances: {e:?}");
                self.shared.breaker.borrow_mut().failure(now);
                self.shared
                    .limits
                    .borrow_mut()
                    .on_first_answer(&identity.key_id, None, b"", now);
                p.limits_for = Some(identity.clone());
                self.proceed(identity, p)
            }
        }
    }

    /// Budgets and rate limits of the key (this VM's allowance; no callout).
    fn admit(&mut self, identity: &Identity) -> Result<(), GatewayError> {
        let admitted = self.shared.limits.borrow_mut().admit(
            &identity.key_id,
            &identity.org_id,
            &identity.config_id,
            now_ms(),
        );
        let mut m = self.shared.metrics.borrow_mut();
        match admitted {
            Ok(a) => {
                if a.soft_over {
                    m.add(metrics::BUDGET_SOFT_EXCEEDED, 1);
                }
                self.limit_headers = a.headers;
                Ok(())
            }
            Err(e) => {
                m.add(
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

    fn on_resolved(&mut self, status: Option<u32>, body: &[u8]) -> Result<Flow, GatewayError> {
        let State::Resolving(p) = std::mem::replace(&mut self.state, State::PassThrough) else {
            return Ok(Flow::Continue);
        };
        if let Some(identity) = p.limits_for.clone() {
            // Counts for the breaker like a resolve: a failing sidecar stops costing first requests.
            match status {
                Some(s) if s < 500 => self.shared.breaker.borrow_mut().success(),
                _ => self.shared.breaker.borrow_mut().failure(now_ms()),
            }
            self.shared.limits.borrow_mut().on_first_answer(
                &identity.key_id,
                status,
                body,
                now_ms(),
            );
            share_limits(&self.shared);
            return self.proceed(identity, *p);
        }
        let Some(sidecar) = self.plan.sidecar.clone() else {
            return Err(GatewayError::InvalidApiKey);
        };
        let identity = store_answer(&self.shared, &sidecar, &p.hash, status, body)?;
        self.proceed(identity, *p)
    }
}

/// A key's limits learned by another worker of this Envoy (shared data), adopted without a callout.
fn adopt_shared_limits(shared: &Shared, identity: &Identity) -> bool {
    let key = crate::limits::shared_key(&identity.key_id);
    match host().shared_get(&key) {
        Ok(Some(record)) => shared.limits.borrow_mut().adopt_shared(
            &identity.key_id,
            &identity.org_id,
            &identity.config_id,
            &record,
            now_ms(),
        ),
        _ => false,
    }
}

/// Shares the answers this VM learned with the other workers (at most one record per key per 10 s).
fn share_limits(shared: &Shared) {
    let records = shared.limits.borrow_mut().take_shared();
    for (key, record) in records {
        if let Err(e) = host().shared_set(&key, Some(&record)) {
            log::warn!("llm-gateway: cannot share budget allowances: {e:?}");
        }
    }
}

/// The attempts for a routed request: its provider and, if it names fallbacks, their chain (healthy
/// providers first). A single attempt means no fallback.
fn fallback_chain(identity: &Identity, routed: &Routed) -> Vec<fallback::Attempt> {
    let Some(provider) = identity.provider(&routed.provider) else {
        return Vec::new();
    };
    let Some(model) = provider.model(&routed.model) else {
        return Vec::new();
    };
    if provider.fallback.is_empty() {
        return Vec::new();
    }
    let now = now_ms();
    fallback::chain(identity, provider, model, |name| {
        health(&identity.org_id, name).ejected(now)
    })
}

fn health(org: &str, provider: &str) -> fallback::Health {
    match host().shared_get(&fallback::health_key(org, provider)) {
        Ok(Some(b)) => fallback::Health::decode(&b),
        _ => fallback::Health::default(),
    }
}

/// Records one attempt's outcome for its provider (shared by all workers; last writer wins).
fn record_health(org: &str, provider: &str, ok: bool) {
    let key = fallback::health_key(org, provider);
    let next = health(org, provider).after(ok, now_ms());
    if let Err(e) = host().shared_set(&key, Some(&next.encode())) {
        log::warn!("llm-gateway: cannot record provider health: {e:?}");
    }
}

/// Filter state for Envoy's access log (`%FILTER_STATE(wasm.llm_gateway.provider:PLAIN)%`, ...).
fn set_filter_state(summary: &crate::access_log::Summary) {
    for (key, value) in crate::access_log::filter_state(summary) {
        if let Err(e) = host().set_property(&[key], value.as_bytes()) {
            log::debug!("llm-gateway: cannot set filter state {key}: {e:?}");
        }
    }
}

/// `:status` of a callout's answer (`None`: no answer — timeout, reset, no healthy sidecar).
fn call_status() -> Option<u32> {
    host()
        .header(Map::CallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| hostapi::text(&s).trim().parse::<u32>().ok())
}

fn read_body(size: usize) -> Result<Vec<u8>, GatewayError> {
    host()
        .buffer(Buffer::RequestBody, 0, size)
        .map_err(|e| GatewayError::Internal {
            reason: format!("cannot read body: {e:?}"),
        })
}

fn dispatch_resolve(sidecar: &SidecarPlan, hash: &str) -> Result<u32, hostapi::Status> {
    let body = resolve::request_body(hash);
    call_sidecar(sidecar, resolve::RESOLVE_PATH, &body, sidecar.timeout_ms)
}

/// A JSON POST to one of the sidecar's internal endpoints.
fn call_sidecar(
    sidecar: &SidecarPlan,
    path: &str,
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, hostapi::Status> {
    host().call(
        &sidecar.cluster,
        &[
            (":method", "POST"),
            (":path", path),
            (":authority", &sidecar.authority),
            ("content-type", "application/json"),
            (resolve::TOKEN_HEADER, &sidecar.token),
        ],
        body,
        timeout_ms,
    )
}

impl GatewayHttp {
    pub fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let status = call_status();
        let body = host()
            .buffer(Buffer::CallResponseBody, 0, body_size)
            .unwrap_or_default();
        match self.on_resolved(status, &body) {
            Ok(_) => {}
            Err(e) => {
                self.reject(&e);
            }
        }
    }
}

impl GatewayHttp {
    pub fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Flow {
        match self.handle_headers(end_of_stream) {
            Ok(a) => a,
            Err(e) => self.reject(&e),
        }
    }

    pub fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Flow {
        match self.handle_body(body_size, end_of_stream) {
            Ok(a) => a,
            Err(e) => self.reject(&e),
        }
    }

    pub fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Flow {
        let (State::Routed(r), Some(ex)) = (&self.state, self.exchange.as_mut()) else {
            return Flow::Continue;
        };
        if ex.first_byte_ms.is_none() && body_size > 0 {
            ex.first_byte_ms = Some(now_ms());
        }
        if ex.translate_whole {
            if !end_of_stream {
                return Flow::Pause;
            }
            let body = host()
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
                set_map_header(Map::ResponseHeaders, ":status", Some(&status.to_string()));
            }
            if let Err(e) = host().set_buffer(Buffer::ResponseBody, 0, body_size, &out) {
                log::warn!("llm-gateway: cannot set the translated response: {e:?}");
            }
            return Flow::Continue;
        }
        let chunk = match host().buffer(Buffer::ResponseBody, 0, body_size) {
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
            if let Err(e) = host().set_buffer(Buffer::ResponseBody, 0, body_size, &out) {
                log::warn!("llm-gateway: cannot set a translated chunk: {e:?}");
            }
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
                    if let Err(e) = host().set_buffer(Buffer::ResponseBody, 0, body_size, &out) {
                        log::warn!("llm-gateway: cannot rewrite a stream chunk: {e:?}");
                    }
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

    pub fn on_log(&mut self) {
        let (State::Routed(r), Some(ex)) = (&self.state, self.exchange.take()) else {
            return;
        };
        if let Some(slot) = &ex.attempt {
            // Attempt role: only the provider's health; the main filter accounts for the request.
            let ok = ex.status != 0
                && !fallback::fails_over(ex.status, slot.attempt.provider.fallback_on429);
            record_health(&slot.org, &slot.attempt.provider.name, ok);
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
        let end = now_ms();
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
        let status = client_status()
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
        set_filter_state(&crate::access_log::Summary {
            provider: &provider,
            model: &model_used,
            model_requested: &r.model,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cost_nano_usd: cost,
            fallback: ex.fallback,
            key_id: &id.key_id,
            config_id: &id.config_id,
        });
        {
            let mut all = self.shared.metrics.borrow_mut();
            let m = all.model(&provider, &r.model);
            inc(m.request(&provider, &r.model, status), 1);
            if ex.fallback {
                inc(m.fallbacks, 1);
            }
            inc(m.tokens_in, u.prompt_tokens);
            inc(m.tokens_out, u.completion_tokens);
            rec(m.duration, latency);
            if let Some(cost) = cost {
                inc(m.cost, cost);
            }
            if let Some(t) = ttft {
                rec(m.ttft, t);
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
            tags: std::mem::take(&mut self.tags),
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
                .add(metrics::USAGE_DROPPED, newly_dropped);
        }
        self.shared.sync_buffered();
    }

    pub fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Flow {
        let (State::Routed(r), Some(ex)) = (&self.state, self.exchange.as_mut()) else {
            return Flow::Continue;
        };
        // Provider headers are bytes: anything non-UTF-8 is decoded lossily, never a panic.
        let headers = Headers(host().headers(Map::ResponseHeaders).unwrap_or_default());
        let get = |name: &str| headers.text(name).map(|v| v.into_owned());
        let set =
            |name: &str, value: Option<&str>| set_map_header(Map::ResponseHeaders, name, value);
        ex.status = get(":status")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let sse = get("content-type").is_some_and(|c| c.contains("text/event-stream"));
        let ok = (200..300).contains(&ex.status);
        let chained = !ex.chain.is_empty() && ex.attempt.is_none();
        // Main role after a fallback chain: the attempt filter says who answered and how.
        let mut strip = r.strip_usage_chunk;
        if chained {
            ex.served_by = get(gateway::PROVIDER_RESPONSE_HEADER);
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
                    set("content-type", Some("text/event-stream"));
                } else {
                    ex.translate_whole = true;
                    set("content-type", Some("application/json"));
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
                    set("content-type", Some("text/event-stream"));
                } else {
                    ex.translate_whole = true;
                    set("content-type", Some("application/json"));
                }
            }
            // Attempt role: the main filter reads usage and strips the chunk it did not ask for.
            (None, Some(_)) => {
                if r.strip_usage_chunk {
                    set(fallback::USAGE_INJECTED_HEADER, Some("1"));
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
                Some(&slot.index.to_string()),
            );
            if slot.fallback {
                set(fallback::FALLBACK_RESPONSE_HEADER, Some("true"));
            }
            // A 429 of a provider configured to fall back on it: let Envoy try the next one.
            if ex.status == 429 && slot.attempt.provider.fallback_on429 && !slot.last {
                set(":status", Some("503"));
            }
        }
        if ex.attempt.is_none() {
            for (name, value) in &self.limit_headers {
                set(name, Some(value));
            }
        }
        if !chained {
            set(gateway::PROVIDER_RESPONSE_HEADER, Some(&r.provider));
            set(gateway::MODEL_RESPONSE_HEADER, Some(&r.model));
        }
        if ex.translate_whole {
            // The whole native body is translated first; status and headers may still change.
            Flow::Pause
        } else {
            Flow::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hash_key as sha;
    use crate::hostapi::fake::Fake;

    const KEY: &str = "sk-test-key";
    const CHAT: &str = "/openai/v1/chat/completions";

    /// A VM with a static-key configuration, on a fresh fake host for this test thread.
    fn vm() -> (&'static Fake, GatewayRoot) {
        let f: &'static Fake = Box::leak(Box::default());
        install(f);
        f.st().now_ms = 1_000;
        f.st().config = serde_json::json!({
            "maxBodyBytes": 4096,
            "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                           "url": "http://127.0.0.1:9/v1", "isHosted": true, "models": ["m1"]}],
            "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
        })
        .to_string()
        .into_bytes();
        let mut root = GatewayRoot::default();
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
        Headers(h.clone()).text(name).map(|v| v.into_owned())
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
        install(f);
        f.st().now_ms = 1_000;
        f.st().config = serde_json::json!({
            "sidecar": {"token": "t"},
            "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                           "url": "http://127.0.0.1:9/v1", "isHosted": true, "models": ["m1"]}],
            "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
        })
        .to_string()
        .into_bytes();
        let mut root = GatewayRoot::default();
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
        install(f);
        f.st().config = serde_json::json!({
            "openaiPassthrough": true,
            "providers": [{"name": "local", "supportedProvider": "OPENAI_COMPATIBLE",
                           "url": "http://127.0.0.1:9/v1", "apiKey": "up-key", "models": ["m1"]}],
            "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
        })
        .to_string()
        .into_bytes();
        let mut root = GatewayRoot::default();
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
        let answer =
            br#"{"text":"hi","usage":{"type":"tokens","input_tokens":14,"output_tokens":3}}"#;
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
        install(f);
        f.st().config = serde_json::json!({
            "openaiPassthrough": true,
            "sidecar": {"token": "t"},
        })
        .to_string()
        .into_bytes();
        let mut root = GatewayRoot::default();
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
        install(f);
        f.st().config = serde_json::json!({
            "providers": [{"name": "claude", "supportedProvider": "ANTHROPIC",
                           "apiKey": "a", "models": ["c1"]}],
            "keys": [{"id": "k", "sha256": sha(KEY), "config": "default"}],
        })
        .to_string()
        .into_bytes();
        let mut root = GatewayRoot::default();
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
            if http.on_http_request_headers(5, false) == Flow::Pause
                && f.st().local_replies.is_empty()
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

    /// A VM with an OpenAI-compatible provider (`m1`) and an ANTHROPIC one (`c1`).
    fn vm_anthropic() -> (&'static Fake, GatewayRoot) {
        let f: &'static Fake = Box::leak(Box::default());
        install(f);
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
        let mut root = GatewayRoot::default();
        assert!(root.on_configure(0));
        (f, root)
    }

    fn messages_request(f: &Fake, http: &mut GatewayHttp, path: &str, body: &[u8]) -> Flow {
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
            let ct: &[u8] = [b"text/event-stream".as_slice(), b"application/json", &ctype]
                [(next() % 3) as usize];
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
}
