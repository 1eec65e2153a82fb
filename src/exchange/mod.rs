//! One request's exchange with the gateway, and the worker VM's root: every decision the filter makes
//! between Envoy's callbacks, as a state machine in plain Rust.
//!
//! Events in, effects out: a callback becomes an [`Event`] (or a [`RootEvent`]); the machine
//! ([`GatewayHttp`] per request, [`GatewayRoot`] per VM) decides, and pushes the [`Effect`]s the host
//! must apply — header changes, a new body, a local reply, a callout, shared data, filter state,
//! metrics — into an outbox, returning the [`Flow`]. The data it needs arrives in the event (request
//! headers, a callout's answer) or is read lazily through [`Read`], the read-only half of the host
//! (bodies, response headers, shared data, properties at log time, the clock): the type system shows
//! that the machine cannot change anything itself. [`crate::adapter`] applies the effects to a
//! [`crate::hostapi::Host`] (Envoy's in `host.rs`, the in-memory fake in tests, the fuzz lifecycle and
//! the benchmark), dispatches callouts and feeds their dispatch result back as an event.
//!
//! The files follow a request: [`effect`] (the vocabulary), [`root`] (configuration, the tick's usage
//! flush, refreshes and allowance renewals, shutdown), [`http`] (auth, resolve callout, selection,
//! shaping, fallback plan, response tap/translation, usage record and metrics).

#[allow(unused_imports)]
use crate::prelude::*;

mod effect;
mod http;
mod root;
#[cfg(test)]
mod tests;

use effect::Cx;
pub use effect::{Call, Effect, Event, Purpose, RootEvent};
pub use http::GatewayHttp;
pub use root::GatewayRoot;

use crate::config::{Identity, SidecarPlan};
use crate::error::GatewayError;
use crate::fallback;
use crate::hostapi::{self, Buffer, Headers, Map, MetricKind, Read};
use crate::metrics;
use crate::report::Reporter;
use crate::resolve::{self, Breaker, IdentityCache, Refresher, Resolved, TokenBucket};
use alloc::rc::Rc;
use core::cell::RefCell;
use hashbrown::HashMap;

/// Logs `llm-gateway: <message>` at `level`, for every log line of the filter: one call site of the
/// `log` machinery instead of one per line (the proxy-wasm logger writes only the message, so the
/// lines need no target or location of their own).
#[inline(never)]
pub(crate) fn log_at(level: log::Level, message: core::fmt::Arguments<'_>) {
    log::log!(level, "llm-gateway: {message}");
}

/// What Envoy should do with the request or response after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// Largest non-streamed response body copied for usage extraction (the response itself is never held).
const MAX_JSON_COPY: usize = 4 * 1024 * 1024;

/// A `RefCell` whose borrows are not `#[track_caller]`: one panic location and check per type
/// instead of one per call site (the exchange borrows [`Shared`]'s fields in ~60 places, never two
/// at once).
#[derive(Default)]
struct Slot<T>(RefCell<T>);

impl<T> Slot<T> {
    fn new(value: T) -> Self {
        Slot(RefCell::new(value))
    }

    #[inline(never)]
    fn borrow(&self) -> core::cell::Ref<'_, T> {
        self.0.borrow()
    }

    #[inline(never)]
    fn borrow_mut(&self) -> core::cell::RefMut<'_, T> {
        self.0.borrow_mut()
    }

    #[inline(never)]
    fn replace(&self, value: T) -> T {
        self.0.replace(value)
    }
}

/// State one worker VM shares between its root context and its requests.
struct Shared {
    cache: Slot<IdentityCache>,
    /// Sidecar lookups of keys in no cache (key spraying guard).
    lookups: Slot<TokenBucket>,
    /// Circuit breaker on the sidecar's resolve endpoint.
    breaker: Slot<Breaker>,
    /// Stale identities the root context refreshes in the background.
    refresher: Slot<Refresher>,
    reporter: Slot<Reporter>,
    metrics: Slot<Metrics>,
    /// Prefix making record ids unique across VMs and restarts.
    id_prefix: Slot<String>,
    next_id: Slot<u64>,
    /// This VM's part of the records-buffered gauge, as last reported.
    buffered_reported: Slot<usize>,
    /// Key → SHA-256 digest, for the keys this VM has seen (at most `MAX_DIGESTS`).
    digests: Slot<HashMap<String, String>>,
    /// Budgets and rate limits (this VM's allowances).
    limits: Slot<crate::limits::Limits>,
}

/// Keys whose digest a VM remembers.
const MAX_DIGESTS: usize = 1024;

