//! Resolving gateway keys through the control-plane sidecar: the callout body, the answer, and the
//! per-VM cache that makes the steady state do no callout at all.
//!
//! Bounds: an identity is served from cache for the TTL the sidecar gives (revocations and config
//! changes take effect within it); past the TTL it is refreshed, and while the sidecar cannot be
//! reached it is served stale for at most `staleSeconds` more. Unknown keys are remembered for
//! `negativeTtlSeconds`.
//!
//! Hardening (issue 9 items 3 and 5):
//! - Unknown keys live only in a per-VM [`NegativeCache`] with a fixed capacity and an expiry; nothing
//!   is written to Envoy's shared data for an unknown key, so spraying random keys cannot grow memory.
//! - Lookups of keys found in no cache draw from a per-VM [`TokenBucket`]; past it the request gets a
//!   429 (`key_lookup_rate_limited`) without a callout.
//! - A [`Breaker`] per VM stops calling a sidecar that keeps failing or timing out: while it is open,
//!   cached identities (even stale) are served and unknown keys fail fast with 503.
//! - A stale identity is served at once and refreshed in the background by the root context
//!   ([`Refresher`]: at most one refresh in flight per key).

#[allow(unused_imports)]
use crate::prelude::*;

use crate::config::Identity;
use crate::error::GatewayError;
use alloc::rc::Rc;
use hashbrown::HashMap;

/// Internal endpoint of the sidecar.
pub const RESOLVE_PATH: &str = "/internal/v1/resolve";
/// Header carrying the shared internal token.
pub const TOKEN_HEADER: &str = "x-gateway-token";
/// Entries kept per VM before expired ones are swept (and, if needed, the cache is reset).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Fresh(Rc<Identity>),
    /// Past its TTL but within the stale bound: refresh, and use it if the sidecar is unreachable.
    Stale(Rc<Identity>),
    /// Recently answered "no such key".
    Unknown,
    Miss,
}

#[derive(Debug, Clone)]
enum Entry {
    Known {
        identity: Rc<Identity>,
        fresh_until: u64,
        stale_until: u64,
    },
}

/// Per-VM cache of resolved identities, keyed by key digest. Known keys and unknown keys are kept in
/// separate maps so that a flood of unknown keys can never evict the identities real callers use.
#[derive(Debug, Default)]
pub struct IdentityCache {
    map: HashMap<String, Entry>,
    unknown: NegativeCache,
}

impl IdentityCache {
    pub fn lookup(&self, hash: &str, now_ms: u64) -> Lookup {
        if self.unknown.contains(hash, now_ms) {
            return Lookup::Unknown;
        }
        match self.map.get(hash) {
            Some(Entry::Known {
                identity,
                fresh_until,
                stale_until,
            }) => {
                if now_ms < *fresh_until {
                    Lookup::Fresh(identity.clone())
                } else if now_ms < *stale_until {
                    Lookup::Stale(identity.clone())
                } else {
                    Lookup::Miss
                }
            }
            None => Lookup::Miss,
        }
    }

    pub fn store_known(
        &mut self,
        hash: &str,
        identity: Rc<Identity>,
        now_ms: u64,
        fresh_until: u64,
        stale_until: u64,
    ) {
        self.make_room(now_ms);
        self.unknown.remove(hash);
        self.map.insert(
            hash.to_string(),
            Entry::Known {
                identity,
                fresh_until,
                stale_until,
            },
        );
    }

    /// Remembers an unknown (or revoked) key; a known entry for it is dropped.
    pub fn store_unknown(&mut self, hash: &str, now_ms: u64, until: u64) {
        self.map.remove(hash);
        self.unknown.insert(hash, now_ms, until);
    }