impl Shared {
    /// Brings this VM's part of `llmgw.usage.records_buffered` up to date (the preStop hook waits for
    /// the gauge to reach zero before Envoy gets SIGTERM).
    fn sync_buffered(&self, out: &mut Vec<Effect>) {
        let now = self.reporter.borrow().buffered();
        let before = self.buffered_reported.replace(now);
        let delta = i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(0);
        self.metrics
            .borrow_mut()
            .gauge_add(out, metrics::USAGE_BUFFERED, delta);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            cache: Slot::default(),
            lookups: Slot::new(TokenBucket::new(20, 50)),
            breaker: Slot::new(Breaker::new(3, 10_000, 2_000)),
            refresher: Slot::new(Refresher::new(REFRESH_QUEUE, 2_000)),
            reporter: Slot::default(),
            metrics: Slot::default(),
            id_prefix: Slot::default(),
            next_id: Slot::default(),
            buffered_reported: Slot::default(),
            digests: Slot::default(),
            limits: Slot::default(),
        }
    }
}

/// Stale keys waiting for a background refresh, and refreshes sent per tick.
const REFRESH_QUEUE: usize = 1024;
const REFRESHES_PER_TICK: usize = 64;

/// The machine's own metric numbers: by name, defined on first use; per-request metrics by
/// (provider, model), so a request formats no name and hashes two short strings. A number is defined
/// once ([`Effect::DefineMetric`]); the adapter maps it to the host's id.
#[derive(Default)]
struct Metrics {
    numbers: Numbers,
    models: HashMap<String, HashMap<String, ModelMetrics>>,
}

/// Numbers handed out so far, and those of metrics known by name.
#[derive(Default)]
struct Numbers {
    next: u32,
    ids: HashMap<String, u32>,
}

impl Numbers {
    /// A new number for `name`.
    fn define(&mut self, out: &mut Vec<Effect>, kind: MetricKind, name: String) -> u32 {
        let local = self.next;
        self.next = self.next.saturating_add(1);
        out.push(Effect::DefineMetric { local, kind, name });
        local
    }

    /// The number of `name`, defined the first time.
    fn id(&mut self, out: &mut Vec<Effect>, kind: MetricKind, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.define(out, kind, name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }
}

/// The numbers of one (provider, model)'s metrics (`requests` per status code, defined on first use).
struct ModelMetrics {
    requests: Vec<(u32, u32)>,
    tokens_in: u32,
    tokens_out: u32,
    duration: u32,
    cost: u32,
    ttft: u32,
    fallbacks: u32,
}

/// Status codes whose request-counter number one (provider, model) remembers (others go by name).
const MAX_STATUS_IDS: usize = 32;

impl ModelMetrics {
    fn new(n: &mut Numbers, out: &mut Vec<Effect>, provider: &str, model: &str) -> Self {
        use MetricKind::{Counter, Histogram};
        ModelMetrics {
            requests: Vec::new(),
            tokens_in: n.define(out, Counter, metrics::tokens(provider, model, "input")),
            tokens_out: n.define(out, Counter, metrics::tokens(provider, model, "output")),
            duration: n.define(out, Histogram, metrics::duration(provider, model)),
            cost: n.define(out, Counter, metrics::cost(provider, model)),
            ttft: n.define(out, Histogram, metrics::ttft(provider, model)),
            fallbacks: n.define(out, Counter, metrics::fallbacks(provider)),
        }
    }

    /// The request counter of this (provider, model) and `status`.
    fn request(
        &mut self,
        n: &mut Numbers,
        out: &mut Vec<Effect>,
        provider: &str,
        model: &str,
        status: u32,
    ) -> u32 {
        if let Some((_, id)) = self.requests.iter().find(|(s, _)| *s == status) {
            return *id;
        }
        let name = metrics::requests(provider, model, status);
        if self.requests.len() >= MAX_STATUS_IDS {
            // Past the cache: by name (still one number per distinct name).
            return n.id(out, MetricKind::Counter, &name);
        }
        let id = n.define(out, MetricKind::Counter, name);
        self.requests.push((status, id));
        id
    }
}

impl Metrics {
    /// The metrics of one (provider, model), defined the first time it is seen.
    fn model(
        &mut self,
        out: &mut Vec<Effect>,
        provider: &str,
        model: &str,
    ) -> (&mut ModelMetrics, &mut Numbers) {
        let Metrics { numbers, models } = self;
        let m = models
            .entry_ref(provider)
            .or_default()
            .entry_ref(model)
            .or_insert_with(|| ModelMetrics::new(numbers, out, provider, model));
        (m, numbers)
    }