    /// Known identities held (unknown keys are counted by [`IdentityCache::unknown_len`]).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn unknown_len(&self) -> usize {
        self.unknown.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn make_room(&mut self, now_ms: u64) {
        if self.map.len() < MAX_ENTRIES {
            return;
        }
        self.map.retain(|_, e| match e {
            Entry::Known { stale_until, .. } => *stale_until > now_ms,
        });
        if self.map.len() >= MAX_ENTRIES {
            self.map.clear();
        }
    }
}

/// Unknown keys remembered per VM: at most `capacity` entries, each until its expiry. When full,
/// expired entries are swept; if none expired, the unknown keys are forgotten (a sprayer only
/// displaces other unknown keys, never a known identity). Memory is bounded by `capacity` × (digest + 8 bytes).
#[derive(Debug)]
pub struct NegativeCache {
    map: HashMap<String, u64>,
    capacity: usize,
}

/// Unknown keys remembered per VM.
pub const NEGATIVE_CAPACITY: usize = 4096;

impl Default for NegativeCache {
    fn default() -> Self {
        NegativeCache::new(NEGATIVE_CAPACITY)
    }
}

impl NegativeCache {
    pub fn new(capacity: usize) -> Self {
        NegativeCache {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, hash: &str, now_ms: u64) -> bool {
        self.map.get(hash).is_some_and(|until| now_ms < *until)
    }

    pub fn insert(&mut self, hash: &str, now_ms: u64, until: u64) {
        if self.map.len() >= self.capacity && !self.map.contains_key(hash) {
            self.map.retain(|_, u| *u > now_ms);
            if self.map.len() >= self.capacity {
                // Every remembered key is live: start over (amortised O(1); only sprayed keys go).
                self.map.clear();
            }
        }
        self.map.insert(hash.to_string(), until);
    }

    pub fn remove(&mut self, hash: &str) {
        self.map.remove(hash);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A token bucket (per VM) limiting sidecar lookups of keys that are in no cache.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_ms: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// `burst` lookups at once, refilled at `per_second`.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            capacity,
            per_ms: f64::from(per_second) / 1000.0,
            tokens: capacity,
            last_ms: 0,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        if now_ms > self.last_ms {
            let elapsed = (now_ms - self.last_ms) as f64;
            self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
            self.last_ms = now_ms;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Circuit breaker on the sidecar (per VM). Closed: calls go out. After `threshold` consecutive
/// failures (timeouts, resets, 5xx) it opens for `cooldown_ms`: no calls. Then one probe call is let
/// through (half-open); its success closes the breaker, its failure opens it again.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown_ms: u64,
    /// A probe that got no answer within this long no longer blocks the next one.
    probe_timeout_ms: u64,
    failures: u32,
    state: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open { until: u64 },
    HalfOpen { since: u64 },
}

impl Breaker {
    pub fn new(threshold: u32, cooldown_ms: u64, probe_timeout_ms: u64) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown_ms,
            probe_timeout_ms,
            failures: 0,
            state: BreakerState::Closed,
        }
    }

    /// Whether a call to the sidecar may go out now (a `true` in half-open state is the probe).
    pub fn allow(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } if now_ms < until => false,
            BreakerState::Open { .. } => {
                self.state = BreakerState::HalfOpen { since: now_ms };
                true
            }
            BreakerState::HalfOpen { since } => {
                if now_ms.saturating_sub(since) >= self.probe_timeout_ms {
                    self.state = BreakerState::HalfOpen { since: now_ms };
                    true
                } else {
                    false
                }
            }
        }
    }

    pub fn is_open(&self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => false,
            BreakerState::Open { until } => now_ms < until,
            BreakerState::HalfOpen { .. } => true,
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A failed call (timeout, reset, 5xx). A failed probe reopens the breaker at once.
    pub fn failure(&mut self, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        let probing = matches!(self.state, BreakerState::HalfOpen { .. });
        if probing || self.failures >= self.threshold {
            self.state = BreakerState::Open {
                until: now_ms.saturating_add(self.cooldown_ms),
            };
        }
    }
}

/// Background refreshes of stale identities, done by the root context: at most one in flight per key
/// and at most `capacity` keys waiting.
#[derive(Debug)]
pub struct Refresher {
    waiting: Vec<String>,
    /// Key digest → when its refresh was sent.
    in_flight: HashMap<String, u64>,
    capacity: usize,
    timeout_ms: u64,
}

impl Refresher {
    pub fn new(capacity: usize, timeout_ms: u64) -> Self {
        Refresher {
            waiting: Vec::new(),
            in_flight: HashMap::new(),
            capacity: capacity.max(1),
            timeout_ms,
        }
    }

    /// Asks for a refresh of `hash`; false if one is already waiting or in flight (or no room).
    pub fn request(&mut self, hash: &str, now_ms: u64) -> bool {
        if let Some(sent) = self.in_flight.get(hash) {
            if now_ms.saturating_sub(*sent) < self.timeout_ms {
                return false;
            }
            self.in_flight.remove(hash);
        }
        if self.waiting.iter().any(|h| h == hash) || self.waiting.len() >= self.capacity {
            return false;
        }
        self.waiting.push(hash.to_string());
        true
    }

    /// The keys to refresh now (up to `max`), marked in flight.
    pub fn take(&mut self, max: usize, now_ms: u64) -> Vec<String> {
        let n = self.waiting.len().min(max);
        let out: Vec<String> = self.waiting.drain(..n).collect();
        for h in &out {
            self.in_flight.insert(h.clone(), now_ms);
        }
        out
    }

    /// The refresh of `hash` finished (answered or failed).
    pub fn finished(&mut self, hash: &str) {
        self.in_flight.remove(hash);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The first provider of `identity` (selectable or fallback-only) whose destination `policy` refuses,
/// as `(provider, reason)`. Checked once when the sidecar's answer arrives (issue 9 item 4: the API
/// refuses such registrations, and the filter refuses them again in case the database was written
/// some other way or the policies differ).
pub fn refused_destination(
    identity: &Identity,
    policy: &crate::destination::Policy,
) -> Option<(String, String)> {
    identity
        .providers
        .iter()
        .chain(identity.fallback_providers.iter())
        .find_map(|p| {
            let scheme = if p.base.tls { "https" } else { "http" };
            let url = format!("{scheme}://{}{}", p.base.authority, p.base.path);
            policy
                .check_url(&url, p.is_hosted)
                .err()
                .map(|reason| (p.name.clone(), reason))
        })
}

/// What to do with a key that is not a static one, before any callout: the VM cache's answer
/// combined with the shared-data record other workers wrote.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    /// Serve this identity. `store`: the record came from shared data, keep it in the VM cache with
    /// these `(fresh_until, stale_until)` bounds. `refresh`: it is stale, refresh it in the background.
    Serve {
        identity: Rc<Identity>,
        store: Option<(u64, u64)>,
        refresh: bool,
    },
    /// Recently answered "no such key".
    Unknown,
    /// Ask the sidecar (rate limit and breaker permitting).
    LookUp,
}

/// Decides from the VM cache lookup and the shared record (`None`: no record). A stale entry of our
/// own is served at once (refresh in the background) unless another worker emptied the shared record
/// (the key was revoked): then it is looked up again, never served stale. The shared record is only
/// decoded when it can help (we have nothing, or it is fresher than our stale entry).
pub fn decide(
    cached: Lookup,
    shared: Option<&[u8]>,
    now_ms: u64,
    policy: &crate::destination::Policy,
) -> Cached {
    let stale = match cached {
        Lookup::Fresh(identity) => {
            return Cached::Serve {
                identity,
                store: None,
                refresh: false,
            }
        }
        Lookup::Unknown => return Cached::Unknown,
        Lookup::Stale(identity) => Some(identity),
        Lookup::Miss => None,
    };
    let revoked = shared.is_some_and(<[u8]>::is_empty);
    if let Some(bytes) = shared {
        let newer = match (&stale, shared_bounds(bytes)) {
            (Some(_), Some((fresh_until, _))) => now_ms < fresh_until,
            _ => true,
        };
        if newer {
            if let Some((fresh_until, stale_until, mut identity)) = decode_shared(bytes) {
                if now_ms < stale_until {
                    identity.refused = refused_destination(&identity, policy);
                    return Cached::Serve {
                        identity: Rc::new(identity),
                        store: Some((fresh_until, stale_until)),
                        refresh: now_ms >= fresh_until,
                    };
                }
            }
        }
    }
    match stale {
        Some(identity) if !revoked => Cached::Serve {
            identity,
            store: None,
            refresh: true,
        },
        _ => Cached::LookUp,
    }
}

/// Body of the resolve callout.
pub fn request_body(hash: &str) -> Vec<u8> {
    format!("{{\"keySha256\":\"{hash}\"}}").into_bytes()
}

/// What the sidecar said about a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Known {
        identity: Box<Identity>,
        ttl_ms: u64,
    },
    Unknown,
}