    fn add(&mut self, out: &mut Vec<Effect>, name: &str, n: u64) {
        let local = self.numbers.id(out, MetricKind::Counter, name);
        out.push(Effect::Increment { local, by: n });
    }

    /// Adds `delta` to a gauge shared by every VM (each VM adds its own part).
    fn gauge_add(&mut self, out: &mut Vec<Effect>, name: &str, delta: i64) {
        if delta == 0 {
            return;
        }
        let local = self.numbers.id(out, MetricKind::Gauge, name);
        out.push(Effect::GaugeAdd { local, delta });
    }
}

/// Applies a resolve answer to the VM cache, the shared cache and the breaker. Returns the identity
/// (or the error for the caller) like [`resolve::parse_answer`].
fn store_answer(
    cx: &mut Cx,
    shared: &Shared,
    sidecar: &SidecarPlan,
    hash: &str,
    status: Option<u32>,
    body: &[u8],
) -> Result<Rc<Identity>, GatewayError> {
    let now = cx.now_ms();
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
            cx.push(Effect::SharedSet {
                key: resolve::shared_key(hash),
                value: resolve::encode_shared(fresh_until, stale_until, body),
            });
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
            if let Ok(Some(bytes)) = cx.host.shared_get(&key) {
                if !bytes.is_empty() {
                    cx.push(Effect::SharedSet {
                        key,
                        value: Vec::new(),
                    });
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

/// A key's limits learned by another worker of this Envoy (shared data), adopted without a callout.
fn adopt_shared_limits(cx: &Cx, shared: &Shared, identity: &Identity) -> bool {
    let key = crate::limits::shared_key(&identity.key_id);
    match cx.host.shared_get(&key) {
        Ok(Some(record)) => shared.limits.borrow_mut().adopt_shared(
            &identity.key_id,
            &identity.org_id,
            &identity.config_id,
            &record,
            cx.now_ms(),
        ),
        _ => false,
    }
}

/// Shares the answers this VM learned with the other workers (at most one record per key per 10 s).
fn share_limits(cx: &mut Cx, shared: &Shared) {
    let records = shared.limits.borrow_mut().take_shared();
    for (key, value) in records {
        cx.push(Effect::SharedSet { key, value });
    }
}

fn health(host: &dyn Read, org: &str, provider: &str) -> fallback::Health {
    match host.shared_get(&fallback::health_key(org, provider)) {
        Ok(Some(b)) => fallback::Health::decode(&b),
        _ => fallback::Health::default(),
    }
}

/// Records one attempt's outcome for its provider (shared by all workers; last writer wins).
fn record_health(cx: &mut Cx, org: &str, provider: &str, ok: bool) {
    let next = health(cx.host, org, provider).after(ok, cx.now_ms());
    cx.push(Effect::SharedSet {
        key: fallback::health_key(org, provider),
        value: next.encode(),
    });
}

/// A key lookup on the sidecar.
fn resolve_call(sidecar: &SidecarPlan, hash: &str, purpose: Purpose) -> Effect {
    let body = resolve::request_body(hash);
    call_sidecar(
        sidecar,
        purpose,
        resolve::RESOLVE_PATH,
        body,
        sidecar.timeout_ms,
    )
}

/// A JSON POST to one of the sidecar's internal endpoints.
fn call_sidecar(
    sidecar: &SidecarPlan,
    purpose: Purpose,
    path: &str,
    body: Vec<u8>,
    timeout_ms: u64,
) -> Effect {
    Effect::Call(Box::new(Call {
        purpose,
        cluster: sidecar.cluster.clone(),
        headers: vec![
            (":method", "POST".into()),
            (":path", path.into()),
            (":authority", sidecar.authority.clone()),
            ("content-type", "application/json".into()),
            (resolve::TOKEN_HEADER, sidecar.token.clone()),
        ],
        body,
        timeout_ms,
    }))
}

/// A callout's answer: its `:status` (`None`: no answer — timeout, reset, no healthy sidecar) and its
/// body (`body_size` bytes; empty when it cannot be read).
pub fn call_answer(host: &dyn Read, body_size: usize) -> (Option<u32>, Vec<u8>) {
    let status = host
        .header(Map::CallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| hostapi::text(&s).trim().parse::<u32>().ok());
    let body = host
        .buffer(Buffer::CallResponseBody, 0, body_size)
        .unwrap_or_default();
    (status, body)
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