/// The sidecar's answer (`identity`, `ttlSeconds`, `storePrompts`, `prices`; other fields ignored).
struct ResolveAnswer {
    identity: Identity,
    ttl_seconds: u64,
    store_prompts: bool,
    prices: alloc::collections::BTreeMap<String, crate::config::Price>,
}

impl ResolveAnswer {
    fn parse(body: &[u8]) -> crate::read::Res<ResolveAnswer> {
        crate::read::document(body, |o| {
            Ok(ResolveAnswer {
                identity: Identity::read(o.req(&["identity"])?, "identity")?,
                ttl_seconds: o.uint_or(&["ttlSeconds"], u64::MAX, default_ttl()),
                store_prompts: o.bool_or(&["storePrompts"], false),
                prices: o.entries(&["prices"], crate::config::Price::read),
            })
        })
    }

    fn into_identity(self) -> Identity {
        let mut identity = self.identity;
        identity.store_prompts = self.store_prompts;
        identity.prices = self.prices;
        identity
    }
}

fn default_ttl() -> u64 {
    30
}

/// Interprets the sidecar's answer. `status` is `None` when the callout failed (timeout, reset, no
/// healthy sidecar).
pub fn parse_answer(status: Option<u32>, body: &[u8]) -> Result<Resolved, GatewayError> {
    match status {
        Some(200) => {
            let a =
                ResolveAnswer::parse(body).map_err(|_| GatewayError::ControlPlaneUnavailable)?;
            let ttl_ms = a.ttl_seconds.saturating_mul(1000);
            Ok(Resolved::Known {
                identity: Box::new(a.into_identity()),
                ttl_ms,
            })
        }
        Some(404) => Ok(Resolved::Unknown),
        _ => Err(GatewayError::ControlPlaneUnavailable),
    }
}

/// Shared-data record (one per key, visible to every worker VM): the validity bounds, then the
/// sidecar's answer as it came.
pub fn encode_shared(fresh_until: u64, stale_until: u64, answer: &[u8]) -> Vec<u8> {
    let mut v = format!("{fresh_until},{stale_until}\n").into_bytes();
    v.extend_from_slice(answer);
    v
}

/// The validity bounds of a shared-data record without decoding the identity.
pub fn shared_bounds(bytes: &[u8]) -> Option<(u64, u64)> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let head = core::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (f, s) = head.split_once(',')?;
    Some((f.parse().ok()?, s.parse().ok()?))
}

/// Decodes a shared-data record: `(fresh_until, stale_until, identity)`.
pub fn decode_shared(bytes: &[u8]) -> Option<(u64, u64, Identity)> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let head = core::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (f, s) = head.split_once(',')?;
    let answer = ResolveAnswer::parse(bytes.get(nl + 1..)?).ok()?;
    Some((f.parse().ok()?, s.parse().ok()?, answer.into_identity()))
}

/// Shared-data key for a key digest.
pub fn shared_key(hash: &str) -> String {
    format!("llm-gateway/identity/{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"{"identity":{"keyId":"k1","orgId":"o1","configId":"c1","clusterId":null,
      "keySettings":{},"orgSettings":{"provider":"p"},
      "providers":[{"name":"p","kind":"OPENAI","base":{"tls":true,"authority":"api.openai.com","path":"/v1"},
        "models":[{"name":"m","upstream":"m"}],"isHosted":false,"apiKey":"sk-secret-9999",
        "envoyCluster":"llm_gateway_dfp_https","fallback":[]}]},"ttlSeconds":7,"storePrompts":true}"#;

    #[test]
    fn parses_answers() {
        match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, ttl_ms } => {
                assert_eq!(ttl_ms, 7000);
                assert_eq!(identity.org_id, "o1");
                assert_eq!(
                    identity.providers[0].api_key.as_deref(),
                    Some("sk-secret-9999")
                );
                assert_eq!(identity.org_settings.provider.as_deref(), Some("p"));
                assert!(identity.store_prompts);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_answer(Some(404), b"{}").unwrap(), Resolved::Unknown);
        for (status, body) in [
            (Some(401), &b"{}"[..]),
            (Some(500), b""),
            (None, b""),
            (Some(200), b"{"),
        ] {
            assert_eq!(
                parse_answer(status, body).unwrap_err(),
                GatewayError::ControlPlaneUnavailable
            );
        }
    }

    #[test]
    fn cache_fresh_stale_and_unknown() {
        let identity: Rc<Identity> = match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, .. } => Rc::from(identity),
            _ => unreachable!(),
        };
        let mut c = IdentityCache::default();
        assert_eq!(c.lookup("h", 0), Lookup::Miss);
        c.store_known("h", identity.clone(), 0, 1000, 5000);
        assert_eq!(c.lookup("h", 999), Lookup::Fresh(identity.clone()));
        assert_eq!(c.lookup("h", 1000), Lookup::Stale(identity.clone()));
        assert_eq!(c.lookup("h", 5000), Lookup::Miss);
        c.store_unknown("x", 0, 100);
        assert_eq!(c.lookup("x", 99), Lookup::Unknown);
        assert_eq!(c.lookup("x", 100), Lookup::Miss);
    }

    #[test]
    fn unknown_keys_are_bounded_and_never_evict_known_ones() {
        let identity: Rc<Identity> = match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, .. } => Rc::from(identity),
            _ => unreachable!(),
        };
        let mut c = IdentityCache::default();
        c.store_known("real", identity.clone(), 0, 1_000_000, 2_000_000);
        for i in 0..(NEGATIVE_CAPACITY * 5) {
            c.store_unknown(&format!("k{i}"), i as u64, i as u64 + 5000);
        }
        assert_eq!(c.unknown_len(), NEGATIVE_CAPACITY);
        assert_eq!(c.len(), 1);
        assert_eq!(c.lookup("real", 10), Lookup::Fresh(identity.clone()));
        // The newest unknown keys are the ones remembered; the oldest were displaced.
        let last = NEGATIVE_CAPACITY * 5 - 1;
        assert_eq!(c.lookup(&format!("k{last}"), last as u64), Lookup::Unknown);
        assert_eq!(c.lookup("k0", last as u64), Lookup::Miss);
        // Expired entries are swept before anything live is displaced.
        let mut n = NegativeCache::new(3);
        n.insert("a", 0, 10);
        n.insert("b", 0, 100);
        n.insert("c", 0, 100);
        n.insert("d", 50, 150);
        assert!(!n.contains("a", 50) && n.contains("b", 50) && n.contains("d", 50));
        assert_eq!(n.len(), 3);
        n.insert("e", 60, 150);
        assert!(n.contains("e", 60) && n.len() == 1);
        // A revoked key: known → unknown, and back when the sidecar knows it again.
        c.store_unknown("real", 20, 30);
        assert_eq!(c.lookup("real", 21), Lookup::Unknown);
        c.store_known("real", identity.clone(), 40, 100, 200);
        assert_eq!(c.lookup("real", 41), Lookup::Fresh(identity));
    }

    #[test]
    fn known_entries_are_bounded() {
        let identity: Rc<Identity> = match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, .. } => Rc::from(identity),
            _ => unreachable!(),
        };
        let mut c = IdentityCache::default();
        for i in 0..(MAX_ENTRIES + 10) {
            c.store_known(&format!("k{i}"), identity.clone(), 0, 5, 10);
        }
        assert!(c.len() <= MAX_ENTRIES);
        c.store_known("live", identity.clone(), 20, 50, 100);
        assert_eq!(c.lookup("live", 21), Lookup::Fresh(identity));
    }

    #[test]
    fn token_bucket_limits_lookups() {
        let mut b = TokenBucket::new(10, 5);
        let taken = (0..20).filter(|_| b.try_take(1000)).count();
        assert_eq!(taken, 5, "burst");
        assert!(!b.try_take(1050));
        assert!(b.try_take(1100), "one token per 100 ms at 10/s");
        assert!(!b.try_take(1100));
        // Refill never exceeds the burst.
        let taken = (0..20).filter(|_| b.try_take(100_000)).count();
        assert_eq!(taken, 5);
        let mut zero = TokenBucket::new(0, 1);
        assert!(zero.try_take(0) && !zero.try_take(1_000_000));
    }

    #[test]
    fn breaker_opens_cools_down_and_probes() {
        let mut b = Breaker::new(3, 1000, 500);
        assert!(b.allow(0));
        b.failure(0);
        b.failure(1);
        assert!(b.allow(2) && !b.is_open(2));
        b.failure(2);
        assert!(b.is_open(3) && !b.allow(3) && !b.allow(1001));
        // Cool-down over: one probe, the others wait for it.
        assert!(b.allow(1002));
        assert!(!b.allow(1003));
        // The probe failed: open again at once.
        b.failure(1100);
        assert!(!b.allow(1200) && !b.allow(2099));
        assert!(b.allow(2100));
        // A probe that never answers stops blocking after the probe timeout.
        assert!(!b.allow(2500) && b.allow(2600));
        b.success();
        assert!(b.allow(2601) && b.allow(2602) && !b.is_open(2602));
        // Success resets the count.
        b.failure(3000);
        b.failure(3000);
        b.success();
        b.failure(3000);
        assert!(b.allow(3001));
    }

    #[test]
    fn refresher_single_flight() {
        let mut r = Refresher::new(2, 1000);
        assert!(r.request("a", 0));
        assert!(!r.request("a", 0), "already waiting");
        assert!(r.request("b", 0));
        assert!(!r.request("c", 0), "no room");
        assert_eq!(r.take(10, 0), vec!["a".to_string(), "b".to_string()]);
        assert!(!r.request("a", 500), "in flight");
        assert_eq!(r.in_flight(), 2);
        r.finished("a");
        assert!(r.request("a", 600));
        // A refresh that never finished stops blocking after the timeout.
        assert!(r.request("b", 1000));
        assert_eq!(r.take(1, 1000), vec!["a".to_string()]);
    }

    #[test]
    fn decides_from_vm_cache_and_shared_record() {
        use crate::destination::Policy;
        let policy = Policy::default();
        let identity: Rc<Identity> = match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, .. } => Rc::from(identity),
            _ => unreachable!(),
        };
        let serve = |c: Cached| match c {
            Cached::Serve { store, refresh, .. } => Some((store, refresh)),
            _ => None,
        };
        // Fresh in the VM: served, nothing else looked at.
        let c = decide(Lookup::Fresh(identity.clone()), Some(b""), 10, &policy);
        assert_eq!(serve(c), Some((None, false)));
        assert_eq!(decide(Lookup::Unknown, None, 10, &policy), Cached::Unknown);
        // Nothing anywhere: look it up.
        assert_eq!(decide(Lookup::Miss, None, 10, &policy), Cached::LookUp);
        // Another worker resolved it: take its record (fresh, or stale with a refresh).
        let rec = encode_shared(100, 200, ANSWER.as_bytes());
        assert_eq!(
            serve(decide(Lookup::Miss, Some(&rec), 10, &policy)),
            Some((Some((100, 200)), false))
        );
        assert_eq!(
            serve(decide(Lookup::Miss, Some(&rec), 150, &policy)),
            Some((Some((100, 200)), true))
        );
        assert_eq!(
            decide(Lookup::Miss, Some(&rec), 250, &policy),
            Cached::LookUp
        );
        // Our entry is stale: served at once with a background refresh...
        let st = Lookup::Stale(identity.clone());
        assert_eq!(
            serve(decide(st.clone(), None, 150, &policy)),
            Some((None, true))
        );
        // ...or replaced by a fresher shared record...
        let newer = encode_shared(300, 400, ANSWER.as_bytes());
        assert_eq!(
            serve(decide(st.clone(), Some(&newer), 150, &policy)),
            Some((Some((300, 400)), false))
        );
        // ...an equally stale shared record is not decoded (a garbage body proves it)...
        assert_eq!(
            serve(decide(st.clone(), Some(b"100,200\n{garbage"), 150, &policy)),
            Some((None, true))
        );
        // ...and a record emptied by a revocation elsewhere sends us to the sidecar.
        assert_eq!(decide(st, Some(b""), 150, &policy), Cached::LookUp);
        // A forbidden destination is marked on a shared record too.
        let bad = ANSWER.replace("api.openai.com", "127.0.0.1:9901");
        let rec = encode_shared(100, 200, bad.as_bytes());
        match decide(Lookup::Miss, Some(&rec), 10, &policy) {
            Cached::Serve { identity, .. } => assert!(identity.refused.is_some()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn destinations_are_checked() {
        use crate::destination::Policy;
        let id = match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, .. } => identity,
            _ => unreachable!(),
        };
        assert_eq!(refused_destination(&id, &Policy::default()), None);
        let mut bad = (*id).clone();
        bad.providers[0].base.authority = "169.254.169.254".into();
        let (p, reason) = refused_destination(&bad, &Policy::parse("169.254.0.0/16").unwrap())
            .expect("metadata endpoints are never allowed");
        assert_eq!(p, "p");
        assert!(!reason.is_empty());
        bad.providers[0].base.authority = "127.0.0.1:9901".into();
        assert!(refused_destination(&bad, &Policy::default()).is_some());
        assert!(refused_destination(&bad, &Policy::parse("127.0.0.1").unwrap()).is_none());
        // Private addresses: hosted providers only.
        bad.providers[0].base.authority = "10.1.2.3:8000".into();
        assert!(refused_destination(&bad, &Policy::default()).is_some());
        bad.providers[0].is_hosted = true;
        assert!(refused_destination(&bad, &Policy::default()).is_none());
    }

    #[test]
    fn shared_records_round_trip() {
        let rec = encode_shared(11, 22, ANSWER.as_bytes());
        let (f, s, id) = decode_shared(&rec).unwrap();
        assert_eq!((f, s, id.key_id.as_str()), (11, 22, "k1"));
        assert!(decode_shared(b"garbage").is_none());
        assert!(decode_shared(b"1,2\n{}").is_none());
        assert_eq!(shared_bounds(&rec), Some((11, 22)));
        assert_eq!(shared_bounds(b"x"), None);
        assert_eq!(request_body("ab"), br#"{"keySha256":"ab"}"#.to_vec());
    }
}
